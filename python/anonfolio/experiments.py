"""Canned experiments that write tables and plots.

``race-policies`` answers Yang Shi's question on the v1 patch: is retrying
one order lower after a lost race (``retry-lower``, v1) worth it compared
with dropping the folio and letting the CPU fault again (``refault``,
upstream since 6.8)? It runs every combination of

- policy (order selection): ``upstream``, ``v1``, ``preferred``;
- race handling: ``refault``, ``retry-lower`` (``Config.on_race``);
- simulated CPUs: 1, 2, 4, 8;
- sharing: ``disjoint`` (a slice per CPU: a control, they never meet) or
  ``interleaved`` (CPUs take turns page by page over one range, so they
  fault in the same folio-sized range at once);
- memory: ``plenty`` or ``fragmented`` (allocations above order 0 fail with
  probability 0.3: a racer then maps a *smaller* folio that may not cover
  the loser's page, the only case where retry-lower and refault differ),

in two passes:

1. **deterministic**: seeded interleavings (``--deterministic SEED``) that
   switch CPUs at the fault path's race points with probability 0.5, over
   several seeds. Races are far more frequent than on real hardware (the
   windows are widened on purpose) but the counts are reproducible; the
   table shows medians and min..max over the seeds.
2. **free**: real host threads (1 and 2: this machine's cores), a bigger
   range, a few repeats: wall time per page and lock contention.

Files written into ``out``: ``results.csv`` (one row per run),
``medians.csv`` (one row per point), ``results.md`` (tables and an
auto-generated findings paragraph) and PNG plots when matplotlib is there.

``scaling``: pages touched per second for 1, 2, 4 ... host threads, against
the linear reference (1-thread rate x N), with the efficiency.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, TextIO, Union

import numpy as np

from . import _anonfolio, plot
from .api import Simulator
from .config import POLICIES, Config
from .stats import Stats, format_bytes

__all__ = [
    "race_policies",
    "scaling",
    "RacePoliciesResult",
    "ScalingResult",
    "RACE_POLICIES_CONFIG",
    "MEMORY",
    "ON_RACE",
    "COLUMNS",
    "SCALING_COLUMNS",
    "paired_deltas",
    "findings",
]

PAGE = _anonfolio.PAGE_SIZE

#: The THP knobs of ``race-policies`` unless told otherwise: three mTHP sizes
#: on, PMD THP off, so faults race for 16kB..256kB ranges. (v1 ignores the
#: per-size knobs below the largest: it tries every order from it down to 2.)
RACE_POLICIES_CONFIG = Config(
    enabled="madvise",
    hugepages={"16kB": "always", "64kB": "always", "256kB": "always", "2048kB": "never"},
)

#: Memory conditions: Config fields for each label.
MEMORY: dict[str, dict[str, Any]] = {
    "plenty": {},
    "fragmented": {"fail_rate": 0.3},
}

#: Race handling, as ``Config.on_race`` spells it.
ON_RACE: tuple[str, ...] = ("refault", "retry-lower")

PASSES = ("deterministic", "free")

#: results.csv columns, in order, and what they mean (also in results.md).
COLUMNS: dict[str, str] = {
    "pass": "deterministic (seeded interleaving, race windows widened) or free (real host threads)",
    "policy": "order selection: upstream (6.8+), v1 (the seed patch), preferred (preferred order else 0)",
    "on_race": "after a lost race: refault (drop the folio, fault again) or retry-lower (v1: retry one order lower in the same fault)",
    "memory": "plenty, or fragmented (allocations above order 0 fail with probability 0.3)",
    "sharing": "disjoint: a slice per CPU; interleaved: CPUs take turns page by page over one range",
    "cpus": "simulated CPUs (deterministic) or host threads (free)",
    "seed": "deterministic: interleaving and failure seed; free: failure seed (one per repeat)",
    "size_bytes": "bytes mapped and written",
    "pages_touched": "pages written (the workload's operations)",
    "faults": "page faults (pgfault), lost ones included",
    "races": "re-checks under the PTE-table lock that found the range no longer empty",
    "retries": "retry-lower: retries one order lower inside the same fault",
    "refaults": "re-executed accesses that faulted again because the faulting PTE was still none after a lost race",
    "folios_wasted": "folios allocated (and, in the kernel, zeroed), then freed unused after a lost race",
    "pages_wasted": "their pages",
    "ptl_acquisitions": "split PTE-table lock acquisitions",
    "ptl_contended": "PTE-table lock acquisitions that found it held",
    "ptl_spins": "spin iterations waiting for PTE-table locks",
    "zone_contended": "zone->lock acquisitions that found it held",
    "rss_bytes": "resident anonymous bytes at the end",
    "mean_folio_kb": "mean size of the folios faults mapped, KiB",
    "elapsed_s": "wall seconds simulating",
    "faults_per_page": "faults / pages_touched",
    "faults_per_1k_pages": "faults per 1000 pages touched",
    "races_per_1k_faults": "races per 1000 faults",
    "retries_per_1k_pages": "retries per 1000 pages touched",
    "refaults_per_1k_pages": "refaults per 1000 pages touched",
    "folios_wasted_per_1k_pages": "folios wasted per 1000 pages touched",
    "pages_wasted_per_1k_pages": "pages wasted (allocated, zeroed, freed unused) per 1000 pages touched",
    "ns_per_page": "free pass only: wall ns per page touched (the simulator does not zero pages: no zeroing cost)",
}

KEYS = ("pass", "policy", "on_race", "memory", "sharing", "cpus")
METRICS = (
    "faults_per_page",
    "faults_per_1k_pages",
    "races_per_1k_faults",
    "retries_per_1k_pages",
    "refaults_per_1k_pages",
    "folios_wasted_per_1k_pages",
    "pages_wasted_per_1k_pages",
    "ptl_contended",
    "mean_folio_kb",
    "ns_per_page",
    "faults",
    "races",
    "retries",
    "refaults",
    "pages_wasted",
)


def _per(n: float, d: float, k: float = 1000.0) -> float:
    return n * k / d if d else 0.0


def _mean_folio_kb(s: Stats) -> float:
    fo = s.folio_orders.astype(float)
    n = fo.sum()
    return float((fo * (PAGE / 1024) * 2.0 ** np.arange(len(fo))).sum() / n) if n else 0.0


def _row(point: dict[str, Any], seed: int, nbytes: int, s: Stats) -> dict[str, Any]:
    pages = int(s.get("ops", 0)) or nbytes // PAGE
    r = s.races
    row = dict(point)
    row.update(
        seed=seed,
        size_bytes=nbytes,
        pages_touched=pages,
        faults=s.faults,
        races=r["races"],
        retries=r["retries"],
        refaults=r["refaults"],
        folios_wasted=r["folios_wasted"],
        pages_wasted=r["pages_wasted"],
        ptl_acquisitions=s.locks.ptl.acquisitions,
        ptl_contended=s.locks.ptl.contended,
        ptl_spins=s.locks.ptl.spins,
        zone_contended=s.locks.zone_lock.contended,
        rss_bytes=s.rss_bytes,
        mean_folio_kb=round(_mean_folio_kb(s), 2),
        elapsed_s=round(s.elapsed_s, 6),
        faults_per_page=round(s.faults / pages, 6) if pages else 0.0,
        faults_per_1k_pages=round(_per(s.faults, pages), 3),
        races_per_1k_faults=round(_per(r["races"], s.faults), 3),
        retries_per_1k_pages=round(_per(r["retries"], pages), 3),
        refaults_per_1k_pages=round(_per(r["refaults"], pages), 3),
        folios_wasted_per_1k_pages=round(_per(r["folios_wasted"], pages), 3),
        pages_wasted_per_1k_pages=round(_per(r["pages_wasted"], pages), 3),
        ns_per_page=round(s.elapsed_s * 1e9 / pages, 2) if point["pass"] == "free" and pages else "",
    )
    return row


def _num(v: Any) -> Optional[float]:
    if v == "" or v is None:
        return None
    return float(v)


def medians(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per point (``KEYS``): for each metric its median, and
    ``<metric>_min`` / ``<metric>_max`` over the runs; ``runs`` counts them."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] if k != "cpus" else int(r[k]) for k in KEYS)].append(r)
    out = []
    for key, grp in groups.items():
        m: dict[str, Any] = dict(zip(KEYS, key))
        m["runs"] = len(grp)
        for c in METRICS:
            vals = [v for v in (_num(r[c]) for r in grp) if v is not None]
            if not vals:
                m[c] = m[c + "_min"] = m[c + "_max"] = ""
                continue
            m[c] = _round(statistics.median(vals))
            m[c + "_min"] = _round(min(vals))
            m[c + "_max"] = _round(max(vals))
        out.append(m)
    out.sort(key=_sort_key)
    return out


def _round(x: float) -> Union[int, float]:
    return int(x) if float(x).is_integer() else round(x, 3)


def _sort_key(r: dict[str, Any]) -> tuple:
    def idx(seq: Sequence[str], v: str) -> int:
        return seq.index(v) if v in seq else 99

    return (idx(PASSES, r["pass"]), idx(tuple(MEMORY), r["memory"]), idx(("interleaved", "disjoint"), r["sharing"]),
            idx(POLICIES, r["policy"]), int(r["cpus"]), idx(ON_RACE, r["on_race"]))


def paired_deltas(rows: Iterable[dict[str, Any]], metrics: Sequence[str] = ("faults_per_1k_pages", "pages_wasted_per_1k_pages")
                  ) -> list[dict[str, Any]]:
    """refault minus retry-lower, paired by seed, for the deterministic runs:
    one row per (policy, memory, sharing, cpus) with the median, min and max
    of each metric's difference over the seeds, and the medians of each side
    (``<metric>_refault``, ``<metric>_retry``). Positive: retry-lower had fewer."""
    by: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if r["pass"] != "deterministic":
            continue
        by[(r["policy"], r["memory"], r["sharing"], int(r["cpus"]), int(r["seed"]))][r["on_race"]] = r
    groups: dict[tuple, list[dict[str, float]]] = defaultdict(list)
    for (pol, mem, sh, nc, _seed), pair in by.items():
        if set(pair) != set(ON_RACE):
            continue
        d = {}
        for mtr in metrics:
            a, b = (_metric(pair[o], mtr) for o in ON_RACE)
            d[mtr] = a - b
            d[mtr + "_refault"] = a
            d[mtr + "_retry"] = b
        groups[(pol, mem, sh, nc)].append(d)
    out = []
    for (pol, mem, sh, nc), ds in groups.items():
        o: dict[str, Any] = dict(policy=pol, memory=mem, sharing=sh, cpus=nc, seeds=len(ds))
        for mtr in metrics:
            vals = [d[mtr] for d in ds]
            o[mtr] = _round(statistics.median(vals))
            o[mtr + "_min"] = _round(min(vals))
            o[mtr + "_max"] = _round(max(vals))
            o[mtr + "_refault"] = _round(statistics.median(d[mtr + "_refault"] for d in ds))
            o[mtr + "_retry"] = _round(statistics.median(d[mtr + "_retry"] for d in ds))
        out.append(o)
    out.sort(key=lambda r: _sort_key(dict(r, **{"pass": "deterministic", "on_race": "refault"})))
    return out


def _metric(r: dict[str, Any], name: str) -> float:
    return float(r[name])


# ----------------------------------------------------------------------------
# race-policies


@dataclasses.dataclass
class RacePoliciesResult:
    """What :func:`race_policies` produced."""

    out: str
    rows: list[dict[str, Any]]
    medians: list[dict[str, Any]]
    deltas: list[dict[str, Any]]
    findings: list[str]
    files: list[str]
    wall_s: float


def race_policies(
    out: Union[str, "os.PathLike[str]"] = os.path.join("out", "race-policies"),
    *,
    size: Union[int, str] = "48M",
    cpus: Sequence[int] = (1, 2, 4, 8),
    seeds: int = 7,
    first_seed: int = 1,
    policies: Sequence[str] = POLICIES,
    on_race: Sequence[str] = ON_RACE,
    sharing: Sequence[str] = ("disjoint", "interleaved"),
    memory: Sequence[str] = tuple(MEMORY),
    free_size: Union[int, str, None] = "4G",
    free_threads: Sequence[int] = (1, 2),
    free_repeat: int = 5,
    workload: str = "sequential",
    config: Optional[Config] = None,
    plots: bool = True,
    jobs: Optional[int] = None,
    log: Optional[TextIO] = None,
) -> RacePoliciesResult:
    """Runs the race-policies experiment and writes its files into ``out``.

    ``size``/``cpus``/``seeds``: the deterministic pass (seeds
    ``first_seed .. first_seed + seeds - 1``; each seeds both the
    interleaving and the failure injection). ``free_size``/``free_threads``/
    ``free_repeat``: the free-running pass (``free_size=None`` or
    ``free_repeat=0`` skips it). ``jobs``: deterministic runs at once (their
    results do not depend on it; default: the host's CPUs, at most 4)."""
    out = os.fspath(out)
    base = config or RACE_POLICIES_CONFIG
    for m in memory:
        if m not in MEMORY:
            raise ValueError(f"unknown memory condition {m!r} (have: {', '.join(MEMORY)})")
    nbytes = _bytes(size)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()

    def cfg_for(pol: str, orr: str, mem: str, seed: int) -> Config:
        return base.replace(policy=pol, on_race=orr, seed=seed, **MEMORY[mem])

    # Deterministic pass: results do not depend on timing, so run a few at once.
    jobs_det = []
    for mem in memory:
        for sh in sharing:
            for pol in policies:
                for nc in cpus:
                    for orr in on_race:
                        for k in range(seeds):
                            seed = first_seed + k
                            pt = {"pass": "deterministic", "policy": pol, "on_race": orr, "memory": mem,
                                  "sharing": sh, "cpus": int(nc)}
                            jobs_det.append((pt, seed))

    keep_orders: dict[str, np.ndarray] = {}
    top = max(cpus) if cpus else 1

    def run_det(job: tuple[dict[str, Any], int]) -> dict[str, Any]:
        pt, seed = job
        s = Simulator(cfg_for(pt["policy"], pt["on_race"], pt["memory"], seed)).run(
            workload, nbytes, threads=pt["cpus"], sharing=pt["sharing"], deterministic=seed)
        if (seed == first_seed and pt["cpus"] == top and pt["sharing"] == "interleaved"
                and pt["memory"] == memory[-1]):
            keep_orders[f"{pt['policy']} / {pt['on_race']}"] = s.folio_orders.copy()
        return _row(pt, seed, nbytes, s)

    nj = jobs or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, nj)) as ex:
        rows = list(ex.map(run_det, jobs_det))
    t_det = time.perf_counter() - t0
    if log is not None:
        log.write(f"race-policies: deterministic pass: {len(rows)} runs over {format_bytes(nbytes)} "
                  f"in {t_det:.1f} s\n")

    # Free-running pass: one run at a time (they time the host).
    free_bytes = _bytes(free_size) if free_size is not None else 0
    t1 = time.perf_counter()
    if free_bytes and free_repeat > 0 and free_threads:
        for k in range(free_repeat):  # repeats outermost: drifts in the host spread over every point
            for mem in memory:
                for sh in sharing:
                    for pol in policies:
                        for nt in free_threads:
                            for orr in on_race:
                                pt = {"pass": "free", "policy": pol, "on_race": orr, "memory": mem,
                                      "sharing": sh, "cpus": int(nt)}
                                s = Simulator(cfg_for(pol, orr, mem, first_seed + k)).run(
                                    workload, free_bytes, threads=nt, sharing=sh)
                                rows.append(_row(pt, first_seed + k, free_bytes, s))
        if log is not None:
            log.write(f"race-policies: free-running pass: {free_repeat} repeat(s) over "
                      f"{format_bytes(free_bytes)} in {time.perf_counter() - t1:.1f} s\n")

    meds = medians(rows)
    deltas = paired_deltas(rows)
    text = findings(meds, deltas, rows)
    wall = time.perf_counter() - t0

    files = ["results.csv", "medians.csv", "results.md"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, "medians.csv"), "w", newline="") as f:
        cols = list(KEYS) + ["runs"] + [x for c in METRICS for x in (c, c + "_min", c + "_max")]
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(meds)

    pngs: list[str] = []
    note = ""
    if plots and plot.available():
        pngs = _race_plots(out, meds, deltas, keep_orders, base, nbytes, free_bytes, workload, seeds)
    elif plots:
        note = "matplotlib is not installed: no plots (pip install matplotlib)"
        if log is not None:
            log.write(f"race-policies: {note}\n")
    files += pngs

    params = dict(size=nbytes, cpus=list(cpus), seeds=seeds, first_seed=first_seed, free_size=free_bytes,
                  free_threads=list(free_threads), free_repeat=free_repeat, workload=workload)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(_race_markdown(meds, deltas, text, base, params, pngs, note, wall))
    if log is not None:
        log.write(f"race-policies: wrote {out}/{', '.join(files)} in {wall:.1f} s\n")
        for line in text:
            log.write(f"  - {line}\n")
    return RacePoliciesResult(out=out, rows=rows, medians=meds, deltas=deltas, findings=text, files=files, wall_s=wall)


def _bytes(size: Union[int, str]) -> int:
    return _anonfolio.parse_bytes(size) if isinstance(size, str) else int(size)


# ----------------------------------------------------------------------------
# Findings: sentences computed from the numbers (never a canned conclusion).


def _f(x: float, nd: int = 1) -> str:
    """A number for prose: thousands separators, ``nd`` decimals (none for big ones)."""
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.{nd}f}"


def _range(d: dict[str, Any], key: str) -> str:
    return f"{_f(d[key + '_min'])}..{_f(d[key + '_max'])}"


def _med(meds: list[dict[str, Any]], *key: Any) -> Optional[dict[str, Any]]:
    """The medians row of a point (``KEYS`` order), or None."""
    return next((m for m in meds if tuple(m[k] for k in KEYS) == key), None)


def _delta_sentence(d: dict[str, Any]) -> str:
    """'upstream: retry-lower saved 9.2 faults per 1000 pages (...) and wasted 43.5 fewer pages per 1000 (...)'."""
    df, dw = d["faults_per_1k_pages"], d["pages_wasted_per_1k_pages"]
    base = d["faults_per_1k_pages_refault"]
    if df == 0:
        f = "took as many faults as refault (per-seed difference "
    else:
        f = (f"{'saved' if df > 0 else 'took'} {_f(abs(df))} {'' if df > 0 else 'more '}faults per 1000 pages touched "
             f"({_f(_per(abs(df), base, 100))}% of refault's {_f(base)}; per-seed difference ")
    f += f"{_range(d, 'faults_per_1k_pages')})"
    if dw == 0:
        w = "wasted as many pages as refault"
    else:
        w = f"wasted {_f(abs(dw))} {'fewer' if dw > 0 else 'more'} pages per 1000"
    w += f" (per-seed difference {_range(d, 'pages_wasted_per_1k_pages')})"
    return f"{d['policy']}: retry-lower {f} and {w}"


def findings(meds: list[dict[str, Any]], deltas: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    """The findings paragraph, one sentence (or a few) per item, computed
    from the medians, the paired deltas and the runs."""
    out: list[str] = []
    det = [r for r in rows if r["pass"] == "deterministic"]
    if det:
        nseeds = len({r["seed"] for r in det})
        # 1. When does retry-lower act at all?
        for mem in MEMORY:
            rl = [r for r in det if r["memory"] == mem and r["on_race"] == "retry-lower"]
            if not rl:
                continue
            retries = sum(int(r["retries"]) for r in rl)
            ds = [d for d in deltas if d["memory"] == mem]
            same = all(d["faults_per_1k_pages_min"] == 0 == d["faults_per_1k_pages_max"]
                       and d["pages_wasted_per_1k_pages_min"] == 0 == d["pages_wasted_per_1k_pages_max"] for d in ds)
            races = sum(int(r["races"]) for r in rl)
            s = (f"Memory {mem} (deterministic pass): retry-lower retried {retries:,} times in {len(rl)} runs "
                 f"that lost {races:,} races")
            if retries == 0 and same:
                s += ("; it never acted, and every paired run gave the same faults and wasted pages as refault "
                      "(the racer's folio always covered the loser's page).")
            elif same:
                s += "; paired runs still gave the same faults and wasted pages as refault."
            else:
                s += f" ({_f(_per(retries, races, 100))}% of its lost races)."
            out.append(s)
        # 2. The comparison where they differ: interleaved, most CPUs, each memory condition with retries.
        top = max(int(r["cpus"]) for r in det)
        for mem in MEMORY:
            pts = [d for d in deltas if d["memory"] == mem and d["sharing"] == "interleaved" and d["cpus"] == top]
            if not pts or all(d["faults_per_1k_pages_min"] == 0 == d["faults_per_1k_pages_max"]
                              and d["pages_wasted_per_1k_pages_min"] == 0 == d["pages_wasted_per_1k_pages_max"]
                              for d in pts):
                continue
            parts = [_delta_sentence(d) for d in pts]
            out.append(f"Memory {mem}, interleaved, {top} CPUs (deterministic, median of {nseeds} seeds, refault "
                       "and retry-lower paired by seed): " + "; ".join(parts) + ".")
            direct = []
            for d in pts:
                mr = _med(meds, "deterministic", d["policy"], "refault", mem, "interleaved", top)
                mt = _med(meds, "deterministic", d["policy"], "retry-lower", mem, "interleaved", top)
                if mr and mt:
                    direct.append(f"{d['policy']} {_f(mr['refaults_per_1k_pages'], 2)} refaults "
                                  f"({_f(_per(mr['refaults_per_1k_pages'], mr['faults_per_1k_pages'], 100), 2)}% of its "
                                  f"faults) against {_f(mt['retries_per_1k_pages'], 2)} retries")
            if direct:
                out.append(f"Counted directly at the same point (medians per 1000 pages touched; a refault is the extra "
                           f"fault that retry-lower replaces by a retry): " + "; ".join(direct) + ".")
        # 3. Race handling against order selection.
        frag = [m for m in meds if m["pass"] == "deterministic" and m["sharing"] == "interleaved"
                and int(m["cpus"]) == top and m["on_race"] == "refault"]
        if frag:
            mem = list(MEMORY)[-1] if any(m["memory"] == list(MEMORY)[-1] for m in frag) else frag[0]["memory"]
            pts = [m for m in frag if m["memory"] == mem]
            fpp: dict[str, float] = {m["policy"]: float(m["faults_per_1k_pages"]) for m in pts}
            lo, hi = min(fpp, key=lambda k: fpp[k]), max(fpp, key=lambda k: fpp[k])
            diffs = [abs(float(d["faults_per_1k_pages"])) for d in deltas if d["memory"] == mem]
            big = max(diffs) if diffs else 0.0
            out.append(
                f"Order selection moves faults more than race handling: at the same point (memory {mem}, interleaved, "
                f"{top} CPUs, refault) faults per 1000 pages run from {_f(fpp[lo])} ({lo}) to {_f(fpp[hi])} ({hi}), "
                f"a spread of {_f(fpp[hi] - fpp[lo])}, while the largest median refault-vs-retry-lower difference "
                f"anywhere under {mem} memory is {_f(big)}."
                if big < fpp[hi] - fpp[lo] else
                f"Race handling moves faults as much as order selection here: at memory {mem}, interleaved, {top} CPUs, "
                f"refault, faults per 1000 pages run from {_f(fpp[lo])} ({lo}) to {_f(fpp[hi])} ({hi}), while the "
                f"largest median refault-vs-retry-lower difference under {mem} memory is {_f(big)}."
            )
        # 4. Controls.
        one = [r for r in det if int(r["cpus"]) == 1]
        dis = [r for r in det if r["sharing"] == "disjoint"]
        out.append(
            f"Controls: 1-CPU runs lost {sum(int(r['races']) for r in one):,} races in {len(one)} runs; "
            f"disjoint slices lost {sum(int(r['races']) for r in dis):,} in {len(dis)} runs."
        )
    free = [r for r in rows if r["pass"] == "free"]
    if free:
        ncpu = os.cpu_count() or 1
        nt = max(int(r["cpus"]) for r in free)
        for sh in ("interleaved", "disjoint"):
            multi = [r for r in free if int(r["cpus"]) > 1 and r["sharing"] == sh]
            if not multi:
                continue
            rpk = [float(r["races_per_1k_faults"]) for r in multi]
            ptl = [int(r["ptl_contended"]) for r in multi]
            out.append(
                f"Free-running host threads ({ncpu} host CPUs, {sh}, {nt} threads, {len(multi)} runs): median "
                f"{_f(statistics.median(rpk), 2)} races per 1000 faults (range {_f(min(rpk), 2)}..{_f(max(rpk), 2)}), "
                f"median {_f(statistics.median(ptl), 0)} contended PTL acquisitions per run (max {max(ptl):,})."
            )
        mem = list(MEMORY)[-1]
        sel = [r for r in free if r["memory"] == mem and r["sharing"] == "interleaved" and int(r["cpus"]) == nt]
        ref = [r for r in sel if r["on_race"] == "refault"]
        ret = [r for r in sel if r["on_race"] == "retry-lower"]
        if ref and ret and nt > 1:
            rf = statistics.median(float(r["refaults_per_1k_pages"]) for r in ref)
            share = statistics.median(_per(float(r["refaults"]), float(r["faults"]), 100) for r in ref)
            rt = statistics.median(float(r["retries_per_1k_pages"]) for r in ret)
            out.append(
                f"Free pass, memory {mem}, interleaved, {nt} threads, all policies: refault mode refaulted a median "
                f"{_f(rf, 2)} times per 1000 pages touched ({_f(share, 2)}% of its faults: the faults retry-lower "
                f"could save); retry-lower retried {_f(rt, 2)} times per 1000 pages."
            )
        # ns per page: refault vs retry-lower where they differ in principle.
        cmp = []
        for orr in ON_RACE:
            v = [float(r["ns_per_page"]) for r in sel if r["on_race"] == orr]
            if v:
                cmp.append((orr, statistics.median(v), min(v), max(v)))
        if len(cmp) == 2:
            (a, ma, la, ha), (b, mb, lb, hb) = cmp
            overlap = not (ha < lb or hb < la)
            out.append(
                f"Wall time (free pass, memory {mem}, interleaved, {nt} threads, all policies): {a} {_f(ma)} ns/page "
                f"(range {_f(la)}..{_f(ha)}), {b} {_f(mb)} ns/page (range {_f(lb)}..{_f(hb)}): "
                + ("the ranges overlap, so no difference is measurable here." if overlap
                   else f"{'retry-lower' if mb < ma else 'refault'} was faster in every run.")
            )
    return out


# ----------------------------------------------------------------------------
# results.md


def _cell(v: Any) -> str:
    if v == "" or v is None:
        return "–"
    if isinstance(v, float):
        return _f(v, 2) if abs(v) < 10 else _f(v, 1)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _mm(m: dict[str, Any], c: str) -> str:
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


def _race_markdown(meds: list[dict[str, Any]], deltas: list[dict[str, Any]], text: list[str], cfg: Config,
                   params: dict[str, Any], pngs: list[str], note: str, wall: float) -> str:
    lines = [
        "# race-policies: is retry-lower worth it?",
        "",
        f"Workload `{params['workload']}` (one VMA, MADV_HUGEPAGE), THP knobs: {_sizes(cfg)}. "
        f"Deterministic pass: {format_bytes(params['size'])} per run, CPUs {params['cpus']}, seeds "
        f"{params['first_seed']}..{params['first_seed'] + params['seeds'] - 1} (interleaving and failure injection). "
        + (f"Free pass: {format_bytes(params['free_size'])} per run, host threads {params['free_threads']}, "
           f"{params['free_repeat']} repeat(s) on a {os.cpu_count()}-CPU host. " if params["free_size"] and params["free_repeat"] else "")
        + f"Memory: " + ", ".join(f"{k} ({', '.join(f'{a}={b}' for a, b in v.items()) or 'no failures'})"
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
    lines += _table(["memory", "sharing", "policy", "CPUs", "on_race"] + cols,
                    ([m["memory"], m["sharing"], m["policy"], str(m["cpus"]), m["on_race"]] + [_mm(m, c) for c in cols]
                     for m in det), left=5)
    free = [m for m in meds if m["pass"] == "free"]
    if free:
        cols = ["ns_per_page", "faults_per_1k_pages", "races_per_1k_faults", "refaults_per_1k_pages",
                "retries_per_1k_pages", "pages_wasted_per_1k_pages", "ptl_contended", "mean_folio_kb"]
        lines += ["", "## Free-running pass: medians [min..max] over the repeats", ""]
        lines += _table(["memory", "sharing", "policy", "threads", "on_race"] + cols,
                        ([m["memory"], m["sharing"], m["policy"], str(m["cpus"]), m["on_race"]] + [_mm(m, c) for c in cols]
                         for m in free), left=5)
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in pngs]
    if note:
        lines += ["", note]
    lines += ["", "## Columns (results.csv)", ""]
    lines += [f"- `{k}`: {v}" for k, v in COLUMNS.items()]
    lines.append("")
    return "\n".join(lines)


def _sizes(cfg: Config) -> str:
    on = [f"{s}={m}" for s, m in cfg.hugepages.items() if m != "never"]
    return f"enabled={cfg.enabled}, " + (", ".join(on) if on else "no mTHP sizes")


def _race_plots(out: str, meds: list[dict[str, Any]], deltas: list[dict[str, Any]], orders: dict[str, np.ndarray],
                cfg: Config, nbytes: int, free_bytes: int, workload: str, seeds: int) -> list[str]:
    written = []
    det = [m for m in meds if m["pass"] == "deterministic" and m["sharing"] == "interleaved"]
    sub = f"{workload} over {format_bytes(nbytes)}, interleaved, deterministic ({seeds} seeds: median, min..max)"
    for name, y, ylabel, title, share in () if not det else (
        ("faults.png", "faults_per_1k_pages", "faults per 1000 pages touched",
         "Faults per 1000 pages touched (each panel its own scale)", False),
        ("waste.png", "pages_wasted_per_1k_pages", "pages wasted per 1000 touched",
         "Pages allocated, zeroed and freed unused after lost races", True),
    ):
        plot.grid_plot(det, x="cpus", y=y, hue="on_race", row="memory", col="policy", sharey=share,
                       path=os.path.join(out, name), title=f"{title}\n{sub}", ylabel=ylabel, xlabel="CPUs")
        written.append(name)
    # The answer in one picture: paired differences.
    long = []
    for d in deltas:
        if d["sharing"] != "interleaved":
            continue
        for mtr, label in (("faults_per_1k_pages", "faults saved per 1000 pages"),
                           ("pages_wasted_per_1k_pages", "pages wasted less per 1000 pages")):
            long.append(dict(policy=d["policy"], memory=d["memory"], cpus=d["cpus"], metric=label,
                             value=d[mtr], value_min=d[mtr + "_min"], value_max=d[mtr + "_max"]))
    if long:
        plot.grid_plot(long, x="cpus", y="value", hue="policy", row="memory", col="metric", sharey=False,
                       zero_line=True, path=os.path.join(out, "delta.png"), xlabel="CPUs",
                       ylabel="refault − retry-lower",
                       title="What retry-lower buys over refault (positive = retry-lower better)\n"
                             f"{sub}; paired by seed")
        written.append("delta.png")
    free = [m for m in meds if m["pass"] == "free" and m["sharing"] == "interleaved"]
    if free:
        long = []
        for m in free:
            for mtr, label in (("ns_per_page", "ns per page touched"), ("ptl_contended", "PTL contended acquisitions per run"),
                               ("races_per_1k_faults", "races per 1000 faults")):
                long.append(dict(m, metric=label, value=m[mtr], value_min=m[mtr + "_min"], value_max=m[mtr + "_max"],
                                 x=f"{m['policy']}\n{m['cpus']} thr"))
        plot.bar_grid(long, x="x", y="value", hue="on_race", row="memory", col="metric",
                      path=os.path.join(out, "free-running.png"),
                      title=f"Free-running host threads ({os.cpu_count()} CPUs), {workload} over "
                            f"{format_bytes(free_bytes)}, interleaved: median, min..max")
        written.append("free-running.png")
    if orders:
        plot.folio_histogram({k: _FakeStats(v) for k, v in orders.items()}, path=os.path.join(out, "folio-sizes.png"),
                             title=f"Mapped memory by folio size: {list(MEMORY)[-1]} memory, "
                                   f"{max(int(m['cpus']) for m in det) if det else 1} CPUs interleaved, one seed")
        written.append("folio-sizes.png")
    return written


class _FakeStats:
    """Just enough of :class:`Stats` for :func:`plot.folio_histogram`."""

    def __init__(self, fo: np.ndarray):
        self.folio_orders = fo


# ----------------------------------------------------------------------------
# scaling

SCALING_COLUMNS: dict[str, str] = {
    "workload": "page_fault1 (each thread maps SIZE, writes a byte a page, unmaps; ITERATIONS times) or sequential (SIZE split between threads)",
    "threads": "host threads",
    "repeat": "repeat index",
    "ops": "pages touched",
    "faults": "page faults",
    "elapsed_s": "wall seconds simulating",
    "ops_per_s": "pages touched per second",
    "linear_ops_per_s": "1-thread ops/s (median) x threads",
    "efficiency": "ops_per_s / linear_ops_per_s",
    "mmap_contended": "mmap_lock acquisitions that found it held",
    "ptl_contended": "PTE-table lock acquisitions that found it held",
    "zone_contended": "zone->lock acquisitions that found it held",
}


@dataclasses.dataclass
class ScalingResult:
    rows: list[dict[str, Any]]
    medians: list[dict[str, Any]]
    table: str
    files: list[str]


def scaling(
    *,
    workload: str = "page_fault1",
    threads: Sequence[int] = (1, 2, 4),
    size: Union[int, str, None] = None,
    iterations: int = 10,
    repeat: int = 3,
    config: Optional[Config] = None,
    out: Union[str, "os.PathLike[str]", None] = None,
    plots: bool = True,
    log: Optional[TextIO] = None,
) -> ScalingResult:
    """Pages touched per second with 1, 2, 4 ... free-running host threads,
    the linear reference (1-thread rate x N) and the efficiency.

    ``page_fault1`` (will-it-scale's): each thread maps ``size`` (default
    128M), writes a byte a page, unmaps, ``iterations`` times. ``sequential``:
    one range of ``size`` (default 1G) split between the threads."""
    if workload not in ("page_fault1", "sequential"):
        raise ValueError(f"scaling: workload must be page_fault1 or sequential, not {workload!r}")
    cfg = config or RACE_POLICIES_CONFIG
    nbytes = _bytes(size if size is not None else ("128M" if workload == "page_fault1" else "1G"))
    threads = sorted(set(int(t) for t in threads))
    rows: list[dict[str, Any]] = []
    for rep in range(repeat):
        for nt in threads:
            kw: dict[str, Any] = dict(threads=nt)
            if workload == "page_fault1":
                kw["iterations"] = iterations
            s = Simulator(cfg).run(workload, nbytes, **kw)
            ops = int(s.get("ops", 0))
            rows.append(dict(workload=workload, threads=nt, repeat=rep, ops=ops, faults=s.faults,
                             elapsed_s=round(s.elapsed_s, 6),
                             ops_per_s=round(ops / s.elapsed_s) if s.elapsed_s > 0 else 0,
                             mmap_contended=s.locks.mmap_lock.contended, ptl_contended=s.locks.ptl.contended,
                             zone_contended=s.locks.zone_lock.contended))
    meds = []
    for nt in threads:
        grp = [r for r in rows if r["threads"] == nt]
        m: dict[str, Any] = {"workload": workload, "threads": nt, "runs": len(grp)}
        for c in ("ops", "faults", "elapsed_s", "ops_per_s", "mmap_contended", "ptl_contended", "zone_contended"):
            vals = [r[c] for r in grp]
            med = statistics.median(vals)
            m[c] = round(med, 6) if c == "elapsed_s" else int(round(med))
            m[c + "_min"], m[c + "_max"] = min(vals), max(vals)
        meds.append(m)
    one = next((m["ops_per_s"] for m in meds if m["threads"] == 1), None)
    if one is None:  # no 1-thread point: scale from the smallest
        one = meds[0]["ops_per_s"] / meds[0]["threads"]
    for m in meds:
        m["linear_ops_per_s"] = round(one * m["threads"])
        m["efficiency"] = round(m["ops_per_s"] / m["linear_ops_per_s"], 3) if m["linear_ops_per_s"] else 0.0
    for r in rows:
        r["linear_ops_per_s"] = round(one * r["threads"])
        r["efficiency"] = round(r["ops_per_s"] / r["linear_ops_per_s"], 3) if r["linear_ops_per_s"] else 0.0

    what = (f"{workload}: " + (f"{format_bytes(nbytes)} per thread x {iterations} iteration(s)"
                               if workload == "page_fault1" else f"{format_bytes(nbytes)} split between the threads")
            + f"; policy {cfg.policy}, {_sizes(cfg)}; median of {repeat} run(s) on a {os.cpu_count()}-CPU host")
    hdr = ["threads", "ops/s", "linear ops/s", "efficiency", "range ops/s", "faults", "mmap contended", "zone contended"]
    body = [[str(m["threads"]), f"{m['ops_per_s']:,}", f"{m['linear_ops_per_s']:,}", f"{m['efficiency']:.2f}",
             f"{m['ops_per_s_min']:,}..{m['ops_per_s_max']:,}", f"{m['faults']:,}", f"{m['mmap_contended']:,}",
             f"{m['zone_contended']:,}"] for m in meds]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(hdr)]
    table = "\n".join([what, ""] + ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [hdr] + body])

    files: list[str] = []
    if out is not None:
        out = os.fspath(out)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "scaling.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(SCALING_COLUMNS))
            w.writeheader()
            w.writerows(rows)
        files.append("scaling.csv")
        with open(os.path.join(out, "scaling.md"), "w") as f:
            f.write("# scaling\n\n```\n" + table + "\n```\n")
        files.append("scaling.md")
        if plots and plot.available():
            plot.scaling_plot(meds, path=os.path.join(out, "scaling.png"), title=f"Scaling\n{what}")
            files.append("scaling.png")
        elif plots and log is not None:
            log.write("scaling: matplotlib is not installed: no plot (pip install matplotlib)\n")
    if log is not None and files:
        log.write(f"scaling: wrote {out}/{', '.join(files)}\n")
    return ScalingResult(rows=rows, medians=meds, table=table, files=files)


if __name__ == "__main__":  # pragma: no cover
    race_policies(log=sys.stderr)
