"""Sweep results as tables: :class:`SweepResult` (what :func:`anonfolio.sweep`
returns) and :func:`flatten`, which turns one result into flat columns.

Columns (see docs/json.md for every figure's meaning and unit):

- the figures: ``faults``, ``rss_bytes``, ``rss_peak_bytes``, ``elapsed_s``,
  ...; nested groups joined with dots: ``mthp.64kB.anon_fault_alloc``,
  ``vmstat.pgfault``, ``locks.ptl.contended``, ``races.pages_wasted``,
  ``fault_paths.zero_page``, ``memory.*``; ``folio_orders.64kB`` (folios
  mapped of that size over the run, cumulative). Every size has its
  ``mthp.*`` columns, zeros included, so that rows line up.
- the settings that made the run, enough to re-run it: ``label``,
  ``workload`` or ``trace``, ``size``, the workload keywords (``threads``,
  ``advice``, ...) and every :class:`~anonfolio.config.Config` field as
  ``config.<field>`` (``config.hugepages.64kB``, ``config.policy``,
  ``config.fail_rate``, ``config.memory``, ...).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

from . import _anonfolio
from .config import THP_SIZES, Config
from .stats import Stats

__all__ = ["SweepResult", "flatten", "SETTING_COLUMNS"]

#: Settings columns that come first, when present.
SETTING_COLUMNS: tuple[str, ...] = ("label", "workload", "trace", "size")

_ANON_SIZES = tuple(s for s in THP_SIZES if s != "8kB")  # order 1 is never used for anon


def _order_name(order: int) -> str:
    return "4kB" if order == 0 else _anonfolio.size_name(order)


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = ",".join(str(v) for v in value)
    else:
        out[prefix] = value


def flatten(stats: Stats) -> dict[str, Any]:
    """One run as flat columns: its settings (``stats.params``), then its figures."""
    row: dict[str, Any] = {}
    params = dict(stats.params)
    cfg = params.pop("config", None)
    for key in SETTING_COLUMNS:
        if key in params:
            v = params.pop(key)
            row[key] = v if not isinstance(v, tuple) else "/".join(str(x) for x in v)
    for k, v in params.items():
        _flat(k, v, row)
    if cfg is not None:
        cd = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
        _flat("config", cd, row)
    d = stats.to_dict()
    mthp = d.pop("mthp", {}) or {}
    fo = d.pop("folio_orders", None)
    d.pop("per_cpu_faults", None)  # one value per CPU: not a column
    for k, v in d.items():
        _flat(k, v, row)
    counters = tuple(_anonfolio.MTHP_COUNTERS)
    for size in _ANON_SIZES:
        c = mthp.get(size) or {}
        for name in counters:
            row[f"mthp.{size}.{name}"] = int(c.get(name, 0))
    if fo is not None:
        for order, n in enumerate(fo):
            if order != 1:
                row[f"folio_orders.{_order_name(order)}"] = int(n)
    return row


class SweepResult(list[Stats]):
    """The :class:`Stats` of a sweep, in the order of its grid (a list), with
    table exports. Each element's ``params`` holds the settings of its run."""

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict a run (:func:`flatten`)."""
        return [flatten(s) for s in self]

    def columns(self) -> list[str]:
        """Every column of :meth:`rows`, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.rows():
            seen.update(dict.fromkeys(r))
        return list(seen)

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame``: one row a run, one flat column a figure or
        setting (needs pandas)."""
        import importlib

        try:
            pd = importlib.import_module("pandas")
        except ImportError as e:  # pragma: no cover - depends on the host
            raise ImportError("SweepResult.to_pandas needs pandas: pip install pandas") from e
        rows = self.rows()
        return pd.DataFrame(rows, columns=_columns(rows))

    def to_csv(self, path: Union[str, os.PathLike[str], None] = None) -> Optional[str]:
        """Writes the table as CSV to ``path``; without one, returns the text.
        Needs nothing beyond the standard library."""
        rows = self.rows()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        if path is None:
            return buf.getvalue()
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
        return None

    def to_parquet(self, path: Union[str, os.PathLike[str]]) -> None:
        """Writes the table as Parquet (needs pandas and pyarrow)."""
        self.to_pandas().to_parquet(path, index=False)


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)
