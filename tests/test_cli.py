"""The command line (docs/cli.md): output, JSON keys, exit statuses and the
one-line errors. Most tests call ``anonfolio.cli.main`` in-process; a few run
``python -m anonfolio`` (and the ``anonfolio`` script, if installed) for real."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anonfolio import cli

B = 0x7F0000000000
P = 4096
MiB = 1 << 20

T64 = f"mmap {B:#x} {MiB:#x} hugepage\n" + "".join(f"w {B + i * P:#x}\n" for i in range(256))


def anonfolio(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def tr(tmp_path: Path):
    def write(text: str, name: str = "t.trace") -> str:
        p = tmp_path / name
        p.write_text(text)
        return str(p)

    return write


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("anonfolio: error: "), err
    assert "Traceback" not in err and "panicked" not in err
    for n in needles:
        assert n in lines[0], (n, err)


# ---------------------------------------------------------------------------
# replay


def test_replay_json_contract(capsys, tr):
    rc, out, err = anonfolio(capsys, "replay", tr(T64), "--thp", "64kB=madvise", "--json")
    assert rc == 0, err
    assert out.count("\n") == 1, "one JSON object on one line"
    j = json.loads(out)
    for k in ("faults", "rss_bytes", "elapsed_s", "mthp", "vmstat", "locks"):
        assert k in j
    assert j["faults"] == 16
    assert j["rss_bytes"] == MiB
    assert j["mthp"]["64kB"]["anon_fault_alloc"] == 16
    assert j["vmstat"]["pgfault"] == 16
    assert {"acquisitions", "contended", "spins"} <= set(j["locks"])
    assert j["folio_orders"][4] == 16
    assert j["config"]["hugepages"]["64kB"] == "madvise"
    assert j["config"]["policy"] == "upstream"
    assert isinstance(j["elapsed_s"], float)


@pytest.mark.parametrize("spelling", ["64kB", "64K", "64KiB"])
def test_replay_size_spellings(capsys, tr, spelling):
    rc, out, _ = anonfolio(capsys, "replay", tr(T64), "--thp", f"{spelling}=madvise", "--json")
    assert rc == 0 and json.loads(out)["faults"] == 16


def test_replay_knobs(capsys, tr):
    t = tr(T64)
    # Top-level never: 64kB=inherit is off, order 0 everywhere.
    rc, out, _ = anonfolio(capsys, "replay", t, "--thp-enabled", "never", "--thp", "64kB=inherit", "--json")
    assert rc == 0 and json.loads(out)["faults"] == 256
    rc, out, _ = anonfolio(capsys, "replay", t, "--thp-enabled", "madvise", "--thp", "64kB=inherit", "--json")
    assert rc == 0 and json.loads(out)["faults"] == 16
    # Default: 2048kB=inherit with the advice, but a 1 MiB VMA cannot hold 2 MiB.
    rc, out, _ = anonfolio(capsys, "replay", t, "--json")
    assert rc == 0 and json.loads(out)["faults"] == 256
    for pol in ("upstream", "v1", "preferred"):
        rc, out, _ = anonfolio(capsys, "replay", t, "--thp", "64kB=always", "--policy", pol, "--json")
        assert rc == 0 and json.loads(out)["faults"] == 16, pol
        assert json.loads(out)["config"]["policy"] == pol


def test_replay_table(capsys, tr):
    rc, out, err = anonfolio(capsys, "replay", tr(T64), "--thp", "64K=madvise")
    assert rc == 0, err
    assert err == ""
    for needle in ("faults", "16", "rss", "1.0 MiB", "64kB", "vmstat", "pgfault", "ptl", "elapsed"):
        assert needle in out, needle


def test_replay_threads(capsys, tr):
    # Threads are unordered with respect to each other: each maps its own VMA.
    t = f"@0 mmap {B:#x} {MiB:#x}\n@1 mmap {B + MiB:#x} {MiB:#x}\n" + "".join(
        f"@{i // 256} w {B + i * P:#x}\n" for i in range(512)
    )
    for opts in ([], ["--threads", "2"], ["--deterministic", "5"], ["--threads", "2", "--deterministic", "5"]):
        rc, out, err = anonfolio(capsys, "replay", tr(t), "--json", *opts)
        assert rc == 0, err
        j = json.loads(out)
        assert j["faults"] == 512 and j["rss_bytes"] == 2 * MiB, opts


def test_replay_stdin(monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(T64))
    rc, out, _ = anonfolio(capsys, "replay", "-", "--thp", "64kB=always", "--json")
    assert rc == 0 and json.loads(out)["faults"] == 16


BAD_TRACES = {
    "unknown op": (f"mmap {B:#x} 0x10000\nfrobnicate 12\n", "line 2"),
    "bad number": (f"mmap {B:#x} 0x10zz\n", "line 1"),
    "unaligned mmap": (f"mmap {B + 5:#x} 0x10000\n", "line 1"),
    "unaligned length": (f"mmap {B:#x} 0x1001\n", "line 1"),
    "access outside any VMA": (f"mmap {B:#x} 0x10000\nw {B + 0x10000:#x}\n", "line 2"),
    "bad advice": (f"mmap {B:#x} 0x10000\nmadvise {B:#x} 0x1000 sideways\n", "line 2"),
    "missing operand": ("w\n", "line 1"),
    "overlapping mmap": (f"mmap {B:#x} 0x10000\nmmap {B + 0x1000:#x} 0x1000\n", "line 2"),
    "bad thread": ("@x w 0x1000\n", "line 1"),
    "trailing junk": (f"mmap {B:#x} 0x10000 hugepage sideways\n", "line 1"),
}


@pytest.mark.parametrize("name", list(BAD_TRACES))
def test_replay_bad_trace_exits_2_with_one_line(capsys, tr, name):
    text, where = BAD_TRACES[name]
    rc, out, err = anonfolio(capsys, "replay", tr(text))
    assert_one_line_error(rc, err, where)
    assert out == ""


def test_replay_json_error_midway_prints_what_ran(capsys, tr):
    t = f"mmap {B:#x} 0x10000\nw {B:#x}\nw {B + P:#x}\nbogus\nw {B + 2 * P:#x}\n"
    rc, out, err = anonfolio(capsys, "replay", tr(t), "--json")
    assert_one_line_error(rc, err, "line 4", "bogus")
    j = json.loads(out)
    assert j["faults"] == 2 and j["rss_bytes"] == 2 * P
    assert j["ops"] == 3
    assert "line 4" in j["error"]
    t = f"mmap {B:#x} 0x10000\nw {B:#x}\nw {B + 0x20000:#x}\nw {B + P:#x}\n"
    rc, out, err = anonfolio(capsys, "replay", tr(t), "--json")
    assert_one_line_error(rc, err, "line 3", "segmentation fault")
    assert json.loads(out)["faults"] == 1


def test_replay_missing_file(capsys, tmp_path):
    rc, _, err = anonfolio(capsys, "replay", str(tmp_path / "nope.trace"))
    assert_one_line_error(rc, err, "nope.trace")


def test_replay_binary_file(capsys, tmp_path):
    p = tmp_path / "bin.trace"
    p.write_bytes(b"\xff\xfe\x00mmap")
    rc, _, err = anonfolio(capsys, "replay", str(p))
    assert_one_line_error(rc, err)


@pytest.mark.parametrize(
    "opts,needle",
    [
        (["--thp", "48kB=always"], "48kB"),
        (["--thp", "4kB=always"], "4kB"),
        (["--thp", "64kB=sometimes"], "sometimes"),
        (["--thp", "64kB"], "64kB"),
        (["--policy", "fastest"], "fastest"),
        (["--thp-enabled", "sometimes"], "sometimes"),
        (["--threads", "0"], "--threads"),
        (["--threads", "many"], "many"),
        (["--deterministic", "-1"], "--deterministic"),
        (["--frobnicate"], "--frobnicate"),
        (["--memory", "12Q"], "12Q"),
        (["--fragmentation", "2"], "--fragmentation"),
        (["--fail-order", "48kB"], "48kB"),
    ],
)
def test_replay_bad_options(capsys, tr, opts, needle):
    rc, out, err = anonfolio(capsys, "replay", tr(T64), *opts)
    assert_one_line_error(rc, err, needle)
    assert out == ""


def test_machine_options(capsys, tr):
    # A memcg limit below the working set: the fault gets VM_FAULT_OOM.
    rc, out, err = anonfolio(capsys, "replay", tr(T64), "--memcg-limit", "512K")
    assert rc == 1 and "out of memory" in err and len(err.strip().splitlines()) == 1
    # Failing the 64kB allocations falls back to order 0.
    rc, out, err = anonfolio(capsys, "replay", tr(T64), "--thp", "64kB=always", "--fail-order", "64kB", "--json")
    assert rc == 0, err
    j = json.loads(out)
    assert j["faults"] == 256
    # One failed 64kB attempt per 64 KiB range: after its order-0 fallback the
    # range is no longer empty, so later faults in it do not try 64kB again.
    assert j["mthp"]["64kB"]["anon_fault_fallback"] == 16
    assert j["mthp"]["64kB"]["anon_fault_alloc"] == 0
    rc, out, err = anonfolio(capsys, "replay", tr(T64), "--check-invariants", "--no-zero-page", "--json")
    assert rc == 0, err


# ---------------------------------------------------------------------------
# run


@pytest.mark.parametrize("size", ["64K", "64KiB", "2M", "2MiB", "1G", "4096"])
def test_run_sizes(capsys, size):
    rc, out, err = anonfolio(capsys, "run", "--workload", "sequential", "--size", size, "--json")
    assert rc == 0, err
    j = json.loads(out)
    assert j["rss_bytes"] == __import__("anonfolio").parse_bytes(size)


def test_run_default_is_a_quick_readable_table(capsys):
    import time

    t0 = time.perf_counter()
    rc, out, err = anonfolio(capsys, "run")
    assert rc == 0, err
    assert time.perf_counter() - t0 < 5
    assert "faults" in out and "2048kB" in out and "1.0 GiB" in out


def test_run_table_without_mthp(capsys):
    rc, out, err = anonfolio(capsys, "run", "--size", "4M", "--thp", "2M=never")
    assert rc == 0, err
    assert "1,024" in out and "(no mTHP activity)" in out
    assert "4kB" in out, "the folio histogram names order 0 too"


@pytest.mark.parametrize("workload", ["sequential", "reverse", "stride", "random", "sparse", "page_fault1"])
def test_run_workloads(capsys, workload):
    rc, out, err = anonfolio(capsys, "run", "--workload", workload, "--size", "4M", "--thp", "2M=never",
                             "--thp", "64K=always", "--json")
    assert rc == 0, err
    j = json.loads(out)
    want = {"sequential": 64, "reverse": 64, "stride": 64, "random": 64, "page_fault1": 64}
    if workload in want:
        assert j["faults"] == want[workload], workload
    else:
        assert 0 < j["faults"] <= 64
    assert j["workload"]["name"] == workload


def test_run_options(capsys):
    rc, out, err = anonfolio(capsys, "run", "--workload", "stride", "--stride", "16", "--size", "4M",
                             "--thp", "2M=never", "--json")
    assert rc == 0, err
    assert json.loads(out)["faults"] == 64
    rc, out, err = anonfolio(capsys, "run", "--workload", "page_fault1", "--size", "1M", "--iterations", "3",
                             "--thp", "2M=never", "--json")
    assert rc == 0, err
    j = json.loads(out)
    assert j["faults"] == 768 and j["rss_bytes"] == 0
    for sharing in ("disjoint", "interleaved"):
        rc, out, err = anonfolio(capsys, "run", "--size", "8M", "--threads", "4", "--sharing", sharing,
                                 "--thp", "64K=always", "--thp", "2M=never", "--deterministic", "3", "--json")
        assert rc == 0, err
        j = json.loads(out)
        assert j["rss_bytes"] == 8 * MiB and j["faults"] >= 128
    rc, out, err = anonfolio(capsys, "run", "--workload", "sparse", "--fraction", "0.5", "--seed", "3",
                             "--size", "4M", "--thp", "2M=never", "--json")
    assert rc == 0, err
    assert 300 < json.loads(out)["faults"] < 724


@pytest.mark.parametrize(
    "opts,needle",
    [
        (["--workload", "zigzag"], "zigzag"),
        (["--size", "12Q"], "12Q"),
        (["--size", "-1"], "-1"),
        (["--size", "4097"], "4097"),
        (["--stride", "0"], "--stride"),
        (["--fraction", "1.5"], "--fraction"),
        (["--sharing", "round-robin"], "round-robin"),
        (["--thp", "3M=always"], "3M"),
        (["extra"], "extra"),
    ],
)
def test_run_bad_options(capsys, opts, needle):
    rc, out, err = anonfolio(capsys, "run", *opts)
    assert_one_line_error(rc, err, needle)
    assert out == ""


# ---------------------------------------------------------------------------
# experiment, misc


def test_experiment_needs_a_name(capsys):
    rc, _, err = anonfolio(capsys, "experiment")
    assert_one_line_error(rc, err, "experiment")
    rc, _, err = anonfolio(capsys, "experiment", "nonsense")
    assert_one_line_error(rc, err, "nonsense")


def test_no_command_and_help(capsys):
    rc, _, err = anonfolio(capsys)
    assert_one_line_error(rc, err, "command")
    rc, out, _ = anonfolio(capsys, "--help")
    assert rc == 0 and "replay" in out and "run" in out
    rc, out, _ = anonfolio(capsys, "replay", "--help")
    assert rc == 0 and "--thp" in out
    rc, out, _ = anonfolio(capsys, "--version")
    assert rc == 0 and out.startswith("anonfolio ")


def _run(cmd: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)


def test_python_dash_m(tr):
    p = _run([sys.executable, "-m", "anonfolio", "replay", tr(T64), "--thp", "64kB=madvise", "--json"])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["faults"] == 16
    p = _run([sys.executable, "-m", "anonfolio", "replay", tr("frobnicate\n")])
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("anonfolio: error: line 1: ")
    p = _run([sys.executable, "-m", "anonfolio", "replay", tr(T64), "--thp", "48kB=always"])
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


@pytest.mark.skipif(shutil.which("anonfolio") is None, reason="the anonfolio script is not on PATH")
def test_console_script(tr):
    p = _run(["anonfolio", "replay", tr(T64), "--thp", "64K=madvise", "--json"])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["faults"] == 16
    p = _run(["anonfolio", "run", "--size", "12Q"])
    assert p.returncode == 2 and p.stderr.count("\n") == 1


def test_broken_pipe_is_quiet(tr):
    """``anonfolio run | head -1`` must not print a traceback."""
    p = subprocess.run(
        f"{sys.executable} -m anonfolio run --size 64M --thp 2M=never | head -c 10",
        shell=True, capture_output=True, text=True, timeout=120,
    )
    assert "Traceback" not in p.stderr and "Error" not in p.stderr


def test_a_replay_from_the_command_line_does_not_load_numpy() -> None:
    # numpy's import and its BLAS threads cost a replay a few percent of its
    # CPU time; only an array asked for from Python needs it.
    code = (
        "import sys, anonfolio.cli as c\n"
        "c.main(['replay', '-', '--json'])\n"
        "assert 'numpy' not in sys.modules, 'numpy was loaded'\n"
    )
    p = subprocess.run([sys.executable, "-c", code], input="mmap 0x10000000 0x10000\nw 0x10000000\n",
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert '"faults": 1' in p.stdout
