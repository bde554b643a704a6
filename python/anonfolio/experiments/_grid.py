"""race-policies: the axes of the experiment (policies, race handling,
memory conditions, passes), its default THP knobs and the columns of
``results.csv`` with the shape of a row (:data:`RaceRow`)."""

from __future__ import annotations

from typing import Any, TypedDict, Union

from .. import _anonfolio
from ..config import Config

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
    "on_race": "after a lost race: refault (drop the folio, fault again) or retry-lower "
    "(v1: retry one order lower in the same fault)",
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

#: One point of the grid: the values of ``KEYS``. (Functional syntax: ``pass``
#: is a Python keyword.)
Point = TypedDict(
    "Point",
    {"pass": str, "policy": str, "on_race": str, "memory": str, "sharing": str, "cpus": int},
)

#: One run: a row of ``results.csv``, the keys of :data:`COLUMNS` in order.
#: ``ns_per_page`` is ``""`` in the deterministic pass (it has no wall time).
RaceRow = TypedDict(
    "RaceRow",
    {
        "pass": str,
        "policy": str,
        "on_race": str,
        "memory": str,
        "sharing": str,
        "cpus": int,
        "seed": int,
        "size_bytes": int,
        "pages_touched": int,
        "faults": int,
        "races": int,
        "retries": int,
        "refaults": int,
        "folios_wasted": int,
        "pages_wasted": int,
        "ptl_acquisitions": int,
        "ptl_contended": int,
        "ptl_spins": int,
        "zone_contended": int,
        "rss_bytes": int,
        "mean_folio_kb": float,
        "elapsed_s": float,
        "faults_per_page": float,
        "faults_per_1k_pages": float,
        "races_per_1k_faults": float,
        "retries_per_1k_pages": float,
        "refaults_per_1k_pages": float,
        "folios_wasted_per_1k_pages": float,
        "pages_wasted_per_1k_pages": float,
        "ns_per_page": Union[float, str],
    },
)

class RaceParams(TypedDict):
    """The sizes and counts a race-policies run was made with (results.md)."""

    size: int
    cpus: list[int]
    seeds: int
    first_seed: int
    free_size: int
    free_threads: list[int]
    free_repeat: int
    workload: str


#: One point's medians (``medians()``): the ``KEYS``, ``runs``, and for each
#: of ``METRICS`` its median, ``<metric>_min`` and ``<metric>_max`` (``""``
#: where no run has the metric). The keys are made from ``METRICS``, so the
#: values are not typed one by one.
MedianRow = dict[str, Any]

#: One paired comparison (``paired_deltas()``): policy, memory, sharing, cpus,
#: seeds, and for each metric compared ``<metric>`` (the median of
#: refault - retry-lower), ``_min``, ``_max``, ``_refault`` and ``_retry``.
DeltaRow = dict[str, Any]
