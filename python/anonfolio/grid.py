"""Grids of settings written on the command line, for ``anonfolio report``
and ``anonfolio sweep`` (docs/cli.md).

An option's values are separated by commas and every combination runs::

    --thp 64kB=always,never --thp 16kB=always,never --policy upstream,v1
    --thp-enabled madvise,always

is 2 x 2 x 2 x 2 = 16 settings. Sizes not named keep this kernel's
defaults (``enabled=madvise``, ``2048kB=inherit``, every other size
``never``), as in ``replay``.

:func:`default_report_grid` is the grid ``report`` uses when no ``--thp``
option is given: order 0 only; each mTHP size alone; every mTHP size; 2048kB
alone; every size with 2048kB. Each named size is ``always`` there, so that
it applies to every VMA of the trace, advised or not.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Optional

from . import _anonfolio
from .config import ENABLED_MODES, POLICIES, SIZE_MODES, THP_SIZES, Config

__all__ = ["GridError", "parse_thp_grid", "config_grid", "default_report_grid", "MTHP_SIZES"]

#: The sizes below the PMD that anonymous memory can use (order 1 never is).
MTHP_SIZES: tuple[str, ...] = tuple(s for s in THP_SIZES if s not in ("8kB", "2048kB"))


class GridError(ValueError):
    """A malformed grid option; the message names it."""


def _values(text: str, allowed: Sequence[str], what: str) -> list[str]:
    vals = [v for v in text.split(",") if v]
    if not vals:
        raise GridError(f"{what}: no value in {text!r}")
    for v in vals:
        if v not in allowed:
            raise GridError(f"{what}: unknown value {v!r} (want {', '.join(allowed)})")
    return vals


def parse_thp_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["64kB=always,never"]`` -> ``[("64kB", ["always", "never"])]``."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        size, sep, modes = spec.partition("=")
        if not sep:
            raise GridError(f"--thp: malformed {spec!r} (want SIZE=MODE[,MODE...])")
        try:
            order = _anonfolio.parse_thp_size(size)
        except _anonfolio.AnonfolioError as e:
            raise GridError(f"--thp: {e}") from None
        if order == 1:
            raise GridError(
                f"--thp: {size}: the kernel has no anonymous-memory knob for 8kB (order 1 is never used for anon)"
            )
        name = _anonfolio.size_name(order)
        out[name] = _values(modes, SIZE_MODES, f"--thp {name}")
    return list(out.items())


def config_grid(
    thp: Sequence[str] = (),
    enabled: Optional[str] = None,
    policy: Optional[str] = None,
    base: Optional[Config] = None,
) -> list[tuple[str, Config]]:
    """Every combination of the comma-separated values of ``--thp`` options,
    ``--thp-enabled`` and ``--policy``, as (label, Config); the label names
    only what varies or was asked for. ``base`` gives the other fields."""
    base = base or Config()
    sizes = parse_thp_grid(thp)
    enableds = _values(enabled, ENABLED_MODES, "--thp-enabled") if enabled else [None]
    policies = _values(policy, POLICIES, "--policy") if policy else [None]
    out: list[tuple[str, Config]] = []
    for en, pol, modes in itertools.product(enableds, policies, itertools.product(*[m for _, m in sizes])):
        hp = {size: mode for (size, _), mode in zip(sizes, modes)}
        fields: dict[str, object] = {"hugepages": hp}
        parts = [f"{s}={m}" for s, m in hp.items()]
        if en is not None:
            fields["enabled"] = en
            parts.insert(0, f"enabled={en}")
        if pol is not None:
            fields["policy"] = pol
            parts.append(pol)
        out.append((" ".join(parts) or "kernel defaults", base.replace(**fields)))
    return out


def default_report_grid(base: Optional[Config] = None, policy: Optional[str] = None) -> list[tuple[str, Config]]:
    """``report``'s grid: order 0 only; each mTHP size alone; every mTHP
    size; 2048kB alone; every size with 2048kB (each named size ``always``),
    times the ``--policy`` values if given."""
    base = base or Config()
    off = dict.fromkeys(MTHP_SIZES, "never")
    points: list[tuple[str, dict[str, str]]] = [("order 0", {**off, "2048kB": "never"})]
    points += [(f"{s} alone", {**off, s: "always", "2048kB": "never"}) for s in MTHP_SIZES]
    points.append(("all mTHP", {**dict.fromkeys(MTHP_SIZES, "always"), "2048kB": "never"}))
    points.append(("2048kB alone", {**off, "2048kB": "always"}))
    points.append(("all + 2048kB", {**dict.fromkeys(MTHP_SIZES, "always"), "2048kB": "always"}))
    policies = _values(policy, POLICIES, "--policy") if policy else [None]
    out = []
    for pol in policies:
        for label, hp in points:
            cfg = base.replace(hugepages=hp, **({"policy": pol} if pol else {}))
            out.append((f"{label} {pol}" if pol and len(policies) > 1 else label, cfg))
    return out
