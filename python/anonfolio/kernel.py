"""The kernel oracle from Python: THP settings as the running kernel has them,
and traces replayed on the real kernel to compare with the simulator.

- :func:`thp_settings` is a context manager that sets
  ``/sys/kernel/mm/transparent_hugepage/enabled`` and
  ``hugepages-*/enabled`` and always restores what it found.
- :func:`kernel_replay` replays a trace on this machine's kernel (in this
  process, see ``anonfolio::oracle``) under given THP settings.
- :func:`add_subcommands` adds ``kernel-replay`` and ``validate`` to the
  command line.

The per-size counters the kernel reports are system-wide: run the oracle on
a quiet machine, and prefer ``madvise`` knobs with ``hugepage`` mappings so
that no other process is affected while a trace runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import threading
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")

TOP_MODES = ("always", "madvise", "never")
SIZE_MODES = ("always", "inherit", "madvise", "never")
#: Every size with a ``hugepages-*`` folder on x86-64 with 4 KiB pages.
ALL_SIZES = tuple(f"{4 << order}kB" for order in range(1, 10))  # 8kB .. 2048kB
PMD_SIZE_NAME = "2048kB"

#: Counters compared by ``validate`` for every size.
COMPARED_COUNTERS = ("anon_fault_alloc", "anon_fault_fallback", "anon_fault_fallback_charge", "split_deferred")

__all__ = [
    "THP_DIR",
    "ALL_SIZES",
    "normalize_size",
    "parse_thp_args",
    "default_settings",
    "read_thp_settings",
    "thp_settings",
    "can_change_thp",
    "kernel_replay",
    "add_subcommands",
]


# ---------------------------------------------------------------------------
# Sizes and settings

_SUFFIX_SHIFT = {
    "": 0, "b": 0,
    "k": 10, "kb": 10, "kib": 10,
    "m": 20, "mb": 20, "mib": 20,
}


def normalize_size(text: str) -> str:
    """``"64K"``, ``"64KiB"``, ``"64kB"``, ``"2M"``, ``"hugepages-64kB"`` -> ``"64kB"``.

    Raises ValueError for anything that is not a size with a ``hugepages-*``
    folder (8kB .. 2048kB)."""
    s = str(text).strip()
    if s.startswith("hugepages-"):
        s = s[len("hugepages-"):]
    m = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", s)
    if not m or m.group(2).lower() not in _SUFFIX_SHIFT:
        raise ValueError(f"unknown THP size {text!r} (sizes: {', '.join(ALL_SIZES)})")
    nbytes = int(m.group(1)) << _SUFFIX_SHIFT[m.group(2).lower()]
    name = f"{nbytes >> 10}kB" if nbytes % 1024 == 0 else ""
    if name not in ALL_SIZES:
        raise ValueError(f"unknown THP size {text!r} (sizes: {', '.join(ALL_SIZES)})")
    return name


def _size_kb(name: str) -> int:
    return int(name[:-2])


def _check_top(mode: str) -> str:
    if mode not in TOP_MODES:
        raise ValueError(f"unknown THP mode {mode!r} for enabled (want {', '.join(TOP_MODES)})")
    return mode


def _check_size_mode(size: str, mode: str) -> str:
    if mode not in SIZE_MODES:
        raise ValueError(f"unknown THP mode {mode!r} for {size} (want {', '.join(SIZE_MODES)})")
    return mode


def parse_thp_args(items: Optional[List[str]]) -> Dict[str, str]:
    """``["64K=always", "2048kB=never"]`` -> ``{"64kB": "always", "2048kB": "never"}``."""
    out: Dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--thp {item!r}: want SIZE=MODE, e.g. 64kB=madvise")
        size, mode = item.split("=", 1)
        name = normalize_size(size)
        out[name] = _check_size_mode(name, mode.strip())
    return out


def default_settings() -> Dict[str, str]:
    """The simulator's (and this kernel's) defaults: ``2048kB=inherit``, every
    other size ``never``."""
    return {s: ("inherit" if s == PMD_SIZE_NAME else "never") for s in ALL_SIZES}


def _full_settings(thp: Optional[Mapping[str, str]]) -> Dict[str, str]:
    settings = default_settings()
    for size, mode in (thp or {}).items():
        name = normalize_size(size)
        settings[name] = _check_size_mode(name, mode)
    return settings


def _read_choice(path: Path) -> str:
    """The bracketed choice of a sysfs knob: ``always [madvise] never`` -> ``madvise``."""
    text = path.read_text()
    m = re.search(r"\[(\w+)\]", text)
    if not m:
        raise OSError(f"cannot read the current mode from {path}: {text.strip()!r}")
    return m.group(1)


def _size_knobs() -> Dict[str, Path]:
    """Size name -> ``hugepages-*/enabled`` for every size that has the knob.
    (``hugepages-8kB`` has no ``enabled``: order 1 is never used for anon.)"""
    knobs = {}
    if THP_DIR.is_dir():
        for d in THP_DIR.glob("hugepages-*kB"):
            f = d / "enabled"
            if f.exists():
                knobs[d.name[len("hugepages-"):]] = f
    return dict(sorted(knobs.items(), key=lambda kv: _size_kb(kv[0])))


def read_thp_settings() -> Tuple[str, Dict[str, str]]:
    """The current (top-level enabled, {size: mode}) of the running kernel."""
    top = _read_choice(THP_DIR / "enabled")
    return top, {size: _read_choice(p) for size, p in _size_knobs().items()}


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@contextlib.contextmanager
def thp_settings(enabled: Optional[str], sizes: Mapping[str, str]) -> Iterator[Tuple[str, Dict[str, str]]]:
    """Sets the kernel's THP knobs for the duration of a ``with`` block.

    ``enabled`` is the top-level mode (None leaves it); ``sizes`` maps sizes
    (``"64kB"``, ``"64K"``...) to modes. Sizes the kernel has no ``enabled``
    knob for (``8kB``: the kernel never uses order 1 for anonymous memory)
    are accepted and ignored. Every knob is recorded first and always
    restored, also when the block raises (KeyboardInterrupt included).
    Only knobs whose value changes are written. Yields the settings found."""
    if enabled is not None:
        _check_top(enabled)
    wanted = {}
    for size, mode in sizes.items():
        name = normalize_size(size)
        wanted[name] = _check_size_mode(name, mode)
    knobs = _size_knobs()
    top_path = THP_DIR / "enabled"
    saved_top, saved_sizes = read_thp_settings()
    # SIGTERM would end the process without running `finally`: while the
    # knobs are changed, turn it into SystemExit (main thread only).
    old_term = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        def _term(signum, frame):
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
        if enabled is not None and enabled != saved_top:
            _write(top_path, enabled)
        yield saved_top, dict(saved_sizes)
    finally:
        # No Ctrl-C or SIGTERM in the middle of restoring: hold them until done.
        blocked = {signal.SIGINT, signal.SIGTERM}
        try:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        except (AttributeError, OSError, ValueError):  # pragma: no cover
            old_mask = None
        try:
            _restore(top_path, saved_top, knobs, saved_sizes)
        finally:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            if in_main:
                signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)


def _restore(top_path: Path, saved_top: str, knobs: Dict[str, Path], saved_sizes: Dict[str, str]) -> None:
    errors = []
    # Top-level first (back to what it was, usually madvise), then sizes.
    try:
        if _read_choice(top_path) != saved_top:
            _write(top_path, saved_top)
    except OSError as e:  # pragma: no cover - keep restoring the rest
        errors.append(f"{top_path}: {e}")
    for name, mode in saved_sizes.items():
        try:
            if _read_choice(knobs[name]) != mode:
                _write(knobs[name], mode)
        except OSError as e:  # pragma: no cover
            errors.append(f"{knobs[name]}: {e}")
    if errors:
        raise OSError("could not restore THP settings: " + "; ".join(errors))


def _kernel_version() -> Tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def can_change_thp() -> Tuple[bool, str]:
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


def kernel_replay(trace_text: str, *, thp_enabled: str = "madvise",
                  thp: Optional[Mapping[str, str]] = None) -> dict:
    """Replays ``trace_text`` on the running kernel with the given THP
    settings, then restores the settings it found.

    Sizes not in ``thp`` get the simulator's defaults (``2048kB=inherit``,
    the others ``never``), and every knob is written explicitly so that a run
    is reproducible. Returns a dict: ``faults``, ``rss_bytes``,
    ``anon_huge_bytes``, ``elapsed_s``, ``mthp`` ({size: {counter: delta}}),
    ``vmstat``, ``kernel``, ``harness_faults`` and ``settings`` (what was
    applied). Raises ValueError for a bad trace or setting (the message names
    the line), OSError when the kernel cannot run it."""
    from anonfolio._anonfolio import kernel_replay as _kr  # lazily: needs the extension

    _check_top(thp_enabled)
    settings = _full_settings(thp)
    with thp_settings(thp_enabled, settings):
        result = dict(_kr(trace_text))
    result["settings"] = {"enabled": thp_enabled, **settings}
    return result


# ---------------------------------------------------------------------------
# Command line


def _add_thp_options(p) -> None:
    p.add_argument("trace", metavar="TRACE", help="trace file (see interface.md), '-' for standard input")
    p.add_argument("--thp-enabled", default="madvise", choices=TOP_MODES,
                   help="top-level transparent_hugepage/enabled (default: madvise)")
    p.add_argument("--thp", action="append", default=[], metavar="SIZE=MODE",
                   help="hugepages-SIZE/enabled: always|inherit|madvise|never (repeatable); "
                        "unspecified sizes: 2048kB=inherit, others never")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_subcommands(subparsers) -> None:
    """Adds ``kernel-replay`` and ``validate`` to an argparse subparsers
    object. Each sets ``func``: call ``args.func(args)``; it returns the exit
    status (0 ok, 1 kernel/simulator disagree or the oracle failed, 2 bad input)."""
    p = subparsers.add_parser(
        "kernel-replay",
        help="replay a trace on the running kernel (root; sets and restores the THP knobs)",
        description="Replays TRACE on this machine's Linux kernel, in this process, with the "
                    "given THP settings (restored afterwards), and prints what the kernel did.")
    _add_thp_options(p)
    p.set_defaults(func=cmd_kernel_replay)

    p = subparsers.add_parser(
        "validate",
        help="replay a trace on the simulator and on the kernel and compare",
        description="Runs TRACE through `anonfolio replay` and through the kernel with the same "
                    "THP settings and prints the figures side by side. Exit status 0 when all "
                    "match, 1 when they differ, 2 for bad input.")
    _add_thp_options(p)
    p.add_argument("--policy", default="upstream", choices=("upstream", "v1", "preferred"),
                   help="simulator policy (the kernel is upstream)")
    p.set_defaults(func=cmd_validate)


class _BadInput(Exception):
    pass


def _fail(msg: str, status: int) -> int:
    print(f"anonfolio: error: {msg}", file=sys.stderr)
    return status


def _fail_on(e: Exception) -> int:
    """Reports what stopped a command: bad input (status 2), a missing
    native extension or an OS error (status 1)."""
    if isinstance(e, _BadInput):
        return _fail(str(e), 2)
    if isinstance(e, ImportError):
        return _fail(f"the native extension is not built: {e}", 1)
    return _fail(str(e).splitlines()[0] if str(e) else repr(e), 1)


def _read_trace(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise _BadInput(f"cannot read trace {path}: {getattr(e, 'strerror', None) or e}")


def _settings_from_args(args) -> Dict[str, str]:
    try:
        return _full_settings(parse_thp_args(args.thp))
    except ValueError as e:
        raise _BadInput(str(e))


def _run_kernel(text: str, args) -> dict:
    try:
        return kernel_replay(text, thp_enabled=args.thp_enabled, thp=parse_thp_args(args.thp))
    except ValueError as e:
        raise _BadInput(str(e).splitlines()[0] if str(e) else repr(e))


def _human(result: dict) -> str:
    lines = [f"kernel {result.get('kernel', '?')}",
             f"faults     {result['faults']}",
             f"rss_bytes  {result['rss_bytes']}",
             f"elapsed_s  {result['elapsed_s']:.6f}"]
    for size, counters in result.get("mthp", {}).items():
        nz = {k: v for k, v in counters.items() if v}
        if nz:
            lines.append(f"{size:>7}  " + "  ".join(f"{k}={v}" for k, v in nz.items()))
    nz = {k: v for k, v in result.get("vmstat", {}).items() if v}
    if nz:
        lines.append("vmstat   " + "  ".join(f"{k}={v}" for k, v in nz.items()))
    return "\n".join(lines)


def cmd_kernel_replay(args) -> int:
    try:
        text = _read_trace(args.trace)
        _settings_from_args(args)
        result = _run_kernel(text, args)
    except (_BadInput, ImportError, OSError) as e:
        return _fail_on(e)
    if args.json:
        print(json.dumps(result))
    else:
        print(_human(result))
    return 0


def _simulator_args(args, settings: Dict[str, str]) -> List[str]:
    out = ["--thp-enabled", args.thp_enabled]
    for size, mode in settings.items():
        out += ["--thp", f"{size}={mode}"]
    out += ["--policy", args.policy]
    return out


def _strip_prog(msg: str) -> str:
    for prefix in ("anonfolio: error: ", "anonfolio: "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def _run_simulator(args, settings: Dict[str, str], text: str) -> dict:
    cmd = [sys.executable, "-m", "anonfolio", "replay", "-" if args.trace == "-" else args.trace,
           "--json"] + _simulator_args(args, settings)
    try:
        proc = subprocess.run(cmd, input=text if args.trace == "-" else None,
                              capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise OSError(f"cannot run the simulator: {e}")
    if proc.returncode == 2:
        msg = (proc.stderr.strip().splitlines() or ["bad input"])[-1]
        raise _BadInput(_strip_prog(msg))
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise OSError(f"simulator failed: {_strip_prog(msg)}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise OSError(f"simulator printed no JSON: {e}")


def compare(sim: dict, kern: dict) -> List[Tuple[str, int, int, bool]]:
    """Rows (name, simulator, kernel, match) for faults, rss_bytes and, for
    every size either side reports, the :data:`COMPARED_COUNTERS`."""
    rows = []
    for key in ("faults", "rss_bytes"):
        s, k = int(sim.get(key, 0)), int(kern.get(key, 0))
        rows.append((key, s, k, s == k))
    smthp, kmthp = sim.get("mthp", {}) or {}, kern.get("mthp", {}) or {}
    sizes = sorted(set(smthp) | set(kmthp), key=lambda s: _size_kb(normalize_size(s)))
    for size in sizes:
        sc, kc = smthp.get(size, {}) or {}, kmthp.get(size, {}) or {}
        for c in COMPARED_COUNTERS:
            s, k = int(sc.get(c, 0)), int(kc.get(c, 0))
            if s == 0 and k == 0:
                continue
            rows.append((f"{size} {c}", s, k, s == k))
    return rows


def cmd_validate(args) -> int:
    try:
        text = _read_trace(args.trace)
        settings = _settings_from_args(args)
        sim = _run_simulator(args, settings, text)
        kern = _run_kernel(text, args)
    except (_BadInput, ImportError, OSError) as e:
        return _fail_on(e)
    rows = compare(sim, kern)
    ok = all(r[3] for r in rows)
    if args.json:
        print(json.dumps({
            "match": ok,
            "rows": [{"name": n, "simulator": s, "kernel": k, "match": m} for n, s, k, m in rows],
            "simulator": sim, "kernel": kern,
        }))
    else:
        w = max([len(r[0]) for r in rows] + [len("figure")])
        print(f"{'figure':<{w}}  {'simulator':>12}  {'kernel':>12}  result")
        for name, s, k, m in rows:
            print(f"{name:<{w}}  {s:>12}  {k:>12}  {'MATCH' if m else 'DIFF'}")
        print(f"kernel {kern.get('kernel', '?')}, policy {args.policy}: "
              f"{'all match' if ok else 'DIFFERENT'}")
    return 0 if ok else 1
