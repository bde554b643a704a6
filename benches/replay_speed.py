#!/usr/bin/env python3
"""Replay at the size real traces have, measured in one run beside `wc -l`
and a plain read of the same file.

    python3 benches/replay_speed.py [--lines 100000000] [--reps 3] [--dir DIR]
                                    [--no-build] [--no-compressed] [--in-memory]
                                    [--anonfolio PATH]

Run from the repository root. It builds the `replay_speed` example
(`cargo build --release --example replay_speed`), writes a sequential
first-touch trace (one `mmap` of LINES pages, then `w` of each page in
order: every line one order-0 fault) to DIR/seq.trace, and .zst (`zstd -3`)
and .gz (`gzip -1`) copies of it, then, --reps times over, alternating:

- `wc -l` of the file, and `cat FILE > /dev/null`;
- `replay_speed read`: read(2) of the file 256 KiB at a time into a page
  aligned buffer (the parser's reads), no parsing;
- `replay_speed parse`: those reads and the parser, in the replay's batches,
  without simulating;
- `replay_speed replay`: the core's streamed replay (`replay_stream`, the
  trace read once), without Python;
- `anonfolio replay FILE --json`: the whole command, Python start-up
  included, on the plain file and on the .zst and .gz copies;
- with --in-memory, once: the replay as it was before streaming (the text
  read whole, parsed into a vector, replayed), for its memory.

Each line gives wall seconds (min / median / max), lines a second by wall
time (best and median), CPU seconds of the process (user + system, from
wait4) and lines per CPU second (the speed on one core, which other load
on this shared machine disturbs less than wall time), and the process's
peak resident memory (ru_maxrss). The replay's peak memory is compared
with the file's size and with the simulated state (16 bytes of host
memory a mapped page): a replay that held the trace would need the file's
size on top.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "target", "release", "examples", "replay_speed")


def run(cmd, shell=False):
    """Runs `cmd`; returns (wall s, cpu s, maxrss bytes, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"replay_speed.py: {cmd} failed ({p.returncode}): {err.decode(errors='replace').strip()}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024, out.decode()


def kv(text):
    return dict(re.findall(r"(\w+)=(\S+)", text))


def load():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=100_000_000, help="access lines (default 10^8)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(ROOT, "target", "replay-speed"))
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-compressed", action="store_true", help="skip the .zst and .gz copies")
    ap.add_argument("--in-memory", action="store_true", help="also the replay as before streaming, once")
    ap.add_argument("--anonfolio", default=shutil.which("anonfolio") or "anonfolio",
                    help="the CLI to time (default: the one on PATH)")
    a = ap.parse_args()

    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "replay_speed"], cwd=ROOT, check=True)
    os.makedirs(a.dir, exist_ok=True)
    plain = os.path.join(a.dir, "seq.trace")
    total_lines = a.lines + 2  # the comment and the mmap
    want_size = None
    if os.path.exists(plain):
        with open(plain, "rb") as f:
            first = f.readline()
        if f"{a.lines} pages".encode() in first:
            want_size = os.path.getsize(plain)
    if want_size is None:
        print(f"writing {plain} ({a.lines} lines)...", flush=True)
        run([EXAMPLE, "gen", str(a.lines), plain])
        for ext in (".zst", ".gz"):
            if os.path.exists(plain + ext):
                os.remove(plain + ext)
    size = os.path.getsize(plain)
    files = {"plain": plain}
    if not a.no_compressed:
        if not os.path.exists(plain + ".zst"):
            print("zstd -3 ...", flush=True)
            run(f"zstd -q -3 -T0 -f -o {plain}.zst {plain}", shell=True)
        if not os.path.exists(plain + ".gz"):
            print("gzip -1 ...", flush=True)
            run(f"gzip -1 -c {plain} > {plain}.gz", shell=True)
        files["zst"] = plain + ".zst"
        files["gz"] = plain + ".gz"

    run(f"cat {plain} > /dev/null", shell=True)  # into the page cache
    cases = [
        ("wc -l", lambda: run(["wc", "-l", plain])),
        ("cat > /dev/null", lambda: run(f"cat {plain} > /dev/null", shell=True)),
        ("read(2), 256 KiB", lambda: run([EXAMPLE, "read", plain])),
        ("read and parse, no simulation (native)", lambda: run([EXAMPLE, "parse", plain])),
        ("core replay_stream (native)", lambda: run([EXAMPLE, "replay", plain])),
        ("anonfolio replay FILE --json", lambda: run([a.anonfolio, "replay", plain, "--json"])),
    ]
    for k in ("zst", "gz"):
        if k in files:
            cases.append((f"anonfolio replay FILE.{k} --json",
                          lambda f=files[k]: run([a.anonfolio, "replay", f, "--json"])))
    results = {name: [] for name, _ in cases}
    details = {}
    print(f"load average before: {load()}", flush=True)
    for rep in range(a.reps):
        for name, fn in cases:
            r = fn()
            results[name].append(r)
            if "replay" in name:
                d = kv(r[3]) if "native" in name else {}
                if "--json" in name:
                    j = json.loads(r[3])
                    d = {"faults": j["faults"], "ops": j["ops"], "elapsed_s": j["elapsed_s"]}
                details.setdefault(name, []).append(d)
            print(f"  rep {rep + 1} {name}: {r[0]:.2f} s wall, {r[1]:.2f} s CPU, {r[2] / 2**20:.0f} MiB peak",
                  flush=True)
    if a.in_memory:
        results["in-memory replay, as before (native)"] = [run([EXAMPLE, "in-memory", plain])]
    print(f"load average after: {load()}")

    print()
    print(f"trace: {total_lines} lines, {size / 2**20:.0f} MiB plain", end="")
    for k in ("zst", "gz"):
        if k in files:
            print(f", {os.path.getsize(files[k]) / 2**20:.0f} MiB .{k}", end="")
    print(f"; simulated state {a.lines * 16 / 2**20:.0f} MiB (16 bytes a mapped page)")
    print()
    print("| what | wall s (min / median / max) | M lines/s by wall (best / median) "
          "| CPU s (min) | M lines per CPU s (best) | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name, rs in results.items():
        walls = sorted(r[0] for r in rs)
        cpus = sorted(r[1] for r in rs)
        med = statistics.median(walls)
        rss = max(r[2] for r in rs)
        print(f"| {name} | {walls[0]:.2f} / {med:.2f} / {walls[-1]:.2f} | "
              f"{total_lines / walls[0] / 1e6:.1f} / {total_lines / med / 1e6:.1f} | "
              f"{cpus[0]:.2f} | {total_lines / cpus[0] / 1e6:.1f} | {rss / 2**20:.0f} |")
    print()
    for name, ds in details.items():
        print(f"{name}: {ds[0]}")
    nat = results["core replay_stream (native)"]
    rss = max(r[2] for r in nat)
    print(f"\nstreamed replay peak RSS {rss / 2**20:.0f} MiB = simulated state "
          f"{a.lines * 16 / 2**20:.0f} MiB + {(rss - a.lines * 16) / 2**20:.0f} MiB; "
          f"the trace is {size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
