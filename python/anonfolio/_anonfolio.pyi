"""Typed stubs of ``anonfolio._anonfolio``, the native module (Rust, PyO3).

Use the public package ``anonfolio`` rather than this module: its
``Simulator`` subclasses the one here and wraps results in ``Stats``.
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any, Final, Optional, Protocol, Union

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

from anonfolio.results import ConfigDict, KernelRun, RunDict, StatsDict, VmaDict

__all__ = [
    "AnonfolioError",
    "CONFIG_FIELDS",
    "ConfigError",
    "FAULT_PATHS",
    "InvariantError",
    "MAX_PAGE_ORDER",
    "MTHP_COUNTERS",
    "OracleError",
    "OutOfMemory",
    "PAGE_SIZE",
    "PMD_ORDER",
    "RACE_COUNTERS",
    "RangeError",
    "SegmentationFault",
    "Simulator",
    "THP_SIZES",
    "TraceError",
    "VMSTAT_COUNTERS",
    "__version__",
    "_debug_panic",
    "build_profile",
    "check_trace",
    "default_cost_profile",
    "kernel_replay",
    "normalize_config",
    "parse_bytes",
    "parse_thp_size",
    "size_name",
]

__version__: Final[str]
#: ``"release"`` or ``"debug"``: how the extension was built.
build_profile: Final[str]
#: Bytes in a base page (4096).
PAGE_SIZE: Final[int]
#: Order of a PMD-mapped THP (9: 2 MiB).
PMD_ORDER: Final[int]
#: Highest buddy order (10: 4 MiB); per-order arrays have this many entries.
MAX_PAGE_ORDER: Final[int]
#: Sizes with a ``hugepages-*`` folder: ``("8kB", "16kB", ..., "2048kB")``.
THP_SIZES: Final[tuple[str, ...]]
#: Counters of ``hugepages-*/stats``, in order.
MTHP_COUNTERS: Final[tuple[str, ...]]
#: ``/proc/vmstat`` counters the simulator keeps.
VMSTAT_COUNTERS: Final[tuple[str, ...]]
#: Race counters (``Stats.races``).
RACE_COUNTERS: Final[tuple[str, ...]]
#: How faults were resolved (``Stats.fault_paths``).
FAULT_PATHS: Final[tuple[str, ...]]
#: Fields of a configuration dict (and of ``anonfolio.Config``).
CONFIG_FIELDS: Final[tuple[str, ...]]

_ByteCount = Union[int, str]
class _NativeConfig(Protocol):
    """What the native module takes as a configuration besides a mapping:
    an object with ``_to_native()`` (``anonfolio.Config``)."""

    def _to_native(self) -> Mapping[str, Any]: ...

_ConfigArg = Union[Mapping[str, Any], _NativeConfig, None]

class AnonfolioError(Exception):
    """Base class of every error anonfolio raises.

    Attributes:
        line: the 1-based trace line the error comes from, or None.
        address: the faulting address (SegmentationFault, OutOfMemory), or None.
        stats: when the error stopped a replay or a workload, the figures of
            what ran before it (a dict, or ``anonfolio.Stats`` from the public
            API); else None.
    """

    line: Optional[int]
    address: Optional[int]
    #: A dict (``RunDict``) from this module, a ``Stats`` from the public API.
    stats: Optional[Mapping[str, Any]]

class TraceError(AnonfolioError, ValueError):
    """A trace line that does not parse; ``line`` names it."""

class SegmentationFault(AnonfolioError):
    """An access outside every VMA (SIGSEGV); ``address`` is where."""

class ConfigError(AnonfolioError, ValueError):
    """A configuration or option value out of its domain."""

class RangeError(AnonfolioError, ValueError):
    """A range not page aligned, empty, outside user space, or an mmap over a mapping."""

class OutOfMemory(AnonfolioError):
    """The simulated machine or memcg ran out of memory (VM_FAULT_OOM)."""

class OracleError(AnonfolioError, OSError):
    """The kernel oracle could not run."""

class InvariantError(AnonfolioError, RuntimeError):
    """A consistency check of the simulated mm failed (a simulator bug)."""

def parse_bytes(text: Union[str, int]) -> int:
    """A byte count: ``4096``, ``"64K"``, ``"64KiB"``, ``"2M"``, ``"1G"``, ``"1T"`` (powers of 1024).

    Raises:
        ConfigError: malformed or too large.
    """

def parse_thp_size(text: str) -> int:
    """The order of a THP size written as sysfs does (``"64kB"``) or with a
    suffix (``"64K"``, ``"2M"``): ``"64kB"`` -> 4.

    Raises:
        ConfigError: no ``hugepages-*`` folder has that size.
    """

def size_name(order: int) -> str:
    """The sysfs name of an order's size: 4 -> ``"64kB"``."""

def normalize_config(config: _ConfigArg = None, **fields: Any) -> ConfigDict:
    """Validates configuration fields (see ``anonfolio.Config``) and returns
    them normalised: every size in ``hugepages``, byte counts as ints,
    ``fail_orders`` a sorted tuple of orders.

    Raises:
        ConfigError: a value out of its domain, or an unknown field.
    """

def default_cost_profile() -> list[tuple[str, float]]:
    """The simulator's built-in cost profile: ``(NAME_ns, ns)`` pairs."""

def check_trace(trace: str) -> int:
    """Parses a trace without running it; returns its number of operations.

    Raises:
        TraceError: a line that does not parse (``line`` names it).
        RangeError: an unaligned or out-of-range mmap/munmap/madvise range.
    """

def kernel_replay(trace_text: str) -> KernelRun:
    """Replays a trace on the running Linux kernel with the THP settings
    sysfs holds now. See ``anonfolio.kernel.kernel_replay``, which sets and
    restores the knobs.

    Raises:
        TraceError, RangeError: the trace is bad.
        OracleError: the kernel could not run it.
    """

def _debug_panic(message: str, *, guarded: bool = True) -> None:
    """Test hook, not API: panics with ``message`` inside the guard every call
    into the core goes through (``guarded=True``: raises
    ``AnonfolioError("internal error: ...")``, prints nothing) or outside it
    (``guarded=False``: PyO3's ``PanicException``; the panic hook prints it)."""

@disjoint_base
class Simulator:
    """One simulated process: VMAs, page tables and the physical memory
    behind them.

    Arguments:
        config: an ``anonfolio.Config``, a dict of its fields, or None for the
            defaults (this kernel's: ``enabled=madvise``, ``2048kB=inherit``,
            every other size ``never``).
        **fields: ``Config`` fields that override ``config``.

    Raises:
        ConfigError: a bad field.
    """

    def __new__(cls, config: _ConfigArg = None, **fields: Any) -> Simulator: ...
    @property
    def config(self) -> ConfigDict:
        """The configuration (a dict of ``Config`` fields here; a ``Config`` in ``anonfolio.Simulator``)."""

    def mmap(
        self, addr: int, length: _ByteCount, *, hugepage: bool = False, nohugepage: bool = False, uffd_wp: bool = False
    ) -> None:
        """``mmap(addr, length, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED_NOREPLACE)``,
        then ``MADV_HUGEPAGE``/``MADV_NOHUGEPAGE`` and userfaultfd-wp registration as flagged.

        Raises:
            RangeError: unaligned, empty, outside user space, or over an existing mapping.
        """

    def munmap(self, addr: int, length: _ByteCount) -> None:
        """``munmap()``: zaps the range and frees page tables nothing else needs.

        Raises:
            RangeError: unaligned, empty or outside user space.
        """

    def madvise(self, addr: int, length: _ByteCount, advice: str) -> None:
        """``madvise()`` with ``"dontneed"``, ``"hugepage"`` or ``"nohugepage"``;
        advising part of a VMA splits it.

        Raises:
            ConfigError: unknown advice.
            RangeError: unaligned, empty or outside user space.
        """

    def read(self, addr: int) -> None:
        """One user read of the byte at ``addr``; faults as the MMU would.

        Raises:
            SegmentationFault: ``addr`` is outside every VMA.
        """

    def write(self, addr: int) -> None:
        """One user write of the byte at ``addr``; faults as the MMU would.

        Raises:
            SegmentationFault: ``addr`` is outside every VMA.
            OutOfMemory: the fault could not get memory.
        """

    def touch(self, addrs: Union[npt.NDArray[np.uint64], Sequence[int]], write: bool = True) -> int:
        """One access per address, in order, with the GIL released; returns
        how many were done.

        Raises:
            SegmentationFault: an address outside every VMA; the exception's
                ``index`` says which (the accesses before it stand).
        """

    def replay(
        self,
        trace: str,
        *,
        threads: int = 1,
        deterministic: Optional[int] = None,
        check_invariants: Optional[bool] = None,
        time: Optional[Mapping[str, float]] = None,
    ) -> RunDict:
        """Replays a trace (its text) with the GIL released. ``threads``:
        simulated CPUs on host threads (each ``@T`` thread runs its own lines
        in order); ``deterministic``: the seed of a deterministic interleaving;
        ``time``: run in virtual time with these costs (``NAME_ns`` to
        nanoseconds; the result then has a ``time`` dict).
        Returns the figures (a dict with the keys of the JSON contract, plus
        ``ops``: operations completed).

        Raises:
            TraceError, RangeError, SegmentationFault, OutOfMemory: the first
                error; operations before it ran, and the exception's ``stats``
                holds their figures, ``line`` the trace line.
        """

    def replay_file(
        self,
        path: Union[str, os.PathLike[str]],
        *,
        threads: int = 1,
        deterministic: Optional[int] = None,
        check_invariants: Optional[bool] = None,
        time: Optional[Mapping[str, float]] = None,
    ) -> RunDict:
        """Replays the trace file at ``path``, plain or compressed with zstd
        or gzip (told by its first bytes), streamed through a fixed buffer,
        read once (on several CPUs twice: first for how many threads it
        has), never held whole, so memory does not grow with the trace.
        The same run, figures and errors as ``replay`` of the file's text;
        the file must not change while it runs.

        Raises:
            OSError: the file cannot be opened (nothing ran).
            TraceError, RangeError, SegmentationFault, OutOfMemory: as
                ``replay``; a file that cannot be read to its end (a corrupt
                or truncated compressed trace) is a TraceError naming the
                line it was reading.
        """

    def run(
        self,
        workload: Optional[str] = None,
        size: Optional[_ByteCount] = None,
        *,
        stride: Optional[int] = None,
        fraction: Optional[float] = None,
        seed: Optional[int] = None,
        threads: int = 1,
        sharing: Optional[str] = None,
        iterations: Optional[int] = None,
        deterministic: Optional[int] = None,
        check_invariants: Optional[bool] = None,
        advice: Optional[str] = None,
        time: Optional[Mapping[str, float]] = None,
        processes: bool = False,
    ) -> RunDict:
        """Maps a VMA of ``size`` bytes (default 1 GiB) with ``advice``
        (``hugepage``: MADV_HUGEPAGE, ``nohugepage``, ``none``; None is
        ``hugepage``, except for page_fault1, which will-it-scale maps
        unadvised) and writes to it in the workload's order (None: ``sequential``): ``sequential``,
        ``reverse``, ``stride`` (every ``stride``-th page), ``random`` (a
        seeded permutation of ``fraction`` of the pages), ``sparse`` (each
        page with probability ``fraction``, default 0.1), ``page_fault1``
        (will-it-scale: map, touch, unmap, ``iterations`` times, a region per
        thread). ``sharing``: ``disjoint`` (None; a slice per thread) or
        ``interleaved`` (turns page by page). Returns the figures, as ``replay``.

        Raises:
            ConfigError: a bad workload, sharing, size, stride or fraction.
            RangeError: the workload's VMA overlaps an existing mapping.
        """

    def stats(self) -> StatsDict:
        """Every counter so far, summed over the simulated CPUs: ``faults``,
        ``rss_bytes``, ``elapsed_s`` (all replays/runs/touches), ``mthp``
        (sizes with a non-zero counter), ``vmstat``, ``locks``, ``races``,
        ``fault_paths``, ``folio_orders`` (a list by order), ``memory``."""

    def vmas(self) -> list[VmaDict]:
        """The VMAs, lowest first: dicts with ``start``, ``end``, ``hugepage``, ``nohugepage``, ``uffd_wp``,
        ``prot`` (``"rw"``, ``"r"``, ``"none"``), ``account``, ``noreserve``, ``growsdown``, ``dontcopy``."""

    def check_invariants(self) -> None:
        """Checks mapcounts, RSS and the conservation of pages. Call it when
        no other thread is using the simulator.

        Raises:
            InvariantError: the first violation.
        """
