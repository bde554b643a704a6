"""Sweeps for scale: any concurrent.futures.Executor gives the serial
results, a Dask LocalCluster too (50 points into a DataFrame with a progress
bar), flat columns with the settings of each run, CSV and Parquet out, the
command line's grid, and results that carry what re-runs them."""

from __future__ import annotations

import json
import pickle
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

import anonfolio
from anonfolio import cli
from anonfolio.frame import flatten

HERE = Path(__file__).resolve().parent
TRACE = HERE.parent / "examples" / "traces" / "kv-store.trace"

CONFIGS = {
    ("order0", 1): anonfolio.Config(hugepages={"2048kB": "never"}),
    ("64kB", 2): anonfolio.Config(hugepages={"64kB": "always", "2048kB": "never"}),
    ("v1 all", 3): anonfolio.Config(hugepages={"16kB": "always", "64kB": "always"}, policy="v1"),
}

# The simulator's own speed and host memory are not results of the model.
NOT_RESULTS = ("elapsed_s", "memory.host_bytes")


def figures(res) -> list[dict]:
    return [{k: v for k, v in flatten(s).items() if k not in NOT_RESULTS} for s in res]


def small_sweep(**kw):
    return anonfolio.sweep(["sequential", "random"], configs=CONFIGS, size="2M", advice=["hugepage", "none"],
                           seed=3, **kw)


def test_configs_and_stats_pickle():
    for c in CONFIGS.values():
        assert pickle.loads(pickle.dumps(c)) == c
    s = anonfolio.run("sequential", "1M")
    t = pickle.loads(pickle.dumps(anonfolio.Stats(s, params={"label": ("a", 1)})))
    assert t == s and t.params == {"label": ("a", 1)}


@pytest.mark.parametrize("make", [lambda: ThreadPoolExecutor(3), lambda: ProcessPoolExecutor(2)],
                         ids=["threads", "processes"])
def test_an_executor_gives_the_serial_results_in_order(make):
    serial = small_sweep()
    assert len(serial) == 3 * 2 * 2
    with make() as ex:
        par = small_sweep(executor=ex)
    assert figures(par) == figures(serial)
    assert [s.params["label"] for s in par] == [s.params["label"] for s in serial]


def test_tuple_labels_stay_tuples():
    res = small_sweep()
    assert {s.params["label"] for s in res} == set(CONFIGS)


def test_a_trace_sweep_sends_the_text_so_workers_need_no_file():
    with ProcessPoolExecutor(2) as ex:
        res = anonfolio.sweep(CONFIGS, trace=TRACE, executor=ex)
    serial = anonfolio.sweep(CONFIGS, trace=TRACE)
    assert figures(res) == figures(serial)
    assert res[0].params["trace"] == str(TRACE)


def test_to_pandas_has_flat_figures_and_the_settings():
    df = small_sweep().to_pandas()
    assert len(df) == 12
    for col in ("faults", "rss_bytes", "rss_peak_bytes", "mthp.64kB.anon_fault_alloc", "mthp.2048kB.nr_anon",
                "vmstat.pgfault", "folio_orders.64kB", "label", "workload", "size", "advice", "seed",
                "config.policy", "config.hugepages.64kB", "config.fail_rate", "config.memory"):
        assert col in df.columns, col
    row = df[(df["workload"] == "sequential") & (df["advice"] == "none") & (df["config.hugepages.64kB"] == "always")
             & (df["config.policy"] == "upstream")]
    assert list(row["faults"]) == [32] and list(row["mthp.64kB.anon_fault_alloc"]) == [32]


def test_csv_and_parquet_round_trip(tmp_path):
    import pandas as pd

    res = small_sweep()
    res.to_csv(tmp_path / "s.csv")
    res.to_parquet(tmp_path / "s.parquet")
    a, b = pd.read_csv(tmp_path / "s.csv"), pd.read_parquet(tmp_path / "s.parquet")
    assert list(a["faults"]) == list(b["faults"]) == [s.faults for s in res]
    assert list(b["mthp.64kB.anon_fault_alloc"]) == [s.mthp["64kB"].anon_fault_alloc for s in res]


def test_progress_shows_when_asked_and_not_on_a_pipe(capsys):
    anonfolio.sweep("sequential", size="1M", configs=CONFIGS, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err
    anonfolio.sweep("sequential", size="1M", configs=CONFIGS)  # stderr is not a terminal here
    assert capsys.readouterr().err == ""


def test_fifty_points_on_a_dask_local_cluster_into_a_dataframe(capsys):
    distributed = pytest.importorskip("distributed")
    configs = {(size, mode): anonfolio.Config(hugepages={size: mode, "2048kB": "never"})
               for size in ("16kB", "32kB", "64kB", "128kB", "256kB") for mode in ("always", "never")}
    sizes = ["1M", "2M", "3M", "4M", "5M"]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc, \
            distributed.Client(lc) as client:
        res = anonfolio.sweep("sequential", configs=configs, sizes=sizes, advice="none",
                              executor=client.get_executor(), progress=True)
    err = capsys.readouterr().err
    assert "50/50" in err
    df = res.to_pandas()
    assert df.shape[0] == 50
    serial = anonfolio.sweep("sequential", configs=configs, sizes=sizes, advice="none")
    assert figures(res) == figures(serial)
    on = df[(df["label"] == "64kB/always") & (df["size"] == 4 << 20)]
    assert list(on["mthp.64kB.anon_fault_alloc"]) == [64]


# ---------------------------------------------------------------------------
# anonfolio sweep


def test_cli_sweep_runs_the_grid_to_csv(capsys, tmp_path):
    import pandas as pd

    out = tmp_path / "g.csv"
    rc = cli.main(["sweep", "--thp", "64kB=always,never", "--policy", "upstream,v1", "--size", "4M,8M",
                   "--advice", "none", "--out", str(out), "--no-progress"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    df = pd.read_csv(out)
    assert len(df) == 8
    assert set(df["config.policy"]) == {"upstream", "v1"} and set(df["config.hugepages.64kB"]) == {"always", "never"}
    got = df[(df["config.hugepages.64kB"] == "always") & (df["size"] == 8 << 20)]["faults"]
    assert list(got) == [128, 128]


def test_cli_sweep_parquet_with_processes(capsys, tmp_path):
    import pandas as pd

    out = tmp_path / "g.parquet"
    rc = cli.main(["sweep", "--trace", str(TRACE), "--thp", "16kB=always,never", "--executor", "processes",
                   "--jobs", "2", "--out", str(out)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    df = pd.read_parquet(out)
    assert len(df) == 2 and (df["trace"] == str(TRACE)).all()


@pytest.mark.parametrize("args,needle", [
    (["--thp", "64kB=always,sometimes"], "sometimes"),
    (["--thp", "8kB=always"], "8kB"),
    (["--policy", "upstream,v9"], "v9"),
    (["--out", "x.json"], ".parquet"),
    (["--trace", "t.trace", "--workload", "random"], "not allowed"),
])
def test_cli_sweep_bad_grid_is_one_line(capsys, args, needle):
    rc = cli.main(["sweep", *args])
    _, err = capsys.readouterr()
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


# ---------------------------------------------------------------------------
# Re-running a result from itself


def test_a_json_result_carries_what_reruns_it(capsys):
    rc = cli.main(["run", "--workload", "random", "--size", "8M", "--seed", "5", "--fraction", "0.5",
                   "--thp", "64kB=always", "--advice", "none", "--fail-rate", "0.3", "--fail-seed", "9",
                   "--fragmentation", "0.2", "--memcg-limit", "1G", "--memory", "64G", "--policy", "v1", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    j = json.loads(out)
    c = j["config"]
    assert (c["fail_rate"], c["seed"], c["fragmentation"], c["memcg_limit"], c["memory"], c["policy"]) == \
        (0.3, 9, 0.2, 1 << 30, 64 << 30, "v1")
    w = dict(j["workload"])
    name, size = w.pop("name"), w.pop("size")
    again = anonfolio.run(name, size, anonfolio.Config(**c), **{k: v for k, v in w.items() if v is not None})
    assert again.faults == j["faults"] and again.rss_bytes == j["rss_bytes"]
    assert again.mthp["64kB"].anon_fault_fallback == j["mthp"]["64kB"]["anon_fault_fallback"] > 0


def test_experiments_show_progress_when_asked(capsys, tmp_path):
    from anonfolio import experiments

    experiments.scaling(threads=[1, 2], size="4M", iterations=1, repeat=2, progress=True)
    assert "4/4" in capsys.readouterr().err
    experiments.race_policies(tmp_path, size="1M", cpus=[2], seeds=1, policies=["upstream"], sharing=["interleaved"],
                              memory=["plenty"], free_repeat=0, plots=False, progress=True)
    err = capsys.readouterr().err
    assert "race-policies: deterministic" in err and "2/2" in err
    experiments.scaling(threads=[1], size="4M", iterations=1, repeat=1)  # stderr is not a terminal here
    assert capsys.readouterr().err == ""


def test_cli_sweep_on_a_dask_scheduler(capsys, tmp_path):
    distributed = pytest.importorskip("distributed")
    import pandas as pd

    out = tmp_path / "d.csv"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        rc = cli.main(["sweep", "--size", "1M,2M", "--thp", "16kB=always,never", "--advice", "none",
                       "--executor", f"dask:{lc.scheduler_address}", "--out", str(out), "--no-progress"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    df = pd.read_csv(out)
    assert list(df["faults"]) == [64, 128, 256, 512]
