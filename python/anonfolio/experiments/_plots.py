"""race-policies: the PNG plots (matplotlib, through :mod:`anonfolio.plot`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from .. import plot
from ..config import Config
from ..stats import format_bytes
from ._grid import MEMORY, DeltaRow, MedianRow


def race_plots(out: str, meds: Sequence[MedianRow], deltas: Sequence[DeltaRow],
               orders: Mapping[str, npt.NDArray[np.uint64]], cfg: Config, nbytes: int, free_bytes: int,
               workload: str, seeds: int) -> list[str]:
    written = []
    det = [m for m in meds if m["pass"] == "deterministic" and m["sharing"] == "interleaved"]
    sub = f"{workload} over {format_bytes(nbytes)}, interleaved, deterministic ({seeds} seeds: median, min..max)"
    for name, y, ylabel, title, share in () if not det else (
        ("faults.png", "faults_per_1k_pages", "faults per 1000 pages touched",
         "Faults per 1000 pages touched (each panel its own scale)", False),
        ("waste.png", "pages_wasted_per_1k_pages", "pages wasted per 1000 touched",
         "Pages allocated, zeroed and freed unused after lost races", True),
    ):
        plot.grid_plot(det, x="cpus", y=y, hue="on_race", row="memory", col="policy", sharey=share,
                       path=os.path.join(out, name), title=f"{title}\n{sub}", ylabel=ylabel, xlabel="CPUs")
        written.append(name)
    # The answer in one picture: paired differences.
    long = []
    for d in deltas:
        if d["sharing"] != "interleaved":
            continue
        for mtr, label in (("faults_per_1k_pages", "faults saved per 1000 pages"),
                           ("pages_wasted_per_1k_pages", "pages wasted less per 1000 pages")):
            long.append(dict(policy=d["policy"], memory=d["memory"], cpus=d["cpus"], metric=label,
                             value=d[mtr], value_min=d[mtr + "_min"], value_max=d[mtr + "_max"]))
    if long:
        plot.grid_plot(long, x="cpus", y="value", hue="policy", row="memory", col="metric", sharey=False,
                       zero_line=True, path=os.path.join(out, "delta.png"), xlabel="CPUs",
                       ylabel="refault − retry-lower",
                       title="What retry-lower buys over refault (positive = retry-lower better)\n"
                             f"{sub}; paired by seed")
        written.append("delta.png")
    free = [m for m in meds if m["pass"] == "free" and m["sharing"] == "interleaved"]
    if free:
        long = []
        for m in free:
            for mtr, label in (("ns_per_page", "ns per page touched"),
                               ("ptl_contended", "PTL contended acquisitions per run"),
                               ("races_per_1k_faults", "races per 1000 faults")):
                long.append(dict(m, metric=label, value=m[mtr], value_min=m[mtr + "_min"], value_max=m[mtr + "_max"],
                                 x=f"{m['policy']}\n{m['cpus']} thr"))
        plot.bar_grid(long, x="x", y="value", hue="on_race", row="memory", col="metric",
                      path=os.path.join(out, "free-running.png"),
                      title=f"Free-running host threads ({os.cpu_count()} CPUs), {workload} over "
                            f"{format_bytes(free_bytes)}, interleaved: median, min..max")
        written.append("free-running.png")
    if orders:
        plot.folio_histogram({k: _FakeStats(v) for k, v in orders.items()}, path=os.path.join(out, "folio-sizes.png"),
                             title=f"Mapped memory by folio size: {list(MEMORY)[-1]} memory, "
                                   f"{max(int(m['cpus']) for m in det) if det else 1} CPUs interleaved, one seed")
        written.append("folio-sizes.png")
    return written


class _FakeStats:
    """Just enough of :class:`Stats` for :func:`plot.folio_histogram`."""

    def __init__(self, fo: npt.NDArray[np.uint64]) -> None:
        self.folio_orders = fo
