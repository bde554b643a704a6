"""Nothing a Python program does can crash or corrupt the simulator: the
VMA tree and the figures are read under the mmap lock while other threads
replay, per-CPU records die with their run, and reading changes nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import anonfolio

BASE = 0x7F0000000000


def _run(code: str) -> subprocess.CompletedProcess[str]:
    # In a child: a crash of the interpreter is a failed test, not a dead suite.
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_reading_vmas_and_stats_while_another_thread_replays_survives() -> None:
    p = _run(
        f"""
        import threading, anonfolio
        sim = anonfolio.Simulator(anonfolio.Config(hugepages={{"64kB": "always"}}))
        trace = "".join(
            f"mmap {{{BASE} + i * 0x400000:#x}} 0x200000\\nw {{{BASE} + i * 0x400000:#x}}\\n"
            f"munmap {{{BASE} + i * 0x400000:#x}} 0x100000\\n" for i in range(64)
        ) + "".join(f"munmap {{{BASE} + i * 0x400000 + 0x100000:#x}} 0x100000\\n" for i in range(64))
        done = threading.Event()
        def replays():
            for _ in range(150):
                sim.replay(trace)
            done.set()
        t = threading.Thread(target=replays)
        t.start()
        reads = 0
        while not done.is_set():
            sim.vmas()
            sim.stats()
            reads += 1
        t.join()
        assert reads > 0
        assert sim.vmas() == [], sim.vmas()
        print("ok", reads)
        """
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("ok")


def test_many_small_replays_on_one_simulator_keep_memory_flat() -> None:
    p = _run(
        f"""
        import anonfolio
        def rss_kb():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        sim = anonfolio.Simulator(anonfolio.Config(memory="64M"))
        trace = "mmap {BASE:#x} 0x10000\\nw {BASE:#x}\\nmunmap {BASE:#x} 0x10000\\n"
        for _ in range(2000):
            sim.replay(trace)
        before = rss_kb()
        for _ in range(18000):
            sim.replay(trace)
        after = rss_kb()
        s = sim.stats()
        assert s.faults == 20000, s.faults
        print(after - before)
        """
    )
    assert p.returncode == 0, p.stderr[-2000:]
    # Each run's per-CPU record used to stay registered (about a kilobyte
    # each): 18,000 more replays grew the process by tens of megabytes.
    assert int(p.stdout.split()[-1]) < 4096, p.stdout


def test_reading_stats_twice_gives_identical_figures() -> None:
    sim = anonfolio.Simulator(anonfolio.Config(hugepages={"64kB": "always"}))
    sim.replay(f"mmap {BASE:#x} 0x200000\nw {BASE:#x}\nr {BASE + 0x100000:#x}\nmunmap {BASE:#x} 0x10000\n")
    a = sim.stats()
    sim.vmas()
    b = sim.stats()
    assert a == b
    assert a.rss_peak_bytes == 16 * 4096 and a.rss_bytes == 0
