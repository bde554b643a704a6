#!/usr/bin/env python3
"""What ``anonfolio record`` costs a program: each workload's own run time
(``setarch -R COMMAND``) beside the same command under the recorder, in one
run, alternating plain and recorded runs so both see the same machine.

    sudo python3 benches/record_overhead.py [--reps N]

Columns: plain = wall seconds of the program alone (best of N); recorded =
wall seconds of ``anonfolio record`` as a whole (best of N); run = the
program's run under the recorder (start to its last task's end); processing
= decoding the events and writing the traces afterwards; events = trace
events read; lines = trace lines written.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = REPO / "tests" / "record_programs"


def workloads(tmp: Path) -> List[Tuple[str, List[str]]]:
    exe = tmp / "touch_pages"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(PROGRAMS / "touch_pages.c")], check=True)
    data = tmp / "data.bin"
    # compressible but not trivially: the same 1 MiB of random bytes, base64, 4 times
    chunk = __import__("base64").b64encode(os.urandom(3 << 18))
    data.write_bytes(chunk * 4)
    out: List[Tuple[str, List[str]]] = [
        ("C: first-touch 1 GiB (faults only)", [str(exe), str(1 << 18)]),
        ("python3: dict of 300k str", [sys.executable, "-c", "d={str(i): i for i in range(300000)}; print(len(d))"]),
    ]
    if shutil.which("xz"):
        out.append(("xz -6 -T2 of 4 MiB", ["xz", "-6", "-T2", "-c", str(data)]))
    if shutil.which("gcc"):
        out.append(("gcc -O2 -c (cc1, as)", ["gcc", "-O2", "-c", "-o", str(tmp / "x.o"), str(PROGRAMS / "vma_ops.c")]))
    return out


def plain(cmd: List[str]) -> float:
    t = time.perf_counter()
    subprocess.run(["setarch", "-R", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def recorded(cmd: List[str], out: Path) -> Tuple[float, float, float, int, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "anonfolio", "record", "--stats", "-o", str(out), "--", *cmd],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    wall = time.perf_counter() - t
    m = re.search(r"(\d+) events, (\d+) trace lines .* run ([\d.]+) s, processing ([\d.]+) s", p.stderr)
    if not m or "error" in p.stderr:
        raise SystemExit(f"recording {cmd[0]} failed: {p.stderr.strip()}")
    return wall, float(m.group(3)), float(m.group(4)), int(m.group(1)), int(m.group(2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("record_overhead: needs root (anonfolio record)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = []
        for name, cmd in workloads(tmp):
            plains, recs = [], []
            for _ in range(args.reps):
                plains.append(plain(cmd))
                recs.append(recorded(cmd, tmp / "t.trace"))
            best = min(recs)
            rows.append((name, min(plains), best))
    heads = ("plain s", "recorded s", "x", "run s", "run x", "process s", "events", "lines")
    widths = (8, 10, 6, 7, 6, 9, 9, 9)
    print(f"{'workload':38} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
    for name, p, (wall, run, proc, ev, lines) in rows:
        print(f"{name:38} {p:8.3f} {wall:10.3f} {wall / p:6.2f} {run:7.3f} {run / p:6.2f} {proc:9.3f} {ev:9d} {lines:9d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
