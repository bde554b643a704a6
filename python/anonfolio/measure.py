"""What a real program got from the running kernel: its anonymous faults,
its folios by size, its peak and final anonymous RSS.

``measure(COMMAND)`` runs COMMAND once (as root, without address-space
randomisation, as ``setarch -R`` does, and with THP as the host's knobs
say: nothing is disabled for it) and reads:

- **folios by size** at exit, from the process's own ``/proc/PID/pagemap``
  and ``/proc/kpageflags``, as the kernel's ``tools/mm/thpmaps`` does: every
  present page of a private anonymous VMA gives a frame; a frame that is
  ``KPF_COMPOUND_TAIL`` belongs to the head below it in its naturally aligned
  window (a folio of order k starts at a frame aligned to 2^k), and the
  folio's order is the number of tails after its head. The shared zero
  page (and the huge zero page, ``KPF_ZERO_PAGE``) is no folio of the
  process's. The process is held at exit (``PTRACE_O_TRACEEXIT``) while its
  mm is still whole, so these are the folios it ended with.
- **anonymous faults**: the tracepoints ``exceptions:page_fault_user`` and
  ``page_fault_kernel`` (a fault inside a system call, ``read()`` into a
  fresh buffer) of the process's tasks between ``execve`` and exit, whose
  address is not in a file-backed or shared mapping at that moment (the
  mappings of ``execve``'s hold, followed through the ``mmap``, ``munmap``
  and ``mremap`` system-call tracepoints);
  plus the folios present at ``execve`` (``argv``/``envp`` written onto the
  new stack by the kernel through GUP, which raises no exception).
- **peak anonymous RSS**: the tracepoint ``kmem:rss_stat`` (``MM_ANONPAGES``
  of the process's mm: each change of the counter reports its new value),
  the highest value before exit, less the anonymous pages that copy-on-write
  made inside private *file* mappings (a write to a library's ``.data``):
  those are anonymous to the kernel but lie outside what a trace of the
  program's anonymous memory holds. Each increase of the counter right
  after a fault of the same task in a file mapping is such a page; their
  number at exit is checked against the pagemap (``file_cow_pages``).
- **final anonymous RSS**: present pages of the private anonymous VMAs at
  exit, the zero page excluded (the counter at exit, less the file COW
  pages, must say the same: ``rss_stat_exit_bytes``).

The tracepoints come through a tracefs instance of this process's own
(``anonfolio-measure-PID``), as ``anonfolio record`` uses one; nothing else's
tracing is touched, and lost events are an error, never a short count.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import functools
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .record import procfs
from .record.model import RecordError, Snapshot
from .record.tracefs import EventFormat, Instance, MissedEvents, TracefsError, read_events
from .record.tracer import LaunchError, child_setup, exit_status, resolve, run_traced

PAGE = procfs.PAGE
FAULTS = ("exceptions/page_fault_user", "exceptions/page_fault_kernel")
RSS_STAT = "kmem/rss_stat"
#: Where file-backed and shared mappings come and go (a fault there is not an
#: anonymous one): the loader maps and unmaps files (``ld.so.cache``) as it goes.
MAPPING_CALLS = tuple(f"syscalls/sys_{d}_{s}" for s in ("mmap", "munmap", "mremap") for d in ("enter", "exit"))
MAP_SHARED = 0x01
MAP_ANONYMOUS = 0x20
MARKER = "ftrace/print"
MARK = "anonfolio-measure "
INSTANCE_PREFIX = "anonfolio-measure-"
#: ``rss_stat``'s member for anonymous pages (include/linux/mm_types_task.h).
MM_ANONPAGES = 1
#: /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h).
KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16
KPF_ZERO_PAGE = 1 << 24
#: pagemap bit 61: a file page or shared anonymous (Documentation/admin-guide/mm/pagemap.rst).
PM_FILE = 1 << 61
#: The widest folio an anonymous fault maps on x86-64: a PMD, 512 pages.
WINDOW = 512
DEFAULT_BUFFER_KB = 32 * 1024

_PID = struct.Struct("<4xi")
_libc = ctypes.CDLL(None, use_errno=True)


class MeasureError(Exception):
    """The program could not be measured (cannot start, lost events, forks)."""


def size_name(pages: int) -> str:
    """A folio size as the sysfs folder names it: ``4kB``, ``64kB``, ``2048kB``."""
    return f"{pages * PAGE // 1024}kB"


@dataclass
class Measurement:
    status: int  # the command's exit status (128+N for signal N)
    faults: int  # anonymous faults: exceptions after execve + folios present at execve
    faults_user: int
    faults_kernel: int
    exec_folios: int
    folios: dict[str, int]  # "64kB" -> folios of that size mapped at exit ("4kB": order 0)
    folio_pages: dict[str, int]  # pages mapped of the folios of each size
    rss_bytes: int
    rss_peak_bytes: int
    rss_stat_exit_bytes: int  # the counter's last value before exit, less file COW pages
    file_cow_pages: int  # anonymous pages in private file mappings at exit (pagemap)
    file_cow_traced: int  # the same, as counted from the events
    anon_vmas: int  # private anonymous VMAs at exit
    anon_vma_bytes: int  # their total size: where a run's own history differed, so may this
    threads: int
    events: int
    run_s: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _redirect(cwd: Optional[str], stdin: Optional[str], stdout: Optional[str]) -> None:
    """In the forked child: the working directory and stdin/stdout as asked
    (/dev/null by default)."""
    if cwd is not None:
        os.chdir(cwd)
    fd = os.open(stdin or os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    fd = os.open(stdout or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)


class _KPageFlags:
    """/proc/kpageflags read a naturally aligned window of 512 frames at a time."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/kpageflags", os.O_RDONLY)
        self.cache: dict[int, tuple[int, ...]] = {}

    def window(self, pfn: int) -> tuple[int, ...]:
        w = pfn // WINDOW
        got = self.cache.get(w)
        if got is None:
            data = os.pread(self.fd, WINDOW * 8, w * WINDOW * 8)
            got = struct.unpack(f"<{len(data) // 8}Q", data)
            self.cache[w] = got
        return got

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Folios:
    """Folios mapped by a set of VMAs: head frame -> (pages in the folio, pages mapped)."""

    heads: dict[int, list[int]] = field(default_factory=dict)
    present: int = 0  # present pages, the zero page excluded

    def by_size(self) -> tuple[dict[str, int], dict[str, int]]:
        count: dict[int, int] = {}
        mapped: dict[int, int] = {}
        for npages, nmapped in self.heads.values():
            count[npages] = count.get(npages, 0) + 1
            mapped[npages] = mapped.get(npages, 0) + nmapped
        return (
            {size_name(k): count[k] for k in sorted(count)},
            {size_name(k): mapped[k] for k in sorted(mapped)},
        )


def folios_of(pid: int, vmas: Sequence[procfs.Vma], zero_pfn: int, tid: Optional[int] = None) -> Folios:
    """The folios that the private anonymous VMAs of a stopped process map,
    as tools/mm/thpmaps finds them (see the module's docstring)."""
    kpf = _KPageFlags()
    out = Folios()
    try:
        for v in vmas:
            if not v.anon:
                continue
            for e in procfs.read_pagemap(pid, v.start, v.end, tid):
                if not e & procfs.PM_PRESENT or e & PM_FILE:
                    continue
                pfn = e & procfs.PM_PFN_MASK
                if pfn == zero_pfn:
                    continue
                win = kpf.window(pfn)
                i = pfn % WINDOW
                flags = win[i] if i < len(win) else 0
                if flags & KPF_ZERO_PAGE:
                    continue
                out.present += 1
                head = i
                if flags & KPF_COMPOUND_TAIL:
                    while head > 0 and not win[head] & KPF_COMPOUND_HEAD:
                        head -= 1
                hpfn = pfn - i + head
                entry = out.heads.get(hpfn)
                if entry is None:
                    npages = 1
                    if win[head] & KPF_COMPOUND_HEAD:
                        j = head + 1
                        while j < len(win) and win[j] & KPF_COMPOUND_TAIL:
                            j += 1
                        npages = j - head
                    entry = out.heads[hpfn] = [npages, 0]
                entry[1] += 1
    finally:
        kpf.close()
    return out


def file_cow_pages(pid: int, vmas: Sequence[procfs.Vma], tid: Optional[int] = None) -> int:
    """Anonymous pages (copy-on-write copies) inside private file mappings."""
    n = 0
    for v in vmas:
        if v.anon or v.perms[3] != "p" or v.name in ("[vvar]", "[vdso]", "[vvar_vclock]"):
            continue
        n += sum(1 for e in procfs.read_pagemap(pid, v.start, v.end, tid) if e & procfs.PM_PRESENT and not e & PM_FILE)
    return n


def measure(
    command: Sequence[str],
    *,
    cwd: Optional[str] = None,
    stdin: Optional[str] = None,
    stdout: Optional[str] = None,
    env: Optional[dict[str, str]] = None,
    buffer_kb: int = DEFAULT_BUFFER_KB,
) -> Measurement:
    """Runs ``command`` once on this kernel and measures it (see the module's
    docstring), in ``cwd``, with ``stdin``/``stdout`` from/to those files
    (default /dev/null) and the environment ``env`` (default ours). Needs
    root. Raises :class:`MeasureError` when the command cannot start, forks
    a process of its own, or the tracing lost events."""
    if not command:
        raise MeasureError("missing COMMAND to measure")
    if os.geteuid() != 0:
        raise MeasureError("measuring needs root (tracefs, /proc/PID/pagemap frame numbers, /proc/kpageflags)")
    try:
        exe = resolve(command[0])
    except LaunchError as e:
        raise MeasureError(str(e)) from None
    try:
        zero = procfs.zero_pfn()
    except OSError as e:
        raise MeasureError(f"cannot find the zero page: {e}") from None
    for d in Path("/sys/kernel/tracing/instances").glob(INSTANCE_PREFIX + "*"):
        pid = d.name[len(INSTANCE_PREFIX) :]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                (d / "events" / "enable").write_text("0")
                d.rmdir()
    try:
        inst = Instance(f"{INSTANCE_PREFIX}{os.getpid()}", buffer_kb)
    except TracefsError as e:
        raise MeasureError(str(e)) from None
    try:
        with tempfile.TemporaryDirectory(prefix="anonfolio-measure-") as tmp:
            return _measure(inst, exe, list(command), zero, Path(tmp), cwd, stdin, stdout, env)
    except TracefsError as e:
        raise MeasureError(str(e)) from None
    finally:
        inst.close()


@dataclass
class _Held:
    snap: Snapshot
    folios: Folios
    file_cow: int = 0


def _measure(
    inst: Instance,
    exe: str,
    command: list[str],
    zero: int,
    tmp: Path,
    cwd: Optional[str],
    stdin: Optional[str],
    stdout: Optional[str],
    env: Optional[dict[str, str]],
) -> Measurement:
    events = (*FAULTS, RSS_STAT, *MAPPING_CALLS)
    formats = inst.formats((*events, MARKER))
    held: list[_Held] = []

    def on_snapshot(s: Snapshot) -> None:
        # The task is still stopped: its pagemap is what it was at this event.
        cow = file_cow_pages(s.tgid, s.vmas, s.tid)
        held.append(_Held(s, folios_of(s.tgid, s.vmas, zero, s.tid), cow))
        inst.marker(f"{MARK}{len(held) - 1}")

    # THP as the host's knobs say: that is what is measured.
    setup = functools.partial(child_setup, thp_disable=False, then=functools.partial(_redirect, cwd, stdin, stdout))
    try:
        run = run_traced(inst, exe, command, events, zero, tmp, on_snapshot, setup, env)
    except LaunchError as e:
        raise MeasureError(str(e)) from None
    tracer, paths, run_s = run.tracer, run.paths, run.run_s
    status = exit_status(tracer)
    kinds = [s.snap.kind for s in held]
    if "fork" in kinds:
        raise MeasureError(f"{command[0]!r} forked a process: measure follows one process only")
    if kinds.count("exec") != 1 or kinds.count("exit") != 1:
        raise MeasureError(f"{command[0]!r}: expected one execve and one exit, saw {kinds}")
    losses = inst.losses()
    try:
        m = _process(formats, paths, inst.page_size, held, status, run_s)
    except MissedEvents as e:
        losses.append(str(e))
    if losses:
        raise MeasureError("the tracing lost events: " + "; ".join(losses))
    if tracer.errors:
        raise MeasureError(tracer.errors[0])
    return m


class _Ranges:
    """A set of address ranges, as few as a process's file mappings."""

    def __init__(self) -> None:
        self.r: list[tuple[int, int]] = []

    def remove(self, lo: int, hi: int) -> None:
        out = []
        for s, e in self.r:
            if e <= lo or s >= hi:
                out.append((s, e))
                continue
            if s < lo:
                out.append((s, lo))
            if e > hi:
                out.append((hi, e))
        self.r = out

    def add(self, lo: int, hi: int) -> None:
        self.remove(lo, hi)
        bisect.insort(self.r, (lo, hi))

    def hit(self, addr: int) -> bool:
        i = bisect.bisect_right(self.r, (addr, 1 << 64)) - 1
        return i >= 0 and addr < self.r[i][1]


def _page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def _mapping_call(files: _Ranges, name: str, args: tuple[int, ...], ret: int) -> None:
    if name == "mmap":
        _addr, length, _prot, flags, fd, _off = args
        files.remove(ret, ret + _page_up(length))
        if flags & MAP_SHARED or (not flags & MAP_ANONYMOUS and fd < (1 << 31)):
            files.add(ret, ret + _page_up(length))
    elif name == "munmap":
        files.remove(args[0], args[0] + _page_up(args[1]))
    elif name == "mremap":
        addr, old_len, new_len, _flags, _new = args
        was_file = files.hit(addr)
        files.remove(addr, addr + _page_up(old_len))
        files.remove(ret, ret + _page_up(new_len))
        if was_file:
            files.add(ret, ret + _page_up(new_len))


def _process(
    formats: dict[int, EventFormat],
    paths: list[Path],
    page_size: int,
    held: list[_Held],
    status: int,
    run_s: float,
) -> Measurement:
    exit_h = next(h for h in held if h.snap.kind == "exit")
    exec_h = next(h for h in held if h.snap.kind == "exec")
    # A fault is anonymous unless it hits a file-backed or shared mapping as
    # the process had them at that moment: those of execve's hold, then
    # every mmap, munmap and mremap as the system calls' events say.
    files = _Ranges()
    for v in exec_h.snap.vmas:
        if not v.anon:
            files.add(v.start, v.end)
    pending: dict[int, tuple[str, tuple[int, ...]]] = {}
    kinds: dict[int, tuple[str, struct.Struct]] = {}
    for eid, f in formats.items():
        if f.system == "exceptions":
            kinds[eid] = ("user" if f.name.endswith("user") else "kernel", f.getter("address", "error_code"))
        elif f.name == "rss_stat":
            kinds[eid] = ("rss", f.getter("mm_id", "curr", "member", "size"))
        elif f.name == "print":
            kinds[eid] = ("print", struct.Struct("<"))
        elif f.name.startswith("sys_enter_"):
            names = [n for n in f.fields if not n.startswith("common_") and n != "__syscall_nr"]
            kinds[eid] = ("enter", f.getter(*names))
        elif f.name.startswith("sys_exit_"):
            kinds[eid] = ("exit", f.getter("ret"))
    names_of = {eid: f.name.split("_", 2)[2] for eid, f in formats.items() if f.name.startswith("sys_")}
    phase = 0  # 0 before execve's hold, 1 running, 2 after exit's hold
    faults = {"user": 0, "kernel": 0}
    tids: set[int] = set()
    last_file_fault: dict[int, bool] = {}
    mm_id: Optional[int] = None
    anon = 0
    # execve itself copies on write inside file mappings (the ELF loader
    # zeroes the tail of the last file page of .data, for the program and
    # for its interpreter): those pages are there at the first hold.
    file_cow = exec_h.file_cow
    peak = 0
    n = 0
    for _ts, _cpu, etype, data in read_events(paths, page_size):
        n += 1
        kind = kinds.get(etype)
        if kind is None:
            continue
        what, st = kind
        if what == "print":
            text = data[16:].split(b"\0", 1)[0].decode(errors="replace").strip()
            if text.startswith(MARK):
                phase = 1 if held[int(text[len(MARK) :])].snap.kind == "exec" else 2
            continue
        if phase != 1:
            continue
        (tid,) = _PID.unpack_from(data)
        if what == "enter":
            pending[tid] = (names_of[etype], st.unpack_from(data))
            continue
        if what == "exit":
            p = pending.pop(tid, None)
            (ret,) = st.unpack_from(data)
            if p is not None and p[0] == names_of[etype] and not -4096 < ret < 0:
                _mapping_call(files, p[0], p[1], ret)
            continue
        if what == "rss":
            mid, curr, member, size = st.unpack_from(data)
            if member != MM_ANONPAGES or not curr:
                continue
            if mm_id is None:
                mm_id = mid
            elif mid != mm_id:
                continue
            pages = size // PAGE
            if pages > anon and last_file_fault.get(tid):
                file_cow += 1  # a COW copy in a file mapping: one page
            last_file_fault[tid] = False
            anon = pages
            peak = max(peak, anon - file_cow)
            continue
        addr, _err = st.unpack_from(data)
        if addr >= procfs.TASK_SIZE:
            continue
        tids.add(tid)
        hit = files.hit(addr)
        last_file_fault[tid] = hit
        if not hit:
            faults[what] += 1
    exec_folios = len(exec_h.folios.heads)
    folios, folio_pages = exit_h.folios.by_size()
    rss = exit_h.folios.present * PAGE
    notes = []
    if file_cow != exit_h.file_cow:
        notes.append(f"file COW pages: {file_cow} counted from the events, {exit_h.file_cow} in the pagemap at exit")
    rss_exit = (anon - file_cow) * PAGE
    if rss_exit != rss:
        notes.append(f"MM_ANONPAGES at exit less file COW pages is {rss_exit} bytes, the pagemap says {rss}")
    # Pages present at execve count toward the peak before any event.
    peak = max(peak * PAGE, rss, exec_h.folios.present * PAGE)
    return Measurement(
        status=status,
        faults=faults["user"] + faults["kernel"] + exec_folios,
        faults_user=faults["user"],
        faults_kernel=faults["kernel"],
        exec_folios=exec_folios,
        folios=folios,
        folio_pages=folio_pages,
        rss_bytes=rss,
        rss_peak_bytes=peak,
        rss_stat_exit_bytes=rss_exit,
        file_cow_pages=exit_h.file_cow,
        file_cow_traced=file_cow,
        anon_vmas=sum(1 for v in exit_h.snap.vmas if v.anon),
        anon_vma_bytes=sum(v.end - v.start for v in exit_h.snap.vmas if v.anon),
        threads=len(tids),
        events=n,
        run_s=run_s,
        notes=notes,
    )


__all__ = ["Measurement", "MeasureError", "RecordError", "folios_of", "measure", "size_name"]
