"""Plot helpers (matplotlib, Agg backend) for :mod:`anonfolio.experiments`
and for notebooks.

matplotlib is optional (``pip install anonfolio[plot]``): :func:`available`
says whether it can be imported, and every function raises ImportError
without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from . import _anonfolio
from .stats import Stats

if TYPE_CHECKING:  # matplotlib is optional at run time
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["available", "line_plot", "grid_plot", "bar_grid", "scaling_plot", "folio_histogram", "mthp_bars"]


def available() -> bool:
    """True if matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt() -> Any:
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        with contextlib.suppress(Exception):  # a backend already in use is fine
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Figure, path: Optional[str]) -> Figure:
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
        _plt().close(fig)
    return fig


def line_plot(
    rows: Sequence[Mapping[str, Any]],
    *,
    x: str,
    y: str,
    hue: str,
    facet: Optional[str] = None,
    path: Optional[str] = None,
    title: str = "",
    ylabel: Optional[str] = None,
    logy: bool = False,
) -> Figure:
    """One line per ``hue`` value of ``y`` against ``x``; one panel per
    ``facet`` value. ``rows`` are dicts (e.g. the rows of an experiment's CSV).
    Saves to ``path`` if given; returns the figure."""
    plt = _plt()
    facets = sorted({r[facet] for r in rows}, key=str) if facet else [None]
    fig, axes = plt.subplots(1, len(facets), figsize=(4.8 * len(facets), 3.8), squeeze=False, sharey=True)
    hues = list(dict.fromkeys(r[hue] for r in rows))
    for ax, fv in zip(axes[0], facets):
        sub = [r for r in rows if facet is None or r[facet] == fv]
        for i, h in enumerate(hues):
            pts = sorted((r[x], r[y]) for r in sub if r[hue] == h)
            if pts:
                # Markers and dashes differ so that equal lines stay visible.
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^Dv"[i % 5],
                        linestyle=("-", "--", ":", "-.")[i % 4], markersize=7 - i, label=str(h))
        ax.set_xlabel(x)
        if fv is not None:
            ax.set_title(f"{facet} = {fv}")
        xs = sorted({r[x] for r in sub})
        if xs and all(isinstance(v, (int, np.integer)) for v in xs):
            ax.set_xticks(xs)
        if logy:
            ax.set_yscale("symlog")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(ylabel or y)
    axes[0][-1].legend(title=hue)
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def _ordered(values: Any) -> list[Any]:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))


def _grid(rows: Sequence[Mapping[str, Any]], row: Optional[str], col: Optional[str]) -> tuple[list[Any], list[Any]]:
    """The ``row`` and ``col`` values of a grid of panels (``[None]`` for none)."""
    return (_ordered(r[row] for r in rows) if row else [None],
            _ordered(r[col] for r in rows) if col else [None])


def _panel(ax: Axes, rows: Sequence[Mapping[str, Any]], row: Optional[str], rv: Any,
           col: Optional[str], cv: Any) -> list[Mapping[str, Any]]:
    """Titles the panel ``rv / cv`` and returns its rows."""
    label = " / ".join(str(v) for v in (rv, cv) if v is not None)
    if label:
        ax.set_title(label, fontsize=9)
    return [r for r in rows if (row is None or r[row] == rv) and (col is None or r[col] == cv)]


def grid_plot(
    rows: Sequence[Mapping[str, Any]],
    *,
    x: str,
    y: str,
    hue: str,
    row: Optional[str] = None,
    col: Optional[str] = None,
    path: Optional[str] = None,
    title: str = "",
    ylabel: Optional[str] = None,
    xlabel: Optional[str] = None,
    sharey: Any = True,
    zero_line: bool = False,
) -> Figure:
    """Lines of ``y`` against ``x``, one per ``hue`` value, in a grid of
    panels (``row`` x ``col`` values). When rows have ``<y>_min`` and
    ``<y>_max`` the line gets an error band from min to max (e.g. over
    seeds). ``sharey``: True (all panels), "row", or False."""
    plt = _plt()
    rvals, cvals = _grid(rows, row, col)
    fig, axes = plt.subplots(len(rvals), len(cvals), figsize=(3.9 * len(cvals) + 0.6, 2.9 * len(rvals) + 0.9),
                             squeeze=False, sharey=sharey, sharex=True)
    hues = _ordered(r[hue] for r in rows)
    for i, rv in enumerate(rvals):
        for j, cv in enumerate(cvals):
            ax = axes[i][j]
            sub = _panel(ax, rows, row, rv, col, cv)
            for k, h in enumerate(hues):
                pts = sorted((r[x], r[y], r.get(y + "_min", ""), r.get(y + "_max", "")) for r in sub
                             if r[hue] == h and r[y] != "")
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                ax.plot(xs, [p[1] for p in pts], marker="os^Dv"[k % 5], linestyle=("-", "--", ":", "-.")[k % 4],
                        markersize=6 - k, label=str(h), color=f"C{k}")
                if all(p[2] != "" and p[3] != "" for p in pts):
                    ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.15, color=f"C{k}",
                                    linewidth=0)
            if zero_line:
                ax.axhline(0, color="0.4", linewidth=0.8)
            xs = sorted({r[x] for r in sub})
            if xs and all(isinstance(v, (int, np.integer)) for v in xs):
                ax.set_xticks(xs)
            ax.grid(True, alpha=0.3)
            if i == len(rvals) - 1:
                ax.set_xlabel(xlabel or x)
            if j == 0:
                ax.set_ylabel(ylabel or y, fontsize=9)
    axes[0][-1].legend(title=hue, fontsize="small")
    if title:
        fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def bar_grid(
    rows: Sequence[Mapping[str, Any]],
    *,
    x: str,
    y: str,
    hue: str,
    row: Optional[str] = None,
    col: Optional[str] = None,
    path: Optional[str] = None,
    title: str = "",
) -> Figure:
    """Grouped bars of ``y`` per ``x`` category and ``hue``, in a grid of
    panels; each panel has its own y scale and is titled ``row / col``.
    ``<y>_min``/``<y>_max`` give error bars when present."""
    plt = _plt()
    rvals, cvals = _grid(rows, row, col)
    xcats = _ordered(r[x] for r in rows)
    hues = _ordered(r[hue] for r in rows)
    width_in = max(4.5, 0.55 * len(xcats) * len(hues)) * len(cvals) / 1.6 + 1
    fig, axes = plt.subplots(len(rvals), len(cvals), figsize=(width_in, 3.0 * len(rvals) + 0.9), squeeze=False)
    width = 0.8 / max(1, len(hues))
    for i, rv in enumerate(rvals):
        for j, cv in enumerate(cvals):
            ax = axes[i][j]
            sub = _panel(ax, rows, row, rv, col, cv)
            for k, h in enumerate(hues):
                vals, lo, hi = [], [], []
                for xc in xcats:
                    m = next((r for r in sub if r[x] == xc and r[hue] == h), None)
                    v = m[y] if m is not None and m[y] != "" else float("nan")
                    vals.append(v)
                    lo.append(v - m[y + "_min"] if m is not None and m.get(y + "_min", "") != "" else 0)
                    hi.append(m[y + "_max"] - v if m is not None and m.get(y + "_max", "") != "" else 0)
                pos = np.arange(len(xcats)) + (k - (len(hues) - 1) / 2) * width
                ax.bar(pos, vals, width, label=str(h), color=f"C{k}", yerr=[lo, hi], capsize=2,
                       error_kw={"linewidth": 0.8})
            ax.set_xticks(np.arange(len(xcats)))
            ax.set_xticklabels([str(c) for c in xcats], fontsize=7)
            ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if title:
        fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout()
    fig.legend(handles, labels, title=hue, fontsize="small", loc="upper right", ncol=len(hues), frameon=False)
    return _finish(fig, path)


def scaling_plot(
    medians: Sequence[Mapping[str, Any]],
    *,
    path: Optional[str] = None,
    title: str = "Scaling",
) -> Figure:
    """Operations per second against threads (median, min..max error bars)
    with the linear reference, each point labelled with its efficiency."""
    plt = _plt()
    ms = sorted(medians, key=lambda m: m["threads"])
    xs = [m["threads"] for m in ms]
    ys = [m["ops_per_s"] for m in ms]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(xs, [m["linear_ops_per_s"] for m in ms], linestyle="--", color="0.5", label="linear (1 thread x N)")
    err = [[m["ops_per_s"] - m.get("ops_per_s_min", m["ops_per_s"]) for m in ms],
           [m.get("ops_per_s_max", m["ops_per_s"]) - m["ops_per_s"] for m in ms]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label="measured (median, min..max)")
    for m in ms:
        ax.annotate(f"{m['efficiency']:.0%}", (m["threads"], m["ops_per_s"]), textcoords="offset points",
                    xytext=(6, -12), fontsize=8)
    ax.set_xticks(xs)
    ax.set_xlabel("threads")
    ax.set_ylabel("pages touched per second (millions)")
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / 1e6:g}"))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    import textwrap

    ax.set_title("\n".join(textwrap.fill(t, 80) for t in title.split("\n")), fontsize=9)
    return _finish(fig, path)


def folio_histogram(
    stats: Mapping[str, Any],
    *,
    path: Optional[str] = None,
    title: str = "Folios mapped by size",
    weight: str = "bytes",
) -> Figure:
    """Grouped bars of ``Stats.folio_orders`` for each labelled run.
    ``weight="bytes"`` shows the share of mapped memory in each size,
    ``"count"`` the number of folios."""
    plt = _plt()
    orders = np.arange(_anonfolio.MAX_PAGE_ORDER)
    labels = list(stats)
    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        fo = stats[label].folio_orders.astype(np.float64)
        if weight == "bytes":
            fo = fo * (2.0 ** orders)
            total = fo.sum()
            fo = fo / total * 100 if total else fo
        ax.bar(orders + (i - (len(labels) - 1) / 2) * width, fo, width, label=label)
    ax.set_xticks(orders)
    ax.set_xticklabels([_anonfolio.size_name(int(o)) for o in orders], rotation=30)
    ax.set_ylabel("% of mapped memory" if weight == "bytes" else "folios")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    return _finish(fig, path)


def mthp_bars(
    stats: Mapping[str, Stats],
    counter: str = "anon_fault_alloc",
    *,
    path: Optional[str] = None,
    title: Optional[str] = None,
) -> Figure:
    """Grouped bars of one ``hugepages-*/stats`` counter by size for each labelled run."""
    plt = _plt()
    sizes = list(_anonfolio.THP_SIZES)
    labels = list(stats)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / max(1, len(labels))
    xs = np.arange(len(sizes))
    for i, label in enumerate(labels):
        vals = [stats[label].mthp[s][counter] for s in sizes]
        ax.bar(xs + (i - (len(labels) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(xs)
    ax.set_xticklabels(sizes, rotation=30)
    ax.set_ylabel(counter)
    ax.set_title(title or f"hugepages-*/stats/{counter}")
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    return _finish(fig, path)
