"""Statistics of a run, under the kernel's names.

:class:`Stats` wraps the dict the native module returns (the keys of the
JSON output, every one explained in docs/json.md) with attribute access::

    s.faults, s.rss_bytes, s.elapsed_s
    s.mthp["64kB"].anon_fault_alloc        # hugepages-64kB/stats/anon_fault_alloc
    s.vmstat.thp_fault_alloc               # /proc/vmstat
    s.locks.ptl.contended, s.locks.contended
    s.races.pages_wasted, s.fault_paths.zero_page
    s.folio_orders                         # numpy uint64 array, folios mapped by order
    s.to_json()

It is a read-only :class:`~collections.abc.Mapping` too, so ``s["faults"]`` works.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Optional, cast

if TYPE_CHECKING:  # numpy is imported when an array is asked for, not at start-up
    import numpy as np

from . import _anonfolio

__all__ = ["Stats", "Counters", "MthpTable", "LockTable", "format_bytes"]

_MTHP_COUNTERS: tuple[str, ...] = tuple(_anonfolio.MTHP_COUNTERS)
_NORDERS = _anonfolio.MAX_PAGE_ORDER


class _FolioOrders:
    """``folio_orders`` as the native module gave it, made a read-only
    uint64 array (once) when asked for: numpy is not loaded for a run that
    only prints its figures."""

    __slots__ = ("_array", "values")

    def __init__(self, values: Any):
        self.values = [int(x) for x in values]
        self._array: Optional[np.ndarray] = None

    def array(self) -> np.ndarray:
        if self._array is None:
            import numpy as np

            a = np.asarray(self.values, dtype=np.uint64)
            a.setflags(write=False)
            self._array = a
        return self._array

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _FolioOrders) and self.values == other.values


class _ReadOnlyView(Mapping[str, Any]):
    """A read-only mapping over the dict ``_d`` whose keys are also
    attributes. Subclasses word the errors: :meth:`_no_attr` for a missing
    name and ``_READ_ONLY`` for an attempt to set one."""

    __slots__ = ("_d",)

    _d: dict[str, Any]
    _READ_ONLY = "read-only"

    def __getitem__(self, key: str) -> Any:
        v = self._d[key]
        return v.array() if isinstance(v, _FolioOrders) else v

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(self._no_attr(name)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(self._READ_ONLY)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._d))

    def _no_attr(self, name: str) -> str:
        return f"no {name!r}"


class Counters(_ReadOnlyView):
    """A read-only group of named counters with attribute access."""

    __slots__ = ()

    _READ_ONLY = "statistics are read-only"

    def __init__(self, d: Mapping[str, Any]):
        object.__setattr__(self, "_d", dict(d))

    def _no_attr(self, name: str) -> str:
        return f"no counter {name!r} (have: {', '.join(self._d)})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._d.items())})"

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.to_dict() if isinstance(v, Counters) else v) for k, v in self._d.items()}


class LockTable(Counters):
    """Lock figures: ``acquisitions``, ``contended`` and ``spins`` of the
    split page-table locks at the top level (as the JSON contract has them),
    and each lock's own figures under ``ptl``, ``page_table_lock``,
    ``zone_lock`` and ``mmap_lock``."""

    __slots__ = ()

    def __init__(self, d: Mapping[str, Any]):
        super().__init__({k: (Counters(v) if isinstance(v, Mapping) else v) for k, v in d.items()})


class MthpTable(Mapping[str, Counters]):
    """``hugepages-<size>/stats`` by size name. Iterating gives the sizes with
    a non-zero counter (as the JSON has them); indexing any valid size, also
    spelt ``"64K"`` or ``"2M"``, gives its counters, zeros if it had none."""

    __slots__ = ("_d",)

    def __init__(self, d: Mapping[str, Mapping[str, int]]):
        self._d = {k: Counters(v) for k, v in d.items()}

    def __getitem__(self, size: str) -> Counters:
        if size in self._d:
            return self._d[size]
        try:
            name = _anonfolio.size_name(_anonfolio.parse_thp_size(size))
        except (ValueError, TypeError):
            raise KeyError(size) from None
        return self._d.get(name) or Counters(dict.fromkeys(_MTHP_COUNTERS, 0))

    def __contains__(self, size: object) -> bool:
        return size in self._d

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"MthpTable({ {k: dict(v) for k, v in self._d.items()} !r})"

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self._d.items()}


class Stats(_ReadOnlyView):
    """The figures of a run or of a simulator's whole life.

    Build one from the dict that ``Simulator.stats()`` / ``replay()`` /
    ``run()`` return, or from the JSON the command line prints
    (:meth:`from_json`). ``params`` holds what produced it when known
    (:func:`anonfolio.sweep` fills it in).
    """

    __slots__ = ("params",)

    params: dict[str, Any]

    def __init__(self, data: Mapping[str, Any], params: Optional[Mapping[str, Any]] = None):
        d = dict(data)
        d["mthp"] = MthpTable(d.get("mthp", {}))
        d["locks"] = LockTable(d.get("locks", {}))
        for key in ("vmstat", "races", "fault_paths", "memory"):
            if key in d:
                d[key] = Counters(d[key])
        if "folio_orders" in d:
            d["folio_orders"] = _FolioOrders(d["folio_orders"])
        object.__setattr__(self, "_d", d)
        object.__setattr__(self, "params", dict(params or {}))

    _READ_ONLY = "Stats are read-only"

    def _no_attr(self, name: str) -> str:
        return f"Stats has no {name!r}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Stats):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}: {v['anon_fault_alloc']}" for k, v in self.mthp.items())
        return (
            f"<Stats faults={self.faults} rss={format_bytes(self.rss_bytes)}"
            f" mthp_alloc={{{sizes}}} elapsed_s={self.elapsed_s:.6f}>"
        )

    # Typed shortcuts for the contract's keys (also reachable via __getattr__).
    @property
    def faults(self) -> int:
        """Page faults handled (``pgfault``: minor faults of the process)."""
        return int(self._d["faults"])

    @property
    def rss_bytes(self) -> int:
        """Resident anonymous bytes mapped (the zero pages do not count)."""
        return int(self._d["rss_bytes"])

    @property
    def rss_pages(self) -> int:
        return self.rss_bytes // _anonfolio.PAGE_SIZE

    @property
    def rss_peak_bytes(self) -> int:
        """The most resident anonymous bytes at any point of the run
        (``mm->hiwater_rss``, as VmHWM reports it)."""
        return int(self._d["rss_peak_bytes"])

    @property
    def elapsed_s(self) -> float:
        """Wall seconds spent simulating (not parsing or start-up)."""
        return float(self._d.get("elapsed_s", 0.0))

    @property
    def mthp(self) -> MthpTable:
        return cast(MthpTable, self._d["mthp"])

    @property
    def locks(self) -> LockTable:
        return cast(LockTable, self._d["locks"])

    @property
    def folio_orders(self) -> np.ndarray:
        """Folios mapped by faults, indexed by order (a read-only uint64 array)."""
        import numpy as np

        fo = self._d.get("folio_orders")
        return fo.array() if fo is not None else np.zeros(_NORDERS, dtype=np.uint64)

    def mthp_by_order(self, counter: str = "anon_fault_alloc") -> np.ndarray:
        """One ``hugepages-*/stats`` counter for every order, as a uint64 array
        indexed by order (orders without a folder are 0)."""
        if counter not in _MTHP_COUNTERS:
            raise KeyError(f"no mTHP counter {counter!r} (have: {', '.join(_MTHP_COUNTERS)})")
        import numpy as np

        out = np.zeros(_NORDERS, dtype=np.uint64)
        for size, c in self.mthp.items():
            out[_anonfolio.parse_thp_size(size)] = c[counter]
        return out

    # Serialisation
    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-able dict: nested dicts, ``folio_orders`` a list."""
        out: dict[str, Any] = {}
        for k, v in self._d.items():
            if isinstance(v, (Counters, MthpTable)):
                v = v.to_dict()
            elif isinstance(v, _FolioOrders):
                v = list(v.values)
            elif hasattr(v, "item") and hasattr(v, "dtype"):  # a numpy scalar
                v = v.item()
            out[k] = v
        return out

    def to_json(self, **kwargs: Any) -> str:
        """One JSON object, the keys of the contract first (``json.dumps`` keywords pass through)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Stats:
        return cls(json.loads(text))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_from_dict, (self.to_dict(), self.params))

    # Presentation
    def table(self, *, title: Optional[str] = None) -> str:
        """A human-readable report: faults, RSS, per-size counters, vmstat, locks, time."""
        lines: list[str] = []
        if title:
            lines += [title, ""]
        rss = self.rss_bytes
        lines.append(f"{'faults':<30}{self.faults:>16,}")
        lines.append(f"{'rss':<30}{format_bytes(rss):>16}  ({rss:,} bytes)")
        if "rss_peak_bytes" in self._d:
            peak = self.rss_peak_bytes
            lines.append(f"{'rss peak':<30}{format_bytes(peak):>16}  ({peak:,} bytes)")
        if "ops" in self._d:
            lines.append(f"{'operations':<30}{int(self._d['ops']):>16,}")
        # Wall time and speed are the simulator's own, not figures of the kernel being modelled.
        lines.append(f"{'elapsed (simulator)':<30}{self.elapsed_s:>16.6f} s")
        if self.faults and self.elapsed_s > 0:
            lines.append(f"{'simulator speed':<30}{self.faults / self.elapsed_s:>16,.0f} faults/s simulated")
        lines.append("")
        short = {
            "anon_fault_alloc": "alloc",
            "anon_fault_fallback": "fallback",
            "anon_fault_fallback_charge": "fallback_charge",
            "nr_anon_partially_mapped": "partially_mapped",
        }
        cols = list(_MTHP_COUNTERS)
        rows = sorted(self.mthp.items(), key=lambda kv: _anonfolio.parse_thp_size(kv[0]))
        widths = [max([len(short.get(c, c))] + [len(f"{r[c]:,}") for _, r in rows]) + 2 for c in cols]
        lines.append(f"{'mTHP':<12}" + "".join(f"{short.get(c, c):>{w}}" for c, w in zip(cols, widths)))
        for size, c in rows:
            lines.append(f"  {size:<10}" + "".join(f"{c[k]:>{w},}" for k, w in zip(cols, widths)))
        if not rows:
            lines.append("  (no mTHP activity)")
        fo = self.folio_orders
        if fo.any():
            lines.append("")
            lines.append("folios mapped by size (cumulative: over the whole run)")
            for order, n in enumerate(fo):
                if n:
                    lines.append(f"  {_anonfolio.size_name(order):<28}{int(n):>16,}")
        lines.append("")
        lines.append("vmstat")
        for k, v in self._d.get("vmstat", {}).items():
            lines.append(f"  {k:<28}{v:>16,}")
        fp = self._d.get("fault_paths")
        if fp and any(fp.values()):
            lines.append("")
            lines.append("fault paths")
            for k, v in fp.items():
                if v:
                    lines.append(f"  {k:<28}{v:>16,}")
        races = self._d.get("races")
        if races and any(races.values()):
            lines.append("")
            lines.append("races")
            for k, v in races.items():
                lines.append(f"  {k:<28}{v:>16,}")
        lines.append("")
        lines.append(f"{'locks':<30}{'acquisitions':>16}{'contended':>14}{'spins':>14}")
        for name in ("ptl", "page_table_lock", "zone_lock", "mmap_lock"):
            if name in self.locks:
                c = self.locks[name]
                lines.append(
                    f"  {name:<28}{c['acquisitions']:>16,}{c['contended']:>14,}{c['spins']:>14,}"
                )
        per_cpu = self._d.get("per_cpu_faults")
        if per_cpu and len(per_cpu) > 1:
            # Fairness next to contention: how evenly the CPUs got their faults done.
            lines.append("")
            lines.append(f"{'faults per CPU':<30}{' '.join(f'{int(n):,}' for n in per_cpu):>16}")
            lines.append(f"{'fairness (Jain)':<30}{float(self._d.get('fairness', 1.0)):>16.3f}")
        return "\n".join(lines)

    def __sub__(self, other: Stats) -> Stats:
        """Counter deltas ``self - other`` (gauges and figures included): what
        happened between two snapshots of the same simulator."""
        if not isinstance(other, Stats):
            return NotImplemented
        return Stats(_sub(self.to_dict(), other.to_dict()))


def _sub(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        keys = list(a) + [k for k in (b or {}) if k not in a]
        out = {k: _sub(a.get(k, _zero_like((b or {}).get(k))), (b or {}).get(k, _zero_like(a.get(k)))) for k in keys}
        return out
    if isinstance(a, list):
        b = b or [0] * len(a)
        return [x - y for x, y in zip(a, b)]
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return a - (b or 0)
    return a


def _zero_like(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _zero_like(x) for k, x in v.items()}
    if isinstance(v, list):
        return [0] * len(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return 0
    return v


def _from_dict(d: dict[str, Any], params: dict[str, Any]) -> Stats:
    return Stats(d, params)


def format_bytes(n: int) -> str:
    """1048576 -> ``"1.0 MiB"``."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{int(x)} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"
