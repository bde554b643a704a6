"""What a user types at ``anonfolio run`` and ``replay`` means what it says:
the VMA's advice, sizes spelt any way, the knob the kernel does not have,
the defaults --help states, a run too large for the simulated memory, and a
trace named by its file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import anonfolio
from anonfolio import cli

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE / "kernel_cases" / "example-seq-32k.trace"


def main(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *args: str) -> dict:
    rc, out, err = main(capsys, "run", *args, "--json")
    assert rc == 0, err
    return json.loads(out)


# ---------------------------------------------------------------------------
# --advice


def test_advice_decides_which_sizes_a_workload_gets(capsys):
    # Kernel defaults (enabled=madvise, 2048kB=inherit) with 64kB=always:
    # advised, the PMD path wins; unadvised only 64kB applies; NOHUGEPAGE none.
    base = ("--size", "4M", "--thp", "64kB=always")
    hp = run_json(capsys, *base)
    assert hp["faults"] == 2 and hp["workload"]["advice"] == "hugepage"
    none = run_json(capsys, *base, "--advice", "none")
    assert none["faults"] == 64 and none["mthp"]["64kB"]["anon_fault_alloc"] == 64
    assert "2048kB" not in none["mthp"]
    no = run_json(capsys, *base, "--advice", "nohugepage")
    assert no["faults"] == 1024 and not no["mthp"]


def test_page_fault1_is_unadvised_as_will_it_scale_maps_it(capsys):
    j = run_json(capsys, "--workload", "page_fault1", "--size", "4M", "--thp", "64kB=always")
    assert j["workload"]["advice"] == "none"
    assert j["faults"] == 64, "64kB folios, not the PMD THPs MADV_HUGEPAGE would give"
    # Its default size is will-it-scale's 128 MiB per thread.
    j = run_json(capsys, "--workload", "page_fault1", "--thp", "2048kB=never")
    assert j["workload"]["size"] == 128 << 20 and j["faults"] == 32768


def test_advice_through_the_api():
    cfg = anonfolio.Config(hugepages={"64kB": "always"})
    assert anonfolio.run("sequential", "4M", cfg).faults == 2
    assert anonfolio.run("sequential", "4M", cfg, advice="none").faults == 64
    with pytest.raises(anonfolio.ConfigError, match="hugepage, nohugepage or none"):
        anonfolio.run("sequential", "4M", cfg, advice="sometimes")


def test_the_readme_racing_example_races(capsys):
    """The README's deterministic racing example: unadvised, so 64kB folios
    are what the CPUs race for (with MADV_HUGEPAGE they would get PMD THPs)."""
    j = run_json(capsys, "--size", "64M", "--threads", "8", "--sharing", "interleaved", "--deterministic", "1",
                 "--preempt", "0.9", "--thp", "64kB=always", "--advice", "none")
    assert j["races"]["races"] > 0
    assert j["mthp"]["64kB"]["anon_fault_alloc"] > 0


# ---------------------------------------------------------------------------
# sizes and knobs


@pytest.mark.parametrize("text", ["1G", "1g", "1GB", "1gb", "1GiB", "1gib", "1073741824"])
def test_every_spelling_of_a_gibibyte_is_one(text):
    assert anonfolio.parse_bytes(text) == 1 << 30


def test_a_size_that_is_not_one_names_the_accepted_spellings(capsys):
    rc, out, err = main(capsys, "run", "--size", "1Gi")
    assert rc == 2 and out == ""
    assert "1Gi" in err and "KiB" in err and "GB" in err and "any case" in err


def test_8kB_is_refused_the_kernel_has_no_such_knob(capsys):
    rc, out, err = main(capsys, "run", "--thp", "8kB=always")
    assert rc == 2 and out == ""
    assert "8kB" in err and "no anonymous-memory knob" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(anonfolio.ConfigError, match="order 1"):
        anonfolio.Config(hugepages={"8K": "always"})
    assert anonfolio.Config(hugepages={"8kB": "never"}).hugepages["8kB"] == "never"


def test_run_help_states_the_defaults(capsys):
    rc, out, _ = main(capsys, "run", "--help")
    assert rc == 0
    flat = " ".join(out.split())
    for needle in ("every PAGES-th page (default 1)", "random (default 1), sparse (default 0.1)",
                   "(default 0)", "loops per thread (default 1)", "pinned before the run (default 0)",
                   "fails (default 0)", "page_fault1 defaults to none"):
        assert needle in flat, needle


def test_scaling_help_states_its_own_thp_defaults(capsys):
    rc, out, _ = main(capsys, "experiment", "scaling", "--help")
    assert rc == 0
    flat = " ".join(out.split())
    assert "16kB, 64kB and 256kB always, 2048kB never" in flat
    assert "2048kB=inherit" not in flat
    # ... and they are what it runs with.
    from anonfolio import experiments

    assert dict(experiments.RACE_POLICIES_CONFIG.hugepages)["256kB"] == "always"
    assert dict(experiments.RACE_POLICIES_CONFIG.hugepages)["2048kB"] == "never"


# ---------------------------------------------------------------------------
# memory


def test_a_run_larger_than_the_memory_fails_before_it_runs_with_a_hint(capsys):
    rc, out, err = main(capsys, "run", "--size", "8G", "--memory", "4G")
    assert rc == 2 and out == ""
    assert "--memory" in err and "8.0 GiB" in err and "4.0 GiB" in err
    with pytest.raises(anonfolio.OutOfMemory, match="memory"):
        anonfolio.run("sequential", "8G", anonfolio.Config(memory="4G"))
    with pytest.raises(anonfolio.OutOfMemory):  # a sweep checks every point before any runs
        anonfolio.sweep("sequential", sizes=["4M", "8G"], configs=anonfolio.Config(memory="4G"))


def test_a_run_that_runs_out_of_memory_prints_what_ran(capsys):
    rc, out, err = main(capsys, "run", "--size", "64M", "--memcg-limit", "16M", "--thp", "2048kB=never")
    assert rc == 1
    assert "out of memory" in err
    assert "stopped: out of memory" in out and "faults" in out and "16.0 MiB" in out


# ---------------------------------------------------------------------------
# replay("app.trace")


def test_replay_reads_a_file_named_by_a_str(monkeypatch):
    by_path = anonfolio.replay(EXAMPLE)
    by_name = anonfolio.replay(str(EXAMPLE))
    assert by_name.faults == by_path.faults > 0
    monkeypatch.chdir(EXAMPLE.parent)
    assert anonfolio.Simulator().replay(EXAMPLE.name).faults == by_path.faults


def test_a_one_line_trace_is_still_text_and_a_missing_file_says_so():
    assert anonfolio.replay("mmap 0x7f0000000000 0x1000").faults == 0
    with pytest.raises(FileNotFoundError, match=r"no trace file .app\.trace."):
        anonfolio.replay("app.trace")
