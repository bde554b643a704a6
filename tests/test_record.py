"""``anonfolio record`` on this machine's kernel: small C programs that do
known things to their memory, recorded, and the trace compared line by line
with what they did. Every recording here also passes the recorder's own
check at exit (the VMAs and present pages of /proc/PID equal the trace's),
or it would exit 2."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import anonfolio

PROGRAMS = Path(__file__).parent / "record_programs"
PG = 4096
REPO = Path(anonfolio.__file__).resolve().parent.parent


def _why_not() -> str:
    if os.geteuid() != 0:
        return "recording needs root"
    if shutil.which("gcc") is None:
        return "gcc is missing (the test programs are C)"
    tracing = Path("/sys/kernel/tracing")
    if not (tracing / "instances").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracing)], capture_output=True)
    if not (tracing / "events" / "exceptions" / "page_fault_user").is_dir():
        return "tracefs with the exceptions:page_fault_user tracepoint is not available"
    return ""


WHY = _why_not()
pytestmark = pytest.mark.skipif(bool(WHY), reason=WHY)


@pytest.fixture(scope="module")
def bins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("record-bin")
    built = {}
    for src in sorted(PROGRAMS.glob("*.c")):
        exe = out / src.stem
        subprocess.run(["gcc", "-O1", "-pthread", "-o", str(exe), str(src)], check=True)
        built[src.stem] = exe
    return built


def record(out: Path, *command: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "anonfolio", "record", *extra, "-o", str(out), "--", *command],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def ops(trace: Path) -> list[tuple[int, list[str]]]:
    """(thread, words) of every line that is not a comment."""
    out = []
    for line in trace.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        words = line.split()
        t = 0
        if words[0].startswith("@"):
            t = int(words[0][1:])
            words = words[1:]
        out.append((t, words))
    return out


def touches_in(trace: Path, lo: int, hi: int) -> list[tuple[int, str, int]]:
    return [(t, w[0], int(w[1], 0)) for t, w in ops(trace) if w[0] in ("r", "w") and lo <= int(w[1], 0) < hi]


def ops_from(trace: Path, first: str) -> list[str]:
    """The lines from the first one equal to ``first`` on, as text."""
    lines = [(f"@{t} " if t else "") + " ".join(w) for t, w in ops(trace)]
    return lines[lines.index(first) :]


def assert_parses(trace: Path) -> None:
    """Every line of the recording parses with the trace parser."""
    lines = [ln for ln in trace.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines, f"{trace} is empty"
    assert anonfolio.check_trace(trace.read_text()) == len(lines)


def ok(p: subprocess.CompletedProcess, status: int = 0) -> None:
    assert p.stderr == "" and p.returncode == status, (p.returncode, p.stderr)


def test_touch_pages_gives_one_line_per_page_write_or_read(bins: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.trace"
    p = record(out, str(bins["touch_pages"]), "16")
    ok(p, 3)  # the program's own exit status
    base = int(p.stdout.split()[0], 16)
    expect = [(0, "w", base + i * PG) for i in range(8)] + [(0, "r", base + i * PG + 100) for i in range(8, 16)]
    assert touches_in(out, base, base + 16 * PG) == expect
    seq = ops_from(out, f"mmap {base:#x} {16 * PG:#x}")
    in_range = [s for s in seq if base <= int(s.split()[-1 if s[0] in "rw" else 1], 0) < base + 16 * PG]
    assert len(in_range) == 18 and in_range[-1] == f"munmap {base:#x} {16 * PG:#x}"
    assert_parses(out)


def test_start_of_trace_has_the_stack_and_its_present_pages(bins: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.trace"
    ok(record(out, str(bins["touch_pages"]), "2"), 3)
    head = out.read_text().split("# pid", 1)[0]
    stack = re.search(r"^mmap (0x7ff\w+) (0x\w+) growsdown$", head, re.M)
    assert stack, head
    lo = int(stack.group(1), 16)
    hi = lo + int(stack.group(2), 16)
    present = [int(a, 16) for a in re.findall(r"^w (0x\w+)$", head, re.M) if lo <= int(a, 16) < hi]
    assert present, "the pages the kernel wrote at exec (argv, envp, auxv) are in the trace"
    assert re.search(r"^brk 0x5555\w+$", head, re.M), "the heap's start is set"


def test_vma_operations_mprotect_mremap_munmap(bins: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.trace"
    p = record(out, str(bins["vma_ops"]))
    ok(p)
    m = dict(kv.split("=") for kv in p.stdout.split())
    base, fence, q = (int(m[k], 16) for k in ("p", "fence", "q"))
    seq = [s for s in ops_from(out, f"mmap {base:#x} {9 * PG:#x}") if not s.startswith(("w 0x5555", "brk"))]
    expect = (
        [f"mmap {base:#x} {9 * PG:#x}", f"mprotect {fence:#x} {PG:#x} none"]
        + [f"w {base + i * PG:#x}" for i in range(8)]
        + [
            f"mprotect {base + 2 * PG:#x} {2 * PG:#x} r",
            f"mprotect {base + 2 * PG:#x} {2 * PG:#x} rw",
            f"mremap {base:#x} {8 * PG:#x} {q:#x} {16 * PG:#x}",
        ]
        # the moved pages are not faulted again: only the 8 new ones
        + [f"w {q + i * PG:#x}" for i in range(8, 16)]
        + [
            f"mremap {q:#x} {16 * PG:#x} {q:#x} {4 * PG:#x}",
            f"munmap {fence:#x} {PG:#x}",
        ]
    )
    assert seq == expect
    assert_parses(out)


def test_heap_grows_by_brk_and_each_page_is_written_once(bins: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.trace"
    p = record(out, str(bins["brk_malloc"]), "2000")
    ok(p)
    before, after = (int(x, 16) for x in p.stdout.split())
    brks = [int(w[1], 0) for _, w in ops(out) if w[0] == "brk"]
    assert brks[0] == before and brks[-1] == after and brks == sorted(set(brks))
    pages = [a & ~(PG - 1) for _, rw, a in touches_in(out, before, after)]
    assert len(pages) == len(set(pages)), "a page's first touch is one line"
    assert all(rw == "w" for _, rw, _ in touches_in(out, before, after))
    # malloc wrote a header into every block of 200 bytes, from the heap's start
    # on; above them lies the untouched top pad that malloc asks brk for
    assert sorted(pages) == list(range(before, max(pages) + PG, PG))
    assert max(pages) + PG - before >= 2000 * 200 and max(pages) < after
    assert_parses(out)


def test_second_thread_writes_are_thread_1_and_its_stack_is_map_stack(bins: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.trace"
    p = record(out, str(bins["thread_writes"]), "32")
    ok(p)
    base = int(p.stdout.split()[0], 16)
    assert touches_in(out, base, base + 32 * PG) == [(1, "w", base + i * PG) for i in range(32)]
    stacks = [w for t, w in ops(out) if w[0] == "mmap" and "stack" in w]
    assert len(stacks) == 1, "the thread's stack is one MAP_STACK mapping"
    lo, hi = int(stacks[0][1], 0), int(stacks[0][1], 0) + int(stacks[0][2], 0)
    assert any(t == 1 for t, _, _ in touches_in(out, lo, hi)), "thread 1 touched its own stack"
    assert_parses(out)


def test_threads_still_running_at_exit_group(bins: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.trace"
    ok(record(out, str(bins["threads_exit"])))
    threads = {t for t, w in ops(out) if w[0] == "w"}
    assert threads == {0, 1, 2, 3}
    p = record(out, str(bins["threads_exit"]), "abort")
    ok(p, 128 + signal.SIGABRT)


def test_fork_child_gets_its_own_trace(bins: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "f.trace"
    p = record(out, str(bins["fork_child"]), "8")
    ok(p, 6)
    _, pid, addr = p.stdout.split()
    child = tmp_path / f"f.{pid}.trace"
    base = int(addr, 16)
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(["f.trace", child.name])
    assert touches_in(child, base, base + 8 * PG) == [(0, "w", base + i * PG) for i in range(8)]
    _start, run = child.read_text().split(f"# pid {pid} runs\n")
    assert f"\nmmap {base:#x} {8 * PG:#x}\n" in "\n" + run
    assert touches_in(out, base, base + 8 * PG) == []
    assert child.read_text().startswith(f"# fork of pid {pid}")
    assert_parses(child)


def test_read_into_a_fresh_buffer_is_a_write_per_page_inside_the_system_call(
    bins: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "t.trace"
    p = record(out, str(bins["read_fresh"]), "8")
    ok(p)
    base = int(p.stdout.split()[0], 16)
    assert touches_in(out, base, base + 8 * PG) == [(0, "w", base + i * PG) for i in range(8)]


def test_execve_starts_the_trace_afresh(bins: dict[str, Path], tmp_path: Path) -> None:
    direct, via_sh = tmp_path / "d.trace", tmp_path / "s.trace"
    ok(record(direct, str(bins["touch_pages"]), "4"), 3)
    ok(record(via_sh, "/bin/sh", "-c", f"exec {bins['touch_pages']} 4"), 3)
    strip = [w for _, w in ops(direct)]
    assert [w for _, w in ops(via_sh)] == strip, "nothing of the shell is left"
    assert via_sh.read_text().count("# exec of pid") == 1


def test_bad_command_exits_2_with_one_line(tmp_path: Path) -> None:
    for cmd in (str(tmp_path / "nothing-here"), "no-such-command-anywhere", "/etc/passwd"):
        p = record(tmp_path / "t.trace", cmd)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "cannot run" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "anonfolio", "record", "-o", str(tmp_path / "t.trace")],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "missing COMMAND" in p.stderr


def test_first_touch_the_faults_cannot_show_is_an_error_and_the_trace_is_kept(
    bins: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "t.trace"
    p = record(out, str(bins["gup_write"]))
    base = int(p.stdout.split()[0], 16)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert f"never touched (first at {base + PG:#x})" in p.stderr
    assert f"mmap {base:#x} {4 * PG:#x}" in out.read_text()


def test_events_the_tracing_drops_are_an_error(bins: dict[str, Path], tmp_path: Path) -> None:
    """The recorder is stopped while the program faults 64k pages into a
    64 KiB buffer: the kernel drops events, and the recording says so."""
    out = tmp_path / "t.trace"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "anonfolio", "record", "--buffer-size", "64", "-o", str(out), "--",
         str(bins["touch_pages"]), "65536"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.time() + 30
    while time.time() < deadline:  # wait for the program to be faulting (past its exec stop)
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        try:
            stat = Path(f"/proc/{kids[0]}/stat").read_text().rsplit(")", 1)[1].split()
        except (IndexError, OSError):
            continue
        if Path(f"/proc/{kids[0]}/exe").resolve() == bins["touch_pages"].resolve() and int(stat[7]) > 2000:
            break
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert "lost events" in err
