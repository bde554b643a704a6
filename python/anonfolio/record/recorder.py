"""``record``: run a command and write its anonymous memory's history.

The mechanism (measured against perf record and ptrace; see the package
docstring): the kernel's own tracepoints in a tracefs instance of ours,
``exceptions:page_fault_user`` / ``page_fault_kernel`` (every fault, the
ones taken inside system calls too), ``syscalls:sys_enter_*/sys_exit_*`` of
the memory system calls and ``sched:sched_process_fork``, stamped with the
``counter`` trace clock so the order across CPUs is the order they
happened in; ptrace only to hold a process still at execve, at a fork
child's first instruction and at exit, where /proc gives the truth to start
from and to check against.
"""

from __future__ import annotations

import os
import signal
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from . import procfs
from .model import Mm, RecordError, Snapshot
from .tracefs import INSTANCE_PREFIX, EventFormat, Instance, MissedEvents, TracefsError, read_events
from .tracer import LaunchError, Tracer, child_setup, exit_status, resolve, run_traced

#: The memory system calls whose effects a trace carries.
SYSCALLS = ("mmap", "munmap", "mprotect", "pkey_mprotect", "mremap", "madvise", "brk", "mlock", "mlock2")
FAULTS = ("exceptions/page_fault_user", "exceptions/page_fault_kernel")
EVENTS = (
    FAULTS + tuple(f"syscalls/sys_{d}_{s}" for s in SYSCALLS for d in ("enter", "exit")) + ("sched/sched_process_fork",)
)
MARKER = "ftrace/print"
MARK = "anonfolio-record "
#: Per-CPU ring buffer: large enough that the readers (which copy pages out
#: while the program runs) never fall behind a burst of faults.
DEFAULT_BUFFER_KB = 64 * 1024

_PID = struct.Struct("<4xi")


@dataclass
class Result:
    status: int  # the command's exit status (128+N when signal N killed it)
    traces: dict[int, Path] = field(default_factory=dict)  # tgid -> trace file
    events: int = 0
    lines: int = 0
    error: Optional[str] = None
    run_s: float = 0.0  # from starting COMMAND to the last traced task's end
    process_s: float = 0.0  # decoding the events and writing the traces


def trace_path(out: Path, tgid: int, root: int) -> Path:
    if tgid == root:
        return out
    name = out.name[: -len(".trace")] if out.name.endswith(".trace") else out.name
    return out.with_name(f"{name}.{tgid}.trace")


def record(command: Sequence[str], out: Path, buffer_kb: int = DEFAULT_BUFFER_KB) -> Result:
    """Runs ``command`` under the recorder; writes ``out`` (and
    ``OUT.PID.trace`` for every further process). Raises
    :class:`RecordError` when it cannot start; a recording that turns out
    wrong or incomplete comes back with ``error`` set, its traces kept."""
    if not command:
        raise RecordError("missing COMMAND to record")
    if os.geteuid() != 0:
        raise RecordError("recording needs root (tracefs, /proc/PID/pagemap frame numbers)")
    try:
        exe = resolve(command[0])
    except LaunchError as e:
        raise RecordError(str(e)) from None
    try:
        zero = procfs.zero_pfn()
    except OSError as e:
        raise RecordError(f"cannot find the zero page: {e}") from None
    out = Path(out)
    if not out.parent.is_dir():
        raise RecordError(f"{out.parent}: no such directory for the trace")
    try:
        inst = Instance(f"{INSTANCE_PREFIX}{os.getpid()}", buffer_kb)
    except TracefsError as e:
        raise RecordError(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="anonfolio-record-") as tmp:
        try:
            return _record(inst, exe, list(command), out, zero, Path(tmp))
        except TracefsError as e:
            raise RecordError(str(e)) from None
        finally:
            inst.close()


def _record(inst: Instance, exe: str, command: list[str], out: Path, zero: int, tmp: Path) -> Result:
    formats = inst.formats((*EVENTS, MARKER))
    snaps: dict[int, Snapshot] = {}

    def on_snapshot(s: Snapshot) -> None:
        key = len(snaps)
        snaps[key] = s
        inst.marker(f"{MARK}{key}")

    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is the program's, as under `time`
    try:
        run = run_traced(inst, exe, command, EVENTS, zero, tmp, on_snapshot, child_setup)
    except LaunchError as e:
        raise RecordError(str(e)) from None
    finally:
        signal.signal(signal.SIGINT, old_int)
    tracer, paths, run_s = run.tracer, run.paths, run.run_s
    pid = tracer.root
    status = exit_status(tracer)
    res = Result(status, run_s=run_s)
    losses = inst.losses()
    t1 = time.perf_counter()
    try:
        _process(formats, paths, inst.page_size, snaps, tracer, out, pid, res)
    except MissedEvents as e:
        losses.append(str(e))
    res.process_s = time.perf_counter() - t1
    if losses:
        res.error = "the tracing lost events, the trace is incomplete: " + "; ".join(losses)
    elif tracer.errors:
        res.error = tracer.errors[0]
    elif tracer.unchecked and res.error is None:
        res.error = f"{len(tracer.unchecked)} process(es) went without the exit check (killed before they could stop)"
    return res


class _Task:
    __slots__ = ("mm", "t")

    def __init__(self, mm: Mm, t: int):
        self.mm = mm
        self.t = t


def _process(
    formats: dict[int, EventFormat],
    paths: list[Path],
    page_size: int,
    snaps: dict[int, Snapshot],
    tracer: Tracer,
    out: Path,
    root: int,
    res: Result,
) -> None:
    """Replays the event stream into one Mm a process; writes the traces."""
    kinds: dict[int, tuple[str, str, struct.Struct]] = {}
    for eid, f in formats.items():
        if f.system == "exceptions":
            kinds[eid] = ("fault", "", f.getter("address", "error_code"))
        elif f.name.startswith("sys_enter_"):
            names = [n for n in f.fields if not n.startswith("common_") and n != "__syscall_nr"]
            kinds[eid] = ("enter", f.name[len("sys_enter_") :], f.getter(*names))
        elif f.name.startswith("sys_exit_"):
            kinds[eid] = ("exit", f.name[len("sys_exit_") :], f.getter("ret"))
        elif f.name == "sched_process_fork":
            kinds[eid] = ("fork", "", f.getter("parent_pid", "child_pid"))
        elif f.name == "print":
            kinds[eid] = ("print", "", struct.Struct("<"))
    tasks: dict[int, _Task] = {}
    pending: dict[int, tuple[str, tuple[int, ...]]] = {}
    fork_brk: dict[int, int] = {}
    files: dict[int, TextIO] = {}
    done: set[int] = set()
    task_size = procfs.TASK_SIZE

    def open_mm(tgid: int) -> Mm:
        path = trace_path(out, tgid, root)
        old = files.pop(tgid, None)
        if old is not None:
            old.close()  # execve: the trace starts afresh with the new image
        f = open(path, "w")  # noqa: SIM115 (kept open across events; closed below)
        files[tgid] = f
        res.traces[tgid] = path
        return Mm(f, str(path))

    try:
        for _ts, _cpu, etype, data in read_events(paths, page_size):
            res.events += 1
            kind = kinds.get(etype)
            if kind is None:
                continue
            what, name, st = kind
            (pid,) = _PID.unpack_from(data)
            if what == "fault":
                task = tasks.get(pid)
                if task is not None:
                    addr, err = st.unpack_from(data)
                    if addr < task_size:
                        task.mm.fault(task.t, addr, bool(err & 2))
            elif what == "enter":
                pending[pid] = (name, st.unpack_from(data))
            elif what == "exit":
                p = pending.pop(pid, None)
                task = tasks.get(pid)
                if p is None or p[0] != name or task is None:
                    continue
                (ret,) = st.unpack_from(data)
                if -4096 < ret < 0:
                    continue  # failed: nothing changed
                _syscall(task, name, p[1], ret)
            elif what == "fork":
                parent, child = st.unpack_from(data)
                ptask = tasks.get(parent)
                if ptask is None:
                    continue
                if tracer.shares.get(child):
                    tasks[child] = _Task(ptask.mm, ptask.mm.new_thread())
                else:
                    fork_brk[child] = ptask.mm.brk
            elif what == "print":
                text = data[16:].split(b"\0", 1)[0].decode(errors="replace").strip()
                if not text.startswith(MARK):
                    continue
                snap = snaps[int(text[len(MARK) :])]
                if snap.kind == "exit":
                    task = tasks.get(snap.tid)
                    if task is None or id(task.mm) in done:
                        continue
                    err = task.mm.check(snap)
                    done.add(id(task.mm))
                    if err and res.error is None:
                        res.error = f"{task.mm.name}: {err}"
                    continue
                mm = open_mm(snap.tgid)
                mm.start_from(snap, fork_brk.pop(snap.tid, None) if snap.kind == "fork" else None)
                tasks[snap.tid] = _Task(mm, mm.new_thread())
        res.lines = sum(t.mm.lines for t in {id(t.mm): t for t in tasks.values()}.values())
    finally:
        for fh in files.values():
            fh.close()


def _syscall(task: _Task, name: str, args: tuple[int, ...], ret: int) -> None:
    mm, t = task.mm, task.t
    if name == "mmap":
        addr, length, prot, flags, _fd, _off = args
        mm.mmap(t, addr, length, prot, flags, ret)
    elif name == "munmap":
        mm.munmap(t, args[0], args[1])
    elif name in ("mprotect", "pkey_mprotect"):
        mm.mprotect(t, args[0], args[1], args[2])
    elif name == "mremap":
        addr, old_len, new_len, flags, _new = args
        mm.mremap(t, addr, old_len, new_len, flags, ret)
    elif name == "madvise":
        mm.madvise(t, args[0], args[1], args[2])
    elif name == "brk":
        mm.set_brk(t, ret)
    elif name == "mlock":
        mm.mlock(t, args[0], args[1], 0)
    elif name == "mlock2":
        mm.mlock(t, args[0], args[1], args[2])
