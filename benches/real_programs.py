#!/usr/bin/env python3
"""Real programs: what anonfolio predicts for them against what the kernel gave them.

    sudo python3 benches/real_programs.py [--programs NAME,...] [--out DIR] [--lock FILE]

For each program (installed from Debian by scripts/setup-system, run on the
fixed inputs of benches/programs/ or inputs generated here from a fixed seed,
always without address-space randomisation):

1. record it once: ``anonfolio record -o DIR/NAME.trace -- COMMAND``;
2. for each THP setting, predict: ``anonfolio replay NAME.trace --json``
   with that setting's knobs (``--threads`` as many as the trace has);
3. run the program itself on this kernel under the same setting and measure
   what it got (``anonfolio.measure``: anonymous faults, folios by size from
   its own pagemap and /proc/kpageflags at exit, peak and final anonymous
   RSS); once for a single-threaded program (it is deterministic), ``--runs``
   times for a multi-threaded one, whose runs differ from each other;
4. where 2048kB is enabled khugepaged runs, and may collapse the program's
   pages behind the fault path: each such setting is measured three times,
   with khugepaged as the host has it, held off (below), and eager
   (``scan_sleep_millisecs=0``: it scans without pause while the program
   runs, which shows which figures its collapses move).

The programs do not call MADV_HUGEPAGE, so a setting is the per-size
``enabled=always`` (the top level stays ``madvise``): that reaches every
process on the machine while it is set, so each setting is set only for its
own short runs, under ``--lock`` (an flock shared with anything else here
that sets THP knobs), and every knob is put back as it was found, on error
and on SIGINT/SIGTERM/SIGHUP too.

Holding khugepaged off: on 6.18 it sleeps ``khugepaged/scan_sleep_millisecs``
between passes while some mm is registered with it, and a newly registered
mm wakes it at once only when none was. So a sentinel process of ours
registers an empty ``MADV_HUGEPAGE`` mapping first, then the sleep is set to
an hour (the write wakes khugepaged for one pass, which finds nothing to
collapse); the program's mm then waits in the queue. ``khugepaged/
pages_collapsed`` is read before and after each run: unchanged means nothing
on the machine was collapsed while the program ran.

Writes DIR/results.json (every figure of every run), DIR/table.md, and
prints the table. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from anonfolio.measure import MeasureError, Measurement, measure  # noqa: E402

THP = Path("/sys/kernel/mm/transparent_hugepage")
MTHP = ("16kB", "32kB", "64kB", "128kB", "256kB", "512kB", "1024kB")
SIZES = (*MTHP, "2048kB")


@dataclass(frozen=True)
class Setting:
    name: str
    always: tuple[str, ...]  # sizes at always; every other size never

    @property
    def pmd(self) -> bool:
        return "2048kB" in self.always

    def replay_args(self) -> list[str]:
        out = ["--thp-enabled", "madvise"]
        for s in SIZES:
            out += ["--thp", f"{s}={'always' if s in self.always else 'never'}"]
        return out


AS_FOUND, HELD, EAGER = "as the host has it", "held off", "eager"

SETTINGS = (
    Setting("4kB only", ()),
    Setting("16kB", ("16kB",)),
    Setting("64kB", ("64kB",)),
    Setting("16-1024kB", MTHP),
    Setting("2048kB", ("2048kB",)),
    Setting("16-2048kB", SIZES),
)


@dataclass(frozen=True)
class Program:
    name: str
    argv: list[str]
    threads: bool  # runs more than one thread (its runs differ from each other)
    about: str
    env: tuple[tuple[str, str], ...] = ()  # set for the recording and every run

    def environ(self) -> dict[str, str]:
        return {**os.environ, **dict(self.env)}


def _cc1() -> str:
    out = subprocess.run(["gcc", "-print-prog-name=cc1"], capture_output=True, text=True, check=False).stdout.strip()
    return out if out.startswith("/") else "cc1"


def make_inputs(d: Path) -> None:
    """Inputs too large to commit, generated from a fixed seed (the same bytes every time)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    text = d / "text.txt"
    if not text.exists():
        with open(text, "w") as f:
            n = 0
            while n < 6 << 20:
                line = " ".join(rng.choice(words) for _ in range(12)) + "\n"
                f.write(line)
                n += len(line)
    nums = d / "numbers.txt"
    if not nums.exists():
        with open(nums, "w") as f:
            for _ in range(300000):
                f.write(f"{rng.randrange(10**12):012d} {rng.choice(words)}\n")


def programs(inputs: Path, out: Path) -> list[Program]:
    p = ROOT / "benches" / "programs"
    return [
        # Both interpreters seed their string hashes at random unless told: the
        # same seed in every run, so that every run does the same.
        Program(
            "python3",
            ["/usr/bin/python3", "-s", "-S", str(p / "dicts.py")],
            False,
            "CPython running dicts.py",
            (("PYTHONHASHSEED", "0"),),
        ),
        Program(
            "perl",
            ["/usr/bin/perl", str(p / "words.pl")],
            False,
            "perl running words.pl",
            (("PERL_HASH_SEED", "0"), ("PERL_PERTURB_KEYS", "0")),
        ),
        Program(
            "sqlite3", ["/usr/bin/sqlite3", ":memory:", f".read {p / 'bench.sql'}"], False, "sqlite3 :memory: bench.sql"
        ),
        Program(
            "cc1",
            [_cc1(), "-quiet", "-O2", str(p / "compile.c"), "-o", str(out / "compile.s")],
            False,
            "gcc's cc1 -O2 on compile.c",
        ),
        Program("xz", ["/usr/bin/xz", "-6", "-T1", "-c", str(inputs / "text.txt")], False, "xz -6 -T1 of 6 MiB"),
        Program(
            "xz-T2",
            ["/usr/bin/xz", "-3", "-T2", "--block-size=2MiB", "-c", str(inputs / "text.txt")],
            True,
            "xz -3 -T2, 2 MiB blocks, of 6 MiB",
        ),
        Program(
            "sort-parallel",
            ["/usr/bin/sort", "--parallel=2", "-S", "64M", "-T", str(out), str(inputs / "numbers.txt")],
            True,
            "sort --parallel=2 of 300k lines",
        ),
    ]


# ----------------------------------------------------------------------------
# THP knobs: set for a run, always put back


def _read_knob(p: Path) -> str:
    text = p.read_text().strip()
    if "[" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text


class Knobs:
    """Every knob written through here is put back as found by :meth:`restore`."""

    def __init__(self) -> None:
        self.saved: dict[Path, str] = {}

    def set(self, p: Path, value: str) -> None:
        if p not in self.saved:
            self.saved[p] = _read_knob(p)
        p.write_text(value)

    def restore(self) -> None:
        errors = []
        for p, v in reversed(list(self.saved.items())):
            try:
                p.write_text(v)
            except OSError as e:
                errors.append(f"{p}: {e}")
        self.saved.clear()
        if errors:
            print("real_programs: could not restore " + "; ".join(errors), file=sys.stderr)


def _on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that restore the knobs


class Sentinel:
    """A process of ours with an empty ``MADV_HUGEPAGE`` mapping, so that
    khugepaged always has an mm registered (see the module's docstring).
    It is a grandchild, not a child: the measuring waits for any child of
    this process until all are gone."""

    def __init__(self) -> None:
        r_ready, w_ready = os.pipe()
        r_stop, self._stop = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                if os.fork() == 0:
                    os.dup2(r_stop, 0)
                    os.dup2(w_ready, 1)
                    os.closerange(3, 256)
                    os.execv(sys.executable, [sys.executable, "-c", SENTINEL])
            finally:
                os._exit(0)
        os.close(r_stop)
        os.close(w_ready)
        os.waitpid(pid, 0)
        self._ready = os.fdopen(r_ready, "rb")
        if self._ready.readline().strip() != b"ready":
            raise RuntimeError("the khugepaged sentinel did not start")

    def stop(self) -> None:
        os.close(self._stop)  # its stdin ends: it exits, and its stdout with it
        self._ready.read()
        self._ready.close()


@contextlib.contextmanager
def setting(s: Setting, lock: Optional[Path], khugepaged: str) -> Iterator[None]:
    """The host under setting ``s`` for the body, under the lock; khugepaged
    as the host has it, ``held off``, or ``eager`` (no sleep between passes)."""
    lf = open(lock, "a") if lock else None  # noqa: SIM115 (held across the yield)
    knobs = Knobs()
    sentinel: Optional[Sentinel] = None
    try:
        if lf:
            fcntl.flock(lf, fcntl.LOCK_EX)
        knobs.set(THP / "enabled", "madvise")
        for size in SIZES:
            knobs.set(THP / f"hugepages-{size}" / "enabled", "always" if size in s.always else "never")
        if khugepaged == EAGER:
            knobs.set(THP / "khugepaged" / "scan_sleep_millisecs", "0")
        if khugepaged == HELD:
            sentinel = Sentinel()  # its mapping is advised: its mm is registered
            knobs.set(THP / "khugepaged" / "scan_sleep_millisecs", "3600000")
            wait_khugepaged_asleep()  # the pass that write woke, before the program
        yield
    finally:
        knobs.restore()
        if sentinel is not None:
            sentinel.stop()
        if lf:
            lf.close()


SENTINEL = """
import mmap, sys
m = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE)
print("ready", flush=True)
sys.stdin.read()
"""


def _khugepaged_state() -> str:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() == "khugepaged":
                    stat = (d / "stat").read_text()
                    return stat[stat.rindex(")") + 2]
    return "?"


def wait_khugepaged_asleep(timeout_s: float = 20.0) -> None:
    """Until khugepaged sleeps and its counters stand still for 0.5 s: the
    pass woken by a knob write can take a few hundred milliseconds (it
    collapses other processes' memory meanwhile)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        now = (collapsed(), int((THP / "khugepaged" / "full_scans").read_text()), _khugepaged_state())
        if now == last and now[2] == "S":
            return
        last = now
        time.sleep(0.5)


def collapsed() -> int:
    return int((THP / "khugepaged" / "pages_collapsed").read_text())


# ----------------------------------------------------------------------------


def anonfolio() -> list[str]:
    exe = shutil.which("anonfolio", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "anonfolio"]


def record(prog: Program, trace: Path) -> str:
    """Records ``prog`` into ``trace``; the recorder's one error line, or ""."""
    rec = subprocess.run(
        [*anonfolio(), "record", "-o", str(trace), "--", *prog.argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
        env=prog.environ(),
    )
    if rec.returncode == 0:
        return ""
    lines = rec.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {rec.returncode}"


def trace_threads(trace: Path) -> int:
    n = 1
    with open(trace) as f:
        for line in f:
            if line.startswith("@"):
                n = max(n, int(line[1 : line.index(" ")]) + 1)
    return n


def predict(trace: Path, s: Setting, threads: int) -> dict[str, Any]:
    cmd = [*anonfolio(), "replay", str(trace), "--json", *s.replay_args()]
    if threads > 1:
        cmd += ["--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        err = r.stderr.strip().splitlines()
        return {"error": err[-1] if err else f"exit status {r.returncode}"}
    d: dict[str, Any] = json.loads(r.stdout)
    return d


def pred_folios(p: dict[str, Any]) -> dict[str, int]:
    return {k: v.get("nr_anon", 0) for k, v in p.get("mthp", {}).items() if v.get("nr_anon", 0)}


def run_kernel(prog: Program, s: Setting, runs: int, lock: Optional[Path], khugepaged: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with setting(s, lock, khugepaged):
        for _ in range(runs):
            before = collapsed()
            try:
                m: Measurement = measure(prog.argv, env=prog.environ())
            except MeasureError as e:
                out.append({"error": str(e)})
                continue
            d = m.to_dict()
            d["khugepaged_collapsed"] = collapsed() - before
            out.append(d)
    return out


def err(pred: int, meas: int) -> str:
    if pred == meas:
        return "0"
    pct = f" ({(pred - meas) / meas:+.1%})" if meas else ""
    return f"{pred - meas:+d}{pct}"


def fmt_range(vals: list[int], scale: int = 1) -> str:
    lo, hi = min(vals) // scale, max(vals) // scale
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def inside(pred: int, vals: list[int]) -> str:
    if len(vals) == 1:
        return err(pred, vals[0])
    if min(vals) <= pred <= max(vals):
        return "in range"
    edge = min(vals) if pred < min(vals) else max(vals)
    return f"{err(pred, edge)} outside"


def folio_cell(pred: dict[str, int], meas: list[dict[str, int]]) -> str:
    sizes = sorted({*pred, *(k for m in meas for k in m if k != "4kB")}, key=lambda k: int(k[:-2]))
    parts = []
    for k in sizes:
        mv = [m.get(k, 0) for m in meas]
        parts.append(f"{k} {fmt_range(mv)}/{pred.get(k, 0)}")
    return ", ".join(parts) if parts else "—"


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| program | setting | khugepaged | anon faults: kernel / predicted, error | final anon RSS KiB: "
        "kernel / predicted, error | peak anon RSS KiB: kernel / predicted, error | "
        "large folios at exit: kernel/predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        runs = [k for k in r["kernel"] if "error" not in k]
        p = r["predicted"]
        kh = r["khugepaged"]
        if not runs:
            msg = r["kernel"][0]["error"] if r["kernel"] else "no run"
            rows.append(f"| {r['program']} | {r['setting']} | {kh} | kernel: {msg} | | | |")
            continue
        if r["khugepaged"] == HELD:
            if any(k["khugepaged_collapsed"] for k in runs):
                kh += " (but collapsed!)"
        elif any(k["khugepaged_collapsed"] for k in runs):
            kh += f" ({max(k['khugepaged_collapsed'] for k in runs)} collapses on the host)"
        f = [k["faults"] for k in runs]
        rss = [k["rss_bytes"] for k in runs]
        peak = [k["rss_peak_bytes"] for k in runs]
        mf = [k["folios"] for k in runs]
        if "error" in p:
            rows.append(
                f"| {r['program']} | {r['setting']} | {kh} | {fmt_range(f)} / replay: {p['error']} | "
                f"{fmt_range(rss, 1024)} / — | {fmt_range(peak, 1024)} / — | {folio_cell({}, mf)} |"
            )
            continue
        pf, pr, pp = p["faults"], p["rss_bytes"], p["rss_peak_bytes"]
        others = [o for o in r.get("predicted_other_recordings", []) if "error" not in o]

        def also(key: str, scale: int = 1, p: dict[str, Any] = p, others: list[dict[str, Any]] = others) -> str:
            if not others:
                return ""
            return f" [{fmt_range([p[key], *(o[key] for o in others)], scale)}]"

        rows.append(
            f"| {r['program']} | {r['setting']} | {kh} | {fmt_range(f)} / {pf}{also('faults')}, {inside(pf, f)} | "
            f"{fmt_range(rss, 1024)} / {pr // 1024}{also('rss_bytes', 1024)}, "
            f"{inside(pr // 1024, [x // 1024 for x in rss])} | "
            f"{fmt_range(peak, 1024)} / {pp // 1024}{also('rss_peak_bytes', 1024)}, "
            f"{inside(pp // 1024, [x // 1024 for x in peak])} | "
            f"{folio_cell(pred_folios(p), mf)} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--programs", help="comma-separated names (default: all)")
    ap.add_argument("--settings", help="comma-separated setting names (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "target" / "real-programs")
    ap.add_argument("--runs", type=int, default=3, help="kernel runs of a multi-threaded program (default 3)")
    ap.add_argument(
        "--records",
        type=int,
        default=3,
        help="recordings of a multi-threaded program (default 3): the table predicts from the first, "
        "the others show how much the program's own history differs from run to run",
    )
    ap.add_argument("--lock", type=Path, help="flock this file while THP knobs are set")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("real_programs: needs root (recording, THP knobs, pagemap frames)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    make_inputs(out / "inputs")
    progs = programs(out / "inputs", out)
    if args.programs:
        want = args.programs.split(",")
        unknown = [w for w in want if w not in {p.name for p in progs}]
        if unknown:
            print(f"real_programs: unknown program {unknown[0]!r}", file=sys.stderr)
            return 2
        progs = [p for p in progs if p.name in want]
    settings: tuple[Setting, ...] = SETTINGS
    if args.settings:
        settings = tuple(s for s in SETTINGS if s.name in args.settings.split(","))
    results: list[dict[str, Any]] = []
    for prog in progs:
        traces = []
        for i in range(args.records if prog.threads else 1):
            trace = out / (f"{prog.name}.trace" if i == 0 else f"{prog.name}-r{i + 1}.trace")
            t0 = time.perf_counter()
            problem = record(prog, trace)
            if problem:
                print(f"{prog.name}: record failed: {problem}", file=sys.stderr)
                results.append({"program": prog.name, "error": f"record: {problem}"})
                break
            traces.append(trace)
            print(f"{prog.name}: recorded {trace.name} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if not traces:
            continue
        threads = trace_threads(traces[0])
        for s in settings:
            preds = [predict(t, s, trace_threads(t)) for t in traces]
            modes = [AS_FOUND, HELD, EAGER] if s.pmd else ["not running"]
            for mode in modes:
                runs = args.runs if prog.threads else 1
                kern = run_kernel(prog, s, runs, args.lock, mode)
                results.append(
                    {
                        "program": prog.name,
                        "about": prog.about,
                        "argv": prog.argv,
                        "setting": s.name,
                        "khugepaged": mode,
                        "threads": threads,
                        "predicted": preds[0],
                        "predicted_other_recordings": preds[1:],
                        "kernel": kern,
                    }
                )
                print(table([results[-1]]).splitlines()[-1], flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    tab = table([r for r in results if "setting" in r])
    (out / "table.md").write_text(tab)
    print()
    print(tab)
    for r in results:
        if "error" in r:
            print(f"{r['program']}: {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
