"""Virtual time from Python and the command line: the `time` object, the
cost profile's checks, and the calibration fit."""

from __future__ import annotations

import json

import pytest

from anonfolio import _anonfolio, calibrate, cli


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_run_with_time_prints_the_time_object_and_repeats(capsys):
    args = ("run", "--workload", "page_fault1", "--size", "4M", "--threads", "4", "--iterations", "2",
            "--thp", "2048kB=never", "--time", "--json")
    rc, out, _ = run_cli(capsys, *args)
    assert rc == 0
    t = json.loads(out)["time"]
    assert set(t["fault_latency_ns"]) == {"mean", "p50", "p99", "max"}
    assert t["elapsed_ns"] > 0 and t["faults_timed"] == 4 * 2 * 1024
    assert "zero_per_kib" in t["breakdown_ns"] and "zone_lock" in t["lock_wait_ns"]
    assert sum(t["breakdown_ns"].values()) + sum(t["lock_wait_ns"].values()) == t["cpu_ns"]
    rc, again, _ = run_cli(capsys, *args)
    assert json.loads(again)["time"] == t, "same seed, same virtual time"


def test_a_bad_profile_is_one_line_and_status_2(capsys, tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"costs": {"zero_per_kb_ns": 1.0}}))
    rc = cli.main(["run", "--size", "1M", "--time", str(p)])
    _, err = capsys.readouterr()
    assert rc == 2 and "unknown cost" in err and err.count("\n") == 1
    p.write_text("{not json")
    rc = cli.main(["run", "--size", "1M", "--time", str(p)])
    _, err = capsys.readouterr()
    assert rc == 2 and "not JSON" in err


def test_the_shipped_profile_loads_and_names_only_known_costs():
    prof = calibrate.load_profile()
    known = {k for k, _ in _anonfolio.default_cost_profile()}
    assert set(prof["costs"]) <= known
    assert prof["provenance"]["kernel"] and prof["provenance"]["date"]


@pytest.mark.parametrize("region", [32 << 20])
def test_the_fit_recovers_what_the_model_itself_measured(region):
    """Measurements made by the simulator with known costs: fitted back,
    the profile reproduces every one of them."""
    truth = dict(_anonfolio.default_cost_profile())
    truth.update(zero_per_kib_ns=120.0, fault_entry_ns=700.0, zap_pte_ns=15.0, prep_large_folio_ns=400.0)
    m = calibrate.predict(truth, region)
    f = calibrate.fit(m)
    calibrate.refine(f["costs"], m, region)
    rows = calibrate.compare(m, calibrate.predict(f["costs"], region))
    worst = max(rows, key=lambda r: abs(r[3]))
    assert abs(worst[3]) < 5.0, worst
    assert abs(f["costs"]["zero_per_kib_ns"] - 120.0) < 6.0


def test_scaling_in_virtual_time_takes_the_knobs_and_runs_threads_or_processes(capsys):
    """Threads of one mm share its mmap lock (a munmap's zap holds off the
    others' mmap and munmap) and the merged VMA's vm_refcnt line; processes
    share only zone->lock and the LRU lock. The --thp knobs reach the run."""
    base = ("experiment", "scaling", "--time", "--threads", "1,4", "--size", "4M", "--iterations", "2",
            "--no-plots", "--no-progress", "--thp", "2048kB=never")

    def waits(out: str) -> dict[str, int]:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith("4 CPUs"))
        w = line.split("wait ns/page:")[1].split()
        return {k: int(v) for k, v in zip(w[::2], w[1::2])}

    rc, threads, _ = run_cli(capsys, *base)
    assert rc == 0 and "(threads)" in threads
    assert waits(threads).get("mmap_lock", 0) > 0 and waits(threads).get("vma_lock", 0) > 0
    rc, procs, _ = run_cli(capsys, *base, "--processes")
    assert rc == 0 and "(processes)" in procs
    assert "mmap_lock" not in waits(procs) and "vma_lock" not in waits(procs)
    rc, big, _ = run_cli(capsys, *base, "--thp", "64kB=always")
    assert rc == 0 and "64kB=always" in big
    rate = lambda out: float(out.split("1 CPUs:")[1].split()[0])  # noqa: E731
    assert rate(big) > 2 * rate(threads), "64 kB folios fault fewer times"
    rc = cli.main(["experiment", "scaling", "--processes"])
    _, err = capsys.readouterr()
    assert rc == 2 and "--processes needs --time" in err
