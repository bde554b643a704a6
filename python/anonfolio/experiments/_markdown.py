"""race-policies: ``results.md``, the tables a person reads."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .. import _anonfolio
from ..config import Config
from ..stats import format_bytes
from ._findings import number
from ._grid import COLUMNS, MEMORY, DeltaRow, MedianRow, RaceParams


def _cell(v: Any) -> str:
    if v == "" or v is None:
        return "–"
    if isinstance(v, float):
        return number(v, 2) if abs(v) < 10 else number(v, 1)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _mm(m: Mapping[str, Any], c: str) -> str:
    """median [min..max], or the median alone when they agree."""
    if m[c] == "":
        return "–"
    if m[c + "_min"] == m[c + "_max"]:
        return _cell(m[c])
    return f"{_cell(m[c])} [{_cell(m[c + '_min'])}..{_cell(m[c + '_max'])}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def results_md(meds: Sequence[MedianRow], deltas: Sequence[DeltaRow], text: Sequence[str], cfg: Config,
               params: RaceParams, pngs: Sequence[str], note: str, wall: float) -> str:
    lines = [
        "# race-policies: is retry-lower worth it?",
        "",
        f"Workload `{params['workload']}` (one VMA, MADV_HUGEPAGE), THP knobs: {knobs_summary(cfg)}. "
        f"Deterministic pass: {format_bytes(params['size'])} per run, CPUs {params['cpus']}, seeds "
        f"{params['first_seed']}..{params['first_seed'] + params['seeds'] - 1} (interleaving and failure injection). "
        + (f"Free pass: {format_bytes(params['free_size'])} per run, host threads {params['free_threads']}, "
           f"{params['free_repeat']} repeat(s) on a {os.cpu_count()}-CPU host. "
           if params["free_size"] and params["free_repeat"] else "")
        + "Memory: " + ", ".join(f"{k} ({', '.join(f'{a}={b}' for a, b in v.items()) or 'no failures'})"
                                  for k, v in MEMORY.items()) + ".",
        f"anonfolio {_anonfolio.__version__} ({_anonfolio.build_profile} build); {wall:.1f} s in all.",
        "",
        "## Findings (computed from the numbers below)",
        "",
    ]
    lines += [f"- {t}" for t in text]
    lines += [
        "",
        "Caveats: the simulator does not zero pages or time zeroing, so a wasted folio costs nothing in `ns_per_page`; "
        "the deterministic schedule switches CPUs at every race point with probability 0.5 and so overstates how "
        "often races happen; free-running race counts depend on host timing (thread start skew, load) and vary "
        "widely between repeats; the free pass can only use as many threads as the host has CPUs.",
        "",
        "## refault vs retry-lower, paired by seed (deterministic, interleaved)",
        "",
        "Faults and wasted pages per 1000 pages touched, medians over the seeds; Δ = refault − retry-lower "
        "(positive: retry-lower had fewer), median [min..max] of the per-seed differences.",
        "",
    ]
    inter = [d for d in deltas if d["sharing"] == "interleaved" and d["cpus"] > 1]
    lines += _table(
        ["memory", "policy", "CPUs", "faults/1k refault", "faults/1k retry-lower", "Δ faults/1k",
         "wasted/1k refault", "wasted/1k retry-lower", "Δ wasted/1k"],
        ([d["memory"], d["policy"], str(d["cpus"]), _cell(d["faults_per_1k_pages_refault"]),
          _cell(d["faults_per_1k_pages_retry"]), _mm(d, "faults_per_1k_pages"),
          _cell(d["pages_wasted_per_1k_pages_refault"]), _cell(d["pages_wasted_per_1k_pages_retry"]),
          _mm(d, "pages_wasted_per_1k_pages")] for d in inter),
        left=2,
    )
    det = [m for m in meds if m["pass"] == "deterministic"]
    cols = ["faults_per_1k_pages", "races_per_1k_faults", "retries_per_1k_pages", "refaults_per_1k_pages",
            "folios_wasted_per_1k_pages", "pages_wasted_per_1k_pages", "mean_folio_kb"]
    lines += [
        "",
        "## Deterministic pass: medians [min..max] over the seeds",
        "",
        "PTL contention is not shown: the deterministic schedule never switches CPUs while a lock is held, so it is 0.",
        "",
    ]
    lines += _table(["memory", "sharing", "policy", "CPUs", "on_race", *cols],
                    ([m["memory"], m["sharing"], m["policy"], str(m["cpus"]), m["on_race"]] + [_mm(m, c) for c in cols]
                     for m in det), left=5)
    free = [m for m in meds if m["pass"] == "free"]
    if free:
        cols = ["ns_per_page", "faults_per_1k_pages", "races_per_1k_faults", "refaults_per_1k_pages",
                "retries_per_1k_pages", "pages_wasted_per_1k_pages", "ptl_contended", "mean_folio_kb"]
        lines += ["", "## Free-running pass: medians [min..max] over the repeats", ""]
        lines += _table(["memory", "sharing", "policy", "threads", "on_race", *cols],
                        ([m["memory"], m["sharing"], m["policy"], str(m["cpus"]), m["on_race"],
                          *(_mm(m, c) for c in cols)] for m in free), left=5)
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in pngs]
    if note:
        lines += ["", note]
    lines += ["", "## Columns (results.csv)", ""]
    lines += [f"- `{k}`: {v}" for k, v in COLUMNS.items()]
    lines.append("")
    return "\n".join(lines)


def knobs_summary(cfg: Config) -> str:
    on = [f"{s}={m}" for s, m in cfg.hugepages.items() if m != "never"]
    return f"enabled={cfg.enabled}, " + (", ".join(on) if on else "no mTHP sizes")
