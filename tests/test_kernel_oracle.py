"""The simulator against what Linux 6.18 did (tests/kernel_cases), and the
kernel oracle itself.

(a) Every case of ``tests/kernel_cases/expected.json`` (recorded on a real
    kernel by ``tests/kernel_cases/record.py``) is replayed with
    ``anonfolio replay TRACE --json ARGS`` (the CLI's ``main``, all cases in
    one helper process; a few are also run as separate
    ``python -m anonfolio replay`` processes and must print the same);
    faults, rss_bytes and every recorded per-size counter must match exactly
    (a size or counter missing from the simulator's JSON counts as 0).
(b) Live tests on this machine's kernel (marked ``host_thp``): a few cases
    re-run on the kernel and compared with the simulator, ``validate``, and
    ``thp_settings`` restoring the knobs. They change the host's THP knobs
    for a moment, so they run only with ``ANONFOLIO_KERNEL_TESTS=1`` (see
    conftest.py), and then only where the knobs can be changed (root,
    writable sysfs, Linux 6.8+).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "kernel_cases"
EXPECTED = json.loads((CASES_DIR / "expected.json").read_text())
CASES = EXPECTED["examples"]
# The operations real programs make (mprotect, mremap, brk, MADV_FREE,
# populate, growsdown, noreserve/stack, dontfork): recorded on the kernel by
# record.py's group "ops7", each exactly twice, kept when both agreed.
OPS7 = json.loads((CASES_DIR / "expected-ops7.json").read_text())["examples"]
COUNTERS = ("anon_fault_alloc", "anon_fault_fallback", "anon_fault_fallback_charge",
            "split_deferred", "nr_anon", "nr_anon_partially_mapped")


def _replay_cmd(trace: Path, args) -> list:
    return [sys.executable, "-m", "anonfolio", "replay", str(trace), "--json", *args]


def _parse(proc) -> dict:
    assert proc.returncode == 0, f"anonfolio replay exited {proc.returncode}: {proc.stderr.strip()}"
    return json.loads(proc.stdout)


def simulate(trace: Path, args) -> dict:
    return _parse(subprocess.run(_replay_cmd(trace, args), capture_output=True, text=True, timeout=120))


# The CLI of `python -m anonfolio replay`, run once per case inside one
# helper process: starting a Python process (and numpy) per case would cost
# most of the time budget. `test_entry_point_agrees_with_batch` checks that
# real `python -m anonfolio replay` processes print the same figures.
_BATCH = """
import contextlib, io, json, sys
from anonfolio.cli import main
out = {}
for name, trace, args in json.load(sys.stdin):
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            rc = main(["replay", trace, "--json", *args])
        except SystemExit as e:
            rc = e.code
    out[name] = [rc, so.getvalue(), se.getvalue()]
json.dump(out, sys.stdout)
"""


class _Proc:
    def __init__(self, rc, stdout, stderr):
        self.returncode, self.stdout, self.stderr = rc, stdout, stderr


@pytest.fixture(scope="module")
def simulated():
    """`anonfolio replay TRACE --json ARGS` of every case, keyed by name."""
    todo = [[c["name"], str(CASES_DIR / c["trace"]), c["args"]] for c in CASES + OPS7]
    proc = subprocess.run([sys.executable, "-c", _BATCH], input=json.dumps(todo),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the replay batch failed: {proc.stderr.strip()[-2000:]}"
    return {name: _Proc(*v) for name, v in json.loads(proc.stdout).items()}


def differences(sim: dict, kern: dict) -> list:
    """What differs between the simulator's JSON and a recorded kernel result."""
    diffs = []
    for key in ("faults", "rss_bytes"):
        if sim.get(key) != kern[key]:
            diffs.append(f"{key}: simulator {sim.get(key)}, kernel {kern[key]}")
    smthp = sim.get("mthp") or {}
    for size, counters in kern.get("mthp", {}).items():
        for c in COUNTERS:
            if c not in counters:
                continue
            s = int((smthp.get(size) or {}).get(c, 0))
            if s != counters[c]:
                diffs.append(f"{size} {c}: simulator {s}, kernel {counters[c]}")
    # Sizes the kernel left out did not change there: the simulator's must be 0 too.
    for size, counters in smthp.items():
        if size in kern.get("mthp", {}):
            continue
        for c in COUNTERS:
            if int(counters.get(c, 0)) != 0:
                diffs.append(f"{size} {c}: simulator {counters[c]}, kernel 0")
    return diffs


@pytest.mark.parametrize("name", ["example-dontneed-retouch-64k", "huge-zero-read-then-write", "random-mix-64k-pmd"])
def test_entry_point_agrees_with_batch(name, simulated):
    case = next(c for c in CASES if c["name"] == name)
    sim = simulate(CASES_DIR / case["trace"], case["args"])
    batch = _parse(simulated[name])
    for key in ("faults", "rss_bytes", "mthp"):
        assert sim[key] == batch[key], key


def test_expected_json_is_complete():
    assert len(CASES) >= 40
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names))
    for c in CASES:
        assert (CASES_DIR / c["trace"]).is_file(), c["trace"]
        assert {"faults", "rss_bytes", "mthp"} <= set(c["kernel"]), c["name"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_simulator_matches_kernel(case, simulated):
    sim = _parse(simulated[case["name"]])
    diffs = differences(sim, case["kernel"])
    assert not diffs, f"{case['name']} ({case.get('description', '')}):\n  " + "\n  ".join(diffs)


OPS7_PREFIXES = ("mprotect-", "mremap-", "brk-", "free-", "populate-", "growsdown-", "flags-", "mixed-")


def test_ops7_cases_cover_every_new_operation():
    """At least 40 kernel-recorded cases, named by what they cover, each
    operation of the trace format present alone and in mixed cases, under
    several THP settings."""
    assert len(OPS7) >= 40
    names = [c["name"] for c in OPS7]
    assert len(names) == len(set(names)) and not set(names) & {c["name"] for c in CASES}
    assert all(n.startswith(OPS7_PREFIXES) for n in names), names
    texts = {c["name"]: (CASES_DIR / c["trace"]).read_text() for c in OPS7}
    for c in OPS7:
        assert {"faults", "rss_bytes", "mthp"} <= set(c["kernel"]), c["name"]
        assert c["kernel_extra"]["agreeing_runs"] == 2, c["name"]
    want = {"mprotect ": "mprotect-", "mremap ": "mremap-", "brk ": "brk-", " free": "free-",
            " populate_read": "populate-", " populate_write": "populate-", " populate": "populate-",
            " growsdown": "growsdown-", " noreserve": "flags-", " stack": "flags-",
            " dontfork": "flags-", " dofork": "flags-", "prot=r": "mprotect-", "prot=none": "mprotect-"}
    for needle, prefix in want.items():
        alone = [n for n, t in texts.items() if n.startswith(prefix) and needle in t]
        mixed = [n for n, t in texts.items() if n.startswith("mixed-") and needle in t]
        assert alone, f"no {prefix}* case has {needle.strip()!r}"
        assert mixed or needle in (" stack", " growsdown", "prot=none", " dofork", " populate"), \
            f"no mixed-* case has {needle.strip()!r}"
    assert any("@1 " in t for n, t in texts.items() if n.startswith("mixed-")), "no threads in the mixed cases"
    settings = {tuple(c["args"]) for c in OPS7}
    assert len(settings) >= 5, settings


@pytest.mark.parametrize("case", OPS7, ids=[c["name"] for c in OPS7])
def test_simulator_matches_kernel_ops7(case, simulated):
    sim = _parse(simulated[case["name"]])
    diffs = differences(sim, case["kernel"])
    assert not diffs, f"{case['name']} ({case.get('description', '')}):\n  " + "\n  ".join(diffs)


# ---------------------------------------------------------------------------
# Live kernel tests

@pytest.fixture(scope="session")
def live_kernel() -> None:
    """Skips unless this process can set the THP knobs. Asked only by tests
    that ``ANONFOLIO_KERNEL_TESTS=1`` lets run: even the probe writes a knob
    (its own value)."""
    from anonfolio.kernel import can_change_thp

    ok, why = can_change_thp()
    if not ok:
        pytest.skip(f"cannot change the kernel's THP settings: {why}")


def live(f):
    """A test that sets the host's THP knobs (and restores them)."""
    return pytest.mark.host_thp(pytest.mark.usefixtures("live_kernel")(f))

LIVE_CASES = ["seq-64k", "combo-64k-pmd-offset-vma", "dontneed-partial-pmd-with-64k",
              "read-then-write-16k-64k", "munmap-inside-64k-folio"]


def _settings(args):
    top = args[args.index("--thp-enabled") + 1]
    thp = {}
    for i, a in enumerate(args):
        if a == "--thp":
            size, mode = args[i + 1].split("=")
            thp[size] = mode
    return top, thp


@live
@pytest.mark.parametrize("name", LIVE_CASES)
def test_live_kernel_matches_simulator(name):
    from anonfolio.kernel import kernel_replay

    case = next(c for c in CASES if c["name"] == name)
    trace = CASES_DIR / case["trace"]
    top, thp = _settings(case["args"])
    # System-wide counters: another process can add to them; retry once.
    for attempt in range(3):
        kern = kernel_replay(trace.read_text(), thp_enabled=top, thp=thp)
        kfig = {"faults": kern["faults"], "rss_bytes": kern["rss_bytes"],
                "mthp": {s: {c: v.get(c, 0) for c in COUNTERS} for s, v in kern["mthp"].items()
                         if any(v.get(c, 0) for c in COUNTERS)}}
        if kfig == case["kernel"] or attempt == 2:
            break
    sim = simulate(trace, case["args"])
    assert not differences(sim, kfig), differences(sim, kfig)


@live
def test_thp_settings_restores_even_on_error():
    from anonfolio.kernel import read_thp_settings, thp_settings

    before = read_thp_settings()
    other = {"64kB": "madvise" if before[1].get("64kB") != "madvise" else "never",
             "16K": "inherit" if before[1].get("16kB") != "inherit" else "never"}
    with pytest.raises(RuntimeError), thp_settings("never" if before[0] != "never" else "madvise", other):
        now = read_thp_settings()
        assert now[1]["64kB"] == other["64kB"]
        assert now[1]["16kB"] == other["16K"]
        assert now[0] != before[0]
        raise RuntimeError("boom")
    assert read_thp_settings() == before
    with pytest.raises(KeyboardInterrupt), \
            thp_settings(None, {"32kB": "madvise" if before[1].get("32kB") != "madvise" else "never"}):
        assert read_thp_settings() != before
        raise KeyboardInterrupt
    assert read_thp_settings() == before
    with thp_settings(None, {}):
        pass
    assert read_thp_settings() == before


@live
def test_kernel_replay_reports_bad_traces():
    from anonfolio.kernel import kernel_replay, read_thp_settings

    before = read_thp_settings()
    with pytest.raises(ValueError):
        kernel_replay("mmap 0x1000 0x10zz\n")
    with pytest.raises(Exception, match="line 2"):
        kernel_replay("mmap 0x200000 0x1000\nw 0x201000\n")
    with pytest.raises(ValueError):
        kernel_replay("mmap 0x200000 0x1000\n", thp={"12kB": "always"})
    assert read_thp_settings() == before


@live
def test_kernel_replay_reports_what_the_kernel_refuses_with_the_line():
    """A write the kernel answers with SIGSEGV (a read-only VMA; a stack
    that may not grow within the guard gap of the VMA below) is a
    SegmentationFault naming the line and address; a VMA operation the
    kernel refuses is a RangeError naming the line and the errno; nothing
    crashes the process."""
    import anonfolio
    from anonfolio.kernel import kernel_replay

    with pytest.raises(anonfolio.SegmentationFault, match=r"line 3: .*read-only") as e:
        kernel_replay("mmap 0x400000 0x4000\nmprotect 0x400000 0x1000 r\nw 0x400010\n")
    assert (e.value.line, e.value.address) == (3, 0x400010)
    stack = "mmap 0x7f0000000000 0x1000\nmmap 0x7f0000080000 0x4000 growsdown\nw 0x7f000007f000\n"
    with pytest.raises(anonfolio.SegmentationFault, match=r"line 3: .*SIGSEGV") as e:
        kernel_replay(stack)
    assert e.value.address == 0x7F000007F000
    # With the huge zero page off, a read of a read-only advised VMA maps a
    # THP read-only: a write to it is SIGSEGV, on the kernel as in the simulator.
    ro_thp = "mmap 0x7f0000000000 0x200000 hugepage prot=r\nr 0x7f0000000000\nw 0x7f0000001000\n"
    no_zero = anonfolio.Config(use_zero_page=False, hugepages={"2048kB": "inherit"})
    with pytest.raises(anonfolio.SegmentationFault, match=r"line 3: .*read-only"):
        kernel_replay(ro_thp, no_zero)
    with pytest.raises(anonfolio.SegmentationFault, match=r"line 3: .*read-only"):
        anonfolio.Simulator(no_zero).replay(ro_thp)
    # A same-size move of two adjacent VMAs, one armed by userfaultfd, is
    # EFAULT on the kernel (vma_multi_allowed), and in the simulator.
    uffd_pair = ("mmap 0x7f0000000000 0x10000\nmmap 0x7f0000010000 0x10000 uffd-wp\n"
                 "mremap 0x7f0000000000 0x20000 0x7f0000400000 0x20000\n")
    with pytest.raises(anonfolio.RangeError, match="line 3: mremap refused by the kernel: EFAULT"):
        kernel_replay(uffd_pair)
    with pytest.raises(anonfolio.RangeError, match="line 3: mremap"):
        anonfolio.replay(uffd_pair)
    with pytest.raises(anonfolio.RangeError, match="line 2: mremap refused by the kernel: EFAULT"):
        kernel_replay("mmap 0x400000 0x4000\nmremap 0x500000 0x1000 0x600000 0x1000\n")
    with pytest.raises(anonfolio.RangeError, match="line 3: brk refused by the kernel"):
        kernel_replay("mmap 0x400000 0x1000\nbrk 0x3fe000\nbrk 0x400000\n")
    # A shrinking brk with no VMA left below the break (mremap moved the
    # heap away) fails on the kernel; the simulator refuses the same line.
    moved_heap = ("brk 0x7f0000000000\nbrk 0x7f0000040000\n"
                  "mremap 0x7f0000000000 0x40000 0x7f0000400000 0x40000\nbrk 0x7f0000020000\n")
    with pytest.raises(anonfolio.RangeError, match="line 4: brk refused by the kernel"):
        kernel_replay(moved_heap)
    with pytest.raises(anonfolio.RangeError, match="line 4: brk"):
        anonfolio.replay(moved_heap)
    # A program's layout: the heap right above the bss (ASLR off), a stack
    # at the top of user space that grows by a page.
    run = kernel_replay("mmap 0x555555554000 0x4000 nohugepage\nbrk 0x555555558000\nbrk 0x555555561000\n"
                        "madvise 0x555555558000 0x9000 nohugepage\nw 0x555555560fff\n"
                        "mmap 0x7ffffffde000 0x21000 growsdown nohugepage\nw 0x7ffffffdd008\n")
    assert (run["faults"], run["rss_bytes"]) == (2, 8192), run


def test_kernel_commands_read_the_options_as_replay_does(capsys):
    """One configuration layer: kernel-replay and validate take the knobs
    with replay's parser into the same Config, spellings and errors alike."""
    from anonfolio import Config, cli

    parser = cli.build_parser()
    opts = ["t.trace", "--thp-enabled", "never", "--thp", "64K=always", "--thp", "2M=never", "--thp", "16kB=madvise"]
    want = cli.config_from_args(parser.parse_args(["replay", *opts]))
    assert want == Config(enabled="never", hugepages={"64kB": "always", "2048kB": "never", "16kB": "madvise"})
    for cmd in ("kernel-replay", "validate"):
        assert cli.config_from_args(parser.parse_args([cmd, *opts])) == want, cmd
    assert cli.config_from_args(parser.parse_args(["validate", *opts, "--policy", "v1"])).policy == "v1"
    # The same message for the same bad size; the kernel has no policy to choose.
    errors = []
    for cmd in ("replay", "kernel-replay", "validate"):
        assert cli.main([cmd, "t.trace", "--thp", "4M=always"]) == 2
        errors.append(capsys.readouterr().err.replace(cmd, "CMD"))
    assert len(set(errors)) == 1 and "4M" in errors[0], errors
    assert cli.main(["kernel-replay", "t.trace", "--policy", "v1"]) == 2
    assert "--policy" in capsys.readouterr().err


def test_validate_bad_input_exits_2(tmp_path):
    bad = tmp_path / "bad.trace"
    bad.write_text("mmap 0x1000 0x1000\nfrobnicate\n")
    proc = subprocess.run([sys.executable, "-m", "anonfolio", "validate", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "anonfolio", "kernel-replay", str(bad), "--thp", "3kB=always"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@live
def test_validate_cli_matches():
    """seq-64k under madvise knobs (no other process gets 64 kB folios): the
    simulator and the kernel agree on every figure, and validate says so."""
    args = [sys.executable, "-m", "anonfolio", "validate", str(CASES_DIR / "seq-64k.trace"),
            "--thp", "64K=madvise", "--thp", "2M=never"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DIFF" not in proc.stdout and proc.stdout.rstrip().endswith("all match"), proc.stdout
    rows = {line.split()[0] for line in proc.stdout.splitlines()[1:-1]}
    assert {"faults", "rss_bytes", "64kB"} <= rows, proc.stdout
    proc = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    j = json.loads(proc.stdout)
    from anonfolio.results import KernelReplay, ValidateResult, ValidateRow

    assert list(j) == list(ValidateResult.__annotations__)
    assert list(j["kernel"]) == list(KernelReplay.__annotations__)
    assert all(list(r) == list(ValidateRow.__annotations__) for r in j["rows"])
    assert j["match"] is True and all(r["match"] for r in j["rows"]), j["rows"]
    assert j["simulator"]["faults"] == j["kernel"]["faults"] == 16
