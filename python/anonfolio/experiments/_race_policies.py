"""race-policies: running the two passes and writing the files."""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, TextIO, Union

import numpy as np
import numpy.typing as npt

from .. import plot
from ..api import Simulator, progress_bar
from ..config import POLICIES, Config
from ..stats import format_bytes
from ._findings import findings
from ._grid import (
    COLUMNS,
    KEYS,
    MEMORY,
    METRICS,
    ON_RACE,
    RACE_POLICIES_CONFIG,
    DeltaRow,
    MedianRow,
    Point,
    RaceParams,
    RaceRow,
)
from ._markdown import results_md
from ._plots import race_plots
from ._rows import byte_count, medians, paired_deltas, run_row

#: Where race-policies writes unless told otherwise.
DEFAULT_OUT = os.path.join("out", "race-policies")


@dataclasses.dataclass
class RacePoliciesResult:
    """What :func:`race_policies` produced."""

    #: The folder written.
    out: str
    #: One per run, as in results.csv.
    rows: list[RaceRow]
    #: One per point, as in medians.csv.
    medians: list[MedianRow]
    #: refault against retry-lower, paired by seed.
    deltas: list[DeltaRow]
    #: The sentences of the findings paragraph.
    findings: list[str]
    #: File names written into ``out``.
    files: list[str]
    wall_s: float


def race_policies(
    out: Union[str, os.PathLike[str]] = DEFAULT_OUT,
    *,
    size: Union[int, str] = "48M",
    cpus: Sequence[int] = (1, 2, 4, 8),
    seeds: int = 7,
    first_seed: int = 1,
    policies: Sequence[str] = POLICIES,
    on_race: Sequence[str] = ON_RACE,
    sharing: Sequence[str] = ("disjoint", "interleaved"),
    memory: Sequence[str] = tuple(MEMORY),
    free_size: Union[int, str, None] = "4G",
    free_threads: Sequence[int] = (1, 2),
    free_repeat: int = 5,
    workload: str = "sequential",
    config: Optional[Config] = None,
    plots: bool = True,
    jobs: Optional[int] = None,
    log: Optional[TextIO] = None,
    progress: Optional[bool] = None,
) -> RacePoliciesResult:
    """Runs the race-policies experiment and writes its files into ``out``.

    ``size``/``cpus``/``seeds``: the deterministic pass (seeds
    ``first_seed .. first_seed + seeds - 1``; each seeds both the
    interleaving and the failure injection). ``free_size``/``free_threads``/
    ``free_repeat``: the free-running pass (``free_size=None`` or
    ``free_repeat=0`` skips it). ``jobs``: deterministic runs at once (their
    results do not depend on it; default: the host's CPUs, at most 4).
    ``progress``: a progress bar per pass on standard error (None: when it
    is a terminal)."""
    out = os.fspath(out)
    base = config or RACE_POLICIES_CONFIG
    for m in memory:
        if m not in MEMORY:
            raise ValueError(f"unknown memory condition {m!r} (have: {', '.join(MEMORY)})")
    nbytes = byte_count(size)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()

    def cfg_for(pol: str, orr: str, mem: str, seed: int) -> Config:
        return base.replace(policy=pol, on_race=orr, seed=seed, **MEMORY[mem])

    # Deterministic pass: results do not depend on timing, so run a few at once.
    jobs_det: list[tuple[Point, int]] = []
    for mem in memory:
        for sh in sharing:
            for pol in policies:
                for nc in cpus:
                    for orr in on_race:
                        for k in range(seeds):
                            seed = first_seed + k
                            pt: Point = {"pass": "deterministic", "policy": pol, "on_race": orr, "memory": mem,
                                         "sharing": sh, "cpus": int(nc)}
                            jobs_det.append((pt, seed))

    keep_orders: dict[str, npt.NDArray[np.uint64]] = {}
    top = max(cpus) if cpus else 1

    def run_det(job: tuple[Point, int]) -> RaceRow:
        pt, seed = job
        s = Simulator(cfg_for(pt["policy"], pt["on_race"], pt["memory"], seed)).run(
            workload, nbytes, threads=pt["cpus"], sharing=pt["sharing"], deterministic=seed)
        if (seed == first_seed and pt["cpus"] == top and pt["sharing"] == "interleaved"
                and pt["memory"] == memory[-1]):
            keep_orders[f"{pt['policy']} / {pt['on_race']}"] = s.folio_orders.copy()
        return run_row(pt, seed, nbytes, s)

    nj = jobs or min(4, os.cpu_count() or 1)
    bar = progress_bar(len(jobs_det), progress=progress, desc="race-policies: deterministic")
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, nj)) as ex:
        for row in ex.map(run_det, jobs_det):
            rows.append(row)
            bar.update(1)
    bar.close()
    t_det = time.perf_counter() - t0
    if log is not None:
        log.write(f"race-policies: deterministic pass: {len(rows)} runs over {format_bytes(nbytes)} "
                  f"in {t_det:.1f} s\n")

    # Free-running pass: one run at a time (they time the host).
    free_bytes = byte_count(free_size) if free_size is not None else 0
    t1 = time.perf_counter()
    if free_bytes and free_repeat > 0 and free_threads:
        nfree = free_repeat * len(memory) * len(sharing) * len(policies) * len(free_threads) * len(on_race)
        fbar = progress_bar(nfree, progress=progress, desc="race-policies: free-running")
        for k in range(free_repeat):  # repeats outermost: drifts in the host spread over every point
            for mem in memory:
                for sh in sharing:
                    for pol in policies:
                        for nt in free_threads:
                            for orr in on_race:
                                fpt: Point = {"pass": "free", "policy": pol, "on_race": orr, "memory": mem,
                                              "sharing": sh, "cpus": int(nt)}
                                s = Simulator(cfg_for(pol, orr, mem, first_seed + k)).run(
                                    workload, free_bytes, threads=nt, sharing=sh)
                                rows.append(run_row(fpt, first_seed + k, free_bytes, s))
                                fbar.update(1)
        fbar.close()
        if log is not None:
            log.write(f"race-policies: free-running pass: {free_repeat} repeat(s) over "
                      f"{format_bytes(free_bytes)} in {time.perf_counter() - t1:.1f} s\n")

    meds = medians(rows)
    deltas = paired_deltas(rows)
    text = findings(meds, deltas, rows)
    wall = time.perf_counter() - t0

    files = ["results.csv", "medians.csv", "results.md"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, "medians.csv"), "w", newline="") as f:
        cols = list(KEYS) + ["runs"] + [x for c in METRICS for x in (c, c + "_min", c + "_max")]
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(meds)

    pngs: list[str] = []
    note = ""
    if plots and plot.available():
        pngs = race_plots(out, meds, deltas, keep_orders, base, nbytes, free_bytes, workload, seeds)
    elif plots:
        note = "matplotlib is not installed: no plots (pip install matplotlib)"
        if log is not None:
            log.write(f"race-policies: {note}\n")
    files += pngs

    params = RaceParams(size=nbytes, cpus=list(cpus), seeds=seeds, first_seed=first_seed, free_size=free_bytes,
                        free_threads=list(free_threads), free_repeat=free_repeat, workload=workload)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(results_md(meds, deltas, text, base, params, pngs, note, wall))
    if log is not None:
        log.write(f"race-policies: wrote {out}/{', '.join(files)} in {wall:.1f} s\n")
        for line in text:
            log.write(f"  - {line}\n")
    return RacePoliciesResult(out=out, rows=rows, medians=meds, deltas=deltas, findings=text, files=files, wall_s=wall)
