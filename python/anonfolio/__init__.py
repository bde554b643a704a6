"""anonfolio: a simulator of the Linux 6.18 anonymous-memory page-fault path
with large folios (multi-size THP).

>>> import anonfolio
>>> sim = anonfolio.Simulator(anonfolio.Config(hugepages={"64kB": "madvise"}))
>>> sim.mmap(0x7f0000000000, "1M", hugepage=True)
>>> sim.write(0x7f0000000000)
>>> s = sim.stats()
>>> s.faults, s.mthp["64kB"].anon_fault_alloc, s.rss_bytes
(1, 1, 65536)

The pieces:

- :class:`Config`: the THP knobs as sysfs has them, and the simulated machine.
- :class:`Simulator`: one process; ``mmap``/``munmap``/``madvise``,
  ``read``/``write``/``touch``, ``replay`` (a trace), ``run`` (a workload),
  ``stats``, ``vmas``, ``check_invariants``.
- :class:`Stats`: the figures, under the kernel's names.
- :func:`replay`, :func:`run`, :func:`sweep`: one-call helpers.
- Exceptions: :class:`AnonfolioError` and its subclasses.

The repository documents the rest: docs/trace-format.md (traces),
docs/json.md (every figure), docs/cli.md (the command line),
docs/workloads.md (the built-in workloads).
"""

from __future__ import annotations

from . import _anonfolio
from ._anonfolio import (
    AnonfolioError,
    ConfigError,
    InvariantError,
    OracleError,
    OutOfMemory,
    RangeError,
    SegmentationFault,
    TraceError,
    check_trace,
    parse_bytes,
    parse_thp_size,
    size_name,
)
from .api import SHARING, WORKLOADS, Simulator, Vma, replay, run, sweep
from .config import ENABLED_MODES, POLICIES, SIZE_MODES, THP_SIZES, Config
from .stats import Stats

__version__: str = _anonfolio.__version__

#: Bytes in a base page (x86-64: 4 KiB).
PAGE_SIZE: int = _anonfolio.PAGE_SIZE

__all__ = [
    "__version__",
    "PAGE_SIZE",
    # configuration
    "Config",
    "THP_SIZES",
    "ENABLED_MODES",
    "SIZE_MODES",
    "POLICIES",
    # simulation
    "Simulator",
    "Vma",
    "Stats",
    "replay",
    "run",
    "sweep",
    "WORKLOADS",
    "SHARING",
    # helpers
    "check_trace",
    "parse_bytes",
    "parse_thp_size",
    "size_name",
    # errors
    "AnonfolioError",
    "TraceError",
    "SegmentationFault",
    "ConfigError",
    "RangeError",
    "OutOfMemory",
    "OracleError",
    "InvariantError",
]
