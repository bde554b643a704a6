"""The Python-facing API: :class:`Simulator` and the one-call helpers
:func:`replay`, :func:`run` and :func:`sweep` (traces: docs/trace-format.md;
figures: docs/json.md; workloads: docs/workloads.md).

The native ``anonfolio._anonfolio.Simulator`` returns plain dicts; the
:class:`Simulator` here is the same class with results wrapped in
:class:`~anonfolio.stats.Stats` and the configuration as a
:class:`~anonfolio.config.Config`.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, as_completed
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

if TYPE_CHECKING:  # numpy is imported when an array is made, not at start-up
    import numpy as np
    import numpy.typing as npt

from . import _anonfolio
from .config import Config
from .frame import SweepResult
from .stats import Stats

__all__ = ["Simulator", "Vma", "replay", "run", "sweep", "check_fits", "progress_bar", "WORKLOADS", "SHARING", "ADVICE"]

#: Built-in workloads of ``Simulator.run`` / ``anonfolio run --workload``.
WORKLOADS: tuple[str, ...] = ("sequential", "reverse", "stride", "random", "sparse", "page_fault1")
#: The advice ``run`` may give the workload's VMA (``--advice``).
ADVICE: tuple[str, ...] = ("hugepage", "nohugepage", "none")
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


def _read_path(path: Union[str, os.PathLike[str]]) -> str:
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            return f.read()
    except UnicodeDecodeError as e:
        name = os.fspath(path)
        raise _anonfolio.TraceError(f"trace {name} is not UTF-8 text: {e.reason} at byte {e.start}") from None


def _trace_text(trace: TraceLike) -> str:
    """The text of ``trace``. The rule: a path-like object is a file; bytes
    are the text; a ``str`` is the text, unless it is a single line naming a
    file that exists (``"app.trace"``), which is read. A single line that is
    neither a file nor a valid trace line is refused as a missing file."""
    if isinstance(trace, os.PathLike):
        return _read_path(trace)
    if isinstance(trace, bytes):
        return trace.decode("utf-8")
    if isinstance(trace, str):
        if "\n" in trace or not trace.strip():
            return trace
        if os.path.isfile(trace):
            return _read_path(trace)
        try:
            _anonfolio.check_trace(trace)
        except _anonfolio.TraceError:
            raise FileNotFoundError(
                errno.ENOENT,
                f"no trace file {trace!r} (and it is not a trace line either; a str is trace text unless it is one "
                "line naming an existing file)",
                trace,
            ) from None
        return trace
    raise TypeError(f"trace: expected the text of a trace, bytes or a path, got {type(trace).__name__}")


def _pages_needed(workload: str, size: int, kwargs: Mapping[str, Any]) -> int:
    """A lower bound on the base pages a workload touches at once: each
    touch needs at least one page of simulated memory."""
    n = size // _anonfolio.PAGE_SIZE
    if workload == "page_fault1":
        return n * max(1, int(kwargs.get("threads") or 1))
    if workload == "stride":
        return -(-n // max(1, int(kwargs.get("stride") or 1)))
    if workload == "random":
        return math.ceil(n * float(kwargs.get("fraction") or 1.0))
    if workload == "sparse":
        return 0  # a seeded fraction: no bound known before it runs
    return n


def check_fits(config: Config, workload: str, size: Union[int, str, None], **kwargs: Any) -> None:
    """Raises :class:`OutOfMemory` before anything runs when the workload
    touches more pages than the simulated machine has (``Config.memory``),
    with a hint of ``--memory``; without it such a run would fill the
    simulated memory (and the host's, with its memory map) before failing."""
    nbytes = _anonfolio.parse_bytes(size) if isinstance(size, str) else (size if size is not None else 1 << 30)
    if nbytes <= 0 or nbytes % _anonfolio.PAGE_SIZE or nbytes > 1 << 46:
        return  # not a size the native workload accepts: it says why
    need = _pages_needed(workload, int(nbytes), kwargs) * _anonfolio.PAGE_SIZE
    have = int(config.memory)
    if need > have:
        from .stats import format_bytes

        raise _anonfolio.OutOfMemory(
            f"{workload} over {format_bytes(int(nbytes))} touches at least {format_bytes(need)} but the simulated "
            f"machine has {format_bytes(have)} of memory: give it more with --memory (Config(memory=...)) "
            "or map less"
        )


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
        import numpy as np

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
        time: Optional[Mapping[str, float]] = None,
    ) -> Stats:
        """Replays a trace (format: docs/trace-format.md): its text (``str``),
        ``bytes``, or a file: a path-like object, or a ``str`` of one line that
        names an existing file (``"app.trace"``). Operations before a bad line run; the error
        (TraceError, SegmentationFault, ...) names the line, and its
        ``stats`` attribute has the figures of what ran. A path is
        streamed (see :meth:`replay_file`)."""
        if isinstance(trace, os.PathLike):
            return self.replay_file(
                trace, threads=threads, deterministic=deterministic, check_invariants=check_invariants, time=time
            )
        text = _trace_text(trace)
        with _wrapped_error_stats():
            return Stats(
                super().replay(
                    text, threads=threads, deterministic=deterministic, check_invariants=check_invariants, time=time
                )
            )

    def replay_file(  # type: ignore[override]
        self,
        path: Union[str, os.PathLike[str]],
        *,
        threads: int = 1,
        deterministic: Optional[int] = None,
        check_invariants: Optional[bool] = None,
        time: Optional[Mapping[str, float]] = None,
    ) -> Stats:
        """Replays the trace file at ``path`` (plain, zstd or gzip),
        streamed through a fixed buffer: memory does not grow with the
        trace. Same figures and errors as :meth:`replay` of its text;
        OSError if it cannot be opened."""
        with _wrapped_error_stats():
            return Stats(
                super().replay_file(
                    path, threads=threads, deterministic=deterministic, check_invariants=check_invariants, time=time
                )
            )

    def run(  # type: ignore[override]
        self,
        workload: str = "sequential",
        size: Union[int, str, None] = None,
        **kwargs: Any,
    ) -> Stats:
        """Maps a VMA of ``size`` bytes and writes to it in the workload's
        order (the workloads are described in docs/workloads.md). Keywords:
        ``advice`` (``"hugepage"``, the default, ``"nohugepage"`` or
        ``"none"``; page_fault1 defaults to ``"none"``, as will-it-scale maps
        it), ``stride`` (pages, default 1), ``fraction`` (random: default 1,
        sparse: 0.1), ``seed`` (default 0), ``threads``, ``sharing``
        (``"disjoint"``/``"interleaved"``), ``iterations`` (page_fault1,
        default 1), ``deterministic`` (seed of a deterministic interleaving),
        ``check_invariants``, ``time`` (a cost profile's costs: virtual
        time), ``processes`` (page_fault1 as will-it-scale's process mode:
        in virtual time each CPU a task of its own mm). A workload that touches more pages than the
        simulated memory raises OutOfMemory before it starts."""
        check_fits(self.config, workload, size, **kwargs)
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
    """Replays ``trace`` (text, bytes, a path, or a file name: the rule of
    :meth:`Simulator.replay`) on a fresh :class:`Simulator`.

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
    workload: Union[str, Sequence[str], ConfigLike, Iterable[ConfigLike], Mapping[Any, ConfigLike]] = "sequential",
    *,
    configs: Union[ConfigLike, Iterable[ConfigLike], Mapping[Any, ConfigLike]] = None,
    size: Union[int, str, None] = None,
    sizes: Optional[Sequence[Union[int, str]]] = None,
    trace: Optional[TraceLike] = None,
    executor: Optional[Executor] = None,
    progress: Optional[bool] = None,
    **kwargs: Any,
) -> SweepResult:
    """Runs every combination of ``configs`` x ``workload`` x ``sizes`` (or
    replays ``trace`` under every config), each on a fresh simulator, and
    returns their :class:`Stats` in that order, as a
    :class:`~anonfolio.frame.SweepResult` (a list with ``.to_pandas()``,
    ``.to_csv()`` and ``.to_parquet()``).

    ``workload`` is a name or a list of names; ``configs`` one config, a
    list, or a dict label->config (None: the defaults; a label may be any
    value, a tuple stays a tuple); ``size`` one size or ``sizes`` a list.
    Other keywords (``threads``, ``sharing``, ``stride``, ``advice``, ...) go
    to :meth:`Simulator.run` (or :meth:`Simulator.replay`); a keyword given
    as a list is swept too. Each result's ``params`` says what produced it:
    ``label``, ``config``, ``workload`` (or ``trace``), ``size`` and the
    keywords, so that any row can be run again from them. For short, the
    configs may come first instead of the workload.

    ``executor``: any :class:`concurrent.futures.Executor` (a
    ``ProcessPoolExecutor``, or a cluster's, e.g. Dask distributed's
    ``Client.get_executor()``) runs the points; the results are the same as
    run serially, in the grid's order. A trace is sent as text, so workers
    need no file. ``progress``: a progress bar on standard error (tqdm);
    None (the default) shows one for sweeps of more than one point when
    standard error is a terminal.

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
        labelled: list[tuple[Any, ConfigLike]] = [(_label(configs), configs)]
    elif isinstance(configs, Mapping) and not _is_fields(configs):
        labelled = list(configs.items())
    elif isinstance(configs, Mapping):
        labelled = [(_label(configs), configs)]
    else:
        labelled = [(_label(c), c) for c in configs]
    cfgs = [(label, c if isinstance(c, Config) else Config(**dict(c or {}))) for label, c in labelled]
    size_list: list[Union[int, str, None]] = list(sizes) if sizes is not None else [size]
    workloads: list[str] = [workload] if isinstance(workload, str) else [str(w) for w in workload]  # type: ignore[union-attr]
    swept = {k: list(v) for k, v in kwargs.items() if isinstance(v, (list, tuple))}
    fixed = {k: v for k, v in kwargs.items() if k not in swept}
    text = _trace_text(trace) if trace is not None else None
    jobs: list[_Job] = []
    for (label, cfg), combo in itertools.product(cfgs, itertools.product(*swept.values())):
        kw = dict(fixed, **dict(zip(swept, combo)))
        if text is not None:
            name = _trace_name(trace) if trace is not None else "<text>"
            jobs.append(_Job(cfg, None, None, kw, dict(label=label, config=cfg, trace=name, **kw), text))
            continue
        for w, sz in itertools.product(workloads, size_list):
            if sz is None:
                sz = _DEFAULT_SIZE
            nbytes = _anonfolio.parse_bytes(sz) if isinstance(sz, str) else int(sz)
            check_fits(cfg, w, nbytes, **kw)  # before any point runs
            jobs.append(_Job(cfg, w, nbytes, kw, dict(label=label, config=cfg, workload=w, size=nbytes, **kw), None))
    return SweepResult(run_jobs(jobs, executor=executor, progress=progress, desc="sweep"))


#: The size ``run`` maps when none is given (page_fault1: per thread), as the native default.
_DEFAULT_SIZE = 1 << 30


class _Job(NamedTuple):
    """One point of a sweep, self-contained and picklable (for executors)."""

    config: Config
    workload: Optional[str]
    size: Optional[int]
    kwargs: dict[str, Any]
    params: dict[str, Any]
    trace: Optional[str]


def _run_job(job: _Job) -> Stats:
    """Runs one point on a fresh simulator (in whatever process the executor chose)."""
    sim = Simulator(job.config)
    if job.trace is not None:
        s = sim.replay(job.trace, **job.kwargs)
    else:
        s = sim.run(job.workload or "sequential", job.size, **job.kwargs)
    return Stats(s, params=job.params)


def run_jobs(
    jobs: Sequence[_Job], *, executor: Optional[Executor] = None, progress: Optional[bool] = None, desc: str = ""
) -> list[Stats]:
    """Runs ``jobs`` serially or on ``executor``; results in ``jobs``' order."""
    bar = progress_bar(len(jobs), progress=progress, desc=desc)
    try:
        if executor is None:
            out = []
            for j in jobs:
                out.append(_run_job(j))
                bar.update(1)
            return out
        futures = [executor.submit(_run_job, j) for j in jobs]
        index = {id(f): i for i, f in enumerate(futures)}
        results: list[Optional[Stats]] = [None] * len(jobs)
        for f in as_completed(futures):
            results[index[id(f)]] = f.result()
            bar.update(1)
        return [r for r in results if r is not None]
    finally:
        bar.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, *, progress: Optional[bool] = None, desc: str = "") -> Any:
    """A tqdm bar on standard error when ``progress`` is True, or when it is
    None, there is more than one step and standard error is a terminal;
    otherwise an object whose ``update``/``close`` do nothing."""
    import sys

    show = progress if progress is not None else (total > 1 and sys.stderr.isatty())
    if not show:
        return _NoBar()
    import importlib

    try:
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _NoBar()
    return tqdm(total=total, desc=desc or None, unit="run", file=sys.stderr, leave=True)


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
    if isinstance(trace, str) and "\n" not in trace and os.path.isfile(trace):
        return trace
    return "<text>"
