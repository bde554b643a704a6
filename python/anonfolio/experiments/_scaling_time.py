"""``experiment scaling --time``: will-it-scale's page_fault1 in virtual
time, pages per second for 1 to 256 simulated CPUs beside the linear
reference (the one-CPU rate times the CPUs), as will-it-scale plots it, with
where the time went: the locks waited for."""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, TextIO

from ..api import Simulator
from ..config import Config

DEFAULT_CPUS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def scaling_time(
    costs: Mapping[str, float],
    *,
    cpus: Sequence[int] = DEFAULT_CPUS,
    size: int = 16 << 20,
    iterations: int = 2,
    config: Optional[Config] = None,
    seed: int = 0,
    processes: bool = False,
    out: Optional[str] = None,
    log: Optional[TextIO] = None,
) -> list[dict[str, Any]]:
    """One row per CPU count: virtual pages/s, the linear reference, the
    efficiency, and the virtual ns each lock was waited for per page.
    ``processes``: will-it-scale's process mode (each CPU a task of its own
    mm) instead of threads of one."""
    cfg = config or Config(hugepages={"2048kB": "never"})
    rows: list[dict[str, Any]] = []
    one: Optional[float] = None
    for n in cpus:
        phys = max(1 << 30, 2 * n * size + (256 << 20))
        sim = Simulator(dataclasses.replace(cfg, memory=phys))
        s = sim.run("page_fault1", size, threads=n, iterations=iterations, deterministic=seed, time=dict(costs),
                    processes=processes)
        t = s.to_dict()["time"]
        pages = n * iterations * (size // 4096)
        rate = pages / t["elapsed_ns"] * 1e9
        one = rate if one is None else one
        linear = one * n / cpus[0]
        row = {"cpus": n, "pages_per_s": rate, "linear_pages_per_s": linear, "efficiency": rate / linear,
               "fault_p50_ns": t["fault_latency_ns"]["p50"], "fault_p99_ns": t["fault_latency_ns"]["p99"]}
        for k, v in t["lock_wait_ns"].items():
            row[f"wait_ns_per_page.{k}"] = v / pages
        rows.append(row)
        if log:
            log.write(f"  {n:>4} CPUs: {rate / 1e6:8.3f} M pages/s  linear {linear / 1e6:8.3f}  "
                      f"({100 * rate / linear:5.1f}%)  p99 {row['fault_p99_ns']} ns  wait ns/page: "
                      + " ".join(f"{k} {v / pages:.0f}" for k, v in t["lock_wait_ns"].items() if v) + "\n")
            log.flush()
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "scaling_time.csv"), "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    return rows
