"""``validate`` and ``kernel-replay`` judge by what the process itself got:
its faults, its Rss, and the folio sizes in its own page table (pagemap +
/proc/kpageflags, as tools/mm/thpmaps reads them), so another process
faulting large folios at the same time cannot make them disagree. The
system-wide hugepages-*/stats counters are shown, marked as such, and
decide only when asked (or when pagemap cannot be read)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from anonfolio import cli, kernel

B = 0x7F0000000000
P = 4096

# 8 MiB advised: 512 folios of 64 KiB; then a 16 KiB hole in the first one
# (it stays, partially mapped) and the last 64 KiB unmapped (that folio goes).
TRACE = (f"mmap {B:#x} {8 << 20:#x} hugepage\n"
         + "".join(f"w {B + i * P:#x}\n" for i in range(2048))
         + f"madvise {B + P:#x} {4 * P:#x} dontneed\n"
         + f"munmap {B + (8 << 20) - (64 << 10):#x} {64 << 10:#x}\n")
KNOBS = ["--thp", "64kB=madvise", "--thp", "2048kB=never"]

# Another process that faults 64 KiB folios in a loop: MADV_HUGEPAGE
# regions, so it gets them only while validate has 64kB at madvise (the
# house rule: never `always`, which would touch every process).
FAULTER = textwrap.dedent("""
    import mmap, sys, time
    end = time.time() + float(sys.argv[1])
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    while time.time() < end:
        m = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
        for off in range(0, 8 << 20, 4096):
            m[off] = 1
        m.close()
""")


def _sim(faults=5, rss=8192, nr_anon=1, alloc=1):
    return {"faults": faults, "rss_bytes": rss, "mthp": {"64kB": {"nr_anon": nr_anon, "anon_fault_alloc": alloc}}}


def _kern(folio_orders, alloc=1, faults=5, rss=8192):
    return {"faults": faults, "rss_bytes": rss, "folio_orders": folio_orders,
            "mthp": {"64kB": {"nr_anon": 1, "anon_fault_alloc": alloc}}}


def test_process_rows_decide_and_system_rows_are_marked():
    orders = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    # Another process's faults added 7 to the system-wide counter: still a match.
    rows = kernel.compare(_sim(), _kern(orders, alloc=8))
    ok, notes = kernel.verdict(rows)
    assert ok
    by = {r["name"]: r for r in rows}
    assert by["64kB folios"]["scope"] == "process" and by["64kB folios"]["decides"]
    assert by["64kB anon_fault_alloc"]["scope"] == "system" and not by["64kB anon_fault_alloc"]["decides"]
    assert any("system-wide counters differ" in n for n in notes)
    # A difference in the process's own folios is a difference.
    assert not kernel.verdict(kernel.compare(_sim(nr_anon=2), _kern(orders)))[0]
    # Asked for, the system-wide counters decide too.
    assert not kernel.verdict(kernel.compare(_sim(), _kern(orders, alloc=8), system_counters=True))[0]


def test_without_pagemap_the_counters_decide_and_the_output_says_they_are_system_wide():
    rows = kernel.compare(_sim(), _kern(None, alloc=8))
    ok, notes = kernel.verdict(rows)
    assert not ok
    assert any("system-wide" in n for n in notes)
    assert not any(r["name"].endswith("folios") for r in rows)


pytestmark_live = pytest.mark.host_thp  # sets 64kB=madvise (restored after)


@pytestmark_live
def test_kernel_replay_reads_the_folio_sizes_the_process_got():
    from anonfolio import Config

    k = kernel.kernel_replay(TRACE, Config(hugepages={"64kB": "madvise", "2048kB": "never"}))
    assert k["folio_orders"] is not None, "needs root: pagemap PFNs and /proc/kpageflags"
    # 127 of the 128 64 KiB folios remain (one was unmapped whole), the first partially mapped.
    assert k["folio_orders"][4] == 127
    assert sum(k["folio_orders"]) == 127
    assert k["rss_bytes"] == (8 << 20) - (64 << 10) - 4 * P


@pytestmark_live
def test_validate_agrees_with_itself_while_another_process_faults(tmp_path, capsys):
    trace = tmp_path / "t.trace"
    trace.write_text(TRACE)
    bg = subprocess.Popen([sys.executable, "-c", FAULTER, "120"], stdout=subprocess.PIPE, text=True)
    try:
        assert bg.stdout is not None and bg.stdout.readline().strip() == "ready"
        verdicts, disturbed = [], 0
        for _ in range(8):
            rc = cli.main(["validate", str(trace), *KNOBS, "--json"])
            out = json.loads(capsys.readouterr().out)
            verdicts.append((rc, out["match"], out["scope"]))
            disturbed += any(not r["match"] for r in out["rows"] if r["scope"] == "system")
            assert bg.poll() is None, "the background faulter died"
    finally:
        bg.kill()
        bg.wait()
    assert verdicts == [(0, True, "process")] * 8
    # The other process really did move the system-wide counters (the old,
    # counter-based validate said DIFFERENT then).
    assert disturbed >= 1, "the background faulter never overlapped a replay"


@pytestmark_live
def test_validate_text_says_which_figures_are_system_wide(tmp_path, capsys):
    trace = tmp_path / "t.trace"
    trace.write_text(TRACE)
    rc = cli.main(["validate", str(trace), *KNOBS])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "64kB folios" in out and "process" in out and "system" in out
    assert os.path.exists("/proc/kpageflags")
