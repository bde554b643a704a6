"""``experiment race-policies --time``: what each policy and its race
handling costs in virtual time, the reviewer's question in his unit. Each
policy runs the same interleaved workload on simulated CPUs in the order of
their clocks (races come from timing, not from a switch probability); the
table gives the virtual elapsed time, the fault latency, the races, and the
zeroing spent on folios that lost their race and were freed."""

from __future__ import annotations

import csv
import dataclasses
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, TextIO

from ..api import Simulator
from ..config import Config
from ._grid import RACE_POLICIES_CONFIG


def race_policies_time(
    costs: Mapping[str, float],
    *,
    policies: Sequence[str] = ("upstream", "v1", "preferred"),
    cpus: Sequence[int] = (2, 8, 64),
    size: int = 48 << 20,
    seeds: int = 3,
    first_seed: int = 0,
    config: Optional[Config] = None,
    out: Optional[str] = None,
    log: Optional[TextIO] = None,
) -> list[dict[str, Any]]:
    """One row per policy and CPU count, medians over ``seeds`` tie-break seeds."""
    cfg = config or RACE_POLICIES_CONFIG
    zero = float(costs.get("zero_per_kib_ns", 0.0))
    rows: list[dict[str, Any]] = []
    for n in cpus:
        for pol in policies:
            runs = []
            for seed in range(first_seed, first_seed + seeds):
                sim = Simulator(dataclasses.replace(cfg, policy=pol, memory=max(1 << 30, 4 * size)))
                d = sim.run("sequential", size, threads=n, sharing="interleaved", deterministic=seed,
                            time=dict(costs)).to_dict()
                runs.append(d)

            def med(f: Callable[[dict[str, Any]], float], runs: list[dict[str, Any]] = runs) -> float:
                return float(statistics.median(f(d) for d in runs))

            row = {
                "policy": pol, "cpus": n,
                "elapsed_ms": med(lambda d: d["time"]["elapsed_ns"]) / 1e6,
                "fault_mean_ns": med(lambda d: d["time"]["fault_latency_ns"]["mean"]),
                "fault_p99_ns": med(lambda d: d["time"]["fault_latency_ns"]["p99"]),
                "faults": med(lambda d: d["faults"]),
                "races": med(lambda d: d["races"]["races"]),
                "pages_wasted": med(lambda d: d["races"]["pages_wasted"]),
                "wasted_zeroing_ms": med(lambda d: d["races"]["pages_wasted"]) * 4 * zero / 1e6,
                "ptl_wait_ms": med(lambda d: d["time"]["lock_wait_ns"]["ptl"]) / 1e6,
            }
            rows.append(row)
            if log:
                log.write(f"  {pol:<9} {n:>3} CPUs: {row['elapsed_ms']:8.3f} ms  "
                          f"fault mean {row['fault_mean_ns']:7.0f} "
                          f"p99 {row['fault_p99_ns']:7.0f} ns  races {row['races']:6.0f}  wasted zeroing "
                          f"{row['wasted_zeroing_ms']:.3f} ms  PTL wait {row['ptl_wait_ms']:.3f} ms\n")
                log.flush()
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "race_policies_time.csv"), "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    return rows
