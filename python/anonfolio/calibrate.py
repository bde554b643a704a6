"""``anonfolio calibrate``: measure this machine's kernel, fit a cost profile.

What is measured (private anonymous memory, this process, as root):

- the write-fault latency per folio size, 4 kB to 2 MiB: one size enabled at
  a time in ``madvise`` mode, the region advised ``MADV_HUGEPAGE``, one byte
  written per folio, the per-size ``anon_fault_alloc`` counter checked;
- read faults (the shared zero page) and the copy a write to it makes;
- the ``munmap`` time per folio size for a region filled with that size;
- page_fault1 at one thread (map 128 MiB, write a byte a page, unmap), with
  order-0 folios and with 64 kB ones.

The THP knobs are put back as they were found, also on an error or a
signal. Per-size counters are system-wide: run it while nothing else
faults large folios.

The fit: a write fault of ``n`` pages costs ``a + b*n (+ c for orders
4..8, which bypass the per-CPU lists, + d for the PMD path)``; ``b`` is
the per-page cost (zeroing 4 KiB and one ``set_ptes`` entry), ``a`` the
fixed part, shared out among the fixed steps in the proportions of the
built-in profile (no single-thread measurement tells them apart). Unmap per
folio of ``n`` pages is ``u0 + u1*n``: ``u1`` per PTE zapped, ``u0`` per folio
(rmap, reference, free, LRU). A read fault gives the no-allocation part,
its copy the allocation and zeroing. Every measured figure is printed
beside what the fitted profile predicts for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import signal
import time
from collections.abc import Iterator
from typing import Any, Optional, TextIO

import numpy as np

THP = "/sys/kernel/mm/transparent_hugepage"
PAGE = 4096
SIZES_KB = [4, 16, 32, 64, 128, 256, 512, 1024, 2048]
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
PROT_RW = 0x3
MAP_PRIVATE_ANON = 0x02 | 0x20
PROFILE_FORMAT = "anonfolio-cost-profile/1"

#: The profile shipped with the package (measured on the machine the
#: package was developed on; see its provenance).
DEFAULT_PROFILE = os.path.join(os.path.dirname(__file__), "profiles", "default.json")


class CalibrateError(Exception):
    """The kernel cannot be measured here (not root, no THP sysfs, ...)."""


def load_profile(path: Optional[str] = None) -> dict[str, Any]:
    """A cost profile (as ``calibrate`` writes it, or a user's): the JSON
    object, whose ``costs`` maps ``NAME_ns`` to nanoseconds."""
    path = path or DEFAULT_PROFILE
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except OSError as e:
        raise CalibrateError(f"cannot read cost profile {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise CalibrateError(f"cost profile {path} is not JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(d, dict) or not isinstance(d.get("costs"), dict):
        raise CalibrateError(f"cost profile {path}: want an object with a \"costs\" object")
    for k, v in d["costs"].items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise CalibrateError(f"cost profile {path}: {k} is not a number")
    return d


# ----------------------------------------------------------------------------
# The kernel side: mmap through libc, one byte a page through numpy.

_libc: Optional[ctypes.CDLL] = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = lib
    return _libc


def _now() -> int:
    """This thread's CPU time (user and system), ns: a fault's cost is system
    time of the faulting thread, and unlike the wall clock it does not grow
    when other processes share the cores."""
    return time.thread_time_ns()


class Region:
    """``size`` bytes of private anonymous memory, 2 MiB aligned."""

    def __init__(self, size: int, advice: int):
        c = _c()
        self.size = size
        raw = c.mmap(None, size + (2 << 20), PROT_RW, MAP_PRIVATE_ANON, -1, 0)
        if raw in (None, ctypes.c_void_p(-1).value):
            raise CalibrateError(f"mmap of {size} bytes failed: {os.strerror(ctypes.get_errno())}")
        self.raw = int(raw)
        self.addr = (self.raw + (2 << 20) - 1) & ~((2 << 20) - 1)
        # Trim to exactly [addr, addr + size) so that munmap times that only.
        if self.addr > self.raw:
            c.munmap(self.raw, self.addr - self.raw)
        tail = self.raw + size + (2 << 20) - (self.addr + size)
        if tail:
            c.munmap(self.addr + size, tail)
        c.madvise(self.addr, size, advice)
        self.mapped = True
        self.view = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(self.addr))

    def write(self, step: int) -> int:
        """Writes one byte every ``step`` bytes; ns taken."""
        t = _now()
        self.view[::step] = 1
        return _now() - t

    def read(self, step: int) -> int:
        t = _now()
        int(self.view[::step].sum())
        return _now() - t

    def unmap(self) -> int:
        del self.view
        t = _now()
        _c().munmap(self.addr, self.size)
        self.mapped = False
        return _now() - t

    def __del__(self) -> None:
        if getattr(self, "mapped", False):
            _c().munmap(self.addr, self.size)


def _knob(path: str) -> str:
    with open(path, encoding="ascii") as f:
        text = f.read()
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()


def _set(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _size_dirs() -> dict[int, str]:
    out = {}
    for d in os.listdir(THP):
        # Only sizes with a knob (this kernel lists a hugepages-8kB without one).
        if d.startswith("hugepages-") and d.endswith("kB") and os.path.exists(os.path.join(THP, d, "enabled")):
            out[int(d[len("hugepages-") : -2])] = os.path.join(THP, d)
    return out


@contextlib.contextmanager
def thp_only(size_kb: Optional[int]) -> Iterator[None]:
    """Only ``size_kb`` in ``madvise`` mode (none: every size ``never``);
    every size knob is put back as found, also on SIGINT/SIGTERM."""
    dirs = _size_dirs()
    saved = {kb: _knob(os.path.join(d, "enabled")) for kb, d in dirs.items()}

    def restore() -> None:
        for kb, v in saved.items():
            with contextlib.suppress(OSError):
                _set(os.path.join(dirs[kb], "enabled"), v)

    def on_signal(sig: int, _frame: Any) -> None:
        restore()
        raise KeyboardInterrupt(f"signal {sig}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for kb, d in dirs.items():
            _set(os.path.join(d, "enabled"), "madvise" if kb == size_kb else "never")
        yield
    finally:
        restore()
        for s, h in old.items():
            signal.signal(s, h)


def _alloc_count(size_kb: int) -> int:
    d = _size_dirs().get(size_kb)
    if d is None:
        return 0
    with open(os.path.join(d, "stats", "anon_fault_alloc"), encoding="ascii") as f:
        return int(f.read())


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def measure(region_bytes: int = 256 << 20, reps: int = 5, log: Optional[TextIO] = None) -> dict[str, Any]:
    """Every kernel figure the fit needs, medians of ``reps`` runs (ns)."""
    if os.geteuid() != 0:
        raise CalibrateError("calibrate sets THP knobs in sysfs: run it as root")
    if not os.path.isdir(THP):
        raise CalibrateError(f"no {THP}: this kernel has no transparent huge pages")
    def say(text: str) -> None:
        if log is not None:
            log.write(text + "\n")
            log.flush()

    out: dict[str, Any] = {"region_bytes": region_bytes, "reps": reps, "write_fault_ns": {}, "unmap_ns_per_folio": {},
                           "large_folio_share": {}}
    sizes = [kb for kb in SIZES_KB if kb == 4 or kb in _size_dirs()]
    for kb in sizes:
        step = kb * 1024
        nfolios = region_bytes // step
        lat, unm, share = [], [], []
        with thp_only(None if kb == 4 else kb):
            for _ in range(reps + 1):
                r = Region(region_bytes, MADV_NOHUGEPAGE if kb == 4 else MADV_HUGEPAGE)
                before = _alloc_count(kb) if kb != 4 else 0
                t = r.write(step)
                got = (_alloc_count(kb) - before) if kb != 4 else nfolios
                u = r.unmap()
                lat.append(t / nfolios)
                unm.append(u / nfolios)
                share.append(got / nfolios)
        # The first round warms the host's memory; drop it.
        out["write_fault_ns"][f"{kb}kB"] = _median(lat[1:])
        out["unmap_ns_per_folio"][f"{kb}kB"] = _median(unm[1:])
        out["large_folio_share"][f"{kb}kB"] = min(share[1:])
        say(f"  {kb:>5} kB: fault {out['write_fault_ns'][f'{kb}kB']:9.0f} ns  "
            f"unmap {out['unmap_ns_per_folio'][f'{kb}kB']:8.0f} ns/folio  "
            f"({100 * min(share[1:]):.0f}% of faults got the size)")
    with thp_only(None):
        rd, cp = [], []
        for _ in range(reps + 1):
            r = Region(region_bytes, MADV_NOHUGEPAGE)
            rd.append(r.read(PAGE) / (region_bytes // PAGE))
            cp.append(r.write(PAGE) / (region_bytes // PAGE))
            r.unmap()
        out["read_fault_ns"] = _median(rd[1:])
        out["zero_page_copy_ns"] = _median(cp[1:])
    say(f"  read fault {out['read_fault_ns']:.0f} ns, write to the zero page {out['zero_page_copy_ns']:.0f} ns")
    out["page_fault1_ns_per_page"] = {}
    pf1_sizes: tuple[tuple[str, Optional[int]], ...] = (("order0", None), ("64kB", 64))
    for label, pkb in pf1_sizes:
        with thp_only(pkb):
            per = []
            for _ in range(reps + 1):
                t0 = _now()
                r = Region(128 << 20, MADV_HUGEPAGE if pkb else MADV_NOHUGEPAGE)
                r.write(PAGE)
                r.unmap()
                per.append((_now() - t0) / ((128 << 20) // PAGE))
        out["page_fault1_ns_per_page"][label] = _median(per[1:])
        say(f"  page_fault1 1 thread {label}: {out['page_fault1_ns_per_page'][label]:.0f} ns/page")
    return out


# ----------------------------------------------------------------------------
# The fit.

def builtin_profile() -> dict[str, float]:
    """The simulator's built-in costs (``CostProfile::default``)."""
    from . import _anonfolio

    return dict(_anonfolio.default_cost_profile())


def _pages(kb: int) -> int:
    return kb // 4


def _lstsq(rows: list[list[float]], y: list[float]) -> list[float]:
    """Least squares in relative error (each row weighted by 1/y, so that a
    4 kB fault counts as much as a 2 MiB one); a term whose fitted value is
    negative is dropped and the rest refitted (no step costs less than
    nothing)."""
    w = 1.0 / np.maximum(np.array(y, dtype=float), 1e-9)
    A = np.array(rows, dtype=float) * w[:, None]
    yw = np.array(y, dtype=float) * w
    keep = [j for j in range(A.shape[1]) if A[:, j].any()]
    while True:
        sol = np.linalg.lstsq(A[:, keep], yw, rcond=None)[0]
        neg = [k for k, v in zip(keep, sol) if v < 0 and k != 0]
        if not neg:
            out = [0.0] * A.shape[1]
            for k, v in zip(keep, sol):
                out[k] = float(v)
            return out
        keep.remove(neg[0])


def fit(m: dict[str, Any], sizes: Optional[list[int]] = None) -> dict[str, Any]:
    """A cost profile from measurements ``m`` (as :func:`measure` returns),
    using the write-fault sizes in ``sizes`` (kB; default all measured)."""
    base = builtin_profile()
    wf = {int(k[:-2]): v for k, v in m["write_fault_ns"].items()}
    un = {int(k[:-2]): v for k, v in m["unmap_ns_per_folio"].items()}
    use = sorted(kb for kb in (sizes or wf) if kb in wf)
    # A write fault of n pages: a + b*n + e*[a large folio] + c*[orders 4..8:
    # no per-CPU list] + d*[PMD path].
    a, b, c, d, e = _lstsq(
        [[1.0, _pages(kb), 1.0 if 16 <= _pages(kb) < 512 else 0.0, 1.0 if kb == 2048 else 0.0,
          1.0 if kb > 4 else 0.0] for kb in use],
        [wf[kb] for kb in use],
    )
    costs_large = e
    costs = dict(base)
    set_pte = base["set_pte_ns"]
    costs["zero_per_kib_ns"] = max(b - set_pte, 0.0) / 4.0
    costs["rmqueue_buddy_ns"] = c + base["pcp_alloc_ns"] if c > 0 else base["rmqueue_buddy_ns"]
    costs["prep_large_folio_ns"] = costs_large
    # The read fault is the fixed part without allocation, charge, rmap and
    # LRU; what it leaves of `a` is theirs.
    read_side = ["fault_entry_ns", "fault_exit_ns", "vma_lookup_ns", "pt_walk_ns", "spin_lock_ns"]
    alloc_side = ["pcp_alloc_ns", "memcg_charge_ns", "rmap_ns", "lru_add_ns"]
    read = m.get("read_fault_ns", a * 0.5) - set_pte
    rs = sum(base[k] for k in read_side)
    for k in read_side:
        costs[k] = max(read, 0.0) * base[k] / rs
    rest = max(a - max(read, 0.0), 0.0)
    al = sum(base[k] for k in alloc_side)
    for k in alloc_side:
        costs[k] = rest * base[k] / al
    # Unmap, per folio of n pages: u0 + u1*n when PTE-mapped (u1: clearing a
    # PTE and freeing its page); a PMD-mapped one has no PTEs, so it gives
    # the freeing part alone.
    pte_sizes = sorted(kb for kb in un if kb < 2048)
    u0, u1, u2 = _lstsq(
        [[1.0, _pages(kb), 1.0 if kb > 4 else 0.0] for kb in pte_sizes], [un[kb] for kb in pte_sizes]
    )
    costs["free_large_folio_ns"] = u2
    free_page = base["free_page_ns"]
    if 2048 in un:
        free_page = min(max((un[2048] - u0 - u2) / 512, 0.0), u1)
    costs["free_page_ns"] = free_page
    costs["zap_pte_ns"] = max(u1 - free_page, 0.0)
    fb = base["zap_folio_ns"] + base["free_pcp_ns"] + base["lru_del_ns"]
    for k in ("zap_folio_ns", "free_pcp_ns", "lru_del_ns"):
        costs[k] = max(u0, 0.0) * base[k] / fb
    # free_buddy (per block into the buddy lists, also for every page a
    # per-CPU list drains) and rmqueue_bulk are not told apart by these
    # measurements: they keep the built-in figures.
    return {"costs": costs, "terms": {"fixed_ns": a, "per_page_ns": b, "large_folio_ns": e, "no_pcp_ns": c,
                                     "pmd_ns": d, "unmap_per_folio_ns": u0, "unmap_per_page_ns": u1,
                                     "unmap_large_folio_ns": u2},
            "sizes_fitted": [f"{kb}kB" for kb in use]}


def refine(costs: dict[str, float], m: dict[str, Any], region_bytes: int = 256 << 20) -> None:
    """One correction pass through the simulator itself: the model adds to
    a fault what the linear fit cannot see (a PTE table now and then, the
    per-CPU refill, the LRU batch), so the allocation-side costs absorb the
    4 kB fault's residual and the per-folio unmap costs the 4 kB unmap's."""
    p = predict(costs, region_bytes)
    d = m["write_fault_ns"]["4kB"] - p["write_fault_ns"]["4kB"]
    side = ["pcp_alloc_ns", "memcg_charge_ns", "rmap_ns", "lru_add_ns"]
    tot = sum(costs[k] for k in side)
    for k in side:
        costs[k] = max(costs[k] + d * costs[k] / tot, 0.0)
    du = m["unmap_ns_per_folio"]["4kB"] - p["unmap_ns_per_folio"]["4kB"]
    side = ["zap_folio_ns", "free_pcp_ns", "lru_del_ns"]
    tot = sum(costs[k] for k in side)
    for k in side:
        costs[k] = max(costs[k] + du * costs[k] / tot, 0.0)


def provenance() -> dict[str, str]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpu": cpu, "cpus": str(os.cpu_count() or 0),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tool": "anonfolio calibrate"}


# ----------------------------------------------------------------------------
# Predictions: the same measurements, run by the simulator in virtual time.

UNMAP_STEPS = ["zap_pte", "zap_folio", "free_pcp", "free_buddy", "free_page", "free_large_folio", "lru_del",
               "tlb_flush"]


def _sim(size_kb: Optional[int], memory: int) -> Any:
    from .api import Simulator
    from .config import Config

    hp = {f"{kb}kB": "never" for kb in SIZES_KB if kb != 4}
    if size_kb and size_kb != 4:
        hp[f"{size_kb}kB"] = "madvise"
    return Simulator(Config(hugepages=hp, memory=memory))


def _trace(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def predict(costs: dict[str, float], region_bytes: int = 256 << 20) -> dict[str, Any]:
    """What the simulator, in virtual time with ``costs``, gives for each
    figure :func:`measure` takes (same sizes, same regions, one CPU)."""
    base = 0x7F00_0000_0000
    mem = 4 * region_bytes + (1 << 30)
    out: dict[str, Any] = {"write_fault_ns": {}, "unmap_ns_per_folio": {}}
    for kb in SIZES_KB:
        step = kb * 1024
        n = region_bytes // step
        advice = "nohugepage" if kb == 4 else "hugepage"
        lines = [f"mmap {base:#x} {region_bytes:#x} {advice}"]
        lines += [f"w {base + i * step:#x}" for i in range(n)]
        lines.append(f"munmap {base:#x} {region_bytes:#x}")
        t = _sim(kb, mem).replay(_trace(lines), time=costs).to_dict()["time"]
        out["write_fault_ns"][f"{kb}kB"] = t["fault_latency_ns"]["mean"]
        out["unmap_ns_per_folio"][f"{kb}kB"] = (
            sum(t["breakdown_ns"][s] for s in UNMAP_STEPS) + t["breakdown_ns"]["syscall"] / 2
        ) / n
    pages = region_bytes // PAGE
    head = [f"mmap {base:#x} {region_bytes:#x} nohugepage"]
    reads = [f"r {base + i * PAGE:#x}" for i in range(pages)]
    writes = [f"w {base + i * PAGE:#x}" for i in range(pages)]
    r = _sim(None, mem).replay(_trace(head + reads), time=costs).to_dict()["time"]
    rw = _sim(None, mem).replay(_trace(head + reads + writes), time=costs).to_dict()["time"]
    out["read_fault_ns"] = r["fault_latency_ns"]["mean"]
    out["zero_page_copy_ns"] = (rw["elapsed_ns"] - r["elapsed_ns"]) / pages
    out["page_fault1_ns_per_page"] = {}
    pf1_sizes: tuple[tuple[str, Optional[int]], ...] = (("order0", None), ("64kB", 64))
    for label, pkb in pf1_sizes:
        from .api import Simulator
        from .config import Config

        hp = {f"{k}kB": "never" for k in SIZES_KB if k != 4}
        if pkb:
            hp[f"{pkb}kB"] = "always"
        s = Simulator(Config(hugepages=hp, memory=mem)).run("page_fault1", 128 << 20, time=costs).to_dict()
        out["page_fault1_ns_per_page"][label] = s["time"]["elapsed_ns"] / ((128 << 20) // PAGE)
    return out


def compare(measured: dict[str, Any], predicted: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(figure, kernel ns, predicted ns, error %) for every figure both have."""
    rows = []
    for key in ("write_fault_ns", "unmap_ns_per_folio", "page_fault1_ns_per_page"):
        for k, v in measured.get(key, {}).items():
            if k in predicted.get(key, {}):
                p = predicted[key][k]
                rows.append((f"{key} {k}", float(v), float(p), 100.0 * (p - v) / v if v else 0.0))
    for key in ("read_fault_ns", "zero_page_copy_ns"):
        if key in measured and key in predicted:
            v, p = float(measured[key]), float(predicted[key])
            rows.append((key, v, p, 100.0 * (p - v) / v if v else 0.0))
    return rows


def run_calibrate(out: Optional[str], region_bytes: int, reps: int, log: TextIO) -> dict[str, Any]:
    """Measures, fits, prints every cost and the residuals, writes ``out``."""
    log.write(f"measuring this kernel ({platform.release()}), {reps} runs per figure:\n")
    m = measure(region_bytes=region_bytes, reps=reps, log=log)
    f = fit(m)
    refine(f["costs"], m, region_bytes)
    log.write("fitted costs (ns):\n")
    for k, v in f["costs"].items():
        log.write(f"  {k:<22} {v:10.2f}\n")
    log.write("fit terms: " + ", ".join(f"{k} {v:.1f}" for k, v in f["terms"].items()) + "\n")
    pred = predict(f["costs"], region_bytes)
    rows = compare(m, pred)
    log.write(f"{'figure':<40} {'kernel ns':>11} {'model ns':>11} {'error':>8}\n")
    for name, v, p, e in rows:
        log.write(f"{name:<40} {v:11.1f} {p:11.1f} {e:+7.1f}%\n")
    profile = {
        "format": PROFILE_FORMAT,
        "provenance": provenance(),
        "costs": f["costs"],
        "fit": {"terms": f["terms"], "sizes_fitted": f["sizes_fitted"],
                "residuals_pct": {name: round(e, 2) for name, _, _, e in rows}},
        "measured": m,
    }
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(profile, fh, indent=1, sort_keys=False)
            fh.write("\n")
        log.write(f"wrote {out}\n")
    return profile
