"""ptrace, through ctypes, for the few moments the recorder must hold a
process still: right after ``execve`` (to read the image the kernel built),
when a fork's child first stops (to read the copy it got), and at exit
(``PTRACE_O_TRACEEXIT``: the mm is still there to compare with). System
calls and faults are not ptraced; they come from the tracepoints.

Each such moment is written into the trace stream as a marker, so the
stream processing knows exactly which events came before the snapshot.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import procfs
from .model import Snapshot
from .tracefs import Instance

PTRACE_TRACEME = 0
PTRACE_CONT = 7
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_EXITKILL = 0x100000
PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK, PTRACE_EVENT_CLONE = 1, 2, 3
PTRACE_EVENT_EXEC, PTRACE_EVENT_VFORK_DONE, PTRACE_EVENT_EXIT = 4, 5, 6
WALL = 0x40000000  # __WALL: wait for threads too
PR_SET_THP_DISABLE = 41
ADDR_NO_RANDOMIZE = 0x0040000
SYS_KCMP = 312
KCMP_VM = 1
PF_EXITING = 0x4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long


def _ptrace(req: int, pid: int, addr: int = 0, data: int = 0) -> int:
    r = _libc.ptrace(req, pid, ctypes.c_void_p(addr), ctypes.c_void_p(data))
    if r == -1:
        e = ctypes.get_errno()
        if e:
            raise OSError(e, f"ptrace({req}, {pid}): {os.strerror(e)}")
    return int(r)


def event_msg(pid: int) -> int:
    out = ctypes.c_ulong(0)
    _libc.ptrace(PTRACE_GETEVENTMSG, pid, None, ctypes.byref(out))
    return int(out.value)


def same_mm(a: int, b: int) -> bool:
    """kcmp(KCMP_VM): do tasks a and b share one mm?"""
    return bool(_libc.syscall(SYS_KCMP, a, b, KCMP_VM, 0, 0) == 0)


def child_setup(*, thp_disable: bool = True, then: Optional[Callable[[], None]] = None) -> None:
    """In the forked child, before execve: be traced, THP off for this mm and
    all it will exec and fork when ``thp_disable`` (PR_SET_THP_DISABLE is
    inherited and kept across execve), no address-space randomisation (as
    setarch -R), ``then`` (e.g. redirections), then stop until the tracer is
    ready."""
    if _libc.ptrace(PTRACE_TRACEME, 0, None, None) != 0:
        raise OSError(ctypes.get_errno(), "ptrace(PTRACE_TRACEME)")
    if thp_disable and _libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")
    cur = _libc.personality(0xFFFFFFFF)
    if _libc.personality(cur | ADDR_NO_RANDOMIZE) == -1:
        raise OSError(ctypes.get_errno(), "personality(ADDR_NO_RANDOMIZE)")
    if then is not None:
        then()
    os.kill(os.getpid(), signal.SIGSTOP)


class LaunchError(Exception):
    """COMMAND could not be started (``cannot run 'CMD': why``)."""


def resolve(cmd: str) -> str:
    """The executable COMMAND names: a path as given, else found on PATH."""
    if "/" in cmd:
        if not os.path.exists(cmd):
            raise LaunchError(f"cannot run {cmd!r}: no such file")
        if os.path.isdir(cmd) or not os.access(cmd, os.X_OK):
            raise LaunchError(f"cannot run {cmd!r}: not an executable file")
        return cmd
    found = shutil.which(cmd)
    if found is None:
        raise LaunchError(f"cannot run {cmd!r}: command not found")
    return found


@dataclass
class Launched:
    """A traced run that is over: its tracer, the raw ring-buffer copies and
    the run's wall seconds."""

    tracer: Tracer
    paths: list[Path]
    run_s: float


def run_traced(
    inst: Instance,
    exe: str,
    command: list[str],
    events: Sequence[str],
    zero: int,
    tmp: Path,
    on_snapshot: Callable[[Snapshot], None],
    setup: Callable[[], None],
    env: Optional[Mapping[str, str]] = None,
) -> Launched:
    """Forks, runs ``setup`` in the child (which must end stopped, as
    :func:`child_setup` does) and execs COMMAND; once it stops, attaches the
    tracer, enables ``events`` in ``inst`` with a reader per CPU into
    ``tmp``, and runs the program to its end. A child that cannot start
    reports why through a pipe: :class:`LaunchError`."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: becomes COMMAND
        os.close(rfd)
        try:
            setup()
            os.execve(exe, command, os.environ if env is None else env)
        except BaseException as e:
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            os.write(wfd, msg.encode()[:512])
        os._exit(127)
    os.close(wfd)
    try:
        _, st = os.waitpid(pid, 0x40000000)  # __WALL
        if not os.WIFSTOPPED(st):
            msg = os.read(rfd, 600).decode(errors="replace") or "it exited before it started"
            raise LaunchError(f"cannot run {command[0]!r}: {msg}")
        tracer = Tracer(pid, zero, on_snapshot)
        tracer.start()
        inst.follow(pid)
        inst.enable(events)
        paths = inst.start_readers(tmp)
        inst.on()
        t0 = time.perf_counter()
        tracer.run()
        run_s = time.perf_counter() - t0
        inst.stop()
    finally:
        failed = os.read(rfd, 600).decode(errors="replace")
        os.close(rfd)
    if failed:
        raise LaunchError(f"cannot run {command[0]!r}: {failed}")
    return Launched(tracer, paths, run_s)


def exit_status(tracer: Tracer) -> int:
    """The traced program's exit status as a shell reports it."""
    st = tracer.root_status if tracer.root_status is not None else 0
    return os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)


def _status_field(tid: int, name: str) -> Optional[int]:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Group:
    """The live tasks sharing one mm, as ptrace sees them."""

    gid: int
    tasks: set[int] = field(default_factory=set)
    exit_stopped: set[int] = field(default_factory=set)
    checked: bool = False
    traced: bool = True  # False for the image before the command's execve


class Tracer:
    """Runs the ptrace loop until every traced task is gone.

    ``on_snapshot(snap)`` is called with each snapshot; it must write the
    marker into the trace stream (the snapshot's key) before it returns, and
    before the task is let go.
    """

    def __init__(self, root: int, zero_pfn: int, on_snapshot: Callable[[Snapshot], None]):
        self.root = root
        self.zero_pfn = zero_pfn
        self.on_snapshot = on_snapshot
        self.groups: dict[int, Group] = {}
        self.group_of: dict[int, int] = {}
        self.shares: dict[int, bool] = {}  # new task -> runs in its creator's mm
        self.known: set[int] = set()
        self.root_status: Optional[int] = None
        self.unchecked: list[int] = []
        self._next_gid = 0
        self.errors: list[str] = []

    def _new_group(self, tid: int, traced: bool = True) -> Group:
        self._next_gid += 1
        g = Group(self._next_gid, {tid}, traced=traced)
        self.groups[g.gid] = g
        self.group_of[tid] = g.gid
        return g

    def _leave(self, tid: int, abandon: bool = False) -> None:
        """``tid`` is gone from its mm (``abandon``: by execve, which drops
        the old image unchecked)."""
        gid = self.group_of.pop(tid, None)
        if gid is None:
            return
        g = self.groups[gid]
        g.tasks.discard(tid)
        g.exit_stopped.discard(tid)
        if not g.tasks:
            if g.traced and not g.checked and not abandon:
                self.unchecked.append(gid)
            del self.groups[gid]

    def _snapshot(self, kind: str, tid: int) -> Snapshot:
        tgid = _status_field(tid, "Tgid") or tid
        vmas = procfs.read_smaps(tgid, tid)
        pages = procfs.present_pages(tgid, vmas, self.zero_pfn, tid)
        return Snapshot(kind, tid, tgid, vmas, pages, procfs.start_brk(tgid))

    def start(self) -> None:
        """The root child has stopped itself before execve: trace it."""
        opts = (
            PTRACE_O_TRACEFORK
            | PTRACE_O_TRACEVFORK
            | PTRACE_O_TRACECLONE
            | PTRACE_O_TRACEEXEC
            | PTRACE_O_TRACEEXIT
            | PTRACE_O_EXITKILL
        )
        _ptrace(PTRACE_SETOPTIONS, self.root, 0, opts)
        self.known.add(self.root)
        self._new_group(self.root, traced=False)

    def cont(self, tid: int, sig: int = 0) -> None:
        # The task may have died meanwhile (SIGKILL): its exit is reported by wait.
        with contextlib.suppress(OSError):
            _ptrace(PTRACE_CONT, tid, 0, sig)

    def run(self) -> None:
        self.cont(self.root)
        while True:
            try:
                tid, status = os.waitpid(-1, WALL)
            except ChildProcessError:
                return
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                if tid == self.root:
                    self.root_status = status
                self._leave(tid)
                continue
            if not os.WIFSTOPPED(status):
                continue
            sig = os.WSTOPSIG(status)
            event = status >> 16
            try:
                if sig == signal.SIGTRAP and event:
                    self._event(tid, event)
                    self.cont(tid)
                elif tid not in self.known:
                    self._first_stop(tid)
                    self.cont(tid)
                else:
                    self.cont(tid, sig)  # a signal for the program: deliver it
            except OSError as e:
                self.errors.append(f"reading /proc of task {tid}: {e.strerror or e}")
                self.cont(tid)

    def _event(self, tid: int, event: int) -> None:
        if event == PTRACE_EVENT_EXEC:
            former = event_msg(tid)
            self._leave(former, abandon=True)
            self._leave(tid, abandon=True)
            self.known.add(tid)
            self._new_group(tid)
            self.on_snapshot(self._snapshot("exec", tid))
        elif event == PTRACE_EVENT_EXIT:
            self._exit_stop(tid)
        # FORK/VFORK/CLONE: the child's own first stop does the work

    def _first_stop(self, tid: int) -> None:
        """A new task, stopped before it runs a user instruction."""
        self.known.add(tid)
        tgid = _status_field(tid, "Tgid")
        ppid = _status_field(tid, "PPid")
        creator: Optional[int] = None
        if tgid is not None and tgid != tid:
            creator = tgid  # a thread: CLONE_THREAD implies CLONE_VM
        elif ppid is not None and same_mm(tid, ppid):
            creator = ppid  # vfork, or clone(CLONE_VM) without CLONE_THREAD
        if creator is not None and creator in self.group_of:
            self.shares[tid] = True
            gid = self.group_of[creator]
            self.groups[gid].tasks.add(tid)
            self.group_of[tid] = gid
            return
        self.shares[tid] = False
        self._new_group(tid)
        self.on_snapshot(self._snapshot("fork", tid))

    def _exit_stop(self, tid: int) -> None:
        gid = self.group_of.get(tid)
        if gid is None:
            return
        g = self.groups[gid]
        g.exit_stopped.add(tid)
        if g.checked or not g.traced:
            return
        if all(self._exiting(t, g) for t in g.tasks if t != tid):
            # The last task, or exit_group/a fatal signal (the others are being
            # killed): the mm is whole until this task goes on.
            g.checked = True
            self.on_snapshot(self._snapshot("exit", tid))

    @staticmethod
    def _exiting(t: int, g: Group) -> bool:
        if t in g.exit_stopped:
            return True
        tgid = _status_field(t, "Tgid") or t
        flags, sigkill = procfs.task_flags(tgid, t)
        return flags < 0 or sigkill or bool(flags & PF_EXITING)
