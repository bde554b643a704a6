"""scaling: pages touched per second against free-running host threads,
with the linear reference and the efficiency."""

from __future__ import annotations

import csv
import dataclasses
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Optional, TextIO, TypedDict, Union

from .. import plot
from ..api import Simulator, progress_bar
from ..config import Config
from ..stats import format_bytes
from ._grid import RACE_POLICIES_CONFIG
from ._markdown import knobs_summary
from ._rows import byte_count

SCALING_COLUMNS: dict[str, str] = {
    "workload": "page_fault1 (each thread maps SIZE, writes a byte a page, unmaps; ITERATIONS times) "
    "or sequential (SIZE split between threads)",
    "threads": "host threads",
    "repeat": "repeat index",
    "ops": "pages touched",
    "faults": "page faults",
    "elapsed_s": "wall seconds simulating",
    "ops_per_s": "pages touched per second",
    "linear_ops_per_s": "1-thread ops/s (median) x threads",
    "efficiency": "ops_per_s / linear_ops_per_s",
    "mmap_contended": "mmap_lock acquisitions that found it held",
    "ptl_contended": "PTE-table lock acquisitions that found it held",
    "zone_contended": "zone->lock acquisitions that found it held",
}


class ScalingRun(TypedDict):
    """One free-running run of the workload."""

    workload: str
    threads: int
    repeat: int
    ops: int
    faults: int
    elapsed_s: float
    ops_per_s: int
    mmap_contended: int
    ptl_contended: int
    zone_contended: int


class ScalingRow(ScalingRun):
    """A row of scaling.csv: the run and the linear reference it is measured against."""

    linear_ops_per_s: int
    efficiency: float


#: One thread count's medians: workload, threads, runs, and for each figure of
#: a run its median, ``<figure>_min`` and ``<figure>_max``; then
#: ``linear_ops_per_s`` and ``efficiency``. The keys are made from the figures'
#: names, so the values are not typed one by one.
ScalingMedian = dict[str, Any]


@dataclasses.dataclass
class ScalingResult:
    """What :func:`scaling` produced."""

    #: One per run, as in scaling.csv.
    rows: list[ScalingRow]
    #: One per thread count.
    medians: list[ScalingMedian]
    #: The table printed (and written into scaling.md).
    table: str
    #: File names written into ``out``.
    files: list[str]


def scaling(
    *,
    workload: str = "page_fault1",
    threads: Sequence[int] = (1, 2, 4),
    size: Union[int, str, None] = None,
    iterations: int = 10,
    repeat: int = 3,
    config: Optional[Config] = None,
    out: Union[str, os.PathLike[str], None] = None,
    plots: bool = True,
    log: Optional[TextIO] = None,
    progress: Optional[bool] = None,
) -> ScalingResult:
    """Pages touched per second with 1, 2, 4 ... free-running host threads,
    the linear reference (1-thread rate x N) and the efficiency.

    ``page_fault1`` (will-it-scale's): each thread maps ``size`` (default
    128M), writes a byte a page, unmaps, ``iterations`` times. ``sequential``:
    one range of ``size`` (default 1G) split between the threads."""
    if workload not in ("page_fault1", "sequential"):
        raise ValueError(f"scaling: workload must be page_fault1 or sequential, not {workload!r}")
    cfg = config or RACE_POLICIES_CONFIG
    nbytes = byte_count(size if size is not None else ("128M" if workload == "page_fault1" else "1G"))
    threads = sorted({int(t) for t in threads})
    runs: list[ScalingRun] = []
    bar = progress_bar(repeat * len(threads), progress=progress, desc="scaling")
    for rep in range(repeat):
        for nt in threads:
            kw: dict[str, Any] = dict(threads=nt)
            if workload == "page_fault1":
                kw["iterations"] = iterations
            s = Simulator(cfg).run(workload, nbytes, **kw)
            ops = int(s.get("ops", 0))
            runs.append(ScalingRun(workload=workload, threads=nt, repeat=rep, ops=ops, faults=s.faults,
                                   elapsed_s=round(s.elapsed_s, 6),
                                   ops_per_s=round(ops / s.elapsed_s) if s.elapsed_s > 0 else 0,
                                   mmap_contended=s.locks.mmap_lock.contended, ptl_contended=s.locks.ptl.contended,
                                   zone_contended=s.locks.zone_lock.contended))
            bar.update(1)
    bar.close()
    meds: list[ScalingMedian] = []
    for nt in threads:
        grp: list[Mapping[str, Any]] = [r for r in runs if r["threads"] == nt]
        m: ScalingMedian = {"workload": workload, "threads": nt, "runs": len(grp)}
        for c in ("ops", "faults", "elapsed_s", "ops_per_s", "mmap_contended", "ptl_contended", "zone_contended"):
            vals = [r[c] for r in grp]
            med = statistics.median(vals)
            m[c] = round(med, 6) if c == "elapsed_s" else round(med)
            m[c + "_min"], m[c + "_max"] = min(vals), max(vals)
        meds.append(m)
    one = next((m["ops_per_s"] for m in meds if m["threads"] == 1), None)
    if one is None:  # no 1-thread point: scale from the smallest
        one = meds[0]["ops_per_s"] / meds[0]["threads"]
    for m in meds:
        m["linear_ops_per_s"] = round(one * m["threads"])
        m["efficiency"] = round(m["ops_per_s"] / m["linear_ops_per_s"], 3) if m["linear_ops_per_s"] else 0.0
    rows: list[ScalingRow] = []
    for r in runs:
        linear = round(one * r["threads"])
        rows.append(ScalingRow(**r, linear_ops_per_s=linear,
                               efficiency=round(r["ops_per_s"] / linear, 3) if linear else 0.0))

    what = (f"{workload}: " + (f"{format_bytes(nbytes)} per thread x {iterations} iteration(s)"
                               if workload == "page_fault1" else f"{format_bytes(nbytes)} split between the threads")
            + f"; policy {cfg.policy}, {knobs_summary(cfg)}; "
            f"median of {repeat} run(s) on a {os.cpu_count()}-CPU host")
    hdr = ["threads", "ops/s", "linear ops/s", "efficiency", "range ops/s", "faults", "mmap contended",
           "zone contended"]
    body = [[str(m["threads"]), f"{m['ops_per_s']:,}", f"{m['linear_ops_per_s']:,}", f"{m['efficiency']:.2f}",
             f"{m['ops_per_s_min']:,}..{m['ops_per_s_max']:,}", f"{m['faults']:,}", f"{m['mmap_contended']:,}",
             f"{m['zone_contended']:,}"] for m in meds]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(hdr)]
    table = "\n".join([what, ""] + ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [hdr, *body]])

    files: list[str] = []
    if out is not None:
        out = os.fspath(out)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "scaling.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(SCALING_COLUMNS))
            w.writeheader()
            w.writerows(rows)
        files.append("scaling.csv")
        with open(os.path.join(out, "scaling.md"), "w") as f:
            f.write("# scaling\n\n```\n" + table + "\n```\n")
        files.append("scaling.md")
        if plots and plot.available():
            plot.scaling_plot(meds, path=os.path.join(out, "scaling.png"), title=f"Scaling\n{what}")
            files.append("scaling.png")
        elif plots and log is not None:
            log.write("scaling: matplotlib is not installed: no plot (pip install matplotlib)\n")
    if log is not None and files:
        log.write(f"scaling: wrote {out}/{', '.join(files)}\n")
    return ScalingResult(rows=rows, medians=meds, table=table, files=files)
