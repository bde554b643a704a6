"""``anonfolio report TRACE --out DIR``: one trace under a grid of THP
settings, as a page a person reads in a browser (docs/report.md).

:func:`report` replays the trace once per setting (:mod:`anonfolio.grid`;
by default order 0 only, each mTHP size alone, every mTHP size, 2048kB
alone, every size with 2048kB) and writes

- ``DIR/index.html``: a summary table, plots (faults; final and peak
  resident memory; their growth over order 0; folios mapped by size;
  fallbacks by size; virtual time when the results carry it) as inline SVG,
  and a table of every figure per setting;
- ``DIR/report.csv``: one row a setting, the flat columns of
  :meth:`anonfolio.frame.SweepResult.to_csv`.

Growth is measured against the trace under order 0 only (every size
``never``) with the same other settings; that run is added when the grid
has none.
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any, NamedTuple, Optional

from . import _anonfolio
from .api import _Job, _trace_text, run_jobs
from .config import THP_SIZES, Config
from .frame import SweepResult, flatten
from .stats import Stats, format_bytes

__all__ = ["report", "Report", "BASELINE_LABEL"]

#: The label of the order-0 run that growth is measured against.
BASELINE_LABEL = "order 0"

_SIZES = tuple(s for s in THP_SIZES if s != "8kB")


class Report(NamedTuple):
    """What :func:`report` wrote: the folder, its two files, and the results
    (the baseline first if it was added)."""

    out: str
    html: str
    csv: str
    results: SweepResult
    #: The names of the plots on the page, in order.
    plots: tuple[str, ...]


def _is_order0(cfg: Config) -> bool:
    return all(m == "never" for s, m in cfg.hugepages.items() if s != "8kB")


def report(
    trace: Any,
    out: str,
    settings: Sequence[tuple[str, Config]],
    *,
    threads: int = 1,
    deterministic: Optional[int] = None,
    executor: Optional[Executor] = None,
    progress: Optional[bool] = None,
    title: Optional[str] = None,
) -> Report:
    """Replays ``trace`` (text, a path or a file name) under each (label,
    Config) of ``settings`` and writes ``out/index.html`` and
    ``out/report.csv``."""
    text = _trace_text(trace)
    _anonfolio.check_trace(text)  # a bad trace stops before anything is written
    name = os.fspath(trace) if isinstance(trace, os.PathLike) or (isinstance(trace, str) and "\n" not in trace) \
        else "<text>"
    points = list(settings)
    if not any(_is_order0(c) for _, c in points):
        first = points[0][1] if points else Config()
        base = first.replace(hugepages=dict.fromkeys(_SIZES, "never"))
        points.insert(0, (BASELINE_LABEL, base))
    kw: dict[str, Any] = {"threads": threads, "deterministic": deterministic}
    jobs = [_Job(cfg, None, None, kw, dict(label=label, config=cfg, trace=name, **kw), text) for label, cfg in points]
    results = SweepResult(run_jobs(jobs, executor=executor, progress=progress, desc="report"))
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "report.csv")
    results.to_csv(csv_path)
    page, plots = _page(results, title or f"anonfolio report: {name}", name, text)
    html_path = os.path.join(out, "index.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(page)
    return Report(out=out, html=html_path, csv=csv_path, results=results, plots=plots)


# ---------------------------------------------------------------------------
# Figures


def _baseline(results: Sequence[Stats]) -> Stats:
    for s in results:
        if _is_order0(s.params["config"]):
            return s
    return results[0]


def _growth(v: float, base: float) -> Optional[float]:
    return None if base == 0 else 100.0 * (v - base) / base


def _fmt_growth(g: Optional[float]) -> str:
    return "n/a" if g is None else f"{g:+.1f}%"


def _large_folios(s: Stats) -> int:
    return int(sum(int(n) for order, n in enumerate(s.folio_orders) if order >= 2))


def _fallbacks(s: Stats) -> int:
    return sum(int(s.mthp[z].anon_fault_fallback) for z in s.mthp)


# ---------------------------------------------------------------------------
# Plots: matplotlib, drawn as SVG and put inline in the page.


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _figure(n: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(8.0, 0.9 + 0.32 * n))


#: One colour per folio size, the same in every plot (matplotlib's tab10).
_SIZE_ORDER = ("4kB", *_SIZES)


def _colour(name: str) -> Optional[str]:
    size = name.split()[0]
    if size not in _SIZE_ORDER:
        return None
    return f"C{_SIZE_ORDER.index(size) % 10}"


def _hbar(labels: list[str], series: Sequence[tuple[str, Sequence[float]]], xlabel: str, title: str,
          stacked: bool = False) -> str:
    import numpy as np

    fig, ax = _figure(len(labels))
    y = np.arange(len(labels))
    if stacked:
        left = np.zeros(len(labels))
        for name, vals in series:
            ax.barh(y, vals, left=left, label=name, color=_colour(name),
                    hatch="//" if name.endswith("charge") else None)
            left += np.asarray(vals, dtype=float)
    else:
        h = 0.8 / max(1, len(series))
        for i, (name, vals) in enumerate(series):
            ax.barh(y - 0.4 + h * (i + 0.5), vals, height=h, label=name)
    if not any(v for _, vals in series for v in vals):
        ax.set_xlim(0, 1)
        ax.text(0.5, 0.5, "zero under every setting", transform=ax.transAxes, ha="center", va="center",
                fontsize=11, color="#555")
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="best")
    return _svg(fig)


def _plots(results: Sequence[Stats]) -> list[tuple[str, str, str]]:
    """(name, caption, svg) of every plot."""
    labels = [str(s.params["label"]) for s in results]
    base = _baseline(results)
    mib = float(1 << 20)
    out = []
    out.append(("faults", "Page faults handled (pgfault) per setting.",
                _hbar(labels, [("faults", [s.faults for s in results])], "faults", "Faults")))
    out.append(("rss", "Resident anonymous memory at the end and at its peak (mm->hiwater_rss).",
                _hbar(labels, [("final", [s.rss_bytes / mib for s in results]),
                               ("peak", [int(s["rss_peak_bytes"]) / mib for s in results])],
                      "MiB", "Resident memory")))
    g_final = [_growth(s.rss_bytes, base.rss_bytes) or 0.0 for s in results]
    g_peak = [_growth(int(s["rss_peak_bytes"]), int(base["rss_peak_bytes"])) or 0.0 for s in results]
    out.append(("rss-growth", f"Growth of resident memory over the order-0 run ({base.params['label']}), "
                "in percent: the memory large folios cost.",
                _hbar(labels, [("final", g_final), ("peak", g_peak)], "% over order 0",
                      "Resident memory growth over order 0")))
    orders = [(o, "4kB" if o == 0 else _anonfolio.size_name(o)) for o in range(len(results[0].folio_orders))
              if o != 1 and any(int(s.folio_orders[o]) for s in results)]
    out.append(("folios", "Folios mapped by faults over the run, by size (cumulative: a folio freed "
                "and faulted again counts twice).",
                _hbar(labels, [(n, [int(s.folio_orders[o]) for s in results]) for o, n in orders] or
                      [("none", [0 for _ in results])], "folios", "Folios mapped by size", stacked=True)))
    fb = [(z, [int(s.mthp[z].anon_fault_fallback) for s in results]) for z in _SIZES]
    fb = [x for x in fb if any(x[1])]
    fbc = [(f"{z} charge", [int(s.mthp[z].anon_fault_fallback_charge) for s in results]) for z in _SIZES]
    fbc = [x for x in fbc if any(x[1])]
    out.append(("fallbacks", "Faults that could not get a folio of a size and fell back to a smaller one "
                "(anon_fault_fallback; 'charge': the memcg charge failed), by size.",
                _hbar(labels, (fb + fbc) or [("none", [0 for _ in results])], "fallbacks",
                      "Fallbacks by size", stacked=True)))
    if all("time" in s for s in results):
        out.append(("time", "Virtual time of the run (--time), from start to the last CPU's end.",
                    _hbar(labels, [("elapsed", [float(s["time"]["elapsed_ns"]) / 1e6 for s in results])],
                          "virtual ms", "Virtual time")))
    return out


# ---------------------------------------------------------------------------
# The page

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; position: sticky; top: 0; }
.figure { margin: 1.5em 0; } .figure svg { max-width: 100%; height: auto; }
.caption { color: #555; font-size: 0.9em; }
code { background: #f4f4f4; padding: 0 3px; }
.wide { overflow-x: auto; }
"""


def _table(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


def _summary(results: Sequence[Stats]) -> str:
    base = _baseline(results)
    head = ["setting", "faults", "faults vs order 0", "RSS final", "growth", "RSS peak", "growth",
            "large folios mapped", "fallbacks", "split_deferred", "simulated in (s)"]
    rows = []
    for s in results:
        peak, bpeak = int(s["rss_peak_bytes"]), int(base["rss_peak_bytes"])
        rows.append([
            str(s.params["label"]), f"{s.faults:,}", _fmt_growth(_growth(s.faults, base.faults)),
            format_bytes(s.rss_bytes), _fmt_growth(_growth(s.rss_bytes, base.rss_bytes)),
            format_bytes(peak), _fmt_growth(_growth(peak, bpeak)),
            f"{_large_folios(s):,}", f"{_fallbacks(s):,}",
            f"{sum(int(s.mthp[z].split_deferred) for z in s.mthp):,}", f"{s.elapsed_s:.4f}",
        ])
    return _table(head, rows)


def _settings_table(results: Sequence[Stats]) -> str:
    head = ["setting", "enabled", *_SIZES, "policy"]
    rows = []
    for s in results:
        c: Config = s.params["config"]
        rows.append([str(s.params["label"]), c.enabled, *[c.hugepages[z] for z in _SIZES], c.policy])
    return _table(head, rows)


def _every_figure(results: Sequence[Stats]) -> str:
    flat = [flatten(s) for s in results]
    keys: dict[str, None] = {}
    for r in flat:
        keys.update(dict.fromkeys(k for k in r if not k.startswith("config.") and k not in
                                  ("label", "trace", "threads", "deterministic")))
    head = ["figure", *[str(s.params["label"]) for s in results]]
    rows = []
    for k in keys:
        vals = [r.get(k, "") for r in flat]
        if k.startswith("mthp.") and not any(vals):
            continue  # a size nothing touched: all its counters are zero
        rows.append([k, *[f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else
                          (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in vals]])
    return _table(head, rows)


def _page(results: Sequence[Stats], title: str, name: str, text: str) -> tuple[str, tuple[str, ...]]:
    plots = _plots(results)
    lines = sum(1 for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#"))
    base = _baseline(results)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Trace <code>{html.escape(name)}</code>, {lines:,} operations, replayed by the simulator "
        f"(anonfolio {html.escape(_anonfolio.__version__)}) under {len(results)} settings. Growth is "
        f"measured against <em>{html.escape(str(base.params['label']))}</em> (every size never). Faults, "
        "RSS and the per-size counters are the kernel's figures as the simulator computes them; "
        "“simulated in” is the simulator's own wall time, not a kernel figure. Every figure is explained "
        "in docs/json.md of the anonfolio repository.</p>",
        "<h2>Summary</h2>", _summary(results),
        "<h2>Plots</h2>",
    ]
    for pname, caption, svg in plots:
        parts.append(f'<div class="figure" id="plot-{pname}">{svg}<p class="caption">{html.escape(caption)}</p></div>')
    parts += ["<h2>Settings</h2>", _settings_table(results),
              "<h2>Every figure</h2>", "<p>Counters named as the kernel names them; <code>folio_orders.*</code> "
              "and the <code>anon_fault_*</code> counters are cumulative over the run, <code>nr_anon</code> "
              "and <code>rss_bytes</code> are what is held at the end. The same table is in "
              "<code>report.csv</code>.</p>", '<div class="wide">', _every_figure(results), "</div></body></html>"]
    return "\n".join(parts) + "\n", tuple(p[0] for p in plots)
