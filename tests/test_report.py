"""``anonfolio report``: the page renders in a real headless browser
(Debian's chromium) with every plot, the CSV holds a row per setting, and
the figures on the page are the runs' own."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import anonfolio
from anonfolio import cli
from anonfolio.grid import default_report_grid
from anonfolio.report import report

HERE = Path(__file__).resolve().parent
TRACE = HERE.parent / "examples" / "traces" / "kv-store.trace"
PLOTS = ("faults", "rss", "rss-growth", "folios", "fallbacks")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup-system)")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def rep(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rc = cli.main(["report", str(TRACE), "--out", str(out), "--fail-rate", "0.3", "--no-progress"])
    assert rc == 0
    return out


def test_the_default_grid_is_the_one_documented():
    labels = [label for label, _ in default_report_grid()]
    assert labels == ["order 0", "16kB alone", "32kB alone", "64kB alone", "128kB alone", "256kB alone",
                      "512kB alone", "1024kB alone", "all mTHP", "2048kB alone", "all + 2048kB"]
    cfg = dict(default_report_grid())
    assert all(m == "never" for s, m in cfg["order 0"].hugepages.items())
    assert cfg["64kB alone"].hugepages["64kB"] == "always" and cfg["64kB alone"].hugepages["2048kB"] == "never"
    assert set(cfg["all + 2048kB"].hugepages.values()) == {"always", "never"}  # 8kB stays never


def test_csv_has_a_row_per_setting_with_the_runs_figures(rep):
    rows = list(csv.DictReader((rep / "report.csv").open()))
    assert [r["label"] for r in rows] == [label for label, _ in default_report_grid()]
    for r, (label, cfg) in zip(rows, default_report_grid()):
        s = anonfolio.replay(TRACE, cfg.replace(fail_rate=0.3))
        assert int(r["faults"]) == s.faults, label
        assert int(r["rss_peak_bytes"]) == s["rss_peak_bytes"], label
        assert int(r["mthp.64kB.anon_fault_fallback"]) == s.mthp["64kB"].anon_fault_fallback, label


def test_the_page_holds_every_plot_and_table(rep):
    page = (rep / "index.html").read_text()
    for name in PLOTS:
        assert f'id="plot-{name}"' in page, name
    assert page.count("<svg") == len(PLOTS)
    assert page.count("<table>") == 3  # summary, settings, every figure
    assert "all + 2048kB" in page and "mthp.64kB.anon_fault_fallback" in page


def test_a_custom_grid_and_the_order0_baseline_it_gets(tmp_path):
    res = report(TRACE, str(tmp_path), [("64k", anonfolio.Config(hugepages={"64kB": "always"}))], progress=False)
    assert [s.params["label"] for s in res.results] == ["order 0", "64k"]
    rc = cli.main(["report", str(TRACE), "--out", str(tmp_path / "g"), "--thp", "64kB=always,never",
                   "--policy", "upstream,v1", "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "g" / "report.csv").open()))
    # 64kB=never keeps 2048kB=inherit, so no point is order 0: the baseline comes first.
    assert [r["label"] for r in rows] == ["order 0", "64kB=always upstream", "64kB=never upstream",
                                          "64kB=always v1", "64kB=never v1"]


def test_a_bad_trace_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.trace"
    bad.write_text("mmap 0x1000 0x1000\nfrobnicate\n")
    rc = cli.main(["report", str(bad), "--out", str(tmp_path / "out")])
    assert rc == 2 and "line 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_browser
def test_the_page_renders_in_a_browser_with_every_plot(rep):
    dom = _chromium("--dump-dom", (rep / "index.html").as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # The browser parsed each inline SVG as an element with a size and bars in it.
    for name in PLOTS:
        m = re.search(rf'<div class="figure" id="plot-{name}"><svg[^>]*width="([\d.]+)pt" height="([\d.]+)pt"',
                      html)
        assert m, name
        assert float(m.group(1)) > 100 and float(m.group(2)) > 50, name
    assert html.count("<path") > 100  # bars, axes, glyphs


@needs_browser
def test_the_screenshot_is_not_blank_and_shows_the_bars(rep, tmp_path):
    import numpy as np
    from matplotlib import image

    png = tmp_path / "report.png"
    r = _chromium(f"--screenshot={png}", "--window-size=1200,4200", (rep / "index.html").as_uri())
    assert r.returncode == 0 and png.exists(), r.stderr[-2000:]
    img = image.imread(str(png))[:, :, :3]
    assert img.shape[0] == 4200 and img.shape[1] == 1200
    # Not blank: many distinct colours, and matplotlib's first bar colour (#1f77b4)
    # drawn in each plot's band of the page.
    assert len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200
    blue = np.all(np.abs(img - np.array([0x1F, 0x77, 0xB4]) / 255) < 0.02, axis=2)
    rows = np.where(blue.any(axis=1))[0]
    assert blue.sum() > 5000
    # Bars of at least four separate plots (gaps of white between them).
    bands = 1 + int(np.sum(np.diff(rows) > 60))
    assert bands >= 4, bands
