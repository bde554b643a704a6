"""Canned experiments that write tables and plots.

``race-policies``: what a lost race costs under each fault-path policy.
Runs ``upstream``, ``v1`` and ``preferred`` with 1, 2 and 4 threads, each
thread either on its own slice (``disjoint``) or taking turns page by page
over the same range (``interleaved``: the case where two CPUs fault in the
same folio-sized range at once), and writes into ``out``:

- ``results.csv``: one row per run (every repeat);
- ``results.md``: the medians per point, and what the columns mean;
- ``races.png``, ``faults.png``, ``throughput.png``, ``ptl.png``,
  ``folio-sizes.png`` (if matplotlib is installed).
"""

from __future__ import annotations

import csv
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional, TextIO, Union

import numpy as np

from . import _anonfolio, plot
from .api import Simulator
from .config import POLICIES, Config
from .stats import Stats, format_bytes

__all__ = ["race_policies", "RACE_POLICIES_CONFIG", "COLUMNS"]

#: The THP knobs of ``race-policies`` unless told otherwise: three mTHP sizes
#: on, PMD THP off, so faults race for 16kB..256kB ranges.
RACE_POLICIES_CONFIG = Config(
    enabled="madvise",
    hugepages={"16kB": "always", "64kB": "always", "256kB": "always", "2048kB": "never"},
)

#: CSV columns, in order, and what they mean (also written to results.md).
COLUMNS: dict[str, str] = {
    "policy": "fault-path policy",
    "sharing": "disjoint: a slice per thread; interleaved: turns page by page",
    "threads": "simulated CPUs, each on a host thread (or interleaved deterministically)",
    "repeat": "repeat index",
    "faults": "page faults (pgfault)",
    "races": "re-checks under the PTL that found the range no longer empty",
    "retries": "v1: retries one order lower inside the same fault",
    "refaults": "faults that returned without mapping and faulted again",
    "folios_wasted": "folios allocated and zeroed, then freed unused after a lost race",
    "pages_wasted": "their pages (zeroed for nothing)",
    "ptl_contended": "split PTE-table lock acquisitions that found it held",
    "ptl_spins": "spin iterations waiting for PTE-table locks",
    "zone_contended": "zone->lock acquisitions that found it held",
    "rss_bytes": "resident anonymous bytes at the end",
    "mean_folio_kb": "mean size of the folios faults mapped, KiB",
    "elapsed_s": "wall seconds simulating",
    "faults_per_s": "faults / elapsed_s",
}

_MEDIAN_COLS = [c for c in COLUMNS if c not in ("policy", "sharing", "threads", "repeat")]


def _row(policy: str, sharing: str, threads: int, rep: int, s: Stats) -> dict[str, Any]:
    fo = s.folio_orders.astype(float)
    folios = fo.sum()
    mean_kb = float((fo * 4.0 * 2.0 ** np.arange(len(fo))).sum() / folios) if folios else 0.0
    return {
        "policy": policy,
        "sharing": sharing,
        "threads": threads,
        "repeat": rep,
        "faults": s.faults,
        "races": s.races["races"],
        "retries": s.races["retries"],
        "refaults": s.races["refaults"],
        "folios_wasted": s.races["folios_wasted"],
        "pages_wasted": s.races["pages_wasted"],
        "ptl_contended": s.locks.ptl.contended,
        "ptl_spins": s.locks.ptl.spins,
        "zone_contended": s.locks.zone_lock.contended,
        "rss_bytes": s.rss_bytes,
        "mean_folio_kb": round(mean_kb, 1),
        "elapsed_s": round(s.elapsed_s, 6),
        "faults_per_s": round(s.faults / s.elapsed_s) if s.elapsed_s > 0 else 0,
    }


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: rows[0][k] for k in ("policy", "sharing", "threads")}
    for c in _MEDIAN_COLS:
        m = statistics.median(r[c] for r in rows)
        out[c] = int(m) if float(m).is_integer() and c not in ("elapsed_s",) else round(m, 6)
    return out


def race_policies(
    out: Union[str, "os.PathLike[str]"] = os.path.join("out", "race-policies"),
    *,
    size: Union[int, str] = "256M",
    threads: Sequence[int] = (1, 2, 4),
    sharing: Sequence[str] = ("disjoint", "interleaved"),
    policies: Sequence[str] = POLICIES,
    repeat: int = 5,
    workload: str = "sequential",
    config: Optional[Config] = None,
    deterministic: Optional[int] = 1,
    plots: bool = True,
    log: Optional[TextIO] = None,
) -> list[dict[str, Any]]:
    """Runs the race-policies experiment and writes its files into ``out``.
    Returns the median rows (one per policy x sharing x threads).

    ``deterministic``: each run uses a seeded deterministic interleaving
    (seed ``deterministic + repeat``), so the results do not depend on the
    machine; None runs free host threads instead (on a small machine, short
    runs rarely overlap, so races are rare and noisy)."""
    out = os.fspath(out)
    base = config or RACE_POLICIES_CONFIG
    nbytes = _anonfolio.parse_bytes(size) if isinstance(size, str) else int(size)
    os.makedirs(out, exist_ok=True)
    rows: list[dict[str, Any]] = []
    medians: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for policy in policies:
        cfg = base.replace(policy=policy)
        for sh in sharing:
            for nt in threads:
                point = []
                for rep in range(repeat):
                    seed = None if deterministic is None else deterministic + rep
                    s = Simulator(cfg).run(workload, nbytes, threads=nt, sharing=sh, deterministic=seed)
                    point.append(_row(policy, sh, nt, rep, s))
                rows += point
                medians.append(_median(point))
                if log is not None:
                    m = medians[-1]
                    log.write(
                        f"race-policies: {policy:<9} {sh:<11} {nt} thread(s): faults {m['faults']}, "
                        f"races {m['races']}, pages wasted {m['pages_wasted']}\n"
                    )
    wall = time.perf_counter() - t0

    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)

    pngs: list[str] = []
    note = ""
    if plots and plot.available():
        pngs = _plots(out, medians, base, nbytes, workload, threads, policies, deterministic)
    elif plots:
        note = "matplotlib is not installed: no plots (pip install matplotlib)"
        if log is not None:
            log.write(f"race-policies: {note}\n")

    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(_markdown(medians, base, nbytes, workload, repeat, deterministic, pngs, note, wall))
    if log is not None:
        log.write(f"race-policies: wrote {out}/results.csv, results.md"
                  f"{', ' + ', '.join(pngs) if pngs else ''} in {wall:.1f} s\n")
    return medians


def _plots(out: str, medians: list[dict[str, Any]], cfg: Config, nbytes: int, workload: str,
           threads: Sequence[int], policies: Sequence[str], deterministic: Optional[int]) -> list[str]:
    sub = f"{workload} over {format_bytes(nbytes)}; {_sizes(cfg)}"
    if deterministic is not None:
        sub += "; deterministic"
    specs = [
        ("races.png", "pages_wasted", "pages zeroed for nothing (median)", "Cost of lost races"),
        ("faults.png", "faults", "page faults (median)", "Faults"),
        ("ptl.png", "ptl_contended", "contended PTL acquisitions (median)", "PTE-table lock contention"),
    ]
    if deterministic is None:
        # Under a deterministic schedule the CPUs hand over to each other at
        # every fault-path point: wall time measures the scheduler, not the path.
        specs.append(("throughput.png", "faults_per_s", "faults / s (median)", "Fault throughput"))
    written = []
    for name, y, ylabel, title in specs:
        plot.line_plot(medians, x="threads", y=y, hue="policy", facet="sharing",
                       path=os.path.join(out, name), title=f"{title}\n{sub}", ylabel=ylabel)
        written.append(name)
    # Folio sizes at the most contended point.
    nt = max(threads)
    by_policy = {}
    for p in policies:
        s = Simulator(cfg.replace(policy=p)).run(workload, nbytes, threads=nt, sharing="interleaved",
                                                 deterministic=deterministic)
        by_policy[p] = s
    plot.folio_histogram(by_policy, path=os.path.join(out, "folio-sizes.png"),
                         title=f"Mapped memory by folio size, {nt} threads interleaved\n{sub}")
    written.append("folio-sizes.png")
    return written


def _sizes(cfg: Config) -> str:
    on = [f"{s}={m}" for s, m in cfg.hugepages.items() if m != "never"]
    return f"enabled={cfg.enabled}, " + (", ".join(on) if on else "no mTHP sizes")


def _markdown(medians: list[dict[str, Any]], cfg: Config, nbytes: int, workload: str, repeat: int,
              deterministic: Optional[int], pngs: list[str], note: str, wall: float) -> str:
    lines = [
        "# race-policies",
        "",
        f"Workload `{workload}` over {format_bytes(nbytes)} (one VMA, MADV_HUGEPAGE), "
        f"THP knobs: {_sizes(cfg)}. Median of {repeat} run(s) per point; "
        + ("free-running host threads." if deterministic is None
           else f"deterministic interleavings seeded {deterministic}..{deterministic + repeat - 1}."),
        f"anonfolio {_anonfolio.__version__} ({_anonfolio.build_profile} build); {wall:.1f} s in all."
        + ("" if deterministic is None else
           " Under a deterministic schedule `faults_per_s` measures the scheduler's hand-offs, not the fault path."),
        "",
    ]
    cols = ["policy", "sharing", "threads", "faults", "races", "retries", "refaults", "pages_wasted",
            "ptl_contended", "mean_folio_kb", "faults_per_s"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" if c in ("policy", "sharing") else "---:" for c in cols) + "|")
    for m in sorted(medians, key=lambda r: (r["sharing"], r["threads"], POLICIES.index(r["policy"])
                                            if r["policy"] in POLICIES else 99)):
        lines.append("| " + " | ".join(f"{m[c]:,}" if isinstance(m[c], int) else str(m[c]) for c in cols) + " |")
    lines += ["", "Columns:", ""]
    lines += [f"- `{k}`: {v}" for k, v in COLUMNS.items()]
    if pngs:
        lines += [""] + [f"![{p}]({p})" for p in pngs]
    if note:
        lines += ["", note]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    race_policies(log=sys.stderr)
