"""From the kernel's events to trace lines: one address-space model per mm.

:class:`Space` is the recorder's picture of one process's VMAs: which ranges
are private anonymous memory (with the attributes a trace line can carry:
protection, ``growsdown``, ``noreserve``, ``dontfork``, THP advice) and
which hold other things (files, shared memory, the vDSO: written as
``prot=none`` address space). It is a coverage map, not a list of the
kernel's VMAs: neighbours with equal attributes are one entry, because
where the kernel splits or merges them is the replay engine's business.

:class:`Mm` turns system-call exits and page faults into trace lines
(:meth:`Mm.syscall`, :meth:`Mm.fault`) and keeps, per page, whether the
program has read it (the shared zero page, ``r``) or written it (``w``): a
page's first read is one ``r`` line, its first write one ``w`` line, and no
fault after that makes a line. :meth:`Mm.check` compares the picture with
the process's own at exit.
"""

from __future__ import annotations

import bisect
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, TextIO

from .procfs import PAGE, Vma

PAGE_MASK = ~(PAGE - 1)
#: mm/mmap.c stack_guard_gap: 256 pages unless stack_guard_gap= says otherwise.
STACK_GUARD_GAP = 256 * PAGE

# include/uapi/asm-generic/mman-common.h, mman.h (x86-64)
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
PROT_GROWSDOWN = 0x01000000
MAP_TYPE = 0x0F
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x100
MAP_LOCKED = 0x2000
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_NONBLOCK = 0x10000
MAP_STACK = 0x20000
MAP_HUGETLB = 0x40000
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4
MLOCK_ONFAULT = 1

#: madvise advice -> the trace's name (None: no line, no effect on anonymous memory).
ADVICE = {
    4: "dontneed",
    24: "dontneed",  # MADV_DONTNEED_LOCKED
    102: "dontneed",  # MADV_GUARD_INSTALL zaps the range like DONTNEED (the guard itself is not expressible)
    8: "free",
    14: "hugepage",
    15: "nohugepage",
    22: "populate_read",
    23: "populate_write",
    10: "dontfork",
    11: "dofork",
}


class Attrs(NamedTuple):
    """What a trace says about a range; ``anon=False`` is address space only."""

    anon: bool
    prot: str = "rw"  # rw | r | none
    growsdown: bool = False
    noreserve: bool = False
    stack: bool = False
    dontfork: bool = False
    thp: str = ""  # "" | hugepage | nohugepage

    def key(self) -> tuple[object, ...]:
        """What the kernel's VMA flags show of it (``MAP_STACK`` is
        ``VM_NOHUGEPAGE`` in the kernel, so ``stack`` is not compared)."""
        if not self.anon:
            return (False,)
        return (True, self.prot, self.growsdown, self.noreserve, self.dontfork, self.thp)


OTHER = Attrs(anon=False, prot="none")


def prot_class(prot: int) -> str:
    """The trace's protection for a PROT_* mask (x86: exec implies read,
    write implies read)."""
    if prot & PROT_WRITE:
        return "rw"
    if prot & (PROT_READ | PROT_EXEC):
        return "r"
    return "none"


def page_up(n: int) -> int:
    return (n + PAGE - 1) & PAGE_MASK


def attrs_of_vma(v: Vma) -> Attrs:
    if not v.anon:
        return OTHER
    perms = v.perms
    prot = "rw" if perms[1] == "w" else ("r" if perms[0] == "r" or perms[2] == "x" else "none")
    thp = "hugepage" if "hg" in v.flags else ("nohugepage" if "nh" in v.flags else "")
    return Attrs(True, prot, "gd" in v.flags, "nr" in v.flags, False, "dc" in v.flags, thp)


class Space:
    """Sorted, non-overlapping [start, end) ranges with attributes."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.attrs: list[Attrs] = []

    def find(self, addr: int) -> Optional[int]:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.ends[i]:
            return i
        return None

    def runs(self, lo: int, hi: int) -> list[tuple[int, int, Attrs]]:
        """The mapped pieces of [lo, hi), clipped, in address order."""
        out = []
        i = max(bisect.bisect_right(self.starts, lo) - 1, 0)
        while i < len(self.starts) and self.starts[i] < hi:
            s, e = max(self.starts[i], lo), min(self.ends[i], hi)
            if s < e:
                out.append((s, e, self.attrs[i]))
            i += 1
        return out

    def covered(self, lo: int, hi: int) -> bool:
        pos = lo
        for s, e, _ in self.runs(lo, hi):
            if s != pos:
                return False
            pos = e
        return pos == hi

    def _rebuild(self, lo: int, hi: int, pieces: Iterable[tuple[int, int, Attrs]]) -> None:
        """Replaces everything overlapping [lo, hi) by what lies outside it plus
        ``pieces`` (inside it), merging equal neighbours."""
        i = max(bisect.bisect_right(self.starts, lo) - 1, 0)
        j = i
        while j < len(self.starts) and self.starts[j] < hi:
            j += 1
        while i < j and self.ends[i] <= lo:
            i += 1
        new: list[tuple[int, int, Attrs]] = []
        if i < j and self.starts[i] < lo:
            new.append((self.starts[i], lo, self.attrs[i]))
        new.extend(p for p in pieces if p[0] < p[1])
        if i < j and self.ends[j - 1] > hi:
            new.append((hi, self.ends[j - 1], self.attrs[j - 1]))
        # merge with the untouched neighbours too
        if i > 0:
            i -= 1
            new.insert(0, (self.starts[i], self.ends[i], self.attrs[i]))
        if j < len(self.starts):
            new.append((self.starts[j], self.ends[j], self.attrs[j]))
            j += 1
        merged: list[tuple[int, int, Attrs]] = []
        for s, e, a in sorted(new):
            if merged and merged[-1][1] == s and merged[-1][2] == a:
                merged[-1] = (merged[-1][0], e, a)
            else:
                merged.append((s, e, a))
        self.starts[i:j] = [m[0] for m in merged]
        self.ends[i:j] = [m[1] for m in merged]
        self.attrs[i:j] = [m[2] for m in merged]

    def set(self, lo: int, hi: int, attrs: Attrs) -> None:
        self._rebuild(lo, hi, [(lo, hi, attrs)])

    def remove(self, lo: int, hi: int) -> None:
        self._rebuild(lo, hi, [])

    def update(self, lo: int, hi: int, fn: Callable[[Attrs], Attrs]) -> None:
        self._rebuild(lo, hi, [(s, e, fn(a)) for s, e, a in self.runs(lo, hi)])

    def coalesced(self) -> list[tuple[int, int, tuple[object, ...]]]:
        out: list[tuple[int, int, tuple[object, ...]]] = []
        for s, e, a in zip(self.starts, self.ends, self.attrs):
            k = a.key()
            if out and out[-1][1] == s and out[-1][2] == k:
                out[-1] = (out[-1][0], e, k)
            else:
                out.append((s, e, k))
        return out


def coalesce_vmas(vmas: list[Vma]) -> list[tuple[int, int, tuple[object, ...]]]:
    sp = Space()
    for v in vmas:
        sp.set(v.start, v.end, attrs_of_vma(v))
    return sp.coalesced()


class RecordError(Exception):
    """A recording that would be wrong or incomplete: one line, exit status 2."""


@dataclass
class Snapshot:
    """A stopped process's own view, read from /proc at a ptrace stop."""

    kind: str  # "exec" | "fork" | "exit"
    tid: int
    tgid: int
    vmas: list[Vma]
    pages: dict[int, str]
    start_brk: int = 0


def _hex(n: int) -> str:
    return f"{n:#x}"


class Mm:
    """One address space and its trace file."""

    def __init__(self, out: TextIO, name: str, stack_rlimit: Optional[int] = None):
        self.out = out
        self.name = name  # for messages: the trace file
        self.space = Space()
        self.pages: dict[int, str] = {}
        self.start_brk = 0
        self.brk = 0
        self.threads = 0  # thread numbers given so far
        self.lines = 0
        self.checked = False
        if stack_rlimit is None:
            soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
            stack_rlimit = soft if soft != resource.RLIM_INFINITY else 1 << 62
        self.stack_rlimit = stack_rlimit

    def new_thread(self) -> int:
        n = self.threads
        self.threads += 1
        return n

    def emit(self, t: int, text: str) -> None:
        self.out.write(f"@{t} {text}\n" if t else f"{text}\n")
        self.lines += 1

    # -- the state a process starts with --------------------------------------

    def start_from(self, snap: Snapshot, brk: Optional[int] = None) -> None:
        """Writes the VMAs and present pages of ``snap`` as the trace's start
        (after exec: the image the kernel built; after fork: the copy)."""
        self.start_brk = snap.start_brk
        self.brk = brk if brk is not None and brk >= snap.start_brk else snap.start_brk
        heap_lo, heap_hi = self.start_brk, page_up(self.brk)
        later_prot: list[tuple[int, int, str]] = []
        self.out.write(f"# {snap.kind} of pid {snap.tgid}: the address space as the kernel gave it\n")
        for v in snap.vmas:
            a = attrs_of_vma(v)
            pieces = [(v.start, v.end)]
            if a.anon and heap_lo < heap_hi:
                # the heap comes from the brk lines, not from an mmap
                pieces = [(s, e) for s, e in ((v.start, min(v.end, heap_lo)), (max(v.start, heap_hi), v.end)) if s < e]
            for s, e in pieces:
                self.space.set(s, e, a)
                if not a.anon:
                    self.emit(0, f"mmap {_hex(s)} {_hex(e - s)} prot=none")
                    continue
                touched = any(p in snap.pages for p in range(s, e, PAGE)) if e - s <= 1 << 24 else True
                prot = a.prot
                if prot != "rw" and touched:
                    # touch first, protect after: a trace may not write a read-only page
                    later_prot.append((s, e, prot))
                    prot = "rw"
                self.emit(0, "mmap " + self._mmap_words(s, e - s, a._replace(prot=prot)))
                if a.dontfork:
                    self.emit(0, f"madvise {_hex(s)} {_hex(e - s)} dontfork")
        if heap_lo < heap_hi:
            self.space.set(heap_lo, heap_hi, Attrs(True))
        self.emit(0, f"brk {_hex(self.start_brk)}")
        if self.brk != self.start_brk:
            self.emit(0, f"brk {_hex(self.brk)}")
        for p in sorted(snap.pages):
            i = self.space.find(p)
            if i is None or not self.space.attrs[i].anon:
                continue
            self.pages[p] = snap.pages[p]
            self.emit(0, f"{snap.pages[p]} {_hex(p)}")
        for s, e, prot in later_prot:
            self.emit(0, f"mprotect {_hex(s)} {_hex(e - s)} {prot}")
        self.out.write(f"# pid {snap.tgid} runs\n")

    @staticmethod
    def _mmap_words(addr: int, length: int, a: Attrs, populate: bool = False) -> str:
        words = [_hex(addr), _hex(length)]
        if a.thp and not (a.stack and a.thp == "nohugepage"):
            words.append(a.thp)
        if a.prot != "rw":
            words.append(f"prot={a.prot}")
        if populate:
            words.append("populate")
        if a.growsdown:
            words.append("growsdown")
        if a.noreserve:
            words.append("noreserve")
        if a.stack:
            words.append("stack")
        return " ".join(words)

    # -- pages ----------------------------------------------------------------

    def _drop_pages(self, lo: int, hi: int) -> None:
        n = (hi - lo) // PAGE
        if n <= len(self.pages):
            for p in range(lo, hi, PAGE):
                self.pages.pop(p, None)
        else:
            for p in [p for p in self.pages if lo <= p < hi]:
                del self.pages[p]

    def _populate(self, lo: int, hi: int, write: bool) -> None:
        for s, e, a in self.space.runs(lo, hi):
            if not a.anon or a.prot == "none":
                continue
            w = write and a.prot == "rw"
            for p in range(s, e, PAGE):
                if w:
                    self.pages[p] = "w"
                else:
                    self.pages.setdefault(p, "r")

    def fault(self, t: int, addr: int, write: bool) -> None:
        page = addr & PAGE_MASK
        i = self.space.find(page)
        if i is None:
            i = self._grow_stack(page)
            if i is None:
                return  # SIGSEGV for the program (or a guard it handles)
        a = self.space.attrs[i]
        if not a.anon:
            return
        state = self.pages.get(page)
        if write:
            if a.prot != "rw" or state == "w":
                return
            self.pages[page] = "w"
            self.emit(t, f"w {_hex(addr)}")
        else:
            if a.prot == "none" or state is not None:
                return
            self.pages[page] = "r"
            self.emit(t, f"r {_hex(addr)}")

    def _grow_stack(self, page: int) -> Optional[int]:
        """The kernel's expand_downwards: a fault below a VM_GROWSDOWN VMA
        grows it to the faulting page, unless that comes closer than the
        stack guard gap to an accessible VMA below or past RLIMIT_STACK."""
        j = bisect.bisect_right(self.space.starts, page)
        if j >= len(self.space.starts):
            return None
        a = self.space.attrs[j]
        if not (a.anon and a.growsdown):
            return None
        if j > 0:
            prev_end, prev = self.space.ends[j - 1], self.space.attrs[j - 1]
            accessible = prev.prot != "none" or not prev.anon
            if not prev.growsdown and accessible and page - prev_end < STACK_GUARD_GAP:
                return None
        # the VMA's extent is not known in a coalesced map; its run's end bounds it
        if self.space.ends[j] - page > self.stack_rlimit:
            return None
        self.space.set(page, self.space.starts[j], a)
        return self.space.find(page)

    # -- system calls ---------------------------------------------------------

    def _unmap_lines(self, t: int, lo: int, hi: int) -> None:
        """munmap lines for whatever is mapped in [lo, hi), run by run."""
        for s, e in self._contiguous(self.space.runs(lo, hi)):
            self.emit(t, f"munmap {_hex(s)} {_hex(e - s)}")
        self.space.remove(lo, hi)
        self._drop_pages(lo, hi)

    @staticmethod
    def _contiguous(runs: list[tuple[int, int, Attrs]], anon_only: bool = False) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for s, e, a in runs:
            if anon_only and not a.anon:
                continue
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        return out

    def mmap(self, t: int, addr: int, length: int, prot: int, flags: int, ret: int) -> None:
        lo, hi = ret, ret + page_up(length)
        anon = bool(flags & MAP_ANONYMOUS) and (flags & MAP_TYPE) == MAP_PRIVATE and not flags & MAP_HUGETLB
        if not anon:
            if self.space.covered(lo, hi) and all(not a.anon for _, _, a in self.space.runs(lo, hi)):
                return  # a file mapped over file space (ld.so's segments): the same address space
            self._unmap_lines(t, lo, hi)
            self.space.set(lo, hi, OTHER)
            self.emit(t, f"mmap {_hex(lo)} {_hex(hi - lo)} prot=none")
            return
        self._unmap_lines(t, lo, hi)
        a = Attrs(
            True,
            prot_class(prot),
            growsdown=bool(flags & MAP_GROWSDOWN),
            noreserve=bool(flags & MAP_NORESERVE),
            stack=bool(flags & MAP_STACK),
            thp="nohugepage" if flags & MAP_STACK else "",
        )
        populate = bool(flags & MAP_LOCKED) or (flags & (MAP_POPULATE | MAP_NONBLOCK)) == MAP_POPULATE
        self.space.set(lo, hi, a)
        self.emit(t, "mmap " + self._mmap_words(lo, hi - lo, a, populate and a.prot != "none"))
        if populate:
            self._populate(lo, hi, True)

    def munmap(self, t: int, addr: int, length: int) -> None:
        self._unmap_lines(t, addr, addr + page_up(length))

    def mprotect(self, t: int, addr: int, length: int, prot: int) -> None:
        lo, hi = addr, addr + page_up(length)
        if prot & PROT_GROWSDOWN:
            i = self.space.find(lo)
            if i is not None and self.space.attrs[i].growsdown:
                lo = self.space.starts[i]
        cls = prot_class(prot)
        runs = self.space.runs(lo, hi)
        if not any(a.anon and a.prot != cls for _, _, a in runs):
            return
        for s, e in self._contiguous(runs, anon_only=True):
            self.emit(t, f"mprotect {_hex(s)} {_hex(e - s)} {cls}")
        self.space.update(lo, hi, lambda a: a._replace(prot=cls) if a.anon else a)

    def mremap(self, t: int, old: int, old_len: int, new_len: int, flags: int, ret: int) -> None:
        old_len, new_len = page_up(old_len), page_up(new_len)
        i = self.space.find(old)
        a = self.space.attrs[i] if i is not None else OTHER
        if old_len == 0:  # a second mapping of shared memory
            self.space.set(ret, ret + new_len, OTHER)
            self.emit(t, f"mmap {_hex(ret)} {_hex(new_len)} prot=none")
            return
        if ret == old:
            if new_len < old_len:
                self.space.remove(old + new_len, old + old_len)
                self._drop_pages(old + new_len, old + old_len)
            else:
                self.space.set(old + old_len, old + new_len, a)
            self.emit(t, f"mremap {_hex(old)} {_hex(old_len)} {_hex(old)} {_hex(new_len)}")
            return
        if flags & MREMAP_FIXED:
            self._unmap_lines(t, ret, ret + new_len)
        keep = min(old_len, new_len)
        if keep // PAGE <= len(self.pages):
            moved = {p - old + ret: self.pages[p] for p in range(old, old + keep, PAGE) if p in self.pages}
        else:
            moved = {p - old + ret: s for p, s in self.pages.items() if old <= p < old + keep}
        self._drop_pages(old, old + old_len)
        self.space.remove(old, old + old_len)
        self.space.set(ret, ret + new_len, a)
        self.pages.update(moved)
        self.emit(t, f"mremap {_hex(old)} {_hex(old_len)} {_hex(ret)} {_hex(new_len)}")
        if flags & MREMAP_DONTUNMAP:
            # the old range stays mapped, empty
            self.space.set(old, old + old_len, a)
            words = self._mmap_words(old, old_len, a) if a.anon else f"{_hex(old)} {_hex(old_len)} prot=none"
            self.emit(t, "mmap " + words)

    def madvise(self, t: int, addr: int, length: int, advice: int) -> None:
        name = ADVICE.get(advice)
        if name is None:
            return
        lo, hi = addr, addr + page_up(length)
        runs = self.space.runs(lo, hi)
        for s, e in self._contiguous(runs, anon_only=True):
            self.emit(t, f"madvise {_hex(s)} {_hex(e - s)} {name}")
            if name == "dontneed":
                self._drop_pages(s, e)
        if name in ("populate_read", "populate_write"):
            self._populate(lo, hi, name == "populate_write")
        fn: Optional[Callable[[Attrs], Attrs]] = {
            "hugepage": lambda a: a._replace(thp="hugepage"),
            "nohugepage": lambda a: a._replace(thp="nohugepage"),
            "dontfork": lambda a: a._replace(dontfork=True),
            "dofork": lambda a: a._replace(dontfork=False),
        }.get(name)
        if fn is not None:
            f = fn
            self.space.update(lo, hi, lambda a: f(a) if a.anon else a)

    def set_brk(self, t: int, ret: int) -> None:
        if ret == self.brk or ret < self.start_brk:
            return
        old_end, new_end = page_up(self.brk), page_up(ret)
        if new_end > old_end:
            self.space.set(old_end, new_end, Attrs(True))
        elif new_end < old_end:
            self.space.remove(new_end, old_end)
            self._drop_pages(new_end, old_end)
        self.brk = ret
        self.emit(t, f"brk {_hex(ret)}")

    def mlock(self, t: int, addr: int, length: int, flags: int) -> None:
        if flags & MLOCK_ONFAULT:
            return
        lo, hi = addr & PAGE_MASK, page_up(addr + length)
        # mlock populates through GUP, as MADV_POPULATE_* does: no fault is seen
        for s, e, a in self.space.runs(lo, hi):
            if a.anon and a.prot != "none":
                self.emit(t, f"madvise {_hex(s)} {_hex(e - s)} populate_{'write' if a.prot == 'rw' else 'read'}")
        self._populate(lo, hi, True)

    # -- the check at exit ----------------------------------------------------

    def check(self, snap: Snapshot) -> Optional[str]:
        """None when the picture equals the process's own; else what differs."""
        self.checked = True
        mine = self.space.coalesced()
        theirs = coalesce_vmas(snap.vmas)
        for k in range(max(len(mine), len(theirs))):
            m = mine[k] if k < len(mine) else None
            r = theirs[k] if k < len(theirs) else None
            if m != r:
                return (
                    f"VMAs differ from /proc/{snap.tgid}/maps at exit: "
                    f"the trace has {_range(m)}, the kernel {_range(r)}"
                )
        absent = sorted(p for p in snap.pages if p not in self.pages)
        if absent:
            return (
                f"{len(absent)} present page(s) the trace never touched (first at {absent[0]:#x}): "
                "a fault the recorder did not see"
            )
        gone = sorted(p for p in self.pages if p not in snap.pages)
        if gone:
            return f"{len(gone)} page(s) the trace touched are not present at exit (first at {gone[0]:#x})"
        differ = sorted(p for p in self.pages if self.pages[p] != snap.pages[p])
        if differ:
            p = differ[0]
            return (
                f"{len(differ)} page(s) read/written otherwise than the trace says (first at {p:#x}: "
                f"trace {self.pages[p]}, kernel {snap.pages[p]})"
            )
        return None


def _range(r: Optional[tuple[int, int, tuple[object, ...]]]) -> str:
    if r is None:
        return "nothing more"
    s, e, k = r
    if not k[0]:
        return f"{s:#x}-{e:#x} (not anonymous)"
    _, prot, gd, nr, dc, thp = k
    flags = (("growsdown", gd), ("noreserve", nr), ("dontfork", dc), (str(thp), bool(thp)))
    extra = "".join(f" {w}" for w, on in flags if on)
    return f"{s:#x}-{e:#x} anonymous {prot}{extra}"


__all__ = ["Attrs", "Mm", "RecordError", "Snapshot", "Space"]
