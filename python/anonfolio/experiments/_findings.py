"""race-policies: the findings paragraph, sentences computed from the
numbers (never a canned conclusion)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from ._grid import KEYS, MEMORY, ON_RACE, DeltaRow, MedianRow
from ._rows import per


def number(x: Union[float, str], nd: int = 1) -> str:
    """A number for prose: thousands separators, ``nd`` decimals (none for big
    ones); a string (``""``: a figure a row does not have) as it is."""
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.{nd}f}"


def _range(d: Mapping[str, Any], key: str) -> str:
    return f"{number(d[key + '_min'])}..{number(d[key + '_max'])}"


def median_of(meds: Sequence[MedianRow], *key: Any) -> Optional[MedianRow]:
    """The medians row of a point (``KEYS`` order), or None."""
    return next((m for m in meds if tuple(m[k] for k in KEYS) == key), None)


def delta_sentence(d: DeltaRow) -> str:
    """'upstream: retry-lower saved 9.2 faults per 1000 pages (...) and wasted 43.5 fewer pages per 1000 (...)'."""
    df, dw = d["faults_per_1k_pages"], d["pages_wasted_per_1k_pages"]
    base = d["faults_per_1k_pages_refault"]
    if df == 0:
        f = "took as many faults as refault (per-seed difference "
    else:
        f = (f"{'saved' if df > 0 else 'took'} {number(abs(df))} {'' if df > 0 else 'more '}"
             "faults per 1000 pages touched "
             f"({number(per(abs(df), base, 100))}% of refault's {number(base)}; per-seed difference ")
    f += f"{_range(d, 'faults_per_1k_pages')})"
    if dw == 0:
        w = "wasted as many pages as refault"
    else:
        w = f"wasted {number(abs(dw))} {'fewer' if dw > 0 else 'more'} pages per 1000"
    w += f" (per-seed difference {_range(d, 'pages_wasted_per_1k_pages')})"
    return f"{d['policy']}: retry-lower {f} and {w}"


def findings(meds: Sequence[MedianRow], deltas: Sequence[DeltaRow], rows: Sequence[Mapping[str, Any]]) -> list[str]:
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
                s += f" ({number(per(retries, races, 100))}% of its lost races)."
            out.append(s)
        # 2. The comparison where they differ: interleaved, most CPUs, each memory condition with retries.
        top = max(int(r["cpus"]) for r in det)
        for mem in MEMORY:
            pts = [d for d in deltas if d["memory"] == mem and d["sharing"] == "interleaved" and d["cpus"] == top]
            if not pts or all(d["faults_per_1k_pages_min"] == 0 == d["faults_per_1k_pages_max"]
                              and d["pages_wasted_per_1k_pages_min"] == 0 == d["pages_wasted_per_1k_pages_max"]
                              for d in pts):
                continue
            parts = [delta_sentence(d) for d in pts]
            out.append(f"Memory {mem}, interleaved, {top} CPUs (deterministic, median of {nseeds} seeds, refault "
                       "and retry-lower paired by seed): " + "; ".join(parts) + ".")
            direct = []
            for d in pts:
                mr = median_of(meds, "deterministic", d["policy"], "refault", mem, "interleaved", top)
                mt = median_of(meds, "deterministic", d["policy"], "retry-lower", mem, "interleaved", top)
                if mr and mt:
                    direct.append(f"{d['policy']} {number(mr['refaults_per_1k_pages'], 2)} refaults "
                                  f"({number(per(mr['refaults_per_1k_pages'], mr['faults_per_1k_pages'], 100), 2)}% "
                                  "of its "
                                  f"faults) against {number(mt['retries_per_1k_pages'], 2)} retries")
            if direct:
                out.append("Counted directly at the same point (medians per 1000 pages touched; a refault is the extra "
                           "fault that retry-lower replaces by a retry): " + "; ".join(direct) + ".")
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
                f"{top} CPUs, refault) faults per 1000 pages run from {number(fpp[lo])} ({lo}) "
                f"to {number(fpp[hi])} ({hi}), "
                f"a spread of {number(fpp[hi] - fpp[lo])}, while the largest median refault-vs-retry-lower difference "
                f"anywhere under {mem} memory is {number(big)}."
                if big < fpp[hi] - fpp[lo] else
                f"Race handling moves faults as much as order selection here: at memory {mem}, interleaved, "
                f"{top} CPUs, refault, faults per 1000 pages run from {number(fpp[lo])} ({lo}) "
                f"to {number(fpp[hi])} ({hi}), while the "
                f"largest median refault-vs-retry-lower difference under {mem} memory is {number(big)}."
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
                f"{number(statistics.median(rpk), 2)} races per 1000 faults "
                f"(range {number(min(rpk), 2)}..{number(max(rpk), 2)}), "
                f"median {number(statistics.median(ptl), 0)} contended PTL acquisitions per run (max {max(ptl):,})."
            )
        mem = list(MEMORY)[-1]
        sel = [r for r in free if r["memory"] == mem and r["sharing"] == "interleaved" and int(r["cpus"]) == nt]
        ref = [r for r in sel if r["on_race"] == "refault"]
        ret = [r for r in sel if r["on_race"] == "retry-lower"]
        if ref and ret and nt > 1:
            rf = statistics.median(float(r["refaults_per_1k_pages"]) for r in ref)
            share = statistics.median(per(float(r["refaults"]), float(r["faults"]), 100) for r in ref)
            rt = statistics.median(float(r["retries_per_1k_pages"]) for r in ret)
            out.append(
                f"Free pass, memory {mem}, interleaved, {nt} threads, all policies: refault mode refaulted a median "
                f"{number(rf, 2)} times per 1000 pages touched ({number(share, 2)}% of its faults: "
                "the faults retry-lower "
                f"could save); retry-lower retried {number(rt, 2)} times per 1000 pages."
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
                f"Wall time (free pass, memory {mem}, interleaved, {nt} threads, all policies): "
                f"{a} {number(ma)} ns/page "
                f"(range {number(la)}..{number(ha)}), {b} {number(mb)} ns/page (range {number(lb)}..{number(hb)}): "
                + ("the ranges overlap, so no difference is measurable here." if overlap
                   else f"{'retry-lower' if mb < ma else 'refault'} was faster in every run.")
            )
    return out
