"""Fast tests of the canned experiments (anonfolio.experiments) and their
command-line wiring: small sizes, few seeds."""

from __future__ import annotations

import csv
import os
import statistics
from pathlib import Path

import pytest

from anonfolio import cli, experiments, plot
from anonfolio.experiments import _findings

# One small run of race-policies shared by the tests below (module scope):
# every axis value at least once, 2 seeds, a tiny free-running pass.
SMALL = dict(size="4M", cpus=(1, 2, 4), seeds=2, free_size="64M", free_threads=(1, 2), free_repeat=1)


@pytest.fixture(scope="module")
def race(tmp_path_factory: pytest.TempPathFactory) -> experiments.RacePoliciesResult:
    out = tmp_path_factory.mktemp("race-policies")
    return experiments.race_policies(out, **SMALL)


def _csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_race_policies_writes_its_files(race: experiments.RacePoliciesResult) -> None:
    for name in ("results.csv", "medians.csv", "results.md"):
        assert os.path.getsize(os.path.join(race.out, name)) > 0
        assert name in race.files
    if plot.available():
        for name in ("faults.png", "waste.png", "delta.png", "free-running.png", "folio-sizes.png"):
            with open(os.path.join(race.out, name), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
            assert name in race.files
    md = Path(race.out, "results.md").read_text()
    for png in race.files:
        if png.endswith(".png"):
            assert f"]({png})" in md


def test_row_shapes_are_the_columns(race: experiments.RacePoliciesResult) -> None:
    """RaceRow and ScalingRow (the typed rows) have exactly the CSV columns."""
    assert list(experiments.RaceRow.__annotations__) == list(experiments.COLUMNS)
    assert all(list(r) == list(experiments.COLUMNS) for r in race.rows)
    assert list(experiments.Point.__annotations__) == list(experiments.KEYS)
    assert set(experiments.ScalingRow.__annotations__) == set(experiments.SCALING_COLUMNS)
    res = experiments.scaling(workload="sequential", threads=(1,), size="1M", repeat=1)
    assert set(res.rows[0]) == set(experiments.SCALING_COLUMNS)


def test_every_run_is_in_the_csv(race: experiments.RacePoliciesResult) -> None:
    rows = _csv(os.path.join(race.out, "results.csv"))
    assert list(rows[0]) == list(experiments.COLUMNS)
    det = [r for r in rows if r["pass"] == "deterministic"]
    free = [r for r in rows if r["pass"] == "free"]
    # policy x on_race x memory x sharing x cpus x seeds
    assert len(det) == 3 * 2 * 2 * 2 * 3 * 2
    assert len(free) == 3 * 2 * 2 * 2 * 2 * 1
    assert {r["policy"] for r in rows} == {"upstream", "v1", "preferred"}
    assert {r["on_race"] for r in rows} == {"refault", "retry-lower"}
    assert {r["memory"] for r in rows} == {"plenty", "fragmented"}
    assert len(race.rows) == len(rows)


def test_numbers_are_consistent(race: experiments.RacePoliciesResult) -> None:
    for r in race.rows:
        what = {k: r[k] for k in experiments.KEYS}
        # The workload writes every page once: all of them end up resident.
        if r["sharing"] == "interleaved":
            assert r["pages_touched"] == r["rss_bytes"] // 4096, what
        assert r["pages_touched"] == r["size_bytes"] // 4096, what
        assert r["faults"] >= 1
        if r["on_race"] == "refault":
            assert r["retries"] == 0, what
        else:  # retry-lower and no read faults: the loser never refaults
            assert r["refaults"] == 0, what
        if r["cpus"] == 1:
            assert r["races"] == 0 and r["pages_wasted"] == 0, what
        # A lost race wastes exactly one folio.
        assert r["folios_wasted"] == r["races"], what
        assert r["pages_wasted"] >= r["folios_wasted"], what
        if r["pass"] == "deterministic":
            assert r["ns_per_page"] == "" and r["ptl_contended"] == 0, what
            if r["sharing"] == "disjoint":
                assert r["races"] == 0, what
        else:
            assert r["ns_per_page"] > 0, what
        if r["memory"] == "plenty":
            assert r["retries"] == 0 and r["refaults"] == 0, what
        assert r["faults_per_1k_pages"] == pytest.approx(1000 * r["faults"] / r["pages_touched"], abs=1e-3)


def test_deterministic_pass_is_reproducible(tmp_path) -> None:
    kw = dict(SMALL, cpus=(4,), free_size=None, plots=False, policies=("upstream",), memory=("fragmented",),
              sharing=("interleaved",))
    a = experiments.race_policies(tmp_path / "a", **kw)
    b = experiments.race_policies(tmp_path / "b", jobs=1, **kw)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(a.rows) == strip(b.rows)
    assert a.findings == b.findings


def test_medians_match_the_runs(race: experiments.RacePoliciesResult) -> None:
    meds = _csv(os.path.join(race.out, "medians.csv"))
    assert len(meds) == len(race.medians) == 3 * 2 * 2 * 2 * (3 + 2)
    for m in race.medians:
        grp = [r for r in race.rows if all(r[k] == m[k] for k in experiments.KEYS)]
        assert m["runs"] == len(grp)
        for c in ("faults", "pages_wasted", "faults_per_1k_pages"):
            assert m[c] == pytest.approx(statistics.median(r[c] for r in grp), abs=1e-3)
            assert m[c + "_min"] <= m[c] <= m[c + "_max"]


def test_paired_deltas(race: experiments.RacePoliciesResult) -> None:
    assert race.deltas
    for d in race.deltas:
        pairs = {}
        for r in race.rows:
            if (r["pass"], r["policy"], r["memory"], r["sharing"], r["cpus"]) == (
                    "deterministic", d["policy"], d["memory"], d["sharing"], d["cpus"]):
                pairs.setdefault(r["seed"], {})[r["on_race"]] = r
        diffs = [p["refault"]["faults_per_1k_pages"] - p["retry-lower"]["faults_per_1k_pages"] for p in pairs.values()]
        assert d["faults_per_1k_pages"] == pytest.approx(statistics.median(diffs), abs=1e-3)
        if d["memory"] == "plenty" or d["cpus"] == 1:  # retry-lower never acts: identical runs
            assert d["faults_per_1k_pages_min"] == d["faults_per_1k_pages_max"] == 0
            assert d["pages_wasted_per_1k_pages_min"] == d["pages_wasted_per_1k_pages_max"] == 0


def test_findings_match_the_table(race: experiments.RacePoliciesResult) -> None:
    text = race.findings
    md = Path(race.out, "results.md").read_text()
    for line in text:
        assert f"- {line}" in md
    det = [r for r in race.rows if r["pass"] == "deterministic"]
    for mem in ("plenty", "fragmented"):
        rl = [r for r in det if r["memory"] == mem and r["on_race"] == "retry-lower"]
        retries = sum(r["retries"] for r in rl)
        races = sum(r["races"] for r in rl)
        line = next(t for t in text if t.startswith(f"Memory {mem} (deterministic pass)"))
        assert f"retried {retries:,} times in {len(rl)} runs that lost {races:,} races" in line
    assert any("never acted" in t for t in text if t.startswith("Memory plenty"))
    top = max(SMALL["cpus"])
    frag = next((t for t in text if t.startswith(f"Memory fragmented, interleaved, {top} CPUs")), None)
    for d in race.deltas:
        if d["memory"] == "fragmented" and d["sharing"] == "interleaved" and d["cpus"] == top and frag:
            assert _findings.delta_sentence(d) in frag
            df = d["faults_per_1k_pages"]
            if df:
                assert f"{'saved' if df > 0 else 'took'} {_findings.number(abs(df))} " in frag
    direct = next((t for t in text if t.startswith("Counted directly")), None)
    if frag:
        assert direct is not None
        for pol in ("upstream", "v1", "preferred"):
            m = _findings.median_of(race.medians, "deterministic", pol, "refault", "fragmented", "interleaved", top)
            assert f"{pol} {_findings.number(m['refaults_per_1k_pages'], 2)} refaults" in direct
    one = [r for r in det if r["cpus"] == 1]
    assert f"1-CPU runs lost 0 races in {len(one)} runs" in " ".join(text)
    # The medians table in results.md has one line per deterministic point.
    det_md, free_md = md.split("## Free-running pass")
    key = "| plenty | interleaved | upstream | 2 | refault |"
    assert len([ln for ln in det_md.splitlines() if ln.startswith(key)]) == 1
    assert len([ln for ln in free_md.splitlines() if ln.startswith(key)]) == 1


def test_findings_follow_the_numbers() -> None:
    """The text is computed: fabricated rows in which retry-lower loses give a different sentence."""
    base = dict(experiments.COLUMNS)
    rows = []
    for seed in (1, 2, 3):
        for orr, faults, wasted in (("refault", 100, 10), ("retry-lower", 120, 40)):
            r = dict.fromkeys(base, 0)
            r.update({"pass": "deterministic", "policy": "upstream", "on_race": orr, "memory": "fragmented",
                      "sharing": "interleaved", "cpus": 2, "seed": seed, "pages_touched": 1000, "faults": faults,
                      "faults_per_1k_pages": faults, "pages_wasted_per_1k_pages": wasted, "races": 5,
                      "retries": 3 if orr == "retry-lower" else 0, "ns_per_page": ""})
            rows.append(r)
    deltas = experiments.paired_deltas(rows)
    assert deltas[0]["faults_per_1k_pages"] == -20 and deltas[0]["pages_wasted_per_1k_pages"] == -30
    text = experiments.findings(experiments.medians(rows), deltas, rows)
    s = next(t for t in text if t.startswith("Memory fragmented, interleaved, 2 CPUs"))
    assert "took 20.0 more faults per 1000 pages touched" in s
    assert "wasted 30.0 more pages per 1000" in s


def test_scaling(tmp_path) -> None:
    res = experiments.scaling(workload="page_fault1", threads=(1, 2), size="4M", iterations=2, repeat=2,
                              out=tmp_path)
    assert [m["threads"] for m in res.medians] == [1, 2]
    one = res.medians[0]
    assert one["efficiency"] == 1.0 and one["linear_ops_per_s"] == one["ops_per_s"]
    two = res.medians[1]
    assert two["linear_ops_per_s"] == 2 * one["ops_per_s"]
    assert two["efficiency"] == pytest.approx(two["ops_per_s"] / two["linear_ops_per_s"], abs=1e-3)
    # page_fault1: each thread touches every page of its own mapping each iteration.
    assert one["ops"] == 1024 * 2 and two["ops"] == 2 * 1024 * 2
    assert "efficiency" in res.table and "linear ops/s" in res.table
    assert os.path.exists(tmp_path / "scaling.csv")
    assert len(_csv(str(tmp_path / "scaling.csv"))) == 4
    if plot.available():
        assert "scaling.png" in res.files


def test_scaling_sequential_splits_the_range() -> None:
    res = experiments.scaling(workload="sequential", threads=(1, 2), size="8M", repeat=1)
    assert [m["ops"] for m in res.medians] == [2048, 2048]
    assert res.files == []
    with pytest.raises(ValueError):
        experiments.scaling(workload="random")


def test_cli_race_policies(tmp_path, capsys) -> None:
    out = tmp_path / "rp"
    rc = cli.main(["experiment", "race-policies", "--out", str(out), "--size", "2M", "--cpus", "1,2", "--seeds", "1",
                   "--policies", "upstream,v1", "--memory", "fragmented", "--no-free", "--no-plots", "--quiet"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == os.path.join(str(out), "results.md")
    rows = _csv(str(out / "results.csv"))
    assert len(rows) == 2 * 2 * 1 * 2 * 2 * 1
    assert not any(f.endswith(".png") for f in os.listdir(out))


def test_cli_scaling(capsys) -> None:
    rc = cli.main(["experiment", "scaling", "--threads", "1,2", "--size", "2M", "--iterations", "1", "--repeat", "1",
                   "--policy", "v1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "policy v1" in out and "efficiency" in out


@pytest.mark.parametrize("argv", [
    ["experiment", "race-policies", "--policies", "v2"],
    ["experiment", "race-policies", "--memory", "tight"],
    ["experiment", "race-policies", "--cpus", "0"],
    ["experiment", "scaling", "--workload", "random"],
    ["experiment"],
])
def test_cli_bad_input(argv, capsys) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("anonfolio: error:") and err.count("\n") == 1
