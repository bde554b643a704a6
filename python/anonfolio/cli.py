"""The ``anonfolio`` command line (every command and option: docs/cli.md)::

    anonfolio replay TRACE [--thp-enabled MODE] [--thp SIZE=MODE ...] [--policy P]
                           [--threads N] [--deterministic SEED] [--json]
    anonfolio run [--workload W] [--size BYTES] [--stride PAGES] [--fraction F] [--seed S]
                  [--threads N] [--sharing disjoint|interleaved] [--deterministic SEED]
                  [same THP/policy options] [--json]
    anonfolio experiment race-policies [--out DIR]
    anonfolio experiment scaling [--threads N,N,...]
    anonfolio kernel-replay TRACE [THP options] [--json]
    anonfolio validate TRACE [THP options] [--policy P] [--json]
    anonfolio report TRACE --out DIR [grid options]
    anonfolio sweep [--workload W,... | --trace TRACE] [grid options] [--out FILE.csv|.parquet]

Bad input exits with status 2 and one line on stderr, ``anonfolio: error: ...``.

Every command reads its THP knobs (and the simulated machine, where it has
one) with the same options, built by :func:`add_config_options`, into a
:class:`~anonfolio.config.Config` by :func:`config_from_args`; sizes and
byte counts go through the native parsers. ``kernel-replay`` and
``validate`` hand that configuration to :mod:`anonfolio.kernel`, the one
module that touches the running kernel. Each subcommand sets
``func=handler``, where ``handler(args) -> int`` returns the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

from . import _anonfolio
from .api import ADVICE, SHARING, WORKLOADS, Simulator
from .config import ENABLED_MODES, POLICIES, Config
from .results import ConfigJson, KernelReplay, ValidateResult
from .stats import Stats

__all__ = ["main", "build_parser", "add_config_options", "config_from_args", "emit", "CliError", "ArgumentParser"]

PROG = "anonfolio"
#: What ``anonfolio run`` does with no options: big enough to mean something,
#: small enough to print in well under a second.
DEFAULT_RUN_SIZE = "1G"
#: page_fault1's own: will-it-scale maps 128 MiB per task.
PAGE_FAULT1_SIZE = "128M"


class CliError(Exception):
    """A bad command line or input: printed as one line, exit status ``status``."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise CliError(message)


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split()) or "error"


# ----------------------------------------------------------------------------
# Option types


def _bytes(text: str) -> int:
    try:
        return _anonfolio.parse_bytes(text)
    except _anonfolio.AnonfolioError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"malformed number {text!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(
                f"{n} is out of range ({lo}..{hi})" if hi is not None else f"{n} is below {lo}"
            )
        return n

    return parse


def _fraction(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"malformed number {text!r}") from None
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..1")
    return f


def _thp_spec(text: str) -> str:
    size, sep, mode = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"malformed {text!r} (want SIZE=always|inherit|madvise|never)")
    try:
        order = _anonfolio.parse_thp_size(size)
    except _anonfolio.AnonfolioError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    name = _anonfolio.size_name(order)
    if order == 1:
        raise argparse.ArgumentTypeError(
            f"{size}: the kernel has no anonymous-memory knob for 8kB (order 1 is never used for anon; "
            "hugepages-8kB exists for files only); sizes: 16kB, 32kB, ..., 2048kB"
        )
    if mode not in ("always", "inherit", "madvise", "never"):
        raise argparse.ArgumentTypeError(
            f"unknown mode {mode!r} for {name} (want always, inherit, madvise or never)"
        )
    return f"{name}={mode}"


# ----------------------------------------------------------------------------
# Shared options


#: What the THP knobs are when no option changes them: this kernel's defaults.
KERNEL_DEFAULT_KNOBS = "enabled=madvise, 2048kB=inherit, every other size never"


def add_config_options(
    p: argparse.ArgumentParser,
    *,
    policy: bool = True,
    preempt: bool = True,
    machine: bool = True,
    knob_defaults: str = KERNEL_DEFAULT_KNOBS,
    knobs: bool = True,
) -> None:
    """The options that make a :class:`Config`: the THP knobs always; the
    fault-path policy (``--policy``, ``--on-race``), the deterministic
    schedule's ``--preempt`` and the simulated machine when asked (the
    kernel oracle has only the knobs)."""
    g = p.add_argument_group(f"THP knobs{' and policy' if policy else ''} (as /sys/kernel/mm/transparent_hugepage/)")
    if knobs:
        g.add_argument(
            "--thp-enabled", choices=ENABLED_MODES, metavar="MODE",
            help=f"transparent_hugepage/enabled: always, madvise or never (default: {knob_defaults})",
        )
        g.add_argument(
            "--thp", action="append", type=_thp_spec, default=[], metavar="SIZE=MODE",
            help="hugepages-SIZE/enabled (SIZE 16kB..2048kB, also 64K, 2M; MODE always|inherit|madvise|never); "
            f"repeatable; sizes not named keep their defaults ({knob_defaults})",
        )
    if policy:
        g.add_argument("--policy", choices=POLICIES, metavar="POLICY",
                       help="fault path: upstream (default; Linux 6.8..6.18), v1 (the seed patch) or preferred")
        g.add_argument("--on-race", choices=("refault", "retry-lower"), metavar="HOW",
                       help="after a lost race: refault (upstream, preferred) or retry-lower (v1); "
                       "default: the policy's own")
    if preempt:
        g.add_argument("--preempt", type=_fraction, metavar="P",
                       help="with --deterministic: probability of switching CPUs at each race point (default 0.5; "
                       "higher widens the race windows)")
    g.add_argument("--no-zero-page", action="store_true",
                   help="use_zero_page=0: no huge zero page (a read fault in a THP-eligible range allocates)")
    if not machine:
        return
    m = p.add_argument_group("simulated machine")
    m.add_argument("--memory", type=_bytes, metavar="BYTES", help="physical memory (default 4T)")
    m.add_argument("--memcg-limit", type=_bytes, metavar="BYTES", help="memcg memory.max (default unlimited)")
    m.add_argument("--fragmentation", type=_fraction, metavar="F",
                   help="fraction 0..1 of pageblocks pinned before the run (default 0)")
    m.add_argument("--fail-order", action="append", default=[], metavar="ORDER|SIZE",
                   help="make every allocation of this order (or size, 64kB) fail; repeatable")
    m.add_argument("--fail-rate", type=_fraction, metavar="F",
                   help="probability that an allocation above order 0 fails (default 0)")
    m.add_argument("--fail-seed", type=_count(0), metavar="S", help="seed of the failure injection (default 0)")
    m.add_argument("--check-invariants", action="store_true",
                   help="check mapcounts and page conservation after the run")


def config_from_args(args: argparse.Namespace) -> Config:
    """The :class:`Config` that :func:`add_config_options`' options describe."""
    fields: dict[str, Any] = {}
    if getattr(args, "no_zero_page", False):
        fields["use_zero_page"] = False
    for opt, field in (("memory", "memory"), ("memcg_limit", "memcg_limit"), ("fragmentation", "fragmentation"),
                       ("fail_rate", "fail_rate"), ("fail_seed", "seed")):
        v = getattr(args, opt, None)
        if v is not None:
            fields[field] = v
    fail = getattr(args, "fail_order", None) or []
    if fail:
        fields["fail_orders"] = [int(x) if x.isdigit() else x for x in fail]
    if getattr(args, "check_invariants", False):
        fields["check_invariants"] = True
    if getattr(args, "on_race", None):
        fields["on_race"] = args.on_race
    if getattr(args, "preempt", None) is not None:
        fields["preempt"] = args.preempt
    return Config.from_args(args, **fields)


def _config_summary(cfg: Config) -> str:
    sizes = " ".join(f"{s}={m}" for s, m in cfg.hugepages.items() if m != "never") or "none"
    return f"policy {cfg.policy}, enabled={cfg.enabled}, mTHP sizes: {sizes}"


def _json_config(cfg: Config) -> ConfigJson:
    return ConfigJson(**cfg.to_dict())


def emit(stats: Stats, args: argparse.Namespace, *, title: str = "", extra: Optional[dict[str, Any]] = None) -> None:
    """Prints ``stats``: one JSON object with ``--json``, else a table."""
    if getattr(args, "json", False):
        d = stats.to_dict()
        if extra:
            d.update(extra)
        sys.stdout.write(json.dumps(d) + "\n")
    else:
        sys.stdout.write(stats.table(title=title) + "\n")
        t = stats.to_dict().get("time")
        if t:
            lat = t["fault_latency_ns"]
            sys.stdout.write(
                f"virtual time: {t['elapsed_ns'] / 1e6:.3f} ms elapsed, fault latency mean {lat['mean']:.0f} ns "
                f"p50 {lat['p50']} p99 {lat['p99']} max {lat['max']}\n"
                "  lock waits (ns): " + ", ".join(f"{k} {v}" for k, v in t["lock_wait_ns"].items()) + "\n")
    sys.stdout.flush()


def _fail_with_partial(
    e: _anonfolio.AnonfolioError, args: argparse.Namespace, extra: dict[str, Any], title: str = ""
) -> NoReturn:
    """A replay or run stopped by an error: print what ran before it, then
    the error goes to stderr as usual. With --json always (one object with
    an ``error`` key); as a table only when the run itself ran out of memory
    (a result worth reading), not for bad input, which only needs fixing."""
    if e.stats is not None and (getattr(args, "json", False) or isinstance(e, _anonfolio.OutOfMemory)):
        stats = e.stats if isinstance(e.stats, Stats) else Stats(e.stats)
        emit(stats, args, title=f"{title}  -- stopped: {_one_line(str(e))}" if title else "",
             extra=dict(extra, error=_one_line(str(e))))
    raise e


# ----------------------------------------------------------------------------
# Commands


def _read_trace(path: str) -> str:
    """The text of the trace file ``path`` (``-``: standard input)."""
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise CliError(f"cannot read trace {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise CliError(f"trace {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None


def _time_costs(args: argparse.Namespace) -> Optional[dict[str, float]]:
    """``--time [PROFILE.json]``: the costs of the profile named (default:
    the one shipped with the package), or None without ``--time``."""
    if getattr(args, "time", None) is None:
        return None
    from .calibrate import CalibrateError, load_profile

    try:
        return {k: float(v) for k, v in load_profile(args.time or None)["costs"].items()}
    except CalibrateError as e:
        raise CliError(str(e)) from None


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import CalibrateError, run_calibrate

    try:
        run_calibrate(out=args.out, region_bytes=args.size, reps=args.reps, log=sys.stdout)
    except CalibrateError as e:
        raise CliError(str(e)) from None
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    path = args.trace
    sim = Simulator(cfg)
    extra = {"config": _json_config(cfg), "trace": path, "threads": args.threads,
             "deterministic": args.deterministic}
    title = f"replay {path}  ({_config_summary(cfg)})"
    try:
        time = _time_costs(args)
        if path == "-":
            s = sim.replay(_read_trace(path), threads=args.threads, deterministic=args.deterministic, time=time)
        else:
            # Streamed from the file (plain, .zst or .gz), never held whole.
            s = sim.replay_file(path, threads=args.threads, deterministic=args.deterministic, time=time)
    except _anonfolio.AnonfolioError as e:
        _fail_with_partial(e, args, extra, title)
    except OSError as e:
        raise CliError(f"cannot read trace {path}: {e.strerror or e}") from None
    emit(s, args, title=title, extra=extra)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    sim = Simulator(cfg)
    size = args.size if args.size is not None else _anonfolio.parse_bytes(
        PAGE_FAULT1_SIZE if args.workload == "page_fault1" else DEFAULT_RUN_SIZE)
    kw: dict[str, Any] = dict(threads=args.threads, sharing=args.sharing, deterministic=args.deterministic,
                              advice=args.advice or default_advice(args.workload))
    if args.time is not None:
        kw["time"] = _time_costs(args)
    for name in ("stride", "fraction", "seed", "iterations"):
        v = getattr(args, name)
        kw[name] = v if v is not None else workload_default(args.workload, name)
    extra = {"config": _json_config(cfg), "workload": dict(name=args.workload, size=size, **kw)}
    from .stats import format_bytes

    title = (f"run {args.workload} over {format_bytes(size)} ({kw['advice']}), {args.threads} thread(s)"
             f"{' ' + args.sharing if args.threads > 1 else ''}  ({_config_summary(cfg)})")
    run_kw = {k: v for k, v in kw.items() if v is not None}
    from .api import check_fits

    try:
        check_fits(cfg, args.workload, size, **run_kw)
    except _anonfolio.OutOfMemory as e:
        raise CliError(str(e)) from None  # the options ask for more than the machine has: bad input
    try:
        s = sim.run(args.workload, size, **run_kw)
    except _anonfolio.AnonfolioError as e:
        _fail_with_partial(e, args, extra, title)
    emit(s, args, title=title, extra=extra)
    return 0


#: What ``run`` uses for an option not given, by workload (None: not used).
_WORKLOAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "stride": {"stride": 1},
    "random": {"fraction": 1.0, "seed": 0},
    "sparse": {"fraction": 0.1, "seed": 0},
    "page_fault1": {"iterations": 1},
}


def workload_default(workload: str, option: str) -> Any:
    """The value ``run --workload W`` uses for ``--OPTION`` when it is not
    given (None: the workload does not use the option)."""
    return _WORKLOAD_DEFAULTS.get(workload, {}).get(option)


def default_advice(workload: str) -> str:
    """MADV_HUGEPAGE for every built-in workload but page_fault1, which
    will-it-scale maps without advice."""
    return "none" if workload == "page_fault1" else "hugepage"


def cmd_race_policies(args: argparse.Namespace) -> int:
    from . import experiments

    if args.time is not None:
        from .experiments._race_time import race_policies_time

        costs = _time_costs(args)
        assert costs is not None
        sys.stdout.write("race policies in virtual time (interleaved sequential writes, medians over seeds):\n")
        race_policies_time(costs, policies=args.policies, cpus=args.cpus, size=args.size or (48 << 20),
                           seeds=args.seeds, first_seed=args.deterministic, out=args.out, log=sys.stdout)
        return 0

    for p in args.policies:
        if p not in POLICIES:
            raise CliError(f"unknown policy {p!r} (want {', '.join(POLICIES)})")
    for m in args.memory:
        if m not in experiments.MEMORY:
            raise CliError(f"unknown memory condition {m!r} (want {', '.join(experiments.MEMORY)})")
    for s in args.sharing:
        if s not in SHARING:
            raise CliError(f"unknown sharing {s!r} (want {', '.join(SHARING)})")
    cfg = experiments.RACE_POLICIES_CONFIG
    if args.thp or args.thp_enabled:
        cfg = Config.from_args(args, hugepages=dict(cfg.hugepages))
    res = experiments.race_policies(
        out=args.out, size=args.size, cpus=args.cpus, seeds=args.seeds, first_seed=args.deterministic,
        policies=args.policies, sharing=args.sharing, memory=args.memory,
        free_size=None if args.no_free else args.free_size, free_threads=args.free_threads,
        free_repeat=args.free_repeat, workload=args.workload, config=cfg,
        plots=not args.no_plots, jobs=args.jobs, log=sys.stderr if not args.quiet else None,
        progress=False if args.quiet else None,
    )
    if args.quiet:
        sys.stdout.write(f"{os.path.join(res.out, 'results.md')}\n")
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from . import experiments

    if args.processes and args.time is None:
        raise CliError("--processes needs --time (free-running CPUs share one mm)")
    if args.time is not None:
        from .experiments._scaling_time import DEFAULT_CPUS, scaling_time

        costs = _time_costs(args)
        assert costs is not None
        # Without --threads: 1 to 256 simulated CPUs; 16 MiB per CPU, 2 loops.
        cpus = DEFAULT_CPUS if args.threads == [1, 2, 4] else args.threads
        size = args.size or (16 << 20)
        iters = 2 if args.iterations == 10 else args.iterations
        cfg = config_from_args(args)
        mode = "processes" if args.processes else "threads"
        sys.stdout.write(f"page_fault1 in virtual time ({mode}): {size >> 20} MiB per CPU, {iters} loops; "
                         f"{_config_summary(cfg)}\n")
        scaling_time(costs, cpus=cpus, size=size, iterations=iters, config=cfg, processes=args.processes,
                     out=args.out, log=sys.stdout)
        return 0

    cfg = config_from_args(args)
    if not (args.thp or args.thp_enabled):
        cfg = cfg.replace(enabled=experiments.RACE_POLICIES_CONFIG.enabled,
                          hugepages=dict(experiments.RACE_POLICIES_CONFIG.hugepages))
    res = experiments.scaling(
        workload=args.workload, threads=args.threads, size=args.size, iterations=args.iterations,
        repeat=args.repeat, config=cfg, out=args.out, plots=not args.no_plots,
        log=sys.stderr if args.out else None, progress=False if args.no_progress else None,
    )
    sys.stdout.write(res.table + "\n")
    return 0


def _grid_from_args(args: argparse.Namespace, default: bool) -> list[tuple[str, Config]]:
    """The settings a ``report`` or ``sweep`` command line asks for."""
    from . import grid

    base = config_from_args(argparse.Namespace(**{k: v for k, v in vars(args).items()
                                                  if k not in ("thp", "thp_enabled", "policy")}))
    try:
        if default and not args.thp and not args.thp_enabled:
            return grid.default_report_grid(base, policy=args.policy)
        return grid.config_grid(args.thp, enabled=args.thp_enabled, policy=args.policy, base=base)
    except (grid.GridError, _anonfolio.ConfigError) as e:
        raise CliError(str(e)) from None


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    settings = _grid_from_args(args, default=True)
    text = _read_trace(args.trace)
    _anonfolio.check_trace(text)
    res = report(text if args.trace == "-" else args.trace, args.out, settings, threads=args.threads,
                 deterministic=args.deterministic, progress=False if args.no_progress else None)
    sys.stdout.write(f"{res.html}\n{res.csv}\n")
    return 0


def _executor(spec: Optional[str], jobs: Optional[int]) -> tuple[Any, Callable[[], None]]:
    """``--executor``: None (serial), ``processes`` (a process pool of
    ``--jobs`` workers) or ``dask:ADDRESS`` (a Dask distributed scheduler);
    with the function that releases it."""
    if spec is None or spec == "serial":
        return None, lambda: None
    if spec == "processes":
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=jobs)
        return pool, pool.shutdown
    if spec.startswith("dask:"):
        import importlib

        try:
            client_class: Any = importlib.import_module("distributed").Client
        except ImportError:
            raise CliError("--executor dask:... needs Dask distributed: pip install 'anonfolio[cluster]'") from None
        try:
            client = client_class(spec[len("dask:"):], timeout=10)
        except OSError as e:
            raise CliError(f"--executor {spec}: cannot reach the Dask scheduler: {_one_line(str(e))}") from None
        ex = client.get_executor()

        def close() -> None:
            ex.shutdown()
            client.close()

        return ex, close
    raise CliError(f"unknown --executor {spec!r} (want serial, processes or dask:ADDRESS)")


def cmd_sweep(args: argparse.Namespace) -> int:
    from .api import sweep

    settings = _grid_from_args(args, default=False)
    kw: dict[str, Any] = {}
    for name in ("threads", "advice", "sharing", "stride", "fraction", "seed", "iterations"):
        v = getattr(args, name)
        if v:
            kw[name] = v if len(v) > 1 else v[0]
    if args.deterministic is not None:
        kw["deterministic"] = args.deterministic
    out = args.out
    if out and not out.endswith((".csv", ".parquet")):
        raise CliError(f"--out {out}: want a .csv or .parquet file name")
    ex, release = _executor(args.executor, args.jobs)
    try:
        if args.trace is not None:
            for k in ("advice", "sharing", "stride", "fraction", "seed", "iterations"):
                if k in kw:
                    raise CliError(f"--{k} is for workloads, not with --trace")
            trace: Any = _read_trace(args.trace) if args.trace == "-" else Path(args.trace)
            if not isinstance(trace, str):
                _read_trace(args.trace)  # a missing file is one line, before anything runs
            res = sweep(dict(settings), trace=trace, executor=ex,
                        progress=False if args.no_progress else None, **kw)
        else:
            res = sweep(args.workload, configs=dict(settings), sizes=args.size or None, executor=ex,
                        progress=False if args.no_progress else None, **kw)
    finally:
        release()
    if out and out.endswith(".parquet"):
        try:
            res.to_parquet(out)
        except ImportError as e:
            raise CliError(f"--out {out}: {e}") from None
    elif out:
        res.to_csv(out)
    else:
        sys.stdout.write(res.to_csv() or "")
    if out:
        sys.stdout.write(f"{out}: {len(res)} runs\n")
    return 0


def _on_the_kernel(text: str, cfg: Config) -> KernelReplay:
    """The trace on the running kernel; what stops it there (no root, no
    userfaultfd, a knob that cannot be written) exits with status 1, bad
    input with 2."""
    from . import kernel

    try:
        return kernel.kernel_replay(text, cfg)
    except _anonfolio.OracleError as e:
        raise CliError(f"the kernel oracle failed: {_one_line(str(e))}", status=1) from None
    except OSError as e:
        raise CliError(f"cannot run on the kernel: {e.strerror or e}", status=1) from None


def _kernel_table(result: KernelReplay) -> str:
    lines = [f"kernel {result['kernel']}",
             f"faults     {result['faults']}",
             f"rss_bytes  {result['rss_bytes']}",
             f"elapsed_s  {result['elapsed_s']:.6f}"]
    orders = result.get("folio_orders")
    if orders is not None:
        held = "  ".join(f"{_anonfolio.size_name(o) if o else '4kB'}={n}" for o, n in enumerate(orders) if n)
        lines.append(f"folios held at the end (this process, pagemap): {held or 'none'}")
    else:
        lines.append("folios held at the end: unknown (pagemap/kpageflags unreadable)")
    lines.append("system-wide counter deltas (other processes' faults count too):")
    for size, counters in result["mthp"].items():
        nz = {k: v for k, v in counters.items() if v}
        if nz:
            lines.append(f"{size:>7}  " + "  ".join(f"{k}={v}" for k, v in nz.items()))
    nz = {k: v for k, v in result["vmstat"].items() if v}
    if nz:
        lines.append("vmstat   " + "  ".join(f"{k}={v}" for k, v in nz.items()))
    return "\n".join(lines)


def cmd_kernel_replay(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = _on_the_kernel(_read_trace(args.trace), cfg)
    sys.stdout.write((json.dumps(result) if args.json else _kernel_table(result)) + "\n")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from . import kernel

    cfg = config_from_args(args)
    text = _read_trace(args.trace)
    _anonfolio.check_trace(text)  # bad input is reported before anything runs
    sim = dict(Simulator(cfg).replay(text).to_dict(), config=_json_config(cfg))
    kern = _on_the_kernel(text, cfg)
    rows = kernel.compare(sim, kern, system_counters=args.system_counters)
    ok, notes = kernel.verdict(rows)
    scope = "system" if any(r["decides"] and r["scope"] == "system" for r in rows) else "process"
    if args.json:
        out = ValidateResult(match=ok, scope=scope, notes=notes, rows=rows, simulator=sim, kernel=kern)
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        w = max([len(r["name"]) for r in rows] + [len("figure")])
        lines = [f"{'figure':<{w}}  {'simulator':>12}  {'kernel':>12}  {'scope':<8}  result"]
        for r in rows:
            res = ("MATCH" if r["match"] else "DIFF") if r["decides"] else ("same" if r["match"] else "differs")
            lines.append(f"{r['name']:<{w}}  {r['simulator']:>12}  {r['kernel']:>12}  {r['scope']:<8}  {res}")
        lines += [f"note: {n}" for n in notes]
        lines.append(f"kernel {kern['kernel']}, policy {cfg.policy}: {'all match' if ok else 'DIFFERENT'}")
        sys.stdout.write("\n".join(lines) + "\n")
    return 0 if ok else 1


# ----------------------------------------------------------------------------


def _add_time_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--time", nargs="?", const="", default=None, metavar="PROFILE.json",
                   help="run in virtual time with this cost profile (default: the one shipped, measured by "
                        "'anonfolio calibrate'); results gain a time object")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Simulate the Linux 6.18 anonymous page-fault path with large folios (mTHP).",
        epilog="Bad input exits with status 2 and one line on stderr. Documentation (in the repository): "
               "docs/cli.md (every command and option), docs/trace-format.md, docs/json.md, docs/workloads.md.",
    )
    p.add_argument("--version", action="version", version=f"anonfolio {_anonfolio.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    r = sub.add_parser("replay", help="replay a trace file",
                       description="Replay a trace: one operation a line (mmap, munmap, madvise, w, r, @T; the "
                                   "format is docs/trace-format.md, the JSON docs/json.md).")
    r.add_argument("trace", metavar="TRACE", help="trace file, or - for standard input")
    add_config_options(r)
    r.add_argument("--threads", type=_count(1, 1024), default=1, metavar="N",
                   help="threads to run the trace's @T lines on (default 1)")
    r.add_argument("--deterministic", type=_count(0), metavar="SEED",
                   help="a deterministic interleaving of the threads, seeded")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    _add_time_option(r)
    r.set_defaults(func=cmd_replay)

    w = sub.add_parser("run", help="run a built-in workload",
                       description="Map one private anonymous VMA (advised MADV_HUGEPAGE unless --advice says "
                                   "otherwise; page_fault1 unadvised) and write to it in the workload's order. "
                                   "The workloads are described in docs/workloads.md, every option in docs/cli.md.")
    w.add_argument("--workload", choices=WORKLOADS, default="sequential", metavar="W",
                   help="sequential (default), reverse, stride, random, sparse or page_fault1")
    w.add_argument("--size", type=_bytes, metavar="BYTES",
                   help=f"bytes to map: 4096, 64K, 64KiB, 2M, 1G, 1g, 1GB, 1T, all powers of 1024 "
                   f"(default {DEFAULT_RUN_SIZE}; page_fault1: {PAGE_FAULT1_SIZE} per thread)")
    w.add_argument("--stride", type=_count(1), metavar="PAGES",
                   help="stride workload: touch every PAGES-th page (default 1)")
    w.add_argument("--fraction", type=_fraction, metavar="F",
                   help="fraction of pages touched: random (default 1), sparse (default 0.1)")
    w.add_argument("--seed", type=_count(0), metavar="S", help="seed of the random and sparse orders (default 0)")
    w.add_argument("--iterations", type=_count(1), metavar="N",
                   help="page_fault1: map-touch-unmap loops per thread (default 1)")
    w.add_argument("--advice", choices=ADVICE, metavar="ADVICE",
                   help="madvise of the VMA: hugepage (MADV_HUGEPAGE, the default), nohugepage or none; "
                   "page_fault1 defaults to none, as will-it-scale maps it")
    w.add_argument("--threads", type=_count(1, 1024), default=1, metavar="N", help="threads (default 1)")
    w.add_argument("--sharing", choices=SHARING, default="disjoint", metavar="HOW",
                   help="disjoint (default: a slice each) or interleaved (turns page by page)")
    w.add_argument("--deterministic", type=_count(0), metavar="SEED",
                   help="a deterministic interleaving of the threads, seeded")
    add_config_options(w)
    w.add_argument("--json", action="store_true", help="print one JSON object")
    _add_time_option(w)
    w.set_defaults(func=cmd_run)

    cal = sub.add_parser("calibrate", help="measure this machine's kernel and fit a cost profile",
                         description="Measure this kernel (write-fault latency per folio size, read faults, "
                                     "unmap cost per folio size, page_fault1 at one thread), fit the cost profile "
                                     "of --time, print every cost and how well the fit reproduces each measurement. "
                                     "Needs root; sets the THP knobs (madvise mode, MADV_HUGEPAGE) and restores them.")
    cal.add_argument("--out", metavar="PROFILE.json", help="write the profile here (default: only print it)")
    cal.add_argument("--size", type=_bytes, default=256 << 20, metavar="BYTES",
                     help="bytes faulted per measurement (default 256M)")
    cal.add_argument("--reps", type=_count(1, 100), default=5, metavar="N", help="runs per figure (default 5)")
    cal.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("experiment", help="canned experiments that write tables and plots")
    esub = e.add_subparsers(dest="experiment", metavar="EXPERIMENT", parser_class=ArgumentParser)

    def _ints(text: str) -> list[int]:
        return [_count(1, 1024)(x) for x in text.split(",") if x]

    def _words(text: str) -> list[str]:
        return [x for x in text.split(",") if x]

    rp = esub.add_parser(
        "race-policies",
        help="is v1's retry-lower worth it compared with refault?",
        description="Every combination of policy (upstream, v1, preferred) x race handling (refault, retry-lower) "
                    "x CPUs x sharing (disjoint, interleaved) x memory (plenty, fragmented = fail-rate 0.3): "
                    "a deterministic pass over several seeds (race counts) and a free-running pass on host threads "
                    "(time, lock contention). Writes results.csv, medians.csv, results.md (with computed findings) "
                    "and plots into --out.",
    )
    rp.add_argument("--out", default=os.path.join("out", "race-policies"), metavar="DIR",
                    help="output folder (default out/race-policies)")
    rp.add_argument("--size", type=_bytes, default=_anonfolio.parse_bytes("48M"), metavar="BYTES",
                    help="bytes per deterministic run (default 48M)")
    rp.add_argument("--cpus", type=_ints, default=[1, 2, 4, 8], metavar="N,N,...",
                    help="simulated CPUs of the deterministic pass (default 1,2,4,8)")
    rp.add_argument("--seeds", type=_count(1, 1000), default=7, metavar="N",
                    help="deterministic seeds per point; tables show median and min..max (default 7)")
    rp.add_argument("--repeat", type=_count(1, 1000), dest="seeds", help=argparse.SUPPRESS)  # the old name
    rp.add_argument("--deterministic", type=_count(0), default=1, metavar="SEED",
                    help="first seed (default 1; seed i seeds both the interleaving and the failure injection)")
    rp.add_argument("--policies", type=_words, default=list(POLICIES), metavar="P,P,...",
                    help="policies (default upstream,v1,preferred)")
    rp.add_argument("--sharing", type=_words, default=["disjoint", "interleaved"], metavar="HOW,...",
                    help="sharing modes (default disjoint,interleaved)")
    rp.add_argument("--memory", type=_words, default=["plenty", "fragmented"], metavar="M,...",
                    help="memory conditions: plenty, fragmented (fail-rate 0.3) (default both)")
    rp.add_argument("--free-size", type=_bytes, default=_anonfolio.parse_bytes("4G"), metavar="BYTES",
                    help="bytes per free-running run (default 4G)")
    rp.add_argument("--free-threads", type=_ints, default=[1, 2], metavar="N,N,...",
                    help="host threads of the free-running pass (default 1,2)")
    rp.add_argument("--free-repeat", type=_count(0, 100), default=5, metavar="N",
                    help="free-running runs per point (default 5; 0 skips the pass)")
    rp.add_argument("--no-free", action="store_true", help="skip the free-running pass")
    rp.add_argument("--workload", choices=WORKLOADS, default="sequential", metavar="W",
                    help="workload (default sequential)")
    rp.add_argument("--thp-enabled", choices=ENABLED_MODES, metavar="MODE",
                    help="transparent_hugepage/enabled (default madvise)")
    rp.add_argument("--thp", action="append", type=_thp_spec, default=[], metavar="SIZE=MODE",
                    help="hugepages-SIZE/enabled, repeatable (default 16kB, 64kB, 256kB always; 2048kB never)")
    rp.add_argument("--jobs", type=_count(1, 64), metavar="N",
                    help="deterministic runs at once (results do not depend on it; default: host CPUs, at most 4)")
    rp.add_argument("--no-plots", action="store_true", help="no PNGs")
    rp.add_argument("--quiet", action="store_true",
                    help="no progress (bars, shown on a terminal, and notes) on stderr; print the path of results.md")
    rp.add_argument("--time", nargs="?", const="", default=None, metavar="PROFILE.json",
                    help="instead: each policy in virtual time with this cost profile (default: the one shipped): "
                         "elapsed, fault latency, races and the zeroing lost to them")
    rp.set_defaults(func=cmd_race_policies)

    sc = esub.add_parser(
        "scaling",
        help="pages touched per second against host threads, with the linear reference",
        description="Runs the workload free-running on 1, 2, 4 ... host threads and prints ops/s (pages touched "
                    "per second, median of --repeat runs), the linear reference (1-thread ops/s x N) and the "
                    "efficiency. page_fault1 is will-it-scale's: each thread maps SIZE, writes a byte a page, "
                    "unmaps, ITERATIONS times.",
    )
    sc.add_argument("--workload", choices=("page_fault1", "sequential"), default="page_fault1", metavar="W",
                    help="page_fault1 (default) or sequential (one range split between the threads)")
    sc.add_argument("--threads", type=_ints, default=[1, 2, 4], metavar="N,N,...", help="thread counts (default 1,2,4)")
    sc.add_argument("--size", type=_bytes, metavar="BYTES",
                    help="page_fault1: bytes per thread (default 128M); sequential: in all (default 1G)")
    sc.add_argument("--iterations", type=_count(1), default=10, metavar="N",
                    help="page_fault1: map-touch-unmap loops per thread (default 10)")
    sc.add_argument("--repeat", type=_count(1, 100), default=3, metavar="N", help="runs per point (default 3)")
    sc.add_argument("--out", metavar="DIR", help="also write scaling.csv, scaling.md and scaling.png here")
    sc.add_argument("--time", nargs="?", const="", default=None, metavar="PROFILE.json",
                    help="page_fault1 in virtual time on simulated CPUs (default 1..256, 16 MiB each, 2 loops) "
                         "with this cost profile (default: the one shipped); THP knobs: the kernel's defaults "
                         "unless given")
    sc.add_argument("--processes", action="store_true",
                    help="with --time: will-it-scale's process mode, each simulated CPU a task of its own mm "
                         "(its own mmap lock and VMAs; zone->lock and the LRU lock shared), instead of threads")
    sc.add_argument("--no-plots", action="store_true", help="no PNG")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal)")
    add_config_options(sc, knob_defaults="enabled=madvise, 16kB, 64kB and 256kB always, 2048kB never, "
                       "the other sizes never")
    sc.set_defaults(func=cmd_scaling)
    e.set_defaults(func=lambda a: _missing(e, "experiment"))

    k = sub.add_parser(
        "kernel-replay",
        help="replay a trace on the running kernel (root; sets and restores the THP knobs)",
        description="Replays TRACE on this machine's Linux kernel, in a child process, with the given THP knobs "
                    "(every size written explicitly, all restored afterwards), and prints what the kernel did.",
    )
    k.add_argument("trace", metavar="TRACE", help="trace file, or - for standard input")
    add_config_options(k, policy=False, preempt=False, machine=False)
    k.add_argument("--json", action="store_true", help="print one JSON object")
    k.set_defaults(func=cmd_kernel_replay)

    v = sub.add_parser(
        "validate",
        help="replay a trace on the simulator and on the kernel and compare",
        description="Replays TRACE on the simulator and on the running kernel with the same THP knobs and prints "
                    "the figures side by side. Exit status 0 when all match, 1 when they differ, 2 for bad input.",
    )
    v.add_argument("trace", metavar="TRACE", help="trace file, or - for standard input")
    add_config_options(v, preempt=False, machine=False)
    v.add_argument("--system-counters", action="store_true",
                   help="let the system-wide hugepages-*/stats counters decide too (only on a quiet machine: "
                   "other processes' faults count there)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=cmd_validate)

    rep = sub.add_parser(
        "report",
        help="one trace under a grid of THP settings, as a web page with tables and plots",
        description="Replays TRACE under a grid of settings and writes DIR/index.html (tables of every figure, "
                    "plots of faults, resident memory and its growth over order 0, folios by size, fallbacks) and "
                    "DIR/report.csv. Default grid: order 0 only; each mTHP size alone; every mTHP size; 2048kB "
                    "alone; every size with 2048kB (each named size always). With --thp/--thp-enabled options the "
                    "grid is every combination of their comma-separated values, e.g. --thp 64kB=always,never "
                    "--policy upstream,v1. See docs/report.md.",
    )
    rep.add_argument("trace", metavar="TRACE", help="trace file, or - for standard input")
    rep.add_argument("--out", required=True, metavar="DIR", help="folder to write index.html and report.csv into")
    _add_grid_options(rep)
    rep.add_argument("--threads", type=_count(1, 1024), default=1, metavar="N", help="threads (default 1)")
    rep.add_argument("--deterministic", type=_count(0), metavar="SEED",
                     help="a deterministic interleaving of the threads, seeded")
    rep.add_argument("--no-progress", action="store_true", help="no progress bar")
    rep.set_defaults(func=cmd_report)

    sw = sub.add_parser(
        "sweep",
        help="a workload or a trace under every combination of settings, to CSV or Parquet",
        description="Runs every combination of the comma-separated values of the options below (e.g. --thp "
                    "64kB=always,never --policy upstream,v1 --size 64M,256M) and writes one row a run: the "
                    "settings, then every figure as a flat column (mthp.64kB.anon_fault_alloc, ...; docs/json.md). "
                    "CSV on standard output unless --out names a .csv or .parquet file. See docs/cli.md.",
    )
    src = sw.add_mutually_exclusive_group()
    src.add_argument("--workload", type=_words_of(WORKLOADS), default=["sequential"], metavar="W,...",
                     help="built-in workloads (default sequential)")
    src.add_argument("--trace", metavar="TRACE", help="replay this trace instead of a workload")
    sw.add_argument("--size", type=_list_of(_bytes), metavar="BYTES,...", help="sizes (default 1G)")
    sw.add_argument("--threads", type=_list_of(_count(1, 1024)), metavar="N,...", help="threads (default 1)")
    sw.add_argument("--advice", type=_words_of(ADVICE), metavar="A,...",
                    help="hugepage, nohugepage, none (default: the workload's own)")
    sw.add_argument("--sharing", type=_words_of(SHARING), metavar="HOW,...", help="disjoint (default), interleaved")
    sw.add_argument("--stride", type=_list_of(_count(1)), metavar="PAGES,...", help="stride workload (default 1)")
    sw.add_argument("--fraction", type=_list_of(_fraction), metavar="F,...",
                    help="random (default 1), sparse (default 0.1)")
    sw.add_argument("--seed", type=_list_of(_count(0)), metavar="S,...", help="random and sparse (default 0)")
    sw.add_argument("--iterations", type=_list_of(_count(1)), metavar="N,...", help="page_fault1 (default 1)")
    sw.add_argument("--deterministic", type=_count(0), metavar="SEED", help="deterministic interleaving seed")
    _add_grid_options(sw)
    sw.add_argument("--out", metavar="FILE", help="write FILE.csv or FILE.parquet instead of CSV on stdout")
    sw.add_argument("--executor", metavar="HOW",
                    help="serial (default), processes (a local process pool), or dask:ADDRESS (a Dask "
                    "distributed scheduler, e.g. dask:tcp://10.0.0.1:8786)")
    sw.add_argument("--jobs", type=_count(1, 1024), metavar="N", help="processes for --executor processes")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")
    sw.set_defaults(func=cmd_sweep)

    from .record import add_subcommands as add_record

    add_record(sub)
    return p


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    """The THP knobs and policy with comma-separated values (a grid), and
    the simulated machine's options (one value each)."""
    g = p.add_argument_group("grid of settings (comma-separated values: every combination runs)")
    g.add_argument("--thp-enabled", metavar="MODE,...", help="transparent_hugepage/enabled values (default madvise)")
    g.add_argument("--thp", action="append", default=[], metavar="SIZE=MODE,...",
                   help="hugepages-SIZE/enabled values, e.g. 64kB=always,never; repeatable; sizes not named keep "
                   f"their defaults ({KERNEL_DEFAULT_KNOBS})")
    g.add_argument("--policy", metavar="P,...", help="upstream (default), v1, preferred")
    add_config_options(p, policy=False, preempt=False, machine=True, knob_defaults=KERNEL_DEFAULT_KNOBS,
                       knobs=False)


def _list_of(parse: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def f(text: str) -> list[Any]:
        vals = [parse(x) for x in text.split(",") if x]
        if not vals:
            raise argparse.ArgumentTypeError(f"no value in {text!r}")
        return vals

    return f


def _words_of(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def f(text: str) -> list[str]:
        vals = [x for x in text.split(",") if x]
        for v in vals:
            if v not in allowed:
                raise argparse.ArgumentTypeError(f"unknown {v!r} (want {', '.join(allowed)})")
        if not vals:
            raise argparse.ArgumentTypeError(f"no value in {text!r}")
        return vals

    return f


def _missing(p: argparse.ArgumentParser, what: str) -> int:
    raise CliError(f"missing {what} name (see '{p.prog} --help')")


def _error(msg: str) -> None:
    try:
        sys.stderr.write(f"{PROG}: error: {_one_line(msg)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line; returns the exit status (the console script exits with it)."""
    try:
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            func = getattr(args, "func", None)
            if func is None:
                raise CliError("missing command: replay, run or experiment (see 'anonfolio --help')")
            rc = func(args)
            return int(rc or 0)
        except CliError as e:
            _error(str(e))
            return e.status
        except (_anonfolio.OutOfMemory, _anonfolio.OracleError) as e:
            _error(str(e))
            return 1
        except _anonfolio.InvariantError as e:
            _error(f"invariant violated: {e}")
            return 1
        except _anonfolio.AnonfolioError as e:
            msg = str(e)
            _error(msg)
            return 1 if msg.startswith("internal error") else 2
        except OSError as e:
            if isinstance(e, BrokenPipeError):
                raise
            _error(f"{e.filename + ': ' if getattr(e, 'filename', None) else ''}{e.strerror or e}")
            return 2
        except KeyboardInterrupt:
            _error("interrupted")
            return 130
        except SystemExit as e:
            # argparse's --help and --version
            return e.code if isinstance(e.code, int) else 0
        except Exception as e:  # the one place that must not show a traceback
            if os.environ.get("ANONFOLIO_DEBUG"):
                raise
            _error(f"internal error: {type(e).__name__}: {e}")
            return 1
    except BrokenPipeError:
        # `anonfolio ... | head`: stdout went away; that is not an error.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 0


def entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
