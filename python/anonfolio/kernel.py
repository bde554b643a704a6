"""The real kernel: its THP knobs in sysfs, and traces replayed on it.

This module is the only one that touches the running kernel. The command
line's ``kernel-replay`` and ``validate`` (:mod:`anonfolio.cli`) read their
options into the same :class:`~anonfolio.config.Config` as ``replay`` and
call what is here:

- :func:`thp_settings` is a context manager that sets
  ``/sys/kernel/mm/transparent_hugepage/enabled``, ``use_zero_page`` and
  ``hugepages-*/enabled``, and always restores what it found.
- :func:`kernel_replay` replays a trace on this machine's kernel (in a
  child process, by the native oracle: every operation of the trace format,
  ``brk`` as the kernel's own) under a :class:`Config`'s knobs.
- :func:`compare` lines a simulator result up with a kernel one, figure by
  figure, as ``validate`` prints them.

The per-size counters the kernel reports are system-wide: run the oracle on
a quiet machine, and prefer ``madvise`` knobs with ``hugepage`` mappings so
that no other process is affected while a trace runs.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Optional, Union

from . import _anonfolio
from .config import ENABLED_MODES, Config
from .results import KernelReplay, ValidateRow

__all__ = [
    "THP_DIR",
    "COMPARED_COUNTERS",
    "read_thp_settings",
    "thp_settings",
    "can_change_thp",
    "kernel_replay",
    "compare",
]

THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")

#: Per-size counters ``validate`` compares, for every size either side reports.
COMPARED_COUNTERS: tuple[str, ...] = (
    "anon_fault_alloc",
    "anon_fault_fallback",
    "anon_fault_fallback_charge",
    "split_deferred",
)


# ---------------------------------------------------------------------------
# The knobs


def _size_name(size: str) -> str:
    """``"64K"`` -> ``"64kB"``, by the parser every other option uses."""
    return _anonfolio.size_name(_anonfolio.parse_thp_size(size))


def _read_choice(path: Path) -> str:
    """The bracketed choice of a sysfs knob: ``always [madvise] never`` -> ``madvise``."""
    text = path.read_text()
    m = re.search(r"\[(\w+)\]", text)
    if not m:
        raise OSError(f"cannot read the current mode from {path}: {text.strip()!r}")
    return m.group(1)


def _size_knobs() -> dict[str, Path]:
    """Size name -> ``hugepages-*/enabled`` for every size that has the knob.
    (``hugepages-8kB`` has no ``enabled``: order 1 is never used for anon.)"""
    knobs = {}
    if THP_DIR.is_dir():
        for d in THP_DIR.glob("hugepages-*kB"):
            f = d / "enabled"
            if f.exists():
                knobs[d.name[len("hugepages-") :]] = f
    return dict(sorted(knobs.items(), key=lambda kv: _anonfolio.parse_thp_size(kv[0])))


def read_thp_settings() -> tuple[str, dict[str, str]]:
    """The current (top-level enabled, {size: mode}) of the running kernel."""
    top = _read_choice(THP_DIR / "enabled")
    return top, {size: _read_choice(p) for size, p in _size_knobs().items()}


def _read_zero_page() -> Optional[str]:
    path = THP_DIR / "use_zero_page"
    return path.read_text().strip() if path.exists() else None


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@contextmanager
def thp_settings(
    enabled: Optional[str],
    sizes: Mapping[str, str],
    *,
    use_zero_page: Optional[bool] = None,
) -> Iterator[tuple[str, dict[str, str]]]:
    """Sets the kernel's THP knobs for the duration of a ``with`` block.

    ``enabled`` is the top-level mode (None leaves it); ``sizes`` maps sizes
    (``"64kB"``, ``"64K"``...) to modes; ``use_zero_page`` None leaves that
    knob. Sizes and modes are checked as :class:`Config` checks them
    (ConfigError). Sizes the kernel has no ``enabled`` knob for (``8kB``: the
    kernel never uses order 1 for anonymous memory) are accepted and ignored.
    Every knob is recorded first and always restored, also when the block
    raises (KeyboardInterrupt included). Only knobs whose value changes are
    written. Yields the settings found."""
    if enabled is not None and enabled not in ENABLED_MODES:
        raise _anonfolio.ConfigError(f"unknown THP mode {enabled!r} for enabled (want {', '.join(ENABLED_MODES)})")
    wanted = {_size_name(size): mode for size, mode in sizes.items()}
    Config(hugepages=wanted)  # the modes, checked by the one parser
    knobs = _size_knobs()
    top_path = THP_DIR / "enabled"
    zero_path = THP_DIR / "use_zero_page"
    saved_top, saved_sizes = read_thp_settings()
    saved_zero = _read_zero_page()
    # SIGTERM would end the process without running `finally`: while the
    # knobs are changed, turn it into SystemExit (main thread only).
    old_term: Any = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:

        def _term(signum: int, frame: Optional[FrameType]) -> None:
            raise SystemExit(128 + signum)

        try:
            old_term = signal.signal(signal.SIGTERM, _term)
        except (ValueError, OSError):  # pragma: no cover
            in_main = False
    try:
        # Per-size knobs first, so a top-level "always" never applies to a
        # size that is about to be switched off.
        for name, mode in wanted.items():
            path = knobs.get(name)
            if path is not None and saved_sizes.get(name) != mode:
                _write(path, mode)
        if use_zero_page is not None and saved_zero is not None and saved_zero != str(int(use_zero_page)):
            _write(zero_path, str(int(use_zero_page)))
        if enabled is not None and enabled != saved_top:
            _write(top_path, enabled)
        yield saved_top, dict(saved_sizes)
    finally:
        # No Ctrl-C or SIGTERM in the middle of restoring: hold them until done.
        blocked = {signal.SIGINT, signal.SIGTERM}
        try:
            old_mask: Optional[set[Union[int, signal.Signals]]] = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        except (AttributeError, OSError, ValueError):  # pragma: no cover
            old_mask = None
        try:
            _restore(top_path, saved_top, knobs, saved_sizes, zero_path, saved_zero)
        finally:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            if in_main:
                signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)


def _restore(
    top_path: Path,
    saved_top: str,
    knobs: dict[str, Path],
    saved_sizes: dict[str, str],
    zero_path: Path,
    saved_zero: Optional[str],
) -> None:
    errors = []
    # Top-level first (back to what it was, usually madvise), then the rest.
    try:
        if _read_choice(top_path) != saved_top:
            _write(top_path, saved_top)
    except OSError as e:  # pragma: no cover - keep restoring the rest
        errors.append(f"{top_path}: {e}")
    if saved_zero is not None:
        try:
            if _read_zero_page() != saved_zero:
                _write(zero_path, saved_zero)
        except OSError as e:  # pragma: no cover
            errors.append(f"{zero_path}: {e}")
    for name, mode in saved_sizes.items():
        try:
            if _read_choice(knobs[name]) != mode:
                _write(knobs[name], mode)
        except OSError as e:  # pragma: no cover
            errors.append(f"{knobs[name]}: {e}")
    if errors:
        raise OSError("could not restore THP settings: " + "; ".join(errors))


def _kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def can_change_thp() -> tuple[bool, str]:
    """Whether this process can set the kernel's THP knobs, and if not why."""
    if not sys.platform.startswith("linux"):
        return False, "not Linux"
    if _kernel_version() < (6, 8):
        return False, f"kernel {platform.release()} predates per-size THP (6.8)"
    if not (THP_DIR / "enabled").exists():
        return False, f"{THP_DIR} does not exist (no THP support)"
    if not _size_knobs():
        return False, f"no {THP_DIR}/hugepages-*/enabled knobs (no mTHP support)"
    if os.geteuid() != 0:
        return False, "not root: cannot write the THP knobs in sysfs"
    top = THP_DIR / "enabled"
    try:
        _write(top, _read_choice(top))  # writing the current value changes nothing
    except OSError as e:
        return False, f"cannot write {top}: {e.strerror or e}"
    return True, "ok"


# ---------------------------------------------------------------------------
# The replay


def kernel_replay(
    trace_text: str,
    config: Optional[Config] = None,
    *,
    thp_enabled: Optional[str] = None,
    thp: Optional[Mapping[str, str]] = None,
) -> KernelReplay:
    """Replays ``trace_text`` on the running kernel with the THP knobs of
    ``config`` (default: :class:`Config`'s, this kernel's defaults), then
    restores the knobs it found.

    ``thp_enabled`` and ``thp`` (``{"64kB": "always"}``) change the
    configuration's knobs, as ``--thp-enabled`` and ``--thp`` do. Every
    size's knob is written explicitly (a size not named gets the default:
    ``2048kB=inherit``, the others ``never``) so that a run is reproducible;
    the simulator-only fields of the configuration (policy, memory...) play
    no part. The trace is parsed before any knob is touched.

    Returns the kernel's figures (:class:`~anonfolio.results.KernelReplay`)
    and ``settings``, the knobs applied.

    Raises:
        TraceError, RangeError: a bad trace, or a VMA operation the kernel
            refused (also ValueError); the message names the line (and errno).
        SegmentationFault: an access the kernel answers with SIGSEGV (``line``, ``address``).
        ConfigError: a bad size or mode (also ValueError).
        OracleError: the kernel could not run it (also OSError).
        OSError: the knobs could not be set (not root...).
    """
    cfg = config if config is not None else Config()
    if thp_enabled is not None or thp:
        cfg = cfg.replace(**({"enabled": thp_enabled} if thp_enabled is not None else {}), hugepages=dict(thp or {}))
    _anonfolio.check_trace(trace_text)
    sizes = dict(cfg.hugepages)
    with thp_settings(cfg.enabled, sizes, use_zero_page=cfg.use_zero_page):
        run = _anonfolio.kernel_replay(trace_text)
    settings = {"enabled": cfg.enabled, **sizes}
    return KernelReplay(**run, settings=settings)


# ---------------------------------------------------------------------------
# The comparison


def compare(sim: Mapping[str, Any], kern: Mapping[str, Any]) -> list[ValidateRow]:
    """Rows (name, simulator, kernel, match) for faults, rss_bytes and, for
    every size either side reports, the :data:`COMPARED_COUNTERS` that are
    not zero on both. ``sim`` is the simulator's JSON (``replay --json``),
    ``kern`` what :func:`kernel_replay` returned; a figure missing from
    either counts as 0."""
    rows: list[ValidateRow] = []
    for key in ("faults", "rss_bytes"):
        s, k = int(sim.get(key, 0)), int(kern.get(key, 0))
        rows.append(ValidateRow(name=key, simulator=s, kernel=k, match=s == k))
    smthp: Mapping[str, Mapping[str, int]] = sim.get("mthp") or {}
    kmthp: Mapping[str, Mapping[str, int]] = kern.get("mthp") or {}
    for size in sorted(set(smthp) | set(kmthp), key=_anonfolio.parse_thp_size):
        sc, kc = smthp.get(size) or {}, kmthp.get(size) or {}
        for c in COMPARED_COUNTERS:
            s, k = int(sc.get(c, 0)), int(kc.get(c, 0))
            if s == 0 and k == 0:
                continue
            rows.append(ValidateRow(name=f"{size} {c}", simulator=s, kernel=k, match=s == k))
    return rows
