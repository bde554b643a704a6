"""Plot helpers (matplotlib, Agg backend) for :mod:`anonfolio.experiments`
and for notebooks.

matplotlib is optional (``pip install anonfolio[plot]``): :func:`available`
says whether it can be imported, and every function raises ImportError
without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from . import _anonfolio
from .stats import Stats

__all__ = ["available", "line_plot", "folio_histogram", "mthp_bars"]


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
        try:
            matplotlib.use("Agg")
        except Exception:  # noqa: BLE001 - a backend already in use is fine
            pass
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, path: Optional[str]) -> Any:
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
) -> Any:
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


def folio_histogram(
    stats: Mapping[str, Stats],
    *,
    path: Optional[str] = None,
    title: str = "Folios mapped by size",
    weight: str = "bytes",
) -> Any:
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
) -> Any:
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
