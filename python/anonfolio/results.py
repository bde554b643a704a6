"""The shapes of the plain dicts anonfolio hands out, as TypedDicts.

The native module (``anonfolio._anonfolio``) returns dicts, the command line
prints them as JSON, and the experiments write them as CSV rows. Where a
dict's keys are fixed, its shape is here, so that a type checker knows
``stats["faults"]`` is an int and a misspelt key is an error. The names of
the counters are the kernel's (``hugepages-*/stats``, ``/proc/vmstat``);
the test suite checks that these shapes and the native module agree.

Dicts whose keys depend on the run (``mthp`` by size, the kernel's
``vmstat``) are ``dict[str, ...]`` of the fixed-key shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, TypedDict

__all__ = [
    "MthpCounters",
    "VmstatCounters",
    "RaceCounters",
    "FaultPaths",
    "LockFigures",
    "Locks",
    "MemoryFigures",
    "StatsDict",
    "RunDict",
    "VmaDict",
    "ConfigDict",
    "ConfigJson",
    "KernelRun",
    "KernelReplay",
    "ValidateRow",
    "ValidateResult",
]


class MthpCounters(TypedDict):
    """``/sys/kernel/mm/transparent_hugepage/hugepages-<size>/stats/*`` of one size."""

    anon_fault_alloc: int
    anon_fault_fallback: int
    anon_fault_fallback_charge: int
    split: int
    split_deferred: int
    #: A gauge: large anon folios of this size that exist.
    nr_anon: int
    #: A gauge: of those, the ones queued for deferred split, partially mapped.
    nr_anon_partially_mapped: int


class VmstatCounters(TypedDict):
    """The ``/proc/vmstat`` events the simulator counts, under their kernel names."""

    pgfault: int
    thp_fault_alloc: int
    thp_fault_fallback: int
    thp_fault_fallback_charge: int
    thp_split_pmd: int
    thp_split_page: int
    thp_deferred_split_page: int
    thp_zero_page_alloc: int
    pgfree: int
    pgalloc: int


class RaceCounters(TypedDict):
    """What lost races cost. The kernel counts none of these: they are the
    simulator's own (``Stats.races``)."""

    #: The re-check under the PTE-table lock found the range no longer empty.
    races: int
    #: ``retry-lower``: retries one order lower inside the same fault.
    retries: int
    #: The fault returned without mapping and the access faulted again.
    refaults: int
    #: Folios allocated (in the kernel: zeroed), then freed unused.
    folios_wasted: int
    #: Their pages.
    pages_wasted: int


class FaultPaths(TypedDict):
    """How faults were resolved, by the kernel function that resolved them.
    (Counts of the simulator's own; the kernel keeps no such counters.)"""

    anonymous: int
    zero_page: int
    huge_zero_page: int
    wp_copy: int
    pmd_thp: int
    huge_zero_wp: int
    spurious: int


class LockFigures(TypedDict):
    """One lock's (or class of locks') figures."""

    acquisitions: int
    #: Acquisitions that found the lock held.
    contended: int
    #: Spin iterations while waiting.
    spins: int


class Locks(LockFigures):
    """Lock figures: the split PTE-table locks at the top level (as the JSON
    contract has them) and each lock's own figures."""

    ptl: LockFigures
    page_table_lock: LockFigures
    zone_lock: LockFigures
    mmap_lock: LockFigures


class MemoryFigures(TypedDict):
    """The simulated machine's memory, in pages (``host_bytes``: bytes the
    simulator itself uses on the host)."""

    phys_pages: int
    used_pages: int
    pcp_pages: int
    pinned_pages: int
    nr_ptes: int
    memcg_usage: int
    memcg_charge_fail: int
    host_bytes: int


class StatsDict(TypedDict):
    """``Simulator.stats()`` of the native module; the keys of the JSON
    contract first."""

    faults: int
    rss_bytes: int
    #: The most resident anonymous bytes at any point (``mm->hiwater_rss``).
    rss_peak_bytes: int
    elapsed_s: float
    #: Sizes (``"64kB"``) with a non-zero counter.
    mthp: dict[str, MthpCounters]
    vmstat: VmstatCounters
    locks: Locks
    races: RaceCounters
    fault_paths: FaultPaths
    #: Folios mapped by faults, indexed by order (``Stats.folio_orders``
    #: makes it a uint64 array).
    folio_orders: list[int]
    memory: MemoryFigures


class RunDict(StatsDict):
    """What a replay or a workload returns: its figures and how it ran."""

    #: Operations completed (trace lines, pages touched).
    ops: int
    #: Faults handled by each simulated CPU.
    per_cpu_faults: list[int]
    #: Jain's fairness index of ``per_cpu_faults`` (1.0: all equal).
    fairness: float


class VmaDict(TypedDict):
    """One VMA as the native ``Simulator.vmas()`` gives it: ``[start, end)``."""

    start: int
    end: int
    hugepage: bool
    nohugepage: bool
    uffd_wp: bool
    prot: str
    """``"rw"``, ``"r"`` or ``"none"``."""
    account: bool
    """VM_ACCOUNT: a private writable mapping without MAP_NORESERVE."""
    noreserve: bool
    """VM_NORESERVE (MAP_NORESERVE)."""
    growsdown: bool
    """VM_GROWSDOWN (MAP_GROWSDOWN)."""
    dontcopy: bool
    """VM_DONTCOPY (MADV_DONTFORK)."""


class ConfigDict(TypedDict):
    """The fields of :class:`anonfolio.Config`, normalised by the native module."""

    enabled: str
    hugepages: dict[str, str]
    use_zero_page: bool
    policy: str
    on_race: Optional[str]
    preempt: float
    memory: int
    memcg_limit: Optional[int]
    fragmentation: float
    fail_orders: Sequence[int]
    fail_rate: float
    seed: int
    check_invariants: bool


class ConfigJson(ConfigDict):
    """``config`` in the JSON of ``replay``, ``run``, ``sweep`` and
    ``validate``: every field of the :class:`~anonfolio.config.Config` the
    simulator ran with (knobs, policy, memory, memcg limit, fragmentation,
    failure injection), so that ``Config(**j["config"])`` re-creates it."""


class KernelRun(TypedDict):
    """What the running kernel did with a trace (``_anonfolio.kernel_replay``)."""

    #: Minor faults of the replay, less the harness's own.
    faults: int
    #: Resident bytes of the trace's mappings at the end (smaps ``Rss:``).
    rss_bytes: int
    #: The PMD-mapped part of that (smaps ``AnonHugePages:``).
    anon_huge_bytes: int
    elapsed_s: float
    #: Per size, the deltas of the ``hugepages-*/stats`` counters that exist
    #: for it. System-wide: other processes add to them.
    mthp: dict[str, dict[str, int]]
    #: Deltas of ``/proc/vmstat`` THP counters (system-wide).
    vmstat: dict[str, int]
    #: ``uname -r``.
    kernel: str
    #: The harness's faults, subtracted from ``faults``.
    harness_faults: int
    #: This process's own folios in the trace's memory at the end, by order
    #: (index 0 = order 0), read from its pagemap and ``/proc/kpageflags`` as
    #: ``tools/mm/thpmaps`` does: no other process changes them. None where
    #: those files cannot be read (not root).
    folio_orders: Optional[list[int]]


class KernelReplay(KernelRun):
    """:func:`anonfolio.kernel.kernel_replay`: the kernel's figures and the
    knobs they were taken under (``enabled`` and every size)."""

    settings: dict[str, str]


class ValidateRow(TypedDict):
    """One figure of ``validate``."""

    name: str
    simulator: int
    kernel: int
    match: bool
    #: ``"process"``: the kernel's figure is this process's own (minor
    #: faults, smaps, pagemap); ``"system"``: a system-wide counter delta,
    #: which other processes faulting at the same time also move.
    scope: str
    #: Whether the row decides ``validate``'s verdict.
    decides: bool


class ValidateResult(TypedDict):
    """``anonfolio validate --json``."""

    #: Every deciding row matched.
    match: bool
    #: Where the per-size figures that decide come from: ``"process"``
    #: (pagemap) or ``"system"`` (the system-wide counters, when pagemap
    #: could not be read or ``--system-counters`` asked for them).
    scope: str
    #: Lines a reader should see (e.g. system-wide counters that differ).
    notes: list[str]
    rows: list[ValidateRow]
    #: ``anonfolio replay --json`` of the same trace and knobs.
    simulator: dict[str, object]
    kernel: KernelReplay
