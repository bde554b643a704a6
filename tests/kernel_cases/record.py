#!/usr/bin/env python3
"""Generates the kernel-recorded scenarios in this folder and records what the
running kernel does with each of them.

    sudo python tests/kernel_cases/record.py            # write traces, record all
    python tests/kernel_cases/record.py --traces-only   # only (re)write the traces
    sudo python tests/kernel_cases/record.py --only NAME [NAME ...]

Every case is a trace (``NAME.trace``, generated here from Python, plus the
seven shared kernel examples copied in) and its THP settings. Each is
replayed with :func:`anonfolio.kernel.kernel_replay`, which sets the sysfs
knobs and always restores what it found. The per-size counters are
system-wide, so each case runs until two runs agree (at most ``--runs``
times) and the most common result is kept. ``expected.json`` has the shape of
``/work/shared/kernel-examples/expected.json``: per case ``name``, ``trace``,
``args`` (command-line options for ``anonfolio replay`` that express the same
settings) and ``kernel`` {``faults``, ``rss_bytes``, ``mthp`` {size:
{counter: delta}}} (sizes whose counters did not change are left out), plus
``description`` and ``kernel_extra`` (vmstat deltas, PMD-mapped bytes) for
information.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT / "python") not in sys.path:
    sys.path.append(str(ROOT / "python"))  # a checkout without an installed package

SHARED = Path("/work/shared/kernel-examples")

K = 1 << 10
M = 1 << 20
P = 4 * K
PMD = 2 * M
BASE = 0x7F0000000000

SIZES = ["16kB", "32kB", "64kB", "128kB", "256kB", "512kB", "1024kB", "2048kB"]
RECORDED = ["anon_fault_alloc", "anon_fault_fallback", "anon_fault_fallback_charge",
            "split_deferred", "nr_anon", "nr_anon_partially_mapped"]


def kb(size: str) -> int:
    return int(size[:-2]) * K


class Trace:
    """A trace under construction."""

    def __init__(self, description: str):
        self.lines = [f"# {line}" for line in description.splitlines()]

    def add(self, line: str) -> Trace:
        self.lines.append(line)
        return self

    def mmap(self, addr, length, *flags):
        return self.add(" ".join([f"mmap {addr:#x} {length:#x}", *flags]))

    def munmap(self, addr, length):
        return self.add(f"munmap {addr:#x} {length:#x}")

    def madvise(self, addr, length, advice):
        return self.add(f"madvise {addr:#x} {length:#x} {advice}")

    def mprotect(self, addr, length, prot):
        return self.add(f"mprotect {addr:#x} {length:#x} {prot}")

    def mremap(self, old, old_len, new, new_len):
        return self.add(f"mremap {old:#x} {old_len:#x} {new:#x} {new_len:#x}")

    def brk(self, addr):
        return self.add(f"brk {addr:#x}")

    def w(self, addr, thread=None):
        return self.add((f"@{thread} " if thread is not None else "") + f"w {addr:#x}")

    def r(self, addr, thread=None):
        return self.add((f"@{thread} " if thread is not None else "") + f"r {addr:#x}")

    def writes(self, addrs):
        for a in addrs:
            self.w(a)
        return self

    def reads(self, addrs):
        for a in addrs:
            self.r(a)
        return self

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def pages(start, length, step=1):
    return [start + i * P for i in range(0, length // P, step)]


CASES = []


def case(name, top="madvise", group="", **sizes):
    """Registers a generator: ``sizes`` like ``s64kB="madvise"``. ``group``
    names the expected file the case goes to (``expected-GROUP.json``; the
    default: ``expected.json``)."""
    settings = {s: ("inherit" if s == "2048kB" else "never") for s in SIZES}
    extra8 = None
    for key, mode in sizes.items():
        size = key[1:]
        if size == "8kB":
            extra8 = mode
        else:
            settings[size] = mode

    def deco(fn):
        CASES.append({"name": name, "top": top, "settings": settings, "extra8": extra8, "make": fn,
                      "group": group})
        return fn
    return deco


def only(*enabled, mode="madvise"):
    """Per-size keywords enabling ``enabled`` sizes, 2048kB never unless listed."""
    kw = {f"s{s}": "never" for s in SIZES}
    for s in enabled:
        kw[f"s{s}"] = mode
    return kw


# ---------------------------------------------------------------------------
# A. access patterns

@case("seq-64k", **only("64kB"))
def _():
    t = Trace("sequential writes over an advised 1 MiB VMA, 64kB folios")
    return t.mmap(BASE, M, "hugepage").writes(pages(BASE, M))


@case("reverse-64k-512k", **only("64kB", "512kB"))
def _():
    t = Trace("reverse writes over a VMA starting 64 KiB into a PMD and ending on the next PMD;\n"
              "the largest enabled order whose aligned range is empty and inside the VMA wins")
    start, length = BASE + 0x10000, PMD - 0x10000
    return t.mmap(start, length, "hugepage").writes(reversed(pages(start, length)))


@case("stride5-32k-128k", **only("32kB", "128kB"))
def _():
    t = Trace("every 5th page of an advised 2 MiB VMA, 32kB and 128kB enabled")
    return t.mmap(BASE, PMD, "hugepage").writes(pages(BASE, PMD, 5))


@case("random-16k-to-1m", **only("16kB", "32kB", "64kB", "128kB", "256kB", "512kB", "1024kB"))
def _():
    t = Trace("every page of a misaligned 2.25 MiB VMA in a seeded random order,\n"
              "16kB..1024kB enabled (no PMD)")
    start, length = BASE + 0x7000, 2 * M + 256 * K
    addrs = pages(start, length)
    random.Random(1234).shuffle(addrs)
    return t.mmap(start, length, "hugepage").writes(a + 0x123 for a in addrs)


@case("random-half-with-pmd", **only("16kB", "64kB", "256kB", "2048kB"))
def _():
    t = Trace("a seeded random half of the pages of a 5 MiB VMA that starts 1 MiB into a PMD;\n"
              "16kB, 64kB, 256kB and 2048kB enabled")
    start, length = BASE + M, 5 * M
    addrs = pages(start, length)
    rng = random.Random(99)
    rng.shuffle(addrs)
    return t.mmap(start, length, "hugepage").writes(addrs[: len(addrs) // 2])


@case("sparse-256k", **only("256kB"))
def _():
    t = Trace("one page in every 37 of an advised 4 MiB VMA, 256kB folios")
    return t.mmap(BASE, 4 * M, "hugepage").writes(pages(BASE, 4 * M, 37))


@case("sparse-pmd", **only("2048kB"))
def _():
    t = Trace("one write per PMD of an advised 16 MiB VMA, at varying offsets: 8 PMD-mapped THPs")
    t.mmap(BASE, 16 * M, "hugepage")
    return t.writes(BASE + i * PMD + (i * 0x3F123) % PMD for i in range(8))


# ---------------------------------------------------------------------------
# B. each size alone, misaligned VMA with an end off every folio boundary

def _alone(size):
    def make():
        s = kb(size)
        length = min(24 * s, 6 * M) + 0x5000
        start = BASE + 0x3000
        t = Trace(f"{size} alone: sequential writes over a VMA starting 12 KiB into a PMD,\n"
                  f"{length:#x} bytes long (its end is not on a folio boundary)")
        return t.mmap(start, length, "hugepage").writes(pages(start, length))
    return make


for _size in SIZES:
    case(f"alone-{_size}", **only(_size))(_alone(_size))


# ---------------------------------------------------------------------------
# C. combinations

@case("combo-16-64-256-no-pmd", **only("16kB", "64kB", "256kB"))
def _():
    t = Trace("16kB+64kB+256kB over a VMA from +20 KiB to 32 KiB before the PMD end: small folios\n"
              "at both ends, 256 KiB in the middle")
    start, end = BASE + 0x5000, BASE + PMD - 0x8000
    return t.mmap(start, end - start, "hugepage").writes(pages(start, end - start))


@case("combo-all-sizes", **only(*SIZES))
def _():
    t = Trace("every size 16kB..2048kB enabled; a 5 MiB VMA starting 4 KiB into a PMD, sequential")
    start, length = BASE + 0x1000, 5 * M
    return t.mmap(start, length, "hugepage").writes(pages(start, length))


@case("combo-64k-pmd-offset-vma", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB; VMA from 1 MiB into a PMD for 3 MiB: 64 KiB folios, then one PMD THP")
    start, length = BASE + M, 3 * M
    return t.mmap(start, length, "hugepage").writes(pages(start, length))


@case("combo-inherit-mix", top="madvise", s16kB="inherit", s128kB="madvise", s2048kB="never")
def _():
    t = Trace("top madvise; 16kB=inherit, 128kB=madvise on an advised VMA; a 1 MiB + 48 KiB VMA")
    start, length = BASE + 0x2000, M + 48 * K
    return t.mmap(start, length, "hugepage").writes(pages(start, length))


# ---------------------------------------------------------------------------
# D. top-level and per-size modes

@case("top-always-pmd-unadvised", top="always", s2048kB="inherit")
def _():
    t = Trace("top always, 2048kB=inherit, a VMA without advice: PMD THPs")
    return t.mmap(BASE, 4 * M).writes(pages(BASE, 4 * M, 64))


@case("top-always-64k-inherit-unadvised", top="always", s64kB="inherit", s2048kB="never")
def _():
    t = Trace("top always, 64kB=inherit, 2048kB=never, a VMA without advice: 64 KiB folios")
    return t.mmap(BASE + 0x4000, M).writes(pages(BASE + 0x4000, M))


@case("top-never-64k-always", top="never", s64kB="always", s2048kB="inherit")
def _():
    t = Trace("top never, 64kB=always: a per-size always works without advice and with top never;\n"
              "2048kB=inherit follows top never")
    return t.mmap(BASE, 4 * M).writes(pages(BASE, 4 * M, 8))


@case("top-never-inherit-advised", top="never", s64kB="inherit", s2048kB="inherit")
def _():
    t = Trace("top never, 64kB and 2048kB inherit, advised VMA: nothing large")
    return t.mmap(BASE, 2 * M, "hugepage").writes(pages(BASE, 2 * M, 4))


@case("madvise-knob-unadvised", top="madvise", s64kB="madvise", s2048kB="inherit")
def _():
    t = Trace("64kB=madvise, 2048kB=inherit, top madvise, VMA without advice: order 0 only")
    return t.mmap(BASE, 2 * M).writes(pages(BASE, 2 * M, 3))


@case("inherit-two-vmas", top="madvise", s64kB="inherit", s2048kB="never")
def _():
    t = Trace("top madvise, 64kB=inherit: an advised VMA gets 64 KiB folios, a plain one order 0")
    a, b = BASE, BASE + 4 * M
    t.mmap(a, 512 * K, "hugepage").mmap(b, 512 * K)
    return t.writes(pages(a, 512 * K, 2)).writes(pages(b, 512 * K, 2))


@case("nohugepage-vs-always", top="madvise", s64kB="always", s2048kB="always")
def _():
    t = Trace("64kB=always, 2048kB=always: a nohugepage VMA stays order 0, a plain one gets a PMD\n"
              "THP and 64 KiB folios where the PMD does not fit")
    a, b = BASE, BASE + 4 * M
    t.mmap(a, 2 * M, "nohugepage").mmap(b, 3 * M)
    return t.writes(pages(a, 2 * M, 16)).writes(pages(b, 3 * M, 16))


@case("order1-8k-always", top="madvise", s8kB="always", s2048kB="never")
def _():
    t = Trace("8kB=always: order 1 is never used for anonymous memory (the kernel has no\n"
              "hugepages-8kB/enabled knob): order 0 only")
    return t.mmap(BASE, 256 * K, "hugepage").writes(pages(BASE, 256 * K))


@case("order1-8k-with-16k", top="madvise", s8kB="always", s16kB="madvise", s2048kB="never")
def _():
    t = Trace("8kB=always and 16kB=madvise on a VMA whose ends cut 16 KiB folios: 16 KiB where it\n"
              "fits, order 0 elsewhere (never order 1)")
    start, length = BASE + 0x2000, 0x40000
    return t.mmap(start, length, "hugepage").writes(pages(start, length))


# ---------------------------------------------------------------------------
# E. partly populated before advice

@case("populate-then-advise-64k", **{**only("64kB"), "s2048kB": "inherit"})
def _():
    t = Trace("a plain 2 MiB VMA: write a few pages (order 0), then MADV_HUGEPAGE the whole VMA and\n"
              "write the rest: 64 KiB where the aligned range is still empty; no PMD (a PTE table exists)")
    t.mmap(BASE, PMD)
    first = [BASE + n * P for n in (0, 1, 17, 100, 300)]
    t.writes(first)
    t.madvise(BASE, PMD, "hugepage")
    return t.writes(a for a in pages(BASE, PMD) if a not in first)


@case("populate-then-advise-pmd", **only("2048kB"))
def _():
    t = Trace("a plain 4 MiB VMA: write one page in the first PMD, advise, then write one page per\n"
              "64 KiB: the first PMD stays order 0, the second becomes a PMD THP")
    t.mmap(BASE, 4 * M).w(BASE + 5 * P).madvise(BASE, 4 * M, "hugepage")
    return t.writes(pages(BASE, 4 * M, 16))


# ---------------------------------------------------------------------------
# F. reads

@case("read-then-write-16k-64k", **only("16kB", "64kB"))
def _():
    t = Trace("per 64 KiB block: read page 3 (zero page), then write page 0 and page 8:\n"
              "the zero-page PTE spoils the 64 KiB range but not every 16 KiB one")
    t.mmap(BASE, 512 * K, "hugepage")
    for blk in range(0, 512 * K, 64 * K):
        t.r(BASE + blk + 3 * P).w(BASE + blk).w(BASE + blk + 8 * P)
    return t


@case("huge-zero-read-then-write", **only("2048kB"))
def _():
    t = Trace("2048kB: reads map the huge zero page; a write to a huge-zero PMD, then more writes")
    t.mmap(BASE, 4 * M, "hugepage")
    t.r(BASE + 0x1000).r(BASE + PMD + 0x5000).r(BASE + 0x3000)
    t.w(BASE + 0x2000)
    return t.writes(pages(BASE + PMD, PMD, 32))


@case("huge-zero-read-only", **only("2048kB"))
def _():
    t = Trace("2048kB: only reads; the huge zero page is not Rss")
    t.mmap(BASE, 4 * M, "hugepage")
    return t.reads(pages(BASE, 4 * M, 64))


@case("huge-zero-with-64k", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB; reads in a PMD-sized VMA part and a tail that cannot hold a PMD;\n"
              "then writes to both")
    start, length = BASE, PMD + 256 * K
    t.mmap(start, length, "hugepage")
    t.r(BASE + 0x10000).r(BASE + PMD + 0x10000)
    return t.writes([BASE + 0x10000, BASE + 0x20000, BASE + PMD + 0x10000, BASE + PMD + 0x21000])


@case("read-then-write-order0")
def _():
    t = Trace("default knobs, a plain VMA: 32 reads (zero page), then writes to the same pages (COW)")
    t.mmap(BASE, 128 * K).reads(pages(BASE, 128 * K))
    return t.writes(pages(BASE, 128 * K))


# ---------------------------------------------------------------------------
# G. MADV_DONTNEED holes

@case("dontneed-inside-64k-retouch", **only("64kB"))
def _():
    t = Trace("64kB: write 1 MiB, DONTNEED one page and two pages inside folios, retouch them")
    t.mmap(BASE, M, "hugepage").writes(pages(BASE, M))
    t.madvise(BASE + 0x23000, P, "dontneed").madvise(BASE + 0x41000, 2 * P, "dontneed")
    return t.writes([BASE + 0x23000, BASE + 0x41000, BASE + 0x42000])


@case("dontneed-across-folios-16k-64k", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: DONTNEED [0x38000, 0x48000) across two 64 KiB folios, retouch the hole")
    t.mmap(BASE, M, "hugepage").writes(pages(BASE, M))
    t.madvise(BASE + 0x38000, 0x10000, "dontneed")
    return t.writes(pages(BASE + 0x38000, 0x10000))


@case("dontneed-whole-folios-128k", **only("128kB"))
def _():
    t = Trace("128kB: DONTNEED two whole aligned folios (no deferred split), retouch: new folios")
    t.mmap(BASE, M, "hugepage").writes(pages(BASE, M, 8))
    t.madvise(BASE + 0x20000, 0x40000, "dontneed")
    return t.writes(pages(BASE + 0x20000, 0x40000))


@case("dontneed-whole-pmd-retouch", **only("2048kB"))
def _():
    t = Trace("2048kB: two PMD THPs, DONTNEED the first whole PMD, retouch it")
    t.mmap(BASE, 4 * M, "hugepage").w(BASE).w(BASE + PMD)
    t.madvise(BASE, PMD, "dontneed")
    return t.w(BASE + 0x7000).w(BASE + 0x8000)


@case("dontneed-partial-pmd", **only("2048kB"))
def _():
    t = Trace("2048kB: DONTNEED 64 KiB in the middle of a PMD THP (the PMD is split), retouch the hole")
    t.mmap(BASE, PMD, "hugepage").w(BASE)
    t.madvise(BASE + 0x80000, 0x10000, "dontneed")
    return t.writes(pages(BASE + 0x80000, 0x10000))


@case("dontneed-partial-pmd-with-64k", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: DONTNEED 128 KiB inside a PMD THP, retouch: 64 KiB folios in the hole")
    t.mmap(BASE, PMD, "hugepage").w(BASE)
    t.madvise(BASE + 0x100000, 0x20000, "dontneed")
    return t.writes(pages(BASE + 0x100000, 0x20000))


@case("dontneed-order0-pmd-then-advise", **only("2048kB"))
def _():
    t = Trace("2048kB: order-0 pages in a nohugepage VMA; DONTNEED the whole PMD, advise hugepage,\n"
              "write again: a PMD THP only if the empty PTE table was freed (CONFIG_PT_RECLAIM)")
    t.mmap(BASE, PMD, "nohugepage").writes(pages(BASE, PMD, 16))
    t.madvise(BASE, PMD, "dontneed").madvise(BASE, PMD, "hugepage")
    return t.writes(pages(BASE, PMD, 16))


@case("dontneed-part-of-pmd-keeps-table", **only("2048kB"))
def _():
    t = Trace("2048kB: order-0 pages only in the first 1 MiB of a nohugepage 2 MiB VMA; DONTNEED just\n"
              "that 1 MiB (less than a PMD): the empty PTE table stays, so no PMD THP after advice")
    t.mmap(BASE, PMD, "nohugepage").writes(pages(BASE, M, 16))
    t.madvise(BASE, M, "dontneed").madvise(BASE, PMD, "hugepage")
    return t.w(BASE).w(BASE + M)


@case("dontneed-two-halves-keeps-table", **only("2048kB"))
def _():
    t = Trace("2048kB: order-0 pages over a whole PMD, DONTNEED in two 1 MiB calls: each call covers\n"
              "less than a PMD, so the (now empty) PTE table is not reclaimed")
    t.mmap(BASE, PMD, "nohugepage").writes(pages(BASE, PMD, 16))
    t.madvise(BASE, M, "dontneed").madvise(BASE + M, M, "dontneed").madvise(BASE, PMD, "hugepage")
    return t.w(BASE + 0x5000)


@case("dontneed-misaligned-4m-reclaims-middle", **only("2048kB"))
def _():
    t = Trace("2048kB: order-0 pages over a 6 MiB nohugepage VMA; DONTNEED [1 MiB, 5 MiB): only the\n"
              "PTE table of the fully covered PMD is reclaimed; after advice only that PMD gets a THP")
    t.mmap(BASE, 6 * M, "nohugepage").writes(pages(BASE, 6 * M, 16))
    t.madvise(BASE + M, 4 * M, "dontneed").madvise(BASE, 6 * M, "hugepage")
    return t.writes(BASE + k * PMD + M + 8 * P for k in range(3))


# ---------------------------------------------------------------------------
# H. munmap holes

@case("munmap-inside-64k-folio", **only("64kB"))
def _():
    t = Trace("64kB: munmap one page inside a folio (deferred split), write the rest again")
    t.mmap(BASE, 512 * K, "hugepage").writes(pages(BASE, 512 * K))
    t.munmap(BASE + 0x35000, P)
    return t.writes(a for a in pages(BASE, 512 * K, 3) if a != BASE + 0x35000)


@case("munmap-across-folios-32k", **only("32kB"))
def _():
    t = Trace("32kB: munmap [0x1c000, 0x2c000) across folios; touch neighbours and new pages")
    t.mmap(BASE, 512 * K, "hugepage").writes(pages(BASE, 256 * K))
    t.munmap(BASE + 0x1C000, 0x10000)
    return t.writes([BASE + 0x1B000, BASE + 0x2C000]).writes(pages(BASE + 256 * K, 256 * K))


@case("munmap-whole-pmd-remap", **only("2048kB"))
def _():
    t = Trace("2048kB: three PMD THPs, munmap the middle PMD, map it again and touch it")
    t.mmap(BASE, 6 * M, "hugepage").writes([BASE, BASE + PMD, BASE + 2 * PMD])
    t.munmap(BASE + PMD, PMD).mmap(BASE + PMD, PMD, "hugepage")
    return t.w(BASE + PMD + 0x1000)


@case("munmap-order0-pmd-remap", **only("2048kB"))
def _():
    t = Trace("2048kB: order-0 pages in the middle PMD of a nohugepage VMA; munmap that PMD\n"
              "(its page table is freed), map it again advised: a PMD THP")
    t.mmap(BASE, 6 * M, "nohugepage").writes(pages(BASE + PMD, PMD, 32))
    t.w(BASE).w(BASE + 2 * PMD)
    t.munmap(BASE + PMD, PMD).mmap(BASE + PMD, PMD, "hugepage")
    return t.w(BASE + PMD + 0x3000).w(BASE + PMD + 0x4000)


@case("munmap-partial-pmd", **only("2048kB"))
def _():
    t = Trace("2048kB: munmap the first 1 MiB + 4 KiB of a PMD THP (PMD split, deferred split),\n"
              "write in what is left")
    t.mmap(BASE, PMD, "hugepage").w(BASE + 0x180000)
    t.munmap(BASE, M + P)
    return t.writes(pages(BASE + M + P, M - P, 64))


@case("munmap-vma-tail-64k", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: munmap the last 20 KiB of a VMA before touching it; the end is\n"
              "off the folio boundaries")
    t.mmap(BASE, 256 * K, "hugepage").munmap(BASE + 256 * K - 0x5000, 0x5000)
    return t.writes(pages(BASE, 256 * K - 0x5000))


# ---------------------------------------------------------------------------
# I. several VMAs, merging and splitting

@case("adjacent-mmaps-merge-pmd", **only("2048kB"))
def _():
    t = Trace("two adjacent advised 1 MiB mmaps merge into one 2 MiB VMA: one PMD THP")
    t.mmap(BASE, M, "hugepage").mmap(BASE + M, M, "hugepage")
    return t.writes(pages(BASE, PMD, 64))


@case("adjacent-mmaps-merge-after-touch", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: an advised 1 MiB VMA is touched (64 KiB folio, PTE table), then an\n"
              "adjacent one is mapped (merge): the rest gets 64 KiB folios, no PMD")
    t.mmap(BASE, M, "hugepage").w(BASE)
    t.mmap(BASE + M, M, "hugepage")
    return t.writes(pages(BASE, PMD, 16))


@case("adjacent-different-advice", **only("64kB"))
def _():
    t = Trace("64kB: adjacent mmaps, the first advised, the second not: they do not merge")
    t.mmap(BASE, M, "hugepage").mmap(BASE + M, M)
    return t.writes(pages(BASE, 2 * M, 4))


@case("madvise-split-and-merge", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: advised 4 MiB VMA; NOHUGEPAGE [1 MiB, 3 MiB) (split in three), touch;\n"
              "HUGEPAGE the middle again (merge), touch more")
    t.mmap(BASE, 4 * M, "hugepage").madvise(BASE + M, PMD, "nohugepage")
    t.writes(pages(BASE, 4 * M, 32))
    t.madvise(BASE + M, PMD, "hugepage")
    return t.writes(a + 0x8000 for a in pages(BASE, 4 * M, 32))


@case("madvise-hugepage-part-of-vma", **only("2048kB"))
def _():
    t = Trace("2048kB: plain 4 MiB VMA, MADV_HUGEPAGE its second half only")
    t.mmap(BASE, 4 * M).madvise(BASE + PMD, PMD, "hugepage")
    return t.writes(pages(BASE, 4 * M, 16))


# ---------------------------------------------------------------------------
# J. userfaultfd write-protect

@case("uffd-wp-advised", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: an advised VMA registered with userfaultfd (WP) maps order 0 only;\n"
              "a plain advised VMA next to it does not")
    a, b = BASE, BASE + 4 * M
    t.mmap(a, 4 * M, "hugepage", "uffd-wp").mmap(b, PMD, "hugepage")
    return t.writes(pages(a, 4 * M, 16)).writes(pages(b, PMD, 16))


@case("uffd-wp-64k-only", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB (no PMD): a uffd-wp VMA gets order 0 (alloc_anon_folio falls back for\n"
              "userfaultfd_armed VMAs); the same writes in a plain advised VMA get 64 KiB folios")
    a, b = BASE, BASE + 4 * M
    t.mmap(a, M, "hugepage", "uffd-wp").mmap(b, M, "hugepage")
    return t.writes(pages(a, M, 8)).writes(pages(b, M, 8))


@case("uffd-wp-read-then-write", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB, uffd-wp VMA: reads then writes")
    t.mmap(BASE, PMD, "hugepage", "uffd-wp")
    t.reads(pages(BASE, 256 * K, 4))
    return t.writes(pages(BASE, 256 * K, 2))


# ---------------------------------------------------------------------------
# K. threads, misc

@case("threads-disjoint-64k", **only("64kB"))
def _():
    t = Trace("64kB: two threads write disjoint 1 MiB halves, lines interleaved\n"
              "(the kernel oracle runs them serially in file order; order does not matter here)")
    t.mmap(BASE, PMD, "hugepage")
    for a in pages(BASE, M):
        t.w(a, thread=0).w(a + M, thread=1)
    return t


@case("write-twice-odd-offsets")
def _():
    t = Trace("default knobs: writes at odd offsets, each page twice; only the first faults")
    t.mmap(BASE + 0x9000, 64 * K)
    for a in pages(BASE + 0x9000, 64 * K):
        t.w(a + 0xFFF).w(a + 0x7)
    return t


@case("pmd-misaligned-vma", **only("2048kB"))
def _():
    t = Trace("2048kB only: an advised 2 MiB VMA starting 4 KiB into a PMD holds no PMD THP")
    start = BASE + 0x1000
    return t.mmap(start, PMD, "hugepage").writes(pages(start, PMD, 8))


@case("always-with-dontneed-and-munmap", top="always", s32kB="inherit", s256kB="always", s2048kB="never")
def _():
    t = Trace("top always, 32kB=inherit, 256kB=always, no advice: folios, then DONTNEED and munmap\n"
              "pieces of them and retouch")
    t.mmap(BASE + 0x8000, M).writes(pages(BASE + 0x8000, M, 2))
    t.madvise(BASE + 0x40000, 0x8000, "dontneed").munmap(BASE + 0x80000, 0x3000)
    return t.writes(pages(BASE + 0x40000, 0x8000)).writes([BASE + 0x83000, BASE + 0x84000])


@case("advise-then-nohugepage-before-touch", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: an advised VMA made NOHUGEPAGE before any touch: order 0 only")
    t.mmap(BASE, 2 * M, "hugepage").madvise(BASE, 2 * M, "nohugepage")
    return t.writes(pages(BASE, 2 * M, 32))


@case("nohugepage-after-pmd-thp", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: a PMD THP stays mapped after MADV_NOHUGEPAGE; new faults in the next\n"
              "PMD are order 0")
    t.mmap(BASE, 4 * M, "hugepage").w(BASE)
    t.madvise(BASE, 4 * M, "nohugepage")
    return t.writes(pages(BASE, 4 * M, 64))


@case("dontneed-huge-zero-then-write", **only("2048kB"))
def _():
    t = Trace("2048kB: read (huge zero PMD), DONTNEED a part of it, then write there and elsewhere")
    t.mmap(BASE, PMD, "hugepage").r(BASE + 0x1000)
    t.madvise(BASE + 0x10000, 0x10000, "dontneed")
    return t.w(BASE + 0x10000).w(BASE + 0x30000)


@case("dontneed-whole-vma-retouch-64k", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: a 2 MiB VMA starting 1 MiB into a PMD, 64 KiB folios; DONTNEED all of it\n"
              "(no PMD is covered whole: the tables stay), retouch every other 64 KiB")
    start = BASE + M
    t.mmap(start, PMD, "hugepage").writes(pages(start, PMD, 16))
    t.madvise(start, PMD, "dontneed")
    return t.writes(pages(start, PMD, 32))


@case("zero-pages-shrink-folios", **only("16kB", "32kB", "64kB", "128kB"))
def _():
    t = Trace("16kB..128kB: scattered reads leave zero-page PTEs; writes then get the largest order\n"
              "whose aligned range holds none of them")
    t.mmap(BASE, M, "hugepage")
    t.reads(BASE + n * P for n in (5, 40, 41, 90, 130, 200))
    return t.writes(pages(BASE, M, 2))


@case("remap-after-munmap-whole-vma", **only("64kB"))
def _():
    t = Trace("64kB: touch a VMA, munmap all of it, map it again and touch it again")
    t.mmap(BASE + 0x30000, 512 * K, "hugepage").writes(pages(BASE + 0x30000, 512 * K, 4))
    t.munmap(BASE + 0x30000, 512 * K).mmap(BASE + 0x30000, 512 * K, "hugepage")
    return t.writes(pages(BASE + 0x30000, 512 * K, 4))


def _random_mix(seed, window=8 * M, nops=400):
    """A seeded random mix of every operation over a window of the address
    space, valid by construction: accesses only hit mapped pages, mmaps
    only cover unmapped ones."""
    rng = random.Random(seed)
    npages = window // P
    mapped = [False] * npages
    t = Trace(f"seeded ({seed}) random mix of mmap/munmap/madvise/reads/writes over {window >> 20} MiB")

    def runs_of(value):
        out, i = [], 0
        while i < npages:
            if mapped[i] == value:
                j = i
                while j < npages and mapped[j] == value:
                    j += 1
                out.append((i, j))
                i = j
            else:
                i += 1
        return out

    for _ in range(nops):
        kind = rng.random()
        holes, vmas = runs_of(False), runs_of(True)
        if (kind < 0.08 or not vmas) and holes:
            lo, hi = rng.choice(holes)
            a = rng.randrange(lo, hi)
            n = rng.randint(1, min(hi - a, 1024))
            flag = rng.choice(["hugepage"] * 6 + [""] * 3 + ["nohugepage"])
            t.mmap(BASE + a * P, n * P, *([flag] if flag else []))
            for i in range(a, a + n):
                mapped[i] = True
        elif kind < 0.12 and vmas:
            a = rng.randrange(npages)
            n = rng.randint(1, min(npages - a, 256))
            t.munmap(BASE + a * P, n * P)
            for i in range(a, a + n):
                mapped[i] = False
        elif kind < 0.22 and vmas:
            lo, hi = rng.choice(vmas)
            a = rng.randrange(lo, hi)
            n = rng.randint(1, hi - a)
            t.madvise(BASE + a * P, n * P, rng.choice(["dontneed", "dontneed", "hugepage", "nohugepage"]))
        elif vmas:
            lo, hi = rng.choice(vmas)
            a = rng.randrange(lo, hi)
            n = rng.randint(1, min(hi - a, 48))
            step = rng.choice([1, 1, 2, 3, 7])
            op = t.r if rng.random() < 0.2 else t.w
            for i in range(a, a + n, step):
                op(BASE + i * P + rng.randrange(P))
    return t


case("random-mix-64k-pmd", **only("64kB", "2048kB"))(lambda: _random_mix(1))
case("random-mix-all-sizes", **only(*SIZES))(lambda: _random_mix(2))
case("random-mix-16k-256k", **only("16kB", "256kB"))(lambda: _random_mix(3))
case("random-mix-inherit", top="madvise", s32kB="inherit", s128kB="madvise", s2048kB="inherit")(
    lambda: _random_mix(4, window=6 * M, nops=600))


# ---------------------------------------------------------------------------
# L. The operations real programs make (mprotect, mremap, brk, MADV_FREE,
#    MADV_POPULATE_*, MAP_POPULATE, MAP_GROWSDOWN, MAP_NORESERVE, MAP_STACK,
#    MADV_DONTFORK/DOFORK), alone and mixed with the others. These go to
#    expected-ops7.json (see README.md).

def ops7(name, **kw):
    return case(name, group="ops7", **kw)


@ops7("mprotect-r-middle-of-64k-folios", **only("64kB"))
def _():
    t = Trace("64kB: mprotect(r) of one 64 KiB folio's range in the middle of a faulted VMA, read it,\n"
              "back to rw, write everything again: the exclusive folios' PTEs are made writable again (no fault)")
    t.mmap(BASE, M, "hugepage").writes(pages(BASE, M))
    t.mprotect(BASE + 0x10000, 0x10000, "r").reads(pages(BASE + 0x10000, 0x10000))
    return t.mprotect(BASE + 0x10000, 0x10000, "rw").writes(pages(BASE, M))


@ops7("mprotect-one-page-inside-64k-folio", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: mprotect(r) of one 4 KiB page inside a 64 KiB folio (3 VMAs, no split), the\n"
              "neighbour still writable; back to rw and write it: no fault; then new faults beside")
    t.mmap(BASE, 256 * K, "hugepage").writes(pages(BASE, 128 * K, 16))
    t.mprotect(BASE + 0x5000, P, "r").r(BASE + 0x5000).w(BASE + 0x6000)
    t.mprotect(BASE + 0x5000, P, "rw").w(BASE + 0x5000)
    return t.writes(pages(BASE + 128 * K, 128 * K))


@ops7("mprotect-none-then-rw-retouch", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: PROT_NONE over faulted 64 KiB folios and part of an untouched range, back to rw:\n"
              "faulted pages stay mapped (no fault), the untouched ones fault in the merged VMA")
    t.mmap(BASE, 512 * K, "hugepage").writes(pages(BASE, 128 * K, 4))
    t.mprotect(BASE + 0x10000, 0x30000, "none").mprotect(BASE + 0x10000, 0x30000, "rw")
    return t.writes(pages(BASE, 512 * K))


@ops7("mprotect-read-only-zero-pages-then-rw-64k", **only("64kB"))
def _():
    t = Trace("64kB: a PROT_READ VMA read all over maps zero pages; after mprotect(rw) every write is an\n"
              "order-0 copy of the zero page (do_wp_page), not a 64 KiB folio")
    t.mmap(BASE, 128 * K, "hugepage", "prot=r").reads(pages(BASE, 128 * K))
    return t.mprotect(BASE, 128 * K, "rw").writes(pages(BASE, 128 * K))


@ops7("mprotect-huge-zero-then-rw-pmd", **only("2048kB"))
def _():
    t = Trace("2048kB: a PROT_READ 2 MiB VMA read all over maps the huge zero page (1 fault); after\n"
              "mprotect(rw) a write allocates a PMD THP (do_huge_zero_wp_pmd)")
    t.mmap(BASE, PMD, "hugepage", "prot=r").reads(pages(BASE, PMD, 8))
    return t.mprotect(BASE, PMD, "rw").w(BASE + 0x1234).writes(pages(BASE, PMD, 64))


@ops7("mprotect-one-page-splits-pmd-mapping", **only("2048kB"))
def _():
    t = Trace("2048kB: mprotect(r) of one page inside a PMD THP splits the PMD mapping (the folio stays);\n"
              "back to rw every page is writable without a fault; the next PMD gets its own THP")
    t.mmap(BASE, 2 * PMD, "hugepage").w(BASE)
    t.mprotect(BASE + 0x40000, P, "r").r(BASE + 0x40000).mprotect(BASE + 0x40000, P, "rw")
    return t.writes(pages(BASE, 2 * PMD, 16))


@ops7("mprotect-reservation-rw-pieces", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: a PROT_NONE MAP_NORESERVE reservation made rw piece by piece (as allocators\n"
              "do), advised and written: 64 KiB folios in a 256 KiB piece, a PMD THP in an aligned 2 MiB one")
    t.mmap(BASE, 8 * M, "prot=none", "noreserve")
    t.mprotect(BASE + 0x40000, 256 * K, "rw").madvise(BASE + 0x40000, 256 * K, "hugepage")
    t.writes(pages(BASE + 0x40000, 256 * K))
    t.mprotect(BASE + 2 * PMD, 2 * PMD, "rw").madvise(BASE + 2 * PMD, 2 * PMD, "hugepage")
    return t.w(BASE + 2 * PMD + 0x777).writes(pages(BASE + 3 * PMD, PMD, 128))


@ops7("mprotect-splits-vma-bounds-orders", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: mprotect(r) of 16 KiB inside an untouched advised VMA, off 64 KiB alignment:\n"
              "the 64 KiB windows that cross the new VMA boundaries fall back to 16 KiB")
    t.mmap(BASE, 256 * K, "hugepage").mprotect(BASE + 0x24000, 0x4000, "r")
    return t.writes(pages(BASE, 0x24000)).writes(pages(BASE + 0x28000, 256 * K - 0x28000))


@ops7("mprotect-merge-back-before-touch-64k", **only("64kB"))
def _():
    t = Trace("64kB: mprotect(r) and back to rw before any touch: the VMAs merge again and every\n"
              "window gets a 64 KiB folio")
    t.mmap(BASE, 512 * K, "hugepage").mprotect(BASE + 0x8000, 0x10000, "r")
    t.mprotect(BASE + 0x8000, 0x10000, "rw")
    return t.writes(pages(BASE, 512 * K))


@ops7("mremap-move-aligned-64k", **only("64kB"))
def _():
    t = Trace("64kB: mremap (MREMAP_FIXED) of 256 KiB of 64 KiB folios to an equally aligned place:\n"
              "PTEs and folios move (move_ptes), nothing faults again")
    t.mmap(BASE, 256 * K, "hugepage").writes(pages(BASE, 256 * K))
    t.mremap(BASE, 256 * K, BASE + 4 * M, 256 * K)
    return t.writes(pages(BASE + 4 * M, 256 * K))


@ops7("mremap-move-misaligned-then-grow", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: move 256 KiB of 64 KiB folios 4 KiB past alignment (folios stay large), grow it\n"
              "in place by 60 KiB and write the new pages: the window holding a moved page refuses 64 KiB")
    t.mmap(BASE, 256 * K, "hugepage").writes(pages(BASE, 256 * K))
    dst = BASE + 4 * M + P
    t.mremap(BASE, 256 * K, dst, 256 * K).mremap(dst, 256 * K, dst, 256 * K + 60 * K)
    return t.writes(pages(dst, 256 * K + 60 * K))


@ops7("mremap-move-pmd-aligned", **only("2048kB"))
def _():
    t = Trace("2048kB: a PMD THP moved to another 2 MiB boundary stays PMD-mapped (move_huge_pmd)")
    t.mmap(BASE, PMD, "hugepage").w(BASE)
    t.mremap(BASE, PMD, BASE + 4 * M, PMD)
    return t.writes(pages(BASE + 4 * M, PMD, 32))


@ops7("mremap-move-pmd-misaligned", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: a PMD THP moved 4 KiB past a 2 MiB boundary: the PMD is split, the folio\n"
              "stays order 9 PTE-mapped; nothing faults again; then a 64 KiB neighbour")
    t.mmap(BASE, PMD, "hugepage").w(BASE)
    dst = BASE + 4 * M + P
    t.mremap(BASE, PMD, dst, PMD).writes(pages(dst, PMD, 16))
    return t.mmap(dst + PMD, 256 * K, "hugepage").writes(pages(dst + PMD, 256 * K))


@ops7("mremap-grow-in-place-pmd", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: 64 KiB written at a 2 MiB boundary, grown in place to 4 MiB: the first PMD\n"
              "has a PTE table (64 KiB folios), the second gets a PMD THP")
    t.mmap(BASE, 64 * K, "hugepage").writes(pages(BASE, 64 * K))
    t.mremap(BASE, 64 * K, BASE, 4 * M)
    return t.writes(pages(BASE, 4 * M))


@ops7("mremap-shrink-cuts-64k-folio", **only("64kB"))
def _():
    t = Trace("64kB: shrink 256 KiB of 64 KiB folios in place to 0x13000: the cut folio goes to the\n"
              "deferred split queue (partially mapped), two whole ones are freed")
    t.mmap(BASE, 256 * K, "hugepage").writes(pages(BASE, 256 * K))
    return t.mremap(BASE, 256 * K, BASE, 0x13000).writes(pages(BASE, 0x13000))


@ops7("mremap-shrink-pmd", **only("2048kB"))
def _():
    t = Trace("2048kB: shrink a PMD THP's VMA from 2 MiB to 1 MiB + 4 KiB: split PMD, deferred split")
    t.mmap(BASE, PMD, "hugepage").w(BASE)
    return t.mremap(BASE, PMD, BASE, M + P).writes(pages(BASE, M + P, 8))


@ops7("mremap-move-onto-populated-vma", **only("64kB"))
def _():
    t = Trace("64kB: MREMAP_FIXED of 64 KiB into the middle of a populated 128 KiB VMA of 64 KiB folios:\n"
              "the target is unmapped first (two folios cut: deferred split)")
    t.mmap(BASE, 128 * K, "hugepage").writes(pages(BASE, 128 * K))
    t.mmap(BASE + M, 64 * K, "hugepage").writes(pages(BASE + M, 64 * K))
    return t.mremap(BASE + M, 64 * K, BASE + 0x8000, 64 * K).writes(pages(BASE, 128 * K))


@ops7("mremap-move-upper-part-and-back", **only("64kB"))
def _():
    t = Trace("64kB: move the upper part of a VMA (cutting a 64 KiB folio: no split), write it, move it\n"
              "back: the VMAs merge again and nothing faults")
    t.mmap(BASE, 256 * K, "hugepage").writes(pages(BASE, 256 * K))
    t.mremap(BASE + 0x18000, 0x28000, BASE + 4 * M, 0x28000).writes(pages(BASE + 4 * M, 0x28000))
    t.mremap(BASE + 4 * M, 0x28000, BASE + 0x18000, 0x28000)
    return t.writes(pages(BASE, 256 * K))


@ops7("mremap-move-and-grow", **only("64kB"))
def _():
    t = Trace("64kB: move and grow 64 KiB to 256 KiB: the moved folio stays, the new 192 KiB faults as usual")
    t.mmap(BASE, 64 * K, "hugepage").writes(pages(BASE, 64 * K))
    t.mremap(BASE, 64 * K, BASE + 4 * M, 256 * K)
    return t.writes(pages(BASE + 4 * M, 256 * K))


@ops7("mremap-move-unfaulted-merges", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: an unfaulted advised VMA moved right after a faulted one merges with it (copy_vma\n"
              "gives it the new pgoff); the windows across the old boundary then get 64 KiB")
    t.mmap(BASE, 0x18000, "hugepage").w(BASE)
    t.mmap(BASE + 4 * M, 0x28000, "hugepage")
    t.mremap(BASE + 4 * M, 0x28000, BASE + 0x18000, 0x28000)
    return t.writes(pages(BASE, 256 * K))


@ops7("brk-grow-order0")
def _():
    t = Trace("default knobs: brk grows the heap by 1 MiB + 100 bytes; unadvised, every write is an\n"
              "order-0 fault")
    t.brk(BASE).brk(BASE + M + 100)
    return t.writes(pages(BASE, M + 100, 16)).w(BASE + M + 99)


@ops7("brk-hugepage-advice-64k", **only("64kB"))
def _():
    t = Trace("64kB: the heap advised with MADV_HUGEPAGE gets 64 KiB folios like any VMA (bounded by\n"
              "start_brk and the rounded-up break)")
    t.brk(BASE + 0x3000).brk(BASE + 0x3000 + 300 * K + 17)
    t.madvise(BASE + 0x3000, 300 * K + 4 * K, "hugepage")
    return t.writes(pages(BASE + 0x3000, 304 * K))


@ops7("brk-grow-after-advice-new-vma", **only("64kB"))
def _():
    t = Trace("64kB: after MADV_HUGEPAGE on the heap, growing it makes a second VMA without the advice\n"
              "(flags differ: do_brk_flags cannot expand): its faults are order 0")
    t.brk(BASE).brk(BASE + 256 * K).madvise(BASE, 256 * K, "hugepage")
    t.writes(pages(BASE, 256 * K)).brk(BASE + 512 * K)
    return t.writes(pages(BASE + 256 * K, 256 * K))


@ops7("brk-shrink-inside-64k-folio", **only("64kB"))
def _():
    t = Trace("64kB: shrink the break into a 64 KiB folio (4 pages kept), three whole folios above freed:\n"
              "deferred split of the cut one; the kept pages stay mapped; grow again and write")
    t.brk(BASE).brk(BASE + 256 * K).madvise(BASE, 256 * K, "hugepage").writes(pages(BASE, 256 * K))
    t.brk(BASE + 0x3800).writes(pages(BASE, 0x4000))
    return t.brk(BASE + 0x14000).writes(pages(BASE + 0x4000, 0x10000))


@ops7("brk-below-mmap-never-merges", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: an advised rw mmap ends at start_brk; brk makes the heap a VMA of its own\n"
              "(never merged with what lies below start_brk); the heap is then advised (madvise may merge)\n"
              "and both are written across the boundary, which is not 64 KiB aligned")
    sb = BASE + 0x28000
    t.mmap(BASE, 0x28000, "hugepage").brk(sb).brk(sb + 0x38000)
    t.madvise(sb, 0x38000, "hugepage")
    return t.writes(pages(BASE, 0x60000))


@ops7("brk-pmd-heap", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: a heap starting on a 2 MiB boundary grown by 4 MiB and advised: PMD THPs")
    t.brk(BASE).brk(BASE + 4 * M + 5).madvise(BASE, 4 * M + P, "hugepage")
    return t.writes(pages(BASE, 4 * M + P, 64))


@ops7("brk-shrink-to-start-then-regrow", **only("64kB"))
def _():
    t = Trace("64kB: grow, advise and write the heap, shrink it to nothing (the VMA is removed), grow it\n"
              "again: the new heap has no advice (order 0)")
    t.brk(BASE + 0x10000).brk(BASE + 0x30000).madvise(BASE + 0x10000, 0x20000, "hugepage")
    t.writes(pages(BASE + 0x10000, 0x20000)).brk(BASE + 0x10000).brk(BASE + 0x30000)
    return t.writes(pages(BASE + 0x10000, 0x20000))


@ops7("brk-mmap-above-merges-into-heap", **only("64kB"))
def _():
    t = Trace("64kB: an advised rw mmap placed right above the heap's rounded-up break, then the heap\n"
              "advised: the mmap merges with the heap; writes across the boundary")
    t.brk(BASE).brk(BASE + 0x18000).mmap(BASE + 0x18000, 0x28000, "hugepage")
    t.madvise(BASE, 0x18000, "hugepage")
    return t.writes(pages(BASE, 0x40000))


@ops7("free-whole-64k-folios-rewrite", **only("64kB"))
def _():
    t = Trace("64kB: MADV_FREE of 256 KiB covering four 64 KiB folios: no split, pages stay mapped,\n"
              "rewriting them faults nothing (no memory pressure)")
    t.mmap(BASE, 256 * K, "hugepage").writes(pages(BASE, 256 * K))
    t.madvise(BASE, 256 * K, "free")
    return t.writes(pages(BASE, 256 * K)).reads(pages(BASE, 256 * K))


@ops7("free-half-of-two-64k-folios", **only("64kB"))
def _():
    t = Trace("64kB: MADV_FREE of +0x8000..+0x18000 (half of two 64 KiB folios): both are split to order 0;\n"
              "writes to the freed pages fault nothing")
    t.mmap(BASE, 256 * K, "hugepage").writes(pages(BASE, 256 * K))
    t.madvise(BASE + 0x8000, 0x10000, "free")
    return t.writes(pages(BASE + 0x8000, 0x10000)).writes(pages(BASE, 256 * K))


@ops7("free-one-page-in-64k", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: MADV_FREE of one page inside a 64 KiB folio splits it; then DONTNEED of the\n"
              "split range and new faults there (order 0 beside the remaining pages)")
    t.mmap(BASE, 128 * K, "hugepage").writes(pages(BASE, 128 * K))
    t.madvise(BASE + 0x3000, P, "free").madvise(BASE + 0x4000, 0x8000, "dontneed")
    return t.writes(pages(BASE, 128 * K))


@ops7("free-whole-pmd", **only("2048kB"))
def _():
    t = Trace("2048kB: MADV_FREE of a whole PMD THP keeps it PMD-mapped; rewriting faults nothing")
    t.mmap(BASE, PMD, "hugepage").w(BASE)
    return t.madvise(BASE, PMD, "free").writes(pages(BASE, PMD, 16))


@ops7("free-part-of-pmd", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: MADV_FREE of the first 64 KiB of a PMD THP splits the PMD and the folio to\n"
              "order 0; writes there fault nothing")
    t.mmap(BASE, 2 * PMD, "hugepage").w(BASE)
    t.madvise(BASE, 64 * K, "free")
    return t.writes(pages(BASE, 128 * K)).writes(pages(BASE + PMD, 256 * K))


@ops7("free-split-unwritten-pages-to-zero-page", **only("16kB", "64kB", "2048kB"))
def _():
    t = Trace("16kB+64kB+2048kB: folios written once each (one byte: the other pages hold zeroes), then\n"
              "MADV_FREE of part of them: the split maps the zero-filled pages to the shared zero page\n"
              "(try_to_map_unused_to_zeropage), so writing them faults (a copy), the written ones do not")
    t.mmap(BASE, PMD, "hugepage").w(BASE)
    t.mmap(BASE + PMD, 256 * K, "hugepage").writes(pages(BASE + PMD, 256 * K, 16))
    t.madvise(BASE + 0x8000, 0x10000, "free").madvise(BASE + PMD + 0x8000, 0x10000, "free")
    return t.writes(pages(BASE, 128 * K)).writes(pages(BASE + PMD, 128 * K))


@ops7("free-zero-pages-then-write", **only("64kB"))
def _():
    t = Trace("64kB: MADV_FREE of zero-page PTEs and never-touched pages changes nothing; the writes then\n"
              "copy the zero pages (order 0) and fault 64 KiB folios where nothing was mapped")
    t.mmap(BASE, 256 * K, "hugepage").reads(pages(BASE, 128 * K))
    return t.madvise(BASE, 256 * K, "free").writes(pages(BASE, 256 * K))


@ops7("populate-write-64k", **only("64kB"))
def _():
    t = Trace("64kB: MADV_POPULATE_WRITE of 256 KiB faults 64 KiB folios through GUP (each counted as a\n"
              "fault); the writes afterwards fault nothing; a second populate does nothing")
    t.mmap(BASE, 256 * K, "hugepage").madvise(BASE, 256 * K, "populate_write")
    return t.writes(pages(BASE, 256 * K)).madvise(BASE, 256 * K, "populate_write")


@ops7("populate-read-then-write-64k", **only("64kB"))
def _():
    t = Trace("64kB: MADV_POPULATE_READ maps zero pages (one fault per page, no folio); populate_write\n"
              "over them copies each at order 0")
    t.mmap(BASE, 256 * K, "hugepage").madvise(BASE, 256 * K, "populate_read")
    return t.madvise(BASE, 256 * K, "populate_write").writes(pages(BASE, 256 * K, 4))


@ops7("populate-read-pmd-huge-zero-then-write", **only("2048kB"))
def _():
    t = Trace("2048kB: MADV_POPULATE_READ of an aligned 2 MiB maps the huge zero page (1 fault); a write\n"
              "then allocates a PMD THP")
    t.mmap(BASE, PMD, "hugepage").madvise(BASE, PMD, "populate_read")
    return t.w(BASE + 0x5000).writes(pages(BASE, PMD, 32))


@ops7("populate-write-pmd", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: MADV_POPULATE_WRITE of 2 MiB + 256 KiB from a 2 MiB boundary: one PMD THP,\n"
              "then 64 KiB folios")
    t.mmap(BASE, PMD + 256 * K, "hugepage").madvise(BASE, PMD + 256 * K, "populate_write")
    return t.writes(pages(BASE, PMD + 256 * K, 8))


@ops7("populate-mmap-then-advise", **only("64kB"))
def _():
    t = Trace("64kB: MAP_POPULATE of 256 KiB faults before any advice (order 0, one fault per page); the\n"
              "advice afterwards changes nothing for pages already there; the rest of the VMA gets 64 KiB")
    t.mmap(BASE, 256 * K, "populate").madvise(BASE, 512 * K, "hugepage")
    t.mmap(BASE + 256 * K, 256 * K, "hugepage")
    return t.writes(pages(BASE, 512 * K))


@ops7("populate-mmap-read-only", **only("64kB"))
def _():
    t = Trace("64kB: MAP_POPULATE of a PROT_READ mapping maps zero pages (read faults); mprotect(rw) and\n"
              "writes copy them at order 0")
    t.mmap(BASE, 128 * K, "prot=r", "populate", "hugepage").reads(pages(BASE, 128 * K))
    return t.mprotect(BASE, 128 * K, "rw").writes(pages(BASE, 128 * K, 2))


@ops7("populate-write-stops-at-hole", **only("64kB"))
def _():
    t = Trace("64kB: MADV_POPULATE_WRITE over a range with a hole populates up to the hole and stops\n"
              "(ENOMEM); the VMA after the hole faults on its writes")
    t.mmap(BASE, 128 * K, "hugepage").mmap(BASE + 192 * K, 128 * K, "hugepage")
    t.madvise(BASE, 320 * K, "populate_write")
    return t.writes(pages(BASE, 128 * K)).writes(pages(BASE + 192 * K, 128 * K))


@ops7("growsdown-page-by-page", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: an advised MAP_GROWSDOWN stack written one page at a time downward: each fault\n"
              "grows it to exactly that page, so every fault is order 0")
    top = BASE + 4 * M
    t.mmap(top - 64 * K, 64 * K, "growsdown", "hugepage").writes(reversed(pages(top - 64 * K, 64 * K)))
    return t.writes(p - 64 * K for p in reversed(pages(top - 64 * K, 128 * K)))


@ops7("growsdown-jump-aligned-64k", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: a write at a 64 KiB-aligned address well below an advised stack grows it there\n"
              "and gets a 64 KiB folio (the window starts at the new vm_start); then the pages between")
    top = BASE + 4 * M
    t.mmap(top - 64 * K, 64 * K, "growsdown", "hugepage").w(top - 4 * K)
    t.w(top - 512 * K)
    return t.writes(pages(top - 512 * K, 448 * K, 3))


@ops7("growsdown-jump-pmd", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: a write at a 2 MiB boundary 4 MiB below an advised stack grows it and maps a\n"
              "PMD THP at once")
    top = BASE + 6 * M + 64 * K
    t.mmap(top - 64 * K, 64 * K, "growsdown", "hugepage").w(top - P)
    return t.w(BASE).writes(pages(BASE, PMD, 64)).writes(pages(BASE + PMD, 256 * K))


@ops7("growsdown-misaligned-jump-then-fill", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: a write 1 MiB below the stack at 64 KiB-aligned + 0x3000 (order 0), then the\n"
              "252 pages between: 16 KiB folios beside it, 64 KiB ones further up")
    top = BASE + 4 * M
    t.mmap(top, 64 * K, "growsdown", "hugepage").w(top)
    low = top - M + 0x3000
    return t.w(low).writes(pages(low + P, top - low - P))


@ops7("growsdown-beside-prot-none", **only("64kB"))
def _():
    t = Trace("64kB: below the stack a PROT_NONE VMA (a guard, not accessible): no guard gap, the stack\n"
              "grows up to it")
    top = BASE + 2 * M
    t.mmap(BASE, PMD - 256 * K, "prot=none")
    t.mmap(top, 64 * K, "growsdown", "hugepage")
    return t.writes(reversed(pages(top - 256 * K, 256 * K, 4))).w(top - 256 * K)


@ops7("flags-noreserve-beside-plain-no-merge", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: a MAP_NORESERVE VMA right after a plain one does not merge with it (VM_ACCOUNT\n"
              "differs); the 64 KiB window across their boundary falls back to 16 KiB")
    t.mmap(BASE, 0x18000, "hugepage").mmap(BASE + 0x18000, 0x28000, "hugepage", "noreserve")
    return t.writes(pages(BASE, 0x40000))


@ops7("flags-noreserve-pair-merges", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: two adjacent MAP_NORESERVE VMAs merge: 64 KiB folios across their boundary")
    t.mmap(BASE, 0x18000, "hugepage", "noreserve").mmap(BASE + 0x18000, 0x28000, "hugepage", "noreserve")
    return t.writes(pages(BASE, 0x40000))


@ops7("flags-stack-is-nohugepage", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: MAP_STACK is VM_NOHUGEPAGE: unadvised it faults order 0, beside a plain VMA it\n"
              "does not merge; advised (MADV_HUGEPAGE clears VM_NOHUGEPAGE) it gets 64 KiB folios")
    t.mmap(BASE, 0x18000, "hugepage").mmap(BASE + 0x18000, 0x28000, "stack")
    t.writes(pages(BASE, 0x40000))
    t.mmap(BASE + M, 256 * K, "stack").madvise(BASE + M, 256 * K, "hugepage")
    return t.writes(pages(BASE + M, 256 * K))


@ops7("flags-dontfork-splits-and-dofork-merges", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: MADV_DONTFORK of 16 KiB inside an untouched advised VMA splits it (VM_DONTCOPY):\n"
              "windows across the split fall back; MADV_DOFORK merges it back before the rest is written")
    t.mmap(BASE, 512 * K, "hugepage").madvise(BASE + 0x24000, 0x4000, "dontfork")
    t.writes(pages(BASE, 128 * K))
    t.madvise(BASE + 0x24000, 0x4000, "dofork")
    return t.writes(pages(BASE + 128 * K, 384 * K))


@ops7("flags-growsdown-noreserve-stack-orders", **only("64kB"))
def _():
    t = Trace("64kB: MAP_NORESERVE, MAP_STACK+MADV_HUGEPAGE and MAP_GROWSDOWN VMAs, each advised, get\n"
              "the same 64 KiB folios as a plain one")
    for i, flags in enumerate([("noreserve",), ("stack",), ("growsdown",)]):
        a = BASE + i * PMD
        t.mmap(a, 256 * K, *flags).madvise(a, 256 * K, "hugepage").writes(pages(a, 256 * K))
    return t


@ops7("mixed-mprotect-dontneed-munmap-64k-pmd", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: a PMD THP and 64 KiB folios; mprotect(r) a piece, DONTNEED across the r/rw\n"
              "boundary, munmap part, mprotect back and retouch")
    t.mmap(BASE, 2 * PMD, "hugepage").w(BASE).writes(pages(BASE + PMD, 512 * K, 16))
    t.mprotect(BASE + PMD + 0x20000, 0x20000, "r")
    t.madvise(BASE + PMD + 0x10000, 0x20000, "dontneed").munmap(BASE + 0x100000, 0x10000)
    t.mprotect(BASE + PMD + 0x20000, 0x20000, "rw")
    return t.writes(pages(BASE + PMD, 512 * K)).writes(pages(BASE + 0x0F0000, 0x10000))


@ops7("mixed-threads-mremap-barrier", **only("64kB"))
def _():
    t = Trace("64kB: thread 0 maps and moves, thread 1 writes before and after the move (VMA operations\n"
              "are barriers); the moved pages do not fault again")
    t.mmap(BASE, 512 * K, "hugepage")
    for a in pages(BASE, 256 * K):
        t.w(a, thread=1).w(a + 256 * K, thread=0)
    t.add(f"@0 mremap {BASE:#x} {512 * K:#x} {BASE + 4 * M:#x} {512 * K:#x}")
    for a in pages(BASE + 4 * M, 512 * K, 2):
        t.w(a, thread=1)
    return t


@ops7("mixed-brk-free-mremap", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: a heap grown and advised, MADV_FREE of part of it, a realloc-like mremap of an\n"
              "mmap'd block that grows by moving, and the heap shrunk")
    t.brk(BASE).brk(BASE + 512 * K).madvise(BASE, 512 * K, "hugepage").writes(pages(BASE, 512 * K, 2))
    t.madvise(BASE + 0x6000, 0x20000, "free").writes(pages(BASE, 256 * K))
    t.mmap(BASE + 4 * M, 128 * K, "hugepage").writes(pages(BASE + 4 * M, 128 * K))
    t.mremap(BASE + 4 * M, 128 * K, BASE + 6 * M, 384 * K).writes(pages(BASE + 6 * M, 384 * K))
    return t.brk(BASE + 0x9000).writes(pages(BASE, 0x9000))


@ops7("mixed-populate-mprotect-threads", **only("64kB", "2048kB"))
def _():
    t = Trace("64kB+2048kB: populate_write by thread 0, mprotect(r) of part, threads read and write the\n"
              "rest; populate_read of a second VMA, then mprotect(rw) and writes by thread 1")
    t.mmap(BASE, 512 * K, "hugepage").add(f"@0 madvise {BASE:#x} {256 * K:#x} populate_write")
    t.mprotect(BASE, 64 * K, "r")
    for a in pages(BASE + 64 * K, 448 * K, 2):
        t.w(a, thread=1).r(a - 64 * K + P, thread=0)
    t.mmap(BASE + PMD, PMD, "hugepage", "prot=r").madvise(BASE + PMD, PMD, "populate_read")
    t.mprotect(BASE + PMD, PMD, "rw")
    return t.writes(pages(BASE + PMD, PMD, 128))


@ops7("mixed-growsdown-mprotect-split", **only("16kB", "64kB"))
def _():
    t = Trace("16kB+64kB: a page near the bottom of a written stack made read-only splits the VMA (both\n"
              "pieces keep VM_GROWSDOWN); the stack still grows below, page by page and by a jump")
    top = BASE + 4 * M
    t.mmap(top - 64 * K, 64 * K, "growsdown", "hugepage").writes(pages(top - 64 * K, 64 * K))
    t.mprotect(top - 60 * K, P, "r").r(top - 60 * K)
    t.writes(reversed(pages(top - 128 * K, 64 * K)))
    return t.w(top - 512 * K).writes(pages(top - 512 * K, 384 * K, 2))


def _random_mix7(seed, window=8 * M, nops=300):
    """A seeded random mix of the new operations (mprotect, mremap moves,
    MADV_FREE, populate, noreserve/stack mmaps) with the old ones over a
    window, valid by construction: accesses only hit pages whose protection
    allows them."""
    rng = random.Random(seed)
    npages = window // P
    prot = [None] * npages  # None: unmapped; else "rw" / "r" / "none"
    t = Trace(f"seeded ({seed}) random mix of mmap/munmap/mprotect/mremap/madvise (free, populate) and\n"
              f"accesses over {window >> 20} MiB")

    def runs(pred):
        out, i = [], 0
        while i < npages:
            if pred(prot[i]):
                j = i
                while j < npages and pred(prot[j]):
                    j += 1
                out.append((i, j))
                i = j
            else:
                i += 1
        return out

    for _ in range(nops):
        kind = rng.random()
        holes, vmas = runs(lambda p: p is None), runs(lambda p: p is not None)
        rw = runs(lambda p: p == "rw")
        if (kind < 0.08 or not vmas) and holes:
            lo, hi = rng.choice(holes)
            a = rng.randrange(lo, hi)
            n = rng.randint(1, min(hi - a, 512))
            flags = [rng.choice(["hugepage"] * 5 + ["", "nohugepage"])]
            flags += [rng.choice(["", "", "", "noreserve", "stack"])]
            t.mmap(BASE + a * P, n * P, *[f for f in flags if f])
            for i in range(a, a + n):
                prot[i] = "rw"
        elif kind < 0.11 and vmas:
            a = rng.randrange(npages)
            n = rng.randint(1, min(npages - a, 128))
            t.munmap(BASE + a * P, n * P)
            for i in range(a, a + n):
                prot[i] = None
        elif kind < 0.17 and vmas:
            lo, hi = rng.choice(vmas)
            a = rng.randrange(lo, hi)
            n = rng.randint(1, min(hi - a, 64))
            p = rng.choice(["rw", "rw", "r", "none"])
            t.mprotect(BASE + a * P, n * P, p)
            for i in range(a, a + n):
                prot[i] = p
        elif kind < 0.21 and vmas and holes:
            # Move a whole run of mapped pages (maybe several VMAs) into a hole that fits it.
            lo, hi = rng.choice(vmas)
            n = hi - lo
            fits = [(s, e) for s, e in holes if e - s >= n]
            if not fits:
                continue
            s, e = rng.choice(fits)
            d = rng.randrange(s, e - n + 1)
            t.mremap(BASE + lo * P, n * P, BASE + d * P, n * P)
            moved = prot[lo:hi]
            for i in range(lo, hi):
                prot[i] = None
            for k, v in enumerate(moved):
                prot[d + k] = v
        elif kind < 0.30 and rw:
            lo, hi = rng.choice(rw)
            a = rng.randrange(lo, hi)
            n = rng.randint(1, hi - a)
            t.madvise(BASE + a * P, n * P, rng.choice(["dontneed", "free", "free", "hugepage", "nohugepage",
                                                       "populate_write", "populate_read", "dontfork", "dofork"]))
        else:
            readable = runs(lambda p: p in ("rw", "r"))
            if not readable:
                continue
            lo, hi = rng.choice(readable)
            a = rng.randrange(lo, hi)
            n = rng.randint(1, min(hi - a, 48))
            for i in range(a, a + n, rng.choice([1, 1, 2, 5])):
                if prot[i] == "rw" and rng.random() < 0.8:
                    t.w(BASE + i * P + rng.randrange(P))
                else:
                    t.r(BASE + i * P + rng.randrange(P))
    return t


ops7("mixed-random-64k-pmd", **only("64kB", "2048kB"))(lambda: _random_mix7(11))
ops7("mixed-random-16k-64k-256k", **only("16kB", "64kB", "256kB"))(lambda: _random_mix7(12))
ops7("mixed-random-all-sizes", **only(*SIZES))(lambda: _random_mix7(13, window=6 * M, nops=400))
ops7("mixed-random-inherit", top="madvise", s32kB="inherit", s128kB="madvise", s2048kB="inherit")(
    lambda: _random_mix7(14))


# ---------------------------------------------------------------------------
# The shared kernel examples, re-recorded


def settings_of(args, defaults=None):
    """The top-level mode and per-size settings that ``anonfolio replay``
    options (``--thp-enabled M --thp SIZE=MODE ...``) express."""
    top = args[args.index("--thp-enabled") + 1]
    settings = dict(defaults or {})
    for i, a in enumerate(args):
        if a == "--thp":
            size, mode = args[i + 1].split("=")
            settings[size] = mode
    return top, settings


def shared_cases():
    out = []
    ex = json.loads((SHARED / "expected.json").read_text())
    for e in ex["examples"]:
        top, settings = settings_of(e["args"])
        out.append({"name": e["name"], "top": top, "settings": settings, "extra8": None,
                    "copy": SHARED / e["trace"], "description": "shared kernel example"})
    return out


def regression_cases():
    """Traces kept from differential fuzzing (``regressions/*.trace``): each
    starts with ``# args: --thp-enabled M --thp SIZE=MODE ...`` and a comment
    saying which kernel behaviour the simulator once got wrong."""
    out = []
    for path in sorted((HERE / "regressions").glob("*.trace")):
        first = path.read_text().splitlines()[0]
        top, settings = settings_of(first.removeprefix("# args:").split(),
                                    {s: ("inherit" if s == "2048kB" else "never") for s in SIZES})
        out.append({"name": path.stem, "top": top, "settings": settings, "extra8": None,
                    "copy": path, "description": "fuzzing regression: " + path.read_text().splitlines()[1][2:]})
    return out


# ---------------------------------------------------------------------------


def args_for(c) -> list:
    args = ["--thp-enabled", c["top"]]
    if c.get("extra8"):
        args += ["--thp", f"8kB={c['extra8']}"]
    for s in SIZES:
        args += ["--thp", f"{s}={c['settings'][s]}"]
    return args


def figures(run: dict) -> dict:
    mthp = {}
    for size, counters in sorted(run["mthp"].items(), key=lambda kv: int(kv[0][:-2])):
        vals = {c: int(counters.get(c, 0)) for c in RECORDED}
        if any(vals.values()):
            mthp[size] = vals
    return {"faults": int(run["faults"]), "rss_bytes": int(run["rss_bytes"]), "mthp": mthp}


def _noisy(c) -> bool:
    """A case with an `always` knob also gives other processes large folios
    while it runs, and they show up in the system-wide counters."""
    return c["top"] == "always" or "always" in c["settings"].values()


def _allocs(fig) -> int:
    return sum(v["anon_fault_alloc"] for v in fig["mthp"].values())


def record_one(c, text, runs):
    """Runs a case until two runs agree (or `runs` times) and keeps the most
    common figures. A case with an `always` knob runs `2 * runs` times and
    keeps the figures with the fewest allocations (other processes can only
    add to anon_fault_alloc), preferring ones seen at least twice."""
    from anonfolio.kernel import kernel_replay

    thp = dict(c["settings"])
    if c.get("extra8"):
        thp["8kB"] = c["extra8"]
    noisy = _noisy(c)
    seen = collections.Counter()
    last = {}
    for _ in range(2 * runs if noisy else runs):
        run = kernel_replay(text, thp_enabled=c["top"], thp=thp)
        fig = figures(run)
        key = json.dumps(fig, sort_keys=True)
        seen[key] += 1
        last[key] = run
        if not noisy and seen[key] >= 2:
            break
    if noisy:
        key = min(seen, key=lambda k: (_allocs(json.loads(k)), -seen[k]))
        n = seen[key]
    else:
        key, n = seen.most_common(1)[0]
    run = last[key]
    extra = {"vmstat": {k: v for k, v in run["vmstat"].items() if v},
             "anon_huge_bytes": run.get("anon_huge_bytes", 0),
             "agreeing_runs": n, "runs": sum(seen.values())}
    return json.loads(key), extra, run["kernel"]


def record_twice(c, text):
    """Records a case exactly twice. Returns the figures, the extra
    information, the kernel release and, if the second recording disagreed,
    its figures (the case is then left out)."""
    from anonfolio.kernel import kernel_replay

    thp = dict(c["settings"])
    runs = [kernel_replay(text, thp_enabled=c["top"], thp=thp) for _ in range(2)]
    figs = [figures(r) for r in runs]
    run = runs[0]
    extra = {"vmstat": {k: v for k, v in run["vmstat"].items() if v},
             "anon_huge_bytes": run.get("anon_huge_bytes", 0),
             "agreeing_runs": 2 if figs[0] == figs[1] else 1, "runs": 2}
    return figs[0], extra, run["kernel"], (None if figs[0] == figs[1] else figs[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="record only these cases (others keep their figures)")
    ap.add_argument("--runs", type=int, default=5, help="at most this many runs per case (default 5)")
    ap.add_argument("--traces-only", action="store_true", help="write the traces, record nothing")
    ap.add_argument("--list", action="store_true", help="list the cases")
    ap.add_argument("--group", help="only the cases of this group (e.g. ops7: expected-ops7.json)")
    opts = ap.parse_args(argv)

    cases = shared_cases() + regression_cases()
    for c in CASES:
        t = c["make"]()
        cases.append({**c, "text": t.text(), "description": t.lines[0][2:] if t.lines else ""})
    names = [c["name"] for c in cases]
    dup = [n for n, k in collections.Counter(names).items() if k > 1]
    if dup:
        raise SystemExit(f"duplicate case names: {dup}")
    if opts.group is not None:
        cases = [c for c in cases if c.get("group", "") == opts.group]
        if not cases:
            print(f"record.py: no case in group {opts.group!r}", file=sys.stderr)
            return 2
    if opts.list:
        for c in cases:
            print(c["name"])
        return 0
    if opts.only:
        unknown = set(opts.only) - set(names)
        if unknown:
            print(f"record.py: unknown case(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2

    for c in cases:
        path = HERE / f"{c['name']}.trace"
        if "copy" in c:
            shutil.copyfile(c["copy"], path)
            c["text"] = path.read_text()
        else:
            path.write_text(c["text"])
    if opts.traces_only:
        print(f"wrote {len(cases)} traces to {HERE}")
        return 0

    from anonfolio.kernel import can_change_thp
    ok, why = can_change_thp()
    if not ok:
        print(f"record.py: cannot set the THP knobs: {why}", file=sys.stderr)
        return 1

    by_group = collections.defaultdict(list)
    for c in cases:
        by_group[c.get("group", "")].append(c)
    disagreed = []
    for group, members in by_group.items():
        out_path = HERE / (f"expected-{group}.json" if group else "expected.json")
        old = {}
        if out_path.exists():
            old = {e["name"]: e for e in json.loads(out_path.read_text()).get("examples", [])}
        examples = []
        release = None
        for c in members:
            entry = {"name": c["name"], "trace": f"{c['name']}.trace", "args": args_for(c),
                     "description": c.get("description", "")}
            if opts.only and c["name"] not in opts.only:
                if c["name"] in old:
                    examples.append({**old[c["name"]], **entry})
                continue
            if group:
                # New groups: exactly two recordings, kept only if they agree.
                fig, extra, release, other = record_twice(c, c["text"])
                if other is not None:
                    disagreed.append(c["name"])
                    print(f"{c['name']:<40} DISAGREE (dropped): {json.dumps(fig)} vs {json.dumps(other)}")
                    continue
            else:
                fig, extra, release = record_one(c, c["text"], opts.runs)
            entry["kernel"] = fig
            entry["kernel_extra"] = extra
            examples.append(entry)
            flag = "" if extra["agreeing_runs"] >= 2 else "  (UNSTABLE: no two runs agreed)"
            print(f"{c['name']:<40} faults={fig['faults']:<6} rss={fig['rss_bytes']:<9} "
                  f"{ {s: v['anon_fault_alloc'] for s, v in fig['mthp'].items()} }{flag}")
        data = {"kernel": release or os.uname().release, "examples": examples}
        out_path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"recorded {len(examples)} cases in {out_path}")
    if disagreed:
        print(f"{len(disagreed)} case(s) whose two recordings disagreed were left out: {', '.join(disagreed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
