"""The Python-facing API: :class:`Simulator` and the one-call helpers
:func:`replay`, :func:`run` and :func:`sweep`.

The native ``anonfolio._anonfolio.Simulator`` returns plain dicts; the
:class:`Simulator` here is the same class with results wrapped in
:class:`~anonfolio.stats.Stats` and the configuration as a
:class:`~anonfolio.config.Config`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import numpy.typing as npt

from . import _anonfolio
from .config import Config
from .stats import Stats

__all__ = ["Simulator", "Vma", "replay", "run", "sweep", "WORKLOADS", "SHARING"]

#: Built-in workloads of ``Simulator.run`` / ``anonfolio run --workload``.
WORKLOADS: tuple[str, ...] = ("sequential", "reverse", "stride", "random", "sparse", "page_fault1")
#: How ``run`` splits a workload between threads.
SHARING: tuple[str, ...] = ("disjoint", "interleaved")

ConfigLike = Union[Config, Mapping[str, Any], None]
TraceLike = Union[str, bytes, "os.PathLike[str]"]


class Vma(NamedTuple):
    """One VMA: ``[start, end)`` and its flags."""

    start: int
    end: int
    hugepage: bool
    nohugepage: bool
    uffd_wp: bool

    @property
    def length(self) -> int:
        return self.end - self.start


@contextmanager
def _wrapped_error_stats() -> Iterator[None]:
    """Turns the ``stats`` dict on a raised error into a :class:`Stats`."""
    try:
        yield
    except _anonfolio.AnonfolioError as e:
        if isinstance(e.stats, Mapping) and not isinstance(e.stats, Stats):
            e.stats = Stats(e.stats)
        raise


def _trace_text(trace: TraceLike) -> str:
    if isinstance(trace, os.PathLike):
        with open(trace, encoding="utf-8", errors="strict") as f:
            return f.read()
    if isinstance(trace, bytes):
        return trace.decode("utf-8")
    if isinstance(trace, str):
        return trace
    raise TypeError(f"trace: expected the text of a trace, bytes or a path, got {type(trace).__name__}")


class Simulator(_anonfolio.Simulator):
    """One simulated process: VMAs, page tables and the physical memory
    behind them, configured like ``/sys/kernel/mm/transparent_hugepage/``.

    ``Simulator(config=None, **fields)``: ``config`` is a :class:`Config`
    (or a dict of its fields); keyword ``fields`` override it, e.g.
    ``Simulator(hugepages={"64kB": "always"}, policy="v1")``.

    State accumulates: every call works on the same address space, and
    :meth:`stats` covers the simulator's whole life. Methods that run many
    operations (``touch``, ``replay``, ``run``) release the GIL.
    """

    @property
    def config(self) -> Config:  # type: ignore[override]
        """The configuration, as a :class:`Config`."""
        return Config(**super().config)

    def stats(self) -> Stats:  # type: ignore[override]
        """Every counter so far, summed over the simulated CPUs."""
        return Stats(super().stats())

    def vmas(self) -> list[Vma]:  # type: ignore[override]
        """The VMAs, lowest address first."""
        return [Vma(**v) for v in super().vmas()]

    def touch(self, addrs: Union[npt.NDArray[np.integer[Any]], Sequence[int]], write: bool = True) -> int:
        """One access per address in ``addrs`` (a numpy array or a sequence
        of ints), in order, with the GIL released. Returns how many were
        done; on an error (e.g. SegmentationFault) the exception's ``index``
        says which address failed, and the accesses before it stand."""
        if not isinstance(addrs, np.ndarray):
            return super().touch(addrs, write)
        if addrs.dtype != np.uint64:
            if addrs.dtype.kind not in "iu":
                raise TypeError(f"addrs: expected an integer array, got dtype {addrs.dtype}")
            if addrs.dtype.kind == "i" and addrs.size and addrs.min() < 0:
                raise _anonfolio.RangeError("addrs: negative address")
        return super().touch(addrs.astype(np.uint64, copy=False), write)

    def replay(  # type: ignore[override]
        self,
        trace: TraceLike,
        *,
        threads: int = 1,
        deterministic: Optional[int] = None,
        check_invariants: Optional[bool] = None,
    ) -> Stats:
        """Replays a trace: its text (``str``), ``bytes``, or a path
        (``pathlib.Path``). Operations before a bad line run; the error
        (TraceError, SegmentationFault, ...) names the line, and its
        ``stats`` attribute has the figures of what ran. A path is
        streamed (see :meth:`replay_file`)."""
        if isinstance(trace, os.PathLike):
            return self.replay_file(
                trace, threads=threads, deterministic=deterministic, check_invariants=check_invariants
            )
        text = _trace_text(trace)
        with _wrapped_error_stats():
            return Stats(
                super().replay(text, threads=threads, deterministic=deterministic, check_invariants=check_invariants)
            )

    def replay_file(  # type: ignore[override]
        self,
        path: Union[str, os.PathLike[str]],
        *,
        threads: int = 1,
        deterministic: Optional[int] = None,
        check_invariants: Optional[bool] = None,
    ) -> Stats:
        """Replays the trace file at ``path`` (plain, zstd or gzip),
        streamed through a fixed buffer: memory does not grow with the
        trace. Same figures and errors as :meth:`replay` of its text;
        OSError if it cannot be opened."""
        with _wrapped_error_stats():
            return Stats(
                super().replay_file(
                    path, threads=threads, deterministic=deterministic, check_invariants=check_invariants
                )
            )

    def run(  # type: ignore[override]
        self,
        workload: str = "sequential",
        size: Union[int, str, None] = None,
        **kwargs: Any,
    ) -> Stats:
        """Maps a VMA of ``size`` bytes (MADV_HUGEPAGE) and writes to it in the
        workload's order. Keywords: ``stride`` (pages), ``fraction``, ``seed``,
        ``threads``, ``sharing`` (``"disjoint"``/``"interleaved"``),
        ``iterations`` (page_fault1), ``deterministic`` (seed of a
        deterministic interleaving), ``check_invariants``."""
        with _wrapped_error_stats():
            return Stats(super().run(workload, size, **kwargs))


def replay(
    trace: TraceLike,
    config: ConfigLike = None,
    *,
    threads: int = 1,
    deterministic: Optional[int] = None,
    check_invariants: Optional[bool] = None,
) -> Stats:
    """Replays ``trace`` (text, bytes or a path) on a fresh :class:`Simulator`.

    >>> import anonfolio
    >>> t = "mmap 0x7f0000000000 0x100000 hugepage\\n" + "".join(
    ...     f"w {0x7f0000000000 + i * 4096:#x}\\n" for i in range(256))
    >>> s = anonfolio.replay(t, anonfolio.Config(hugepages={"64kB": "madvise"}))
    >>> s.faults, s.mthp["64kB"].anon_fault_alloc, s.rss_bytes
    (16, 16, 1048576)
    """
    return Simulator(config).replay(
        trace, threads=threads, deterministic=deterministic, check_invariants=check_invariants
    )


def run(
    workload: str = "sequential",
    size: Union[int, str, None] = None,
    config: ConfigLike = None,
    **kwargs: Any,
) -> Stats:
    """Runs a built-in workload on a fresh :class:`Simulator`; keywords as
    :meth:`Simulator.run`."""
    return Simulator(config).run(workload, size, **kwargs)


def sweep(
    workload: Union[str, Sequence[str], ConfigLike, Iterable[ConfigLike], Mapping[str, ConfigLike]] = "sequential",
    *,
    configs: Union[ConfigLike, Iterable[ConfigLike], Mapping[str, ConfigLike]] = None,
    size: Union[int, str, None] = None,
    sizes: Optional[Sequence[Union[int, str]]] = None,
    trace: Optional[TraceLike] = None,
    **kwargs: Any,
) -> list[Stats]:
    """Runs every combination of ``configs`` x ``workload`` x ``sizes`` (or
    replays ``trace`` under every config), each on a fresh simulator, and
    returns their :class:`Stats` in that order.

    ``workload`` is a name or a list of names; ``configs`` one config, a
    list, or a dict label->config (None: the defaults); ``size`` one size or
    ``sizes`` a list. Other keywords (``threads``, ``sharing``, ``stride``,
    ...) go to :meth:`Simulator.run` (or :meth:`Simulator.replay`); a keyword
    given as a list is swept too. Each result's ``params`` says what produced
    it: ``label``, ``config``, ``workload``, ``size`` and the keywords. For
    short, the configs may come first instead of the workload.

    >>> import anonfolio
    >>> rows = anonfolio.sweep("sequential", size="1M",
    ...                        configs={"4k": anonfolio.Config(hugepages={"2M": "never"}),
    ...                                 "64k": anonfolio.Config(hugepages={"64K": "always", "2M": "never"})})
    >>> [(r.params["label"], r.faults) for r in rows]
    [('4k', 256), ('64k', 16)]
    """
    if not _is_workloads(workload):
        if configs is not None:
            raise TypeError("sweep: configs given twice (positionally and by keyword)")
        configs, workload = workload, "sequential"  # type: ignore[assignment]
    if size is not None and sizes is not None:
        raise TypeError("sweep: give size or sizes, not both")
    if configs is None or isinstance(configs, Config):
        labelled: list[tuple[str, ConfigLike]] = [(_label(configs), configs)]
    elif isinstance(configs, Mapping) and not _is_fields(configs):
        labelled = [(str(k), v) for k, v in configs.items()]
    elif isinstance(configs, Mapping):
        labelled = [(_label(configs), configs)]
    else:
        labelled = [(_label(c), c) for c in configs]
    cfgs = [(label, c if isinstance(c, Config) else Config(**dict(c or {}))) for label, c in labelled]
    size_list: list[Union[int, str, None]] = list(sizes) if sizes is not None else [size]
    workloads: list[str] = [workload] if isinstance(workload, str) else [str(w) for w in workload]  # type: ignore[union-attr]
    swept = {k: list(v) for k, v in kwargs.items() if isinstance(v, (list, tuple))}
    fixed = {k: v for k, v in kwargs.items() if k not in swept}
    out: list[Stats] = []
    for (label, cfg), combo in itertools.product(cfgs, itertools.product(*swept.values())):
        kw = dict(fixed, **dict(zip(swept, combo)))
        if trace is not None:
            s = Simulator(cfg).replay(trace, **kw)
            out.append(Stats(s, params=dict(label=label, config=cfg, trace=_trace_name(trace), **kw)))
            continue
        for w, sz in itertools.product(workloads, size_list):
            s = Simulator(cfg).run(w, sz, **kw)
            out.append(Stats(s, params=dict(label=label, config=cfg, workload=w, size=sz, **kw)))
    return out


def _is_workloads(w: Any) -> bool:
    if isinstance(w, str):
        return True
    return bool(isinstance(w, (list, tuple)) and w and all(isinstance(x, str) for x in w))


def _is_fields(m: Mapping[str, Any]) -> bool:
    return bool(m) and all(k in _anonfolio.CONFIG_FIELDS for k in m)


def _label(c: ConfigLike) -> str:
    if c is None:
        return "default"
    cfg = c if isinstance(c, Config) else Config(**dict(c))
    on = [f"{s}={m}" for s, m in cfg.hugepages.items() if m != "never"]
    return f"{cfg.policy} enabled={cfg.enabled} " + (" ".join(on) if on else "no-mthp")


def _trace_name(trace: TraceLike) -> str:
    if isinstance(trace, os.PathLike):
        return os.fspath(trace)
    return "<text>"
