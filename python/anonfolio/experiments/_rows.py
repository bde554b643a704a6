"""race-policies: one row per run, and what is computed over the rows:
medians per point and refault-vs-retry-lower differences paired by seed."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np

from .. import _anonfolio
from ..config import POLICIES
from ..stats import Stats
from ._grid import KEYS, MEMORY, METRICS, ON_RACE, PAGE, PASSES, DeltaRow, MedianRow, Point, RaceRow


def per(n: float, d: float, k: float = 1000.0) -> float:
    return n * k / d if d else 0.0


def _mean_folio_kb(s: Stats) -> float:
    fo = s.folio_orders.astype(float)
    n = fo.sum()
    return float((fo * (PAGE / 1024) * 2.0 ** np.arange(len(fo))).sum() / n) if n else 0.0


def run_row(point: Point, seed: int, nbytes: int, s: Stats) -> RaceRow:
    pages = int(s.get("ops", 0)) or nbytes // PAGE
    r = s.races
    return {
        **point,
        "seed": seed,
        "size_bytes": nbytes,
        "pages_touched": pages,
        "faults": s.faults,
        "races": r["races"],
        "retries": r["retries"],
        "refaults": r["refaults"],
        "folios_wasted": r["folios_wasted"],
        "pages_wasted": r["pages_wasted"],
        "ptl_acquisitions": s.locks.ptl.acquisitions,
        "ptl_contended": s.locks.ptl.contended,
        "ptl_spins": s.locks.ptl.spins,
        "zone_contended": s.locks.zone_lock.contended,
        "rss_bytes": s.rss_bytes,
        "mean_folio_kb": round(_mean_folio_kb(s), 2),
        "elapsed_s": round(s.elapsed_s, 6),
        "faults_per_page": round(s.faults / pages, 6) if pages else 0.0,
        "faults_per_1k_pages": round(per(s.faults, pages), 3),
        "races_per_1k_faults": round(per(r["races"], s.faults), 3),
        "retries_per_1k_pages": round(per(r["retries"], pages), 3),
        "refaults_per_1k_pages": round(per(r["refaults"], pages), 3),
        "folios_wasted_per_1k_pages": round(per(r["folios_wasted"], pages), 3),
        "pages_wasted_per_1k_pages": round(per(r["pages_wasted"], pages), 3),
        "ns_per_page": round(s.elapsed_s * 1e9 / pages, 2) if point["pass"] == "free" and pages else "",
    }


def _num(v: Any) -> Optional[float]:
    if v == "" or v is None:
        return None
    return float(v)


def medians(rows: Iterable[Mapping[str, Any]]) -> list[MedianRow]:
    """One row per point (``KEYS``): for each metric its median, and
    ``<metric>_min`` / ``<metric>_max`` over the runs; ``runs`` counts them."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] if k != "cpus" else int(r[k]) for k in KEYS)].append(r)
    out: list[MedianRow] = []
    for key, grp in groups.items():
        m: MedianRow = dict(zip(KEYS, key))
        m["runs"] = len(grp)
        for c in METRICS:
            vals = [v for v in (_num(r[c]) for r in grp) if v is not None]
            if not vals:
                m[c] = m[c + "_min"] = m[c + "_max"] = ""
                continue
            m[c] = round_figure(statistics.median(vals))
            m[c + "_min"] = round_figure(min(vals))
            m[c + "_max"] = round_figure(max(vals))
        out.append(m)
    out.sort(key=sort_key)
    return out


def round_figure(x: float) -> Union[int, float]:
    return int(x) if float(x).is_integer() else round(x, 3)


def sort_key(r: Mapping[str, Any]) -> tuple[int, ...]:
    def idx(seq: Sequence[str], v: str) -> int:
        return seq.index(v) if v in seq else 99

    return (idx(PASSES, r["pass"]), idx(tuple(MEMORY), r["memory"]), idx(("interleaved", "disjoint"), r["sharing"]),
            idx(POLICIES, r["policy"]), int(r["cpus"]), idx(ON_RACE, r["on_race"]))


def paired_deltas(rows: Iterable[Mapping[str, Any]],
                  metrics: Sequence[str] = ("faults_per_1k_pages", "pages_wasted_per_1k_pages")) -> list[DeltaRow]:
    """refault minus retry-lower, paired by seed, for the deterministic runs:
    one row per (policy, memory, sharing, cpus) with the median, min and max
    of each metric's difference over the seeds, and the medians of each side
    (``<metric>_refault``, ``<metric>_retry``). Positive: retry-lower had fewer."""
    by: dict[tuple[str, str, str, int, int], dict[str, Mapping[str, Any]]] = defaultdict(dict)
    for r in rows:
        if r["pass"] != "deterministic":
            continue
        by[(r["policy"], r["memory"], r["sharing"], int(r["cpus"]), int(r["seed"]))][r["on_race"]] = r
    groups: dict[tuple[str, str, str, int], list[dict[str, float]]] = defaultdict(list)
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
    out: list[DeltaRow] = []
    for (pol, mem, sh, nc), ds in groups.items():
        o: DeltaRow = dict(policy=pol, memory=mem, sharing=sh, cpus=nc, seeds=len(ds))
        for mtr in metrics:
            vals = [d[mtr] for d in ds]
            o[mtr] = round_figure(statistics.median(vals))
            o[mtr + "_min"] = round_figure(min(vals))
            o[mtr + "_max"] = round_figure(max(vals))
            o[mtr + "_refault"] = round_figure(statistics.median(d[mtr + "_refault"] for d in ds))
            o[mtr + "_retry"] = round_figure(statistics.median(d[mtr + "_retry"] for d in ds))
        out.append(o)
    out.sort(key=lambda r: sort_key(dict(r, **{"pass": "deterministic", "on_race": "refault"})))
    return out


def _metric(r: Mapping[str, Any], name: str) -> float:
    return float(r[name])


def byte_count(size: Union[int, str]) -> int:
    return _anonfolio.parse_bytes(size) if isinstance(size, str) else int(size)
