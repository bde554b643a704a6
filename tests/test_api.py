"""The Python API: Simulator, Config, Stats, the helpers and the exceptions,
with figures a kernel developer can work out by hand."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import anonfolio
from anonfolio import (
    AnonfolioError,
    Config,
    ConfigError,
    RangeError,
    SegmentationFault,
    Simulator,
    Stats,
    TraceError,
)

B = 0x7F0000000000  # 2 MiB aligned
P = 4096
MiB = 1 << 20


def writes(start: int, npages: int, op: str = "w") -> str:
    return "".join(f"{op} {start + i * P:#x}\n" for i in range(npages))


def only(**sizes: str) -> Config:
    """Every mTHP size and PMD THP off except those named (64kB="madvise")."""
    hp = dict.fromkeys(anonfolio.THP_SIZES, "never")
    hp.update({k.replace("_", ""): v for k, v in sizes.items()})
    return Config(hugepages=hp)


# ---------------------------------------------------------------------------
# Fault counts by hand


def test_64k_madvise_over_1mib_advised():
    """The contract's example: 256 pages in 64 KiB folios -> 16 faults."""
    sim = Simulator(Config(hugepages={"64kB": "madvise"}))
    sim.mmap(B, MiB, hugepage=True)
    s = sim.replay(writes(B, 256))
    assert s.faults == 16
    assert s.mthp["64kB"].anon_fault_alloc == 16
    assert s.mthp["64kB"].anon_fault_fallback == 0
    assert s.mthp["64kB"].nr_anon == 16
    assert s.rss_bytes == MiB
    assert s.vmstat.pgfault == 16
    assert s.folio_orders[4] == 16 and s.folio_orders.sum() == 16
    assert list(s.mthp) == ["64kB"], "sizes with all-zero counters are left out"


def test_64k_madvise_needs_the_advice():
    sim = Simulator(Config(hugepages={"64kB": "madvise"}))
    sim.mmap(B, MiB)  # no MADV_HUGEPAGE
    s = sim.replay(writes(B, 256))
    assert s.faults == 256
    assert s.folio_orders[0] == 256
    assert "64kB" not in s.mthp


def test_order0_default_is_one_fault_per_page():
    s = anonfolio.replay(f"mmap {B:#x} {MiB:#x}\n" + writes(B, 256))
    assert s.faults == 256
    assert s.rss_bytes == MiB
    assert s.folio_orders[0] == 256
    assert dict(s.mthp) == {}
    assert s.fault_paths.anonymous == 256


def test_default_config_gives_pmd_thp_only_with_the_advice():
    t = f"mmap {B:#x} {4 * MiB:#x} hugepage\n" + writes(B, 1024)
    s = anonfolio.replay(t)
    assert s.faults == 2
    assert s.rss_bytes == 4 * MiB
    assert s.vmstat.thp_fault_alloc == 2
    assert s.mthp["2048kB"].anon_fault_alloc == 2
    assert s.mthp["2M"].anon_fault_alloc == 2, "sizes may be spelt 2M"
    assert s.folio_orders[9] == 2
    # enabled=never turns the inherited 2048kB off.
    s = anonfolio.replay(t, Config(enabled="never"))
    assert s.faults == 1024 and s.vmstat.thp_fault_alloc == 0


def test_read_then_write_two_faults_a_page_and_no_rss_for_reads():
    sim = Simulator()
    sim.mmap(B, 64 * P)
    s = sim.replay(writes(B, 64, "r"))
    assert s.faults == 64
    assert s.rss_bytes == 0, "the shared zero page is not RSS"
    assert s.fault_paths.zero_page == 64
    s = sim.replay(writes(B, 64, "w"))
    assert s.faults == 128
    assert s.rss_bytes == 64 * P
    assert s.fault_paths.wp_copy == 64
    # Touching again costs nothing.
    assert sim.replay(writes(B, 64, "w")).faults == 128


def test_use_zero_page_is_the_huge_zero_page():
    """use_zero_page governs the huge zero page only; order-0 reads always
    map the shared zero page."""
    t = f"mmap {B:#x} {2 * MiB:#x} hugepage\n" + writes(B, 16, "r")
    s = anonfolio.replay(t)
    assert s.faults == 1 and s.rss_bytes == 0
    assert s.fault_paths.huge_zero_page == 1
    s = anonfolio.replay(t, Config(use_zero_page=False))
    assert s.faults == 1 and s.rss_bytes == 2 * MiB
    assert s.mthp["2048kB"].anon_fault_alloc == 1
    s = anonfolio.replay(f"mmap {B:#x} {MiB:#x}\n" + writes(B, 16, "r"), Config(use_zero_page=False))
    assert s.faults == 16 and s.rss_bytes == 0


def test_nohugepage_and_uffd_wp_get_order0():
    for flag in ("nohugepage", "uffd_wp"):
        sim = Simulator(hugepages={"64kB": "always"})
        sim.mmap(B, MiB, **{flag: True})
        sim.touch(np.arange(B, B + MiB, P, dtype=np.uint64))
        s = sim.stats()
        assert s.faults == 256, flag
        assert s.folio_orders[0] == 256, flag


def test_always_without_advice():
    sim = Simulator(hugepages={"64kB": "always"})
    sim.mmap(B, MiB)
    sim.touch(range(B, B + MiB, P))
    assert sim.stats().faults == 16


def test_largest_enabled_order_that_fits_the_vma():
    """A 192 KiB VMA at a 2 MiB boundary with 128kB and 16kB on: one 128kB
    folio, then 16kB folios for the 64 KiB that 128kB cannot cover."""
    sim = Simulator(only(**{"128kB": "always", "16kB": "always"}))
    sim.mmap(B, 192 * 1024)
    sim.touch(range(B, B + 192 * 1024, P))
    s = sim.stats()
    assert s.mthp["128kB"].anon_fault_alloc == 1
    assert s.mthp["16kB"].anon_fault_alloc == 4
    assert s.faults == 5
    assert s.rss_bytes == 192 * 1024


def test_munmap_and_dontneed_drop_rss():
    sim = Simulator(hugepages={"64kB": "always"})
    sim.mmap(B, MiB)
    sim.touch(range(B, B + MiB, P))
    sim.madvise(B, 64 * 1024, "dontneed")
    assert sim.stats().rss_bytes == MiB - 64 * 1024
    sim.write(B)  # refault: a fresh 64 KiB folio
    s = sim.stats()
    assert s.faults == 17 and s.rss_bytes == MiB
    sim.munmap(B, MiB)
    s = sim.stats()
    assert s.rss_bytes == 0
    assert sim.vmas() == []
    sim.check_invariants()


def test_partial_madvise_splits_the_vma():
    sim = Simulator()
    sim.mmap(B, 4 * MiB)
    sim.madvise(B + MiB, MiB, "hugepage")
    v = sim.vmas()
    assert [(x.start - B, x.end - B, x.hugepage) for x in v] == [
        (0, MiB, False),
        (MiB, 2 * MiB, True),
        (2 * MiB, 4 * MiB, False),
    ]
    assert v[1].length == MiB


def test_touch_takes_numpy_and_lists_and_reports_the_bad_index():
    sim = Simulator()
    sim.mmap(B, 16 * P)
    assert sim.touch(np.arange(B, B + 8 * P, P, dtype=np.uint64)) == 8
    assert sim.touch(np.arange(B, B + 8 * P, P, dtype=np.int64)) == 8
    assert sim.touch([B + 8 * P, B + 9 * P], write=False) == 2
    with pytest.raises(SegmentationFault) as e:
        sim.touch([B, B + 16 * P, B + P])
    assert e.value.index == 1
    assert e.value.address == B + 16 * P
    with pytest.raises(RangeError):
        sim.touch(np.array([-1]))
    with pytest.raises(TypeError):
        sim.touch(np.array([1.5]))


def test_threads_can_share_the_simulator():
    """touch() releases the GIL; concurrent callers each get their work done."""
    sim = Simulator()
    sim.mmap(B, 64 * MiB)
    chunks = np.split(np.arange(B, B + 64 * MiB, P, dtype=np.uint64), 4)
    ts = [threading.Thread(target=sim.touch, args=(c,)) for c in chunks]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    s = sim.stats()
    assert s.faults == 64 * MiB // P
    assert s.rss_bytes == 64 * MiB
    sim.check_invariants()


# ---------------------------------------------------------------------------
# Workloads


def test_run_sequential_and_stride():
    s = anonfolio.run("sequential", "4M", only(**{"64kB": "always"}))
    assert s.faults == 64 and s.rss_bytes == 4 * MiB
    s = anonfolio.run("stride", "4M", only(), stride=16)
    assert s.faults == 64 and s.rss_bytes == 64 * P
    s = anonfolio.run("sequential", "4M")  # default config, MADV_HUGEPAGE: PMD THP
    assert s.faults == 2 and s.mthp["2048kB"].anon_fault_alloc == 2


def test_run_page_fault1_unmaps_each_round():
    s = anonfolio.run("page_fault1", "1M", iterations=3)
    assert s.faults == 3 * 256
    assert s.rss_bytes == 0


def test_run_threads_disjoint_and_interleaved_cover_every_page():
    for sharing in anonfolio.SHARING:
        s = anonfolio.run("sequential", "8M", only(**{"64kB": "always"}), threads=4, sharing=sharing)
        assert s.rss_bytes == 8 * MiB, sharing
        # Lost races can add faults, never remove them.
        assert s.faults >= 128, sharing
        assert s.folio_orders.sum() == 128, sharing


def test_deterministic_runs_repeat():
    cfg = only(**{"16kB": "always", "64kB": "always"})
    a = anonfolio.run("sequential", "16M", cfg, threads=4, sharing="interleaved", deterministic=3)
    b = anonfolio.run("sequential", "16M", cfg, threads=4, sharing="interleaved", deterministic=3)
    strip = lambda s: {k: v for k, v in s.to_dict().items() if k not in ("elapsed_s",)}  # noqa: E731
    assert strip(a) == strip(b)


def test_run_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        anonfolio.run("zigzag", "1M")
    with pytest.raises(ConfigError):
        anonfolio.run("sequential", "1M", sharing="round-robin")
    with pytest.raises(ConfigError):
        anonfolio.run("sequential", "12Q")
    with pytest.raises(ConfigError):
        anonfolio.run("sequential", 4097)
    with pytest.raises(ConfigError):
        anonfolio.run("sequential", "1M", threads=0)
    with pytest.raises(ConfigError):
        anonfolio.run("stride", "1M", stride=0)


def test_run_over_an_existing_mapping_is_a_range_error():
    sim = Simulator()
    sim.run("sequential", "1M")
    with pytest.raises(RangeError):
        sim.run("sequential", "1M")


# ---------------------------------------------------------------------------
# Errors


def test_exception_hierarchy():
    for cls in (TraceError, SegmentationFault, ConfigError, RangeError, anonfolio.OutOfMemory):
        assert issubclass(cls, AnonfolioError)
    for cls in (TraceError, ConfigError, RangeError):
        assert issubclass(cls, ValueError)
    assert not issubclass(SegmentationFault, ValueError)
    assert TraceError.__module__ == "anonfolio"
    assert anonfolio.TraceError is anonfolio._anonfolio.TraceError


def test_segv_names_the_address_and_the_line():
    t = f"mmap {B:#x} 0x10000\nw {B:#x}\nw {B + 0x10000:#x}\n"
    with pytest.raises(SegmentationFault) as e:
        anonfolio.replay(t)
    err = e.value
    assert err.address == B + 0x10000
    assert err.line == 3
    assert str(err).startswith("line 3: ")
    assert isinstance(err.stats, Stats)
    assert err.stats.faults == 1, "what ran before the error is counted"
    sim = Simulator()
    with pytest.raises(SegmentationFault) as e:
        sim.read(B)
    assert e.value.address == B and e.value.line is None


def test_trace_errors_name_the_line_and_keep_what_ran():
    good = f"mmap {B:#x} 0x10000\nw {B:#x}\n"
    for bad, line in [
        ("frobnicate 12\n", 3),
        (f"mmap {B:#x} 0x10zz\n", 3),
        ("w\n", 3),
        (f"madvise {B:#x} 0x1000 sideways\n", 3),
        ("\n# comment\nw 0x1000 extra\n", 5),
    ]:
        with pytest.raises(TraceError) as e:
            anonfolio.replay(good + bad)
        assert e.value.line == line, bad
        assert f"line {line}" in str(e.value)
        assert e.value.stats.faults == 1
        with pytest.raises(TraceError):
            anonfolio.check_trace(good + bad)
    assert anonfolio.check_trace(good) == 2


def test_range_errors():
    sim = Simulator()
    with pytest.raises(RangeError):
        sim.mmap(B + 5, 0x10000)
    with pytest.raises(RangeError):
        sim.mmap(B, 0x10001)
    with pytest.raises(RangeError):
        sim.mmap(B, 0)
    with pytest.raises(RangeError):
        sim.mmap(1 << 47, P)
    sim.mmap(B, MiB)
    with pytest.raises(RangeError):
        sim.mmap(B + P, P)  # overlap
    with pytest.raises(RangeError):
        anonfolio.replay(f"mmap {B + 5:#x} 0x10000\n")
    with pytest.raises(ConfigError):
        sim.madvise(B, P, "sideways")


def test_memcg_limit_is_out_of_memory():
    sim = Simulator(memcg_limit="1M")
    sim.mmap(B, 4 * MiB)
    with pytest.raises(anonfolio.OutOfMemory) as e:
        sim.touch(range(B, B + 4 * MiB, P))
    # The memcg is charged for the PTE table too (as the kernel charges
    # page tables): 255 pages of folios fit in 1 MiB beside it.
    assert e.value.index == 255
    assert sim.stats().rss_bytes == MiB - P


# ---------------------------------------------------------------------------
# Config


def test_config_defaults_are_this_kernels():
    c = Config()
    assert c.enabled == "madvise"
    assert c.hugepages["2048kB"] == "inherit"
    assert all(m == "never" for s, m in c.hugepages.items() if s != "2048kB")
    assert list(c.hugepages) == list(anonfolio.THP_SIZES)
    assert c.policy == "upstream" and c.use_zero_page
    assert c.memory == 4 << 40
    assert Simulator().config == c


def test_config_normalises_and_is_frozen():
    c = Config(hugepages={"64K": "always", "2M": "never"}, memory="64G", memcg_limit="512MiB",
               fail_orders=["64kB", 9])
    assert c.hugepages["64kB"] == "always" and c.hugepages["2048kB"] == "never"
    assert c.memory == 64 << 30 and c.memcg_limit == 512 << 20
    assert c.fail_orders == (4, 9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.enabled = "always"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.hugepages["64kB"] = "never"  # type: ignore[index]
    assert c == Config(hugepages={"64kB": "always", "2048kB": "never"}, memory=64 << 30,
                       memcg_limit=512 << 20, fail_orders=(9, 4))
    assert len({c, Config(**c.to_dict())}) == 1
    assert pickle.loads(pickle.dumps(c)) == c
    assert Config(**json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize(
    "kw",
    [
        dict(enabled="sometimes"),
        dict(hugepages={"48kB": "always"}),
        dict(hugepages={"4kB": "always"}),
        dict(hugepages={"64kB": "sometimes"}),
        dict(hugepages=["64kB"]),
        dict(policy="fastest"),
        dict(memory="12Q"),
        dict(memory=-1),
        dict(fragmentation=1.5),
        dict(fail_rate=-0.1),
        dict(fail_orders=[11]),
        dict(fail_orders=["48kB"]),
        dict(seed=-1),
        dict(use_zero_page="yes"),
    ],
)
def test_config_validation(kw):
    with pytest.raises(ConfigError):
        Config(**kw)
    with pytest.raises(ValueError):
        Simulator(**kw)


def test_unknown_config_field():
    with pytest.raises(TypeError):
        Config(colour="blue")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="colour"):
        Simulator(colour="blue")
    with pytest.raises(TypeError):
        Simulator(42)  # type: ignore[arg-type]


def test_config_sysfs_and_from_args():
    c = Config.from_args(thp_enabled="always", thp=["64K=always", "2048kB=never"], policy="v1")
    s = c.sysfs()
    assert s["enabled"] == "always"
    assert s["hugepages-64kB/enabled"] == "always"
    assert s["hugepages-2048kB/enabled"] == "never"
    assert s["hugepages-16kB/enabled"] == "never"
    assert s["use_zero_page"] == "1"
    assert c.policy == "v1"
    assert Config.from_sysfs(s, policy="v1") == c
    kernel_view = {"enabled": "always [madvise] never", "hugepages-64kB/enabled": "[always] inherit madvise never"}
    k = Config.from_sysfs(kernel_view)
    assert k.enabled == "madvise" and k.hugepages["64kB"] == "always"
    assert c.thp_args[:2] == ["--thp-enabled", "always"]
    with pytest.raises(ConfigError):
        Config.from_args(thp=["48kB=always"])
    with pytest.raises(ConfigError):
        Config.from_args(thp=["64kB"])


def test_config_replace_merges_hugepages_and_allowed_sizes():
    c = Config(hugepages={"64kB": "always"})
    d = c.replace(hugepages={"16kB": "madvise"}, policy="preferred")
    assert d.hugepages["64kB"] == "always" and d.hugepages["16kB"] == "madvise"
    assert d.policy == "preferred" and c.policy == "upstream"
    assert d.allowed_sizes() == ("64kB",)
    assert d.allowed_sizes(hugepage=True) == ("2048kB", "64kB", "16kB")
    assert d.allowed_sizes(hugepage=True, nohugepage=True) == ()
    assert Config(enabled="never").allowed_sizes(hugepage=True) == ()
    assert "64kB" in repr(c) and "policy" not in repr(c)


def test_simulator_takes_config_dict_and_overrides():
    sim = Simulator({"hugepages": {"64kB": "always"}}, policy="v1")
    assert sim.config.policy == "v1" and sim.config.hugepages["64kB"] == "always"
    assert "64kB=always" in repr(sim)


# ---------------------------------------------------------------------------
# Stats


def _one_mib_64k() -> Stats:
    return anonfolio.replay(f"mmap {B:#x} {MiB:#x} hugepage\n" + writes(B, 256),
                            Config(hugepages={"64kB": "madvise"}))


def test_stats_keys_follow_the_contract():
    s = _one_mib_64k()
    d = json.loads(s.to_json())
    for k in ("faults", "rss_bytes", "elapsed_s", "mthp", "vmstat", "locks"):
        assert k in d
    assert set(d["mthp"]["64kB"]) == {"anon_fault_alloc", "anon_fault_fallback", "anon_fault_fallback_charge",
                                      "split", "split_deferred", "nr_anon", "nr_anon_partially_mapped"}
    assert {"pgfault", "thp_fault_alloc", "thp_fault_fallback"} <= set(d["vmstat"])
    for k in ("acquisitions", "contended", "spins"):
        assert k in d["locks"] and d["locks"][k] == d["locks"]["ptl"][k]
    for lock in ("ptl", "page_table_lock", "zone_lock", "mmap_lock"):
        assert set(d["locks"][lock]) == {"acquisitions", "contended", "spins"}
    assert d["locks"]["acquisitions"] >= 16, "each fault takes a PTE-table lock"
    assert d["folio_orders"] == [0, 0, 0, 0, 16, 0, 0, 0, 0, 0]
    assert {"races", "fault_paths", "memory", "ops"} <= set(d)
    assert d["ops"] == 257
    assert s.elapsed_s >= 0


def test_stats_object():
    s = _one_mib_64k()
    assert s["faults"] == s.faults == 16
    assert isinstance(s.folio_orders, np.ndarray) and s.folio_orders.dtype == np.uint64
    with pytest.raises(ValueError):
        s.folio_orders[0] = 1
    assert s.mthp["16kB"].anon_fault_alloc == 0, "any valid size reads as zeros"
    with pytest.raises(KeyError):
        s.mthp["48kB"]
    assert s.mthp_by_order("anon_fault_alloc")[4] == 16
    assert s.locks.ptl.acquisitions == s.locks.acquisitions
    with pytest.raises(AttributeError):
        s.faults = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        s.nonexistent  # noqa: B018
    assert pickle.loads(pickle.dumps(s)) == s
    assert Stats.from_json(s.to_json()) == s
    assert "faults" in s.table() and "64kB" in s.table()
    assert "faults=16" in repr(s)


def test_stats_difference_between_snapshots():
    sim = Simulator(hugepages={"64kB": "always"})
    sim.mmap(B, 2 * MiB)
    sim.touch(range(B, B + MiB, P))
    before = sim.stats()
    sim.touch(range(B + MiB, B + 2 * MiB, P))
    delta = sim.stats() - before
    assert delta.faults == 16
    assert delta.rss_bytes == MiB
    assert delta.mthp["64kB"].anon_fault_alloc == 16
    assert list(delta.folio_orders) == [0, 0, 0, 0, 16, 0, 0, 0, 0, 0]


def test_simulator_stats_accumulate():
    sim = Simulator()
    sim.mmap(B, MiB)
    sim.replay(writes(B, 10))
    s = sim.replay(writes(B + 10 * P, 10))
    assert s.faults == 20 == sim.stats().faults
    assert s.ops == 10


# ---------------------------------------------------------------------------
# Helpers


def test_parse_helpers():
    assert anonfolio.parse_bytes("64K") == anonfolio.parse_bytes("64KiB") == 65536
    assert anonfolio.parse_bytes("2M") == anonfolio.parse_bytes("2MiB") == 2 << 20
    assert anonfolio.parse_bytes("1T") == 1 << 40
    assert anonfolio.parse_bytes(4096) == 4096
    assert anonfolio.parse_thp_size("64kB") == anonfolio.parse_thp_size("64K") == 4
    assert anonfolio.size_name(9) == "2048kB"
    for bad in ("12Q", "-1", "", "1.5M"):
        with pytest.raises(ConfigError):
            anonfolio.parse_bytes(bad)
    with pytest.raises(ConfigError):
        anonfolio.parse_thp_size("48kB")


def test_replay_takes_paths_and_bytes(tmp_path: Path):
    t = f"mmap {B:#x} {MiB:#x}\n" + writes(B, 4)
    p = tmp_path / "t.trace"
    p.write_text(t)
    assert anonfolio.replay(p).faults == 4
    assert anonfolio.replay(t.encode()).faults == 4


def test_sweep():
    rows = anonfolio.sweep(
        {"4k": only(), "64k": only(**{"64kB": "always"}), "16k": only(**{"16kB": "always"})},
        sizes=["1M", "2M"],
    )
    got = [(r.params["label"], r.params["size"], r.faults) for r in rows]
    M = 1 << 20  # sizes come back as byte counts, whatever spelling went in
    assert got == [("4k", M, 256), ("4k", 2 * M, 512), ("64k", M, 16), ("64k", 2 * M, 32),
                   ("16k", M, 64), ("16k", 2 * M, 128)]
    rows = anonfolio.sweep("sequential", size="1M", configs=[only(**{"64kB": "always"})], threads=[1, 2])
    assert [r.params["threads"] for r in rows] == [1, 2]
    assert all(r.rss_bytes == MiB for r in rows)
    rows = anonfolio.sweep(["sequential", "stride"], size="1M", configs=only(**{"64kB": "always"}), stride=16)
    assert [(r.params["workload"], r.faults) for r in rows] == [("sequential", 16), ("stride", 16)]
    t = f"mmap {B:#x} {MiB:#x}\n" + writes(B, 256)
    rows = anonfolio.sweep([only(), only(**{"64kB": "always"})], trace=t)
    assert [r.faults for r in rows] == [256, 16]
    with pytest.raises(TypeError):
        anonfolio.sweep(only(), configs=[only()])


def test_public_api_surface():
    assert anonfolio.__version__ == anonfolio._anonfolio.__version__
    for name in anonfolio.__all__:
        assert hasattr(anonfolio, name), name
    root = Path(anonfolio.__file__).parent
    assert (root / "py.typed").exists()
    assert (root / "_anonfolio.pyi").exists()


# ---------------------------------------------------------------------------
# The kernel's own figures for the hand-written example traces, through the
# Python API with a path (tests/kernel_cases/example-*).

_EXAMPLES = Path(__file__).resolve().parent / "kernel_cases"


def _kernel_examples():
    cases = json.loads((_EXAMPLES / "expected.json").read_text())["examples"]
    return [c for c in cases if c["name"].startswith("example-")]


def test_the_hand_written_examples_are_there():
    assert len(_kernel_examples()) == 7


@pytest.mark.parametrize("ex", _kernel_examples(), ids=lambda e: e["name"])
def test_matches_the_kernel_examples(ex):
    args = ex["args"]
    enabled = args[args.index("--thp-enabled") + 1] if "--thp-enabled" in args else None
    thp = [args[i + 1] for i, a in enumerate(args) if a == "--thp"]
    cfg = Config.from_args(thp_enabled=enabled, thp=thp)
    s = anonfolio.replay(_EXAMPLES / ex["trace"], cfg)
    k = ex["kernel"]
    assert s.faults == k["faults"]
    assert s.rss_bytes == k["rss_bytes"]
    for size, counters in k["mthp"].items():
        for name, v in counters.items():
            assert s.mthp[size][name] == v, (size, name)


def test_result_shapes_match_the_native_module():
    """The TypedDicts of anonfolio.results (and so the stubs that use them)
    name exactly the keys the native module returns, in its order."""
    from anonfolio import _anonfolio, results

    def keys(td: type) -> list[str]:
        return list(td.__annotations__)

    native = _anonfolio.Simulator(only(_64kB="always"))
    run = native.run("sequential", "1M")
    assert list(run) == keys(results.RunDict)
    stats = native.stats()
    assert list(stats) == keys(results.StatsDict)
    assert list(run["mthp"]["64kB"]) == keys(results.MthpCounters) == list(_anonfolio.MTHP_COUNTERS)
    assert list(run["vmstat"]) == keys(results.VmstatCounters) == list(_anonfolio.VMSTAT_COUNTERS)
    assert list(run["races"]) == keys(results.RaceCounters) == list(_anonfolio.RACE_COUNTERS)
    assert list(run["fault_paths"]) == keys(results.FaultPaths) == list(_anonfolio.FAULT_PATHS)
    assert list(run["memory"]) == keys(results.MemoryFigures)
    assert list(run["locks"]) == keys(results.Locks)
    for lock in ("ptl", "page_table_lock", "zone_lock", "mmap_lock"):
        assert list(run["locks"][lock]) == keys(results.LockFigures), lock
    assert isinstance(run["folio_orders"], list) and all(isinstance(n, int) for n in run["folio_orders"])
    assert Stats(run).folio_orders.dtype == np.uint64
    assert [list(v) for v in native.vmas()] == [keys(results.VmaDict)]
    assert list(native.config) == keys(results.ConfigDict) == list(_anonfolio.CONFIG_FIELDS)
    assert list(_anonfolio.normalize_config()) == keys(results.ConfigDict)
    assert list(Config().to_dict()) == keys(results.ConfigDict)
    try:
        kern = _anonfolio.kernel_replay("mmap 0x7f0000000000 0x2000\nw 0x7f0000000000\n")
    except anonfolio.OracleError as e:  # pragma: no cover - a kernel without the oracle's needs
        pytest.skip(f"the kernel oracle cannot run here: {e}")
    assert list(kern) == keys(results.KernelRun)


def test_no_rust_panic_crosses_into_python(capfd):
    """A panic inside a call into the core (here the native test hook
    ``_debug_panic``, which panics inside the same guard every call goes
    through) reaches Python as ``AnonfolioError("internal error: ...")``,
    with where it happened, and prints nothing; bad values never get that
    far: each is a clear error of its own."""
    from anonfolio import _anonfolio

    with pytest.raises(AnonfolioError) as ei:
        _anonfolio._debug_panic("injected panic")
    assert type(ei.value) is AnonfolioError
    assert re.fullmatch(r"internal error: injected panic at \S+\.rs:\d+ \(this is a bug in anonfolio\)",
                        str(ei.value)), str(ei.value)
    if os.environ.get("ANONFOLIO_PANIC_VERBOSE") is None:
        assert capfd.readouterr().err == ""
    # The guard nests and unwinds cleanly: the next call works.
    assert anonfolio.parse_bytes("64K") == 65536
    sim = Simulator()
    for call, error in (
        (lambda: sim.mmap(2**64 - 4096, 8192), RangeError),
        (lambda: sim.mmap(-4096, 4096), OverflowError),
        (lambda: sim.read(2**64 - 1), SegmentationFault),
        (lambda: sim.munmap(0, 2**64 - 4096), RangeError),
        (lambda: sim.madvise(2**64 - 4096, 4096, "dontneed"), RangeError),
        (lambda: sim.touch([2**64 - 1]), SegmentationFault),
        (lambda: sim.replay("w 0xffffffffffffffff\n"), TraceError),
        (lambda: sim.replay(f"@{2**40} w 0x1000\n"), TraceError),
        (lambda: sim.replay("mmap 0xfffffffffffff000 0x2000\n"), RangeError),
        (lambda: sim.run("sequential", 2**63), ConfigError),
    ):
        with pytest.raises(error) as ei:
            call()
        assert "internal error" not in str(ei.value)
    assert sim.run("random", "4K", fraction=1.0).faults == 1


def test_panics_outside_the_guard_still_print():
    """The panic hook anonfolio installs silences only panics inside its own
    guarded calls: any other panic of the process goes to the hook that was
    there before (Rust's default prints it)."""
    code = (
        "import anonfolio, anonfolio._anonfolio as n\n"
        "try:\n"
        "    n._debug_panic('unguarded panic', guarded=False)\n"
        "except BaseException as e:\n"
        "    print(type(e).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ANONFOLIO_PANIC_VERBOSE"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(env, RUST_BACKTRACE="0"))
    assert proc.stdout.strip() == "PanicException", proc.stdout + proc.stderr
    assert "panicked at" in proc.stderr and "unguarded panic" in proc.stderr, proc.stderr


@pytest.mark.parametrize("module", ["anonfolio", "anonfolio.config", "anonfolio.api", "anonfolio.stats"])
def test_docstring_examples(module):
    import doctest
    import importlib

    r = doctest.testmod(importlib.import_module(module))
    assert r.failed == 0


def test_preempt_widens_the_race_window():
    """Deterministic mode: no switches, no races; more switches, more races;
    and the same seed gives the same figures."""
    races = []
    for p in (0.0, 0.2, 0.9):
        cfg = Config(hugepages={"64kB": "always", "2048kB": "never"}, preempt=p)
        runs = [anonfolio.run("sequential", size="8M", config=cfg, threads=4, sharing="interleaved", deterministic=5)
                for _ in range(2)]
        assert runs[0].races == runs[1].races and runs[0].faults == runs[1].faults
        assert runs[0].rss_bytes == 8 << 20
        races.append(runs[0].races["races"])
    assert races[0] == 0
    assert races[0] < races[1] < races[2]
    with pytest.raises(anonfolio.ConfigError):
        Config(preempt=1.5)
