"""A stopped process's address space as /proc shows it: its VMAs
(``smaps``, with ``VmFlags``), which pages are present (``pagemap``), which
of those are the shared zero page, and where its heap starts (``stat``)."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Optional

PAGE = 4096
#: x86-64 TASK_SIZE_MAX with 4-level tables: [vsyscall] lies above it.
TASK_SIZE = 0x7FFFFFFFF000

PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1

#: Names /proc/PID/maps gives private anonymous memory (everything else with
#: a name, an inode or a shared mapping is "the address space it holds").
_ANON_NAMES = ("", "[heap]", "[stack]")


@dataclass
class Vma:
    start: int
    end: int
    perms: str  # "rw-p"
    inode: int
    name: str
    flags: tuple[str, ...]  # VmFlags mnemonics: "rd", "wr", "gd", "nr", "dc", "hg", "nh", ...

    @property
    def anon(self) -> bool:
        if self.inode != 0 or self.perms[3] != "p":
            return False
        return self.name in _ANON_NAMES or self.name.startswith("[anon:")


def read_smaps(pid: int, tid: Optional[int] = None) -> list[Vma]:
    """The VMAs below TASK_SIZE of task ``tid`` of ``pid`` (the task's own view
    works when the thread-group leader has already gone)."""
    path = f"/proc/{pid}/task/{tid}/smaps" if tid else f"/proc/{pid}/smaps"
    with open(path) as f:
        text = f.read()
    vmas: list[Vma] = []
    cur: Optional[Vma] = None
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            lo, hi = head[0].split("-")
            cur = Vma(int(lo, 16), int(hi, 16), head[1], int(head[4]), head[5].strip() if len(head) > 5 else "", ())
            if cur.start < TASK_SIZE:
                vmas.append(cur)
        elif line.startswith("VmFlags:") and cur is not None:
            cur.flags = tuple(line.split()[1:])
    return vmas


def read_pagemap(pid: int, start: int, end: int, tid: Optional[int] = None) -> list[int]:
    """The pagemap entries (one u64 per page) of [start, end)."""
    path = f"/proc/{pid}/task/{tid}/pagemap" if tid else f"/proc/{pid}/pagemap"
    n = (end - start) // PAGE
    out: list[int] = []
    with open(path, "rb", buffering=0) as f:
        f.seek(start // PAGE * 8)
        while len(out) < n:
            want = min(n - len(out), 1 << 16)
            data = f.read(want * 8)
            if not data:
                break
            out.extend(struct.unpack(f"<{len(data) // 8}Q", data))
    return out


def present_pages(pid: int, vmas: list[Vma], zero_pfn: int, tid: Optional[int] = None) -> dict[int, str]:
    """Present pages of the anonymous VMAs: page address -> ``"r"`` when it
    maps the shared zero page (only read so far), ``"w"`` otherwise."""
    out: dict[int, str] = {}
    for v in vmas:
        if not v.anon:
            continue
        for i, e in enumerate(read_pagemap(pid, v.start, v.end, tid)):
            if e & PM_PRESENT:
                out[v.start + i * PAGE] = "r" if (e & PM_PFN_MASK) == zero_pfn else "w"
    return out


def zero_pfn() -> int:
    """The page frame of the shared zero page, found by reading a fresh
    private anonymous page of our own and looking at our pagemap (root sees
    frame numbers)."""
    m = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        _ = m[0]  # a read fault maps the zero page
        import ctypes

        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        (e,) = read_pagemap(os.getpid(), addr, addr + PAGE)
        del addr
        if not e & PM_PRESENT or (e & PM_PFN_MASK) == 0:
            raise PermissionError("pagemap shows no frame numbers (recording needs root)")
        return e & PM_PFN_MASK
    finally:
        with contextlib.suppress(BufferError):
            m.close()


def start_brk(pid: int) -> int:
    """``mm->start_brk``: field 47 of /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[47 - 3])


def task_flags(pid: int, tid: int) -> tuple[int, bool]:
    """(``task->flags``, SIGKILL pending) of a task, or (-1, True) when it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            text = f.read()
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            status = f.read()
    except OSError:
        return -1, True
    rest = text[text.rindex(")") + 2 :].split()
    flags = int(rest[9 - 3])
    sigpnd = 0
    for line in status.splitlines():
        if line.startswith("SigPnd:"):
            sigpnd = int(line.split()[1], 16)
    return flags, bool(sigpnd & (1 << 8))
