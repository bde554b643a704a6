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
