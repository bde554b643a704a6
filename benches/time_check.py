#!/usr/bin/env python3
"""Virtual time checked against this machine's kernel, in one run.

Measures the kernel (as root; THP knobs in madvise mode, restored after):
per-size write-fault latency, unmap time per folio size, and page_fault1
as threads (1 and 2 threads, order 0 and 64 kB, `examples/kernel_pf1`).
Fits a cost profile on part of it (the single-thread figures of the sizes
4, 16, 64, 256, 1024 and 2048 kB and the unmap times) and predicts the rest
with `--time`: the write faults of 32, 128 and 512 kB, and page_fault1 at 1
and 2 threads. Prints a Markdown table of prediction against kernel.

    cargo build --release --example kernel_pf1
    python3 benches/time_check.py [--reps 5] [--seconds 2]

Every time is thread CPU time (user + system of the faulting threads), so
that other processes on the cores do not inflate it; page_fault1 also
reports wall-clock pages per second. A task waiting for the mmap lock (an
rwsem) sleeps, so the model's CPU time per page leaves out its `mmap_lock`
waits (a munmap or mmap waiting behind another thread's zap, a fault that
fell back waiting for a writer); the wall-clock rate keeps them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from typing import Any

from anonfolio import calibrate as cal
from anonfolio.api import Simulator
from anonfolio.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PF1 = os.path.join(ROOT, "target", "release", "examples", "kernel_pf1")
FIT_SIZES = [4, 16, 64, 256, 1024, 2048]
HELD_OUT = [32, 128, 512]


def kernel_pf1(threads: int, kb: int | None, seconds: float) -> dict[str, float]:
    with cal.thp_only(kb):
        args = [PF1, "--threads", str(threads), "--seconds", str(seconds)] + (["--advise"] if kb else [])
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", out) if k != "advise"}


def sim_pf1(costs: dict[str, float], threads: int, kb: int | None) -> dict[str, Any]:
    hp = {f"{k}kB": "never" for k in cal.SIZES_KB if k != 4}
    if kb:
        hp[f"{kb}kB"] = "always"
    iters = 2
    s = Simulator(Config(hugepages=hp, memory=(threads * 256 + 512) << 20)).run(
        "page_fault1", 128 << 20, threads=threads, iterations=iters, time=costs, deterministic=0
    ).to_dict()
    t = s["time"]
    pages = threads * iters * (128 << 20) // 4096
    awake = t["cpu_ns"] - t["lock_wait_ns"]["mmap_lock"]
    return {"cpu_ns_per_page": awake / pages, "pages_per_s": pages / t["elapsed_ns"] * 1e9,
            "lock_wait": t["lock_wait_ns"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args()
    if not os.path.exists(PF1):
        sys.exit(f"time_check: build {PF1} first (cargo build --release --example kernel_pf1)")
    print(f"measuring the kernel ({os.uname().release}), {a.reps} runs per figure", file=sys.stderr)
    m = cal.measure(reps=a.reps, log=sys.stderr)
    pf1 = {(n, kb): kernel_pf1(n, kb, a.seconds) for n in (1, 2) for kb in (None, 64)}
    f = cal.fit(m, sizes=FIT_SIZES)
    cal.refine(f["costs"], m)
    costs = f["costs"]
    pred = cal.predict(costs)
    rows: list[tuple[str, str, float, float]] = []
    for kb in HELD_OUT:
        k = f"{kb}kB"
        rows.append((f"write fault {k} (held out)", "ns", m["write_fault_ns"][k], pred["write_fault_ns"][k]))
    for kb in FIT_SIZES:
        k = f"{kb}kB"
        rows.append((f"write fault {k} (fitted)", "ns", m["write_fault_ns"][k], pred["write_fault_ns"][k]))
    for k in m["unmap_ns_per_folio"]:
        rows.append((f"unmap per folio {k} (fitted)", "ns", m["unmap_ns_per_folio"][k],
                     pred["unmap_ns_per_folio"][k]))
    for n in (1, 2):
        for pkb in (None, 64):
            label = "order 0" if pkb is None else "64 kB"
            sim = sim_pf1(costs, n, pkb)
            kern = pf1[(n, pkb)]
            rows.append((f"page_fault1 {n} thread(s), {label}: CPU ns per page", "ns", kern["cpu_ns_per_page"],
                         sim["cpu_ns_per_page"]))
            rows.append((f"page_fault1 {n} thread(s), {label}: pages/s, all threads (wall)", "pages/s",
                         kern["pages_per_s"], sim["pages_per_s"]))
            print(f"  model lock waits, {n} thread(s) {label}: {sim['lock_wait']}", file=sys.stderr)
    print("| figure | unit | kernel | model (--time) | error |")
    print("|---|---|---|---|---|")
    for name, unit, kv, pv in rows:
        print(f"| {name} | {unit} | {kv:,.0f} | {pv:,.0f} | {100 * (pv - kv) / kv:+.1f}% |")
    # Hildenbrand's munmap shape: seconds per GiB by folio size.
    print()
    print("| folio | kernel here, munmap s/GiB | model, s/GiB |")
    print("|---|---|---|")
    for k, v in m["unmap_ns_per_folio"].items():
        per_gib = (1 << 30) // (int(k[:-2]) * 1024)
        print(f"| {k} | {v * per_gib / 1e9:.4f} | {pred['unmap_ns_per_folio'][k] * per_gib / 1e9:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
