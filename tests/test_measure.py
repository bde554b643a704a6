"""``anonfolio.measure`` on this machine's kernel: a small C program whose
folios, faults and RSS are known, measured, and a recording of it replayed
against the measurement."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import anonfolio
from anonfolio.measure import MeasureError, measure

PROGRAMS = Path(__file__).parent / "measure_programs"
REPO = Path(anonfolio.__file__).resolve().parent.parent
THP = Path("/sys/kernel/mm/transparent_hugepage")
KB64 = 64 * 1024


def _why_not() -> str:
    if os.geteuid() != 0:
        return "measuring needs root"
    if shutil.which("gcc") is None:
        return "gcc is missing (the test program is C)"
    tracing = Path("/sys/kernel/tracing")
    if not (tracing / "instances").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracing)], capture_output=True)
    if not (tracing / "events" / "kmem" / "rss_stat").is_dir():
        return "tracefs with the kmem:rss_stat tracepoint is not available"
    return ""


WHY = _why_not()
pytestmark = pytest.mark.skipif(bool(WHY), reason=WHY)


@pytest.fixture(scope="module")
def folios_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("measure-bin") / "folios"
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(PROGRAMS / "folios.c")], check=True)
    return exe


def _mode(p: Path) -> str:
    text = p.read_text()
    return text[text.index("[") + 1 : text.index("]")]


@pytest.fixture
def mthp_64k_madvise() -> Iterator[None]:
    """hugepages-64kB=madvise, 2048kB=never: only the program's advised memory
    gets 64 KiB folios; put back as found."""
    knobs = {THP / "hugepages-64kB" / "enabled": "madvise", THP / "hugepages-2048kB" / "enabled": "never"}
    saved = {p: _mode(p) for p in knobs}
    try:
        for p, v in knobs.items():
            p.write_text(v)
        yield
    finally:
        for p, v in saved.items():
            p.write_text(v)


@pytest.mark.host_thp
def test_64k_folios_of_an_advised_mapping_are_counted_exactly(folios_bin: Path, mthp_64k_madvise: None) -> None:
    base = measure([str(folios_bin), "0", "advise"])
    m = measure([str(folios_bin), "10", "advise"])
    assert m.status == 0 and base.status == 0
    assert m.notes == [] and base.notes == []
    # Nothing else of the program is advised, so every 64 KiB folio is one of the ten.
    assert base.folios.get("64kB", 0) == 0
    assert m.folios["64kB"] == 10
    assert m.folio_pages["64kB"] == 10 * 16 - 4  # block 0 lost 4 pages to the munmap
    assert m.faults - base.faults == 10
    assert m.rss_bytes - base.rss_bytes == 10 * KB64 - 16384
    assert m.rss_peak_bytes - base.rss_peak_bytes == 10 * KB64


def test_unadvised_pages_are_order_0_and_the_counter_agrees_with_the_pagemap(folios_bin: Path) -> None:
    base = measure([str(folios_bin), "0"])
    m = measure([str(folios_bin), "10"])
    assert m.notes == []  # MM_ANONPAGES at exit less file COW pages == pagemap's count
    assert m.rss_stat_exit_bytes == m.rss_bytes
    assert m.file_cow_pages == m.file_cow_traced
    assert m.faults - base.faults == 10
    assert m.folios["4kB"] - base.folios["4kB"] == 10
    assert m.rss_bytes - base.rss_bytes == 10 * 4096
    assert m.rss_peak_bytes - base.rss_peak_bytes == 10 * 4096


def test_measurement_equals_the_replay_of_the_programs_recording(folios_bin: Path, tmp_path: Path) -> None:
    trace = tmp_path / "folios.trace"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rec = subprocess.run(
        [sys.executable, "-m", "anonfolio", "record", "-o", str(trace), "--", str(folios_bin), "10"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert rec.returncode == 0, rec.stderr
    rep = subprocess.run(
        [sys.executable, "-m", "anonfolio", "replay", str(trace), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert rep.returncode == 0, rep.stderr
    import json

    pred = json.loads(rep.stdout)
    m = measure([str(folios_bin), "10"])
    assert (m.faults, m.rss_bytes, m.rss_peak_bytes) == (pred["faults"], pred["rss_bytes"], pred["rss_peak_bytes"])


def test_a_command_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MeasureError, match="command not found"):
        measure(["no-such-command-anonfolio"])
    notexe = tmp_path / "data"
    notexe.write_text("x")
    with pytest.raises(MeasureError, match="not an executable"):
        measure([str(notexe)])
