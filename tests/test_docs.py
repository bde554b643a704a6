"""The documentation in docs/ cannot silently rot: every trace operation it
names parses exactly when it says the engine models it, every JSON key the
command line prints is explained, every option of every command is
documented, the README's examples run, and no text in the repository points
outside it."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import anonfolio
from anonfolio import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TRACE = ROOT / "examples" / "traces" / "kv-store.trace"


def _doc(name: str) -> str:
    return (DOCS / name).read_text()


# ---------------------------------------------------------------------------
# docs/trace-format.md


ENGINE = ("modelled", "no effect yet", "refused", "not yet")
B = 0x7F0000000000
# A write to the first page of the examples' mapping (the smallest is one
# page): what a flag or advice with an effect would change.
PROBE = f"w {B:#x}\n"
# The kernel's figures of a run (not the line count or lock traffic).
KERNEL_FIGURES = ("faults", "rss_bytes", "rss_peak_bytes", "mthp", "vmstat", "folio_orders", "fault_paths")


def _operation_rows() -> list[tuple[str, str, str]]:
    """(operation, example, engine) of every row of the operations table."""
    rows = []
    for line in _doc("trace-format.md").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[2] in ENGINE:
            rows.append((cells[0].strip("`"), cells[1].strip("`"), cells[2]))
    return rows


def test_the_operations_table_covers_every_operation():
    ops = {r[0].split()[0] for r in _operation_rows()}
    assert ops >= {"mmap", "munmap", "brk", "mprotect", "mremap", "madvise", "w", "r", "@T"}
    text = " ".join(r[0] for r in _operation_rows())
    for word in ("hugepage", "nohugepage", "uffd-wp", "prot=", "populate", "growsdown", "noreserve", "stack",
                 "dontneed", "free", "populate_read", "populate_write", "dontfork", "dofork"):
        assert word in text, word


def _without(example: str) -> str:
    """The same trace without what the example adds: an mmap's last flag, or the line."""
    if example.startswith("mmap "):
        return " ".join(example.split()[:3]) + "\n" + PROBE
    return "mmap 0x7f0000000000 0x200000\n" + PROBE


def _figures(text: str) -> dict:
    d = anonfolio.replay(text).to_dict()
    return {k: d[k] for k in KERNEL_FIGURES}


@pytest.mark.parametrize("op,example,engine", _operation_rows(), ids=[r[0] for r in _operation_rows()])
def test_each_documented_operation_does_what_the_doc_says_the_engine_does(op, example, engine):
    # The example works on a mapping the table assumes exists.
    text = example + "\n" if example.startswith("mmap 0x7f0000000000") else \
        "mmap 0x7f0000000000 0x200000\n" + example + "\n"
    if engine == "not yet":
        with pytest.raises(anonfolio.TraceError):
            anonfolio.check_trace(text)
            pytest.fail(f"{example!r} parses now: update its engine column in docs/trace-format.md")
        return
    anonfolio.check_trace(text)
    if engine == "modelled":
        # The example itself replays; what the probe then finds is the
        # operation's own business (a write to an `r` VMA faults with SIGSEGV).
        anonfolio.replay(text)
    elif engine == "refused":
        with pytest.raises(anonfolio.AnonfolioError, match="line 2"):
            anonfolio.replay(text)
            pytest.fail(f"{example!r} replays now: update its engine column in docs/trace-format.md")
    else:
        assert _figures(text + PROBE) == _figures(_without(example)), \
            f"{example!r} has an effect now: update its engine column in docs/trace-format.md"


# ---------------------------------------------------------------------------
# docs/json.md


def _keys(x, out: set, prefix: str = "") -> set:
    if isinstance(x, dict):
        for k, v in x.items():
            if prefix in ("mthp", "config.hugepages"):  # keyed by size: the size names are documented once
                _keys(v, out, "size")
                continue
            out.add(k)
            _keys(v, out, f"{prefix}.{k}" if prefix else k)
    return out


def _json(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "anonfolio", *args, "--json"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout)


def test_json_md_names_every_key_the_cli_prints():
    doc = _doc("json.md")
    printed: set = set()
    _keys(_json("replay", str(TRACE), "--thp", "64kB=always"), printed)
    _keys(_json("run", "--size", "4M", "--threads", "2", "--sharing", "interleaved"), printed)
    _keys(_json("run", "--size", "64M", "--memcg-limit", "16M"), printed)  # with an error key
    assert {"faults", "rss_peak_bytes", "anon_fault_alloc", "advice", "error", "fail_rate"} <= printed
    missing = sorted(k for k in printed if f"`{k}`" not in doc)
    assert not missing, f"docs/json.md does not explain: {missing}"


def test_json_md_names_every_kernel_replay_and_validate_key():
    from anonfolio import results

    doc = _doc("json.md")
    for td in (results.KernelReplay, results.ValidateResult, results.ValidateRow):
        for k in td.__annotations__:
            assert f"`{k}`" in doc, (td.__name__, k)


def test_the_table_says_what_is_cumulative_and_what_is_the_simulators_own():
    table = anonfolio.run("sequential", "1M", anonfolio.Config(hugepages={"64kB": "always"}), advice="none").table()
    assert "folios mapped by size (cumulative" in table
    assert "simulator speed" in table and "fault rate" not in table
    assert "elapsed (simulator)" in table


# ---------------------------------------------------------------------------
# docs/cli.md


def _commands(p: argparse.ArgumentParser, name: str = "anonfolio"):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for n, sp in a.choices.items():
                yield f"{name} {n}", sp
                yield from _commands(sp, f"{name} {n}")


def test_cli_md_documents_every_command_and_option():
    doc = _doc("cli.md")
    sections = re.split(r"\n## ", doc)
    for name, sp in _commands(cli.build_parser()):
        words = name.split()[1:]
        if words == ["experiment"]:
            continue
        title = " ".join(words)
        own = [s for s in sections if s.startswith((f"`{title}", f"`experiment {title}"))]
        assert own, f"docs/cli.md has no section for {name}"
        for a in sp._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS or a.option_strings == ["-h", "--help"]:
                continue
            opt = a.option_strings[-1]
            # An option shared by a group of commands is documented once, in its group's table.
            assert f"`{opt}" in own[0] or f"`{opt}" in doc.split("## `replay TRACE`")[0], (name, opt)


def test_help_points_to_the_docs(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "docs/cli.md" in out and "docs/trace-format.md" in out and "docs/json.md" in out
    assert cli.main(["replay", "--help"]) == 0
    assert "docs/trace-format.md" in " ".join(capsys.readouterr().out.split())
    assert cli.main(["run", "--help"]) == 0
    assert "docs/workloads.md" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------------
# The README and the repository as a whole


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("i", range(len(_readme_python_blocks())))
def test_the_readme_python_examples_run(i, tmp_path, monkeypatch):
    block = _readme_python_blocks()[i]
    if "dask" in block:
        pytest.importorskip("distributed")
    monkeypatch.chdir(ROOT)
    block = block.replace('"sweep.csv"', repr(str(tmp_path / "s.csv"))).replace(
        '"sweep.parquet"', repr(str(tmp_path / "s.parquet")))
    env: dict = {}
    exec(compile(block, f"README.md python block {i}", "exec"), env)
    if "res" in env:
        assert len(env["res"]) > 0 and len(env["res"].to_pandas()) == len(env["res"])


def test_the_readme_worked_example_figures_are_the_simulators():
    s0 = anonfolio.replay(TRACE, anonfolio.Config(hugepages={"2048kB": "never"}))
    s64 = anonfolio.replay(TRACE, anonfolio.Config(enabled="always", hugepages={"64kB": "always", "2048kB": "never"}))
    readme = (ROOT / "README.md").read_text()
    assert f"faults {s0.faults:,}" in readme and f"faults {s64.faults:,}" in readme
    assert f"anon_fault_alloc {s64.mthp['64kB'].anon_fault_alloc}" in readme
    assert f"nr_anon {s64.mthp['64kB'].nr_anon} at the end" in readme
    assert f"takes {anonfolio.replay(TRACE).faults:,}" in readme


# Spelled in pieces so that this file does not match itself.
OUTSIDE = ["interface" + ".md", "/wo" + "rk/", "../sha" + "red", "shared/" + "reference", "reference" + "/kernel",
           "kernel-" + "mthp.md", "kernel-" + "examples"]


def test_no_text_in_the_repository_points_outside_it():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for f in files:
        p = ROOT / f
        if p.suffix in (".png", ".so", ".json") or not p.is_file():
            continue
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            continue
        for needle in OUTSIDE:
            if needle in text:
                hits.append(f"{f}: {needle}")
    assert not hits, hits


def test_every_doc_link_resolves():
    for md in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", md.read_text()):
            assert (md.parent / target).exists(), f"{md.name}: {target}"


def test_the_shipped_example_trace_parses_and_its_comment_says_where_the_format_is():
    text = TRACE.read_text()
    anonfolio.check_trace(text)
    assert "docs/trace-format.md" in text
    assert os.path.getsize(TRACE) < 200_000
