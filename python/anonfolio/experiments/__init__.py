"""Canned experiments that write tables and plots.

``race-policies`` answers Yang Shi's question on the v1 patch: is retrying
one order lower after a lost race (``retry-lower``, v1) worth it compared
with dropping the folio and letting the CPU fault again (``refault``,
upstream since 6.8)? It runs every combination of

- policy (order selection): ``upstream``, ``v1``, ``preferred``;
- race handling: ``refault``, ``retry-lower`` (``Config.on_race``);
- simulated CPUs: 1, 2, 4, 8;
- sharing: ``disjoint`` (a slice per CPU: a control, they never meet) or
  ``interleaved`` (CPUs take turns page by page over one range, so they
  fault in the same folio-sized range at once);
- memory: ``plenty`` or ``fragmented`` (allocations above order 0 fail with
  probability 0.3: a racer then maps a *smaller* folio that may not cover
  the loser's page, the only case where retry-lower and refault differ),

in two passes:

1. **deterministic**: seeded interleavings (``--deterministic SEED``) that
   switch CPUs at the fault path's race points with probability 0.5, over
   several seeds. Races are far more frequent than on real hardware (the
   windows are widened on purpose) but the counts are reproducible; the
   table shows medians and min..max over the seeds.
2. **free**: real host threads (1 and 2: this machine's cores), a bigger
   range, a few repeats: wall time per page and lock contention.

Files written into ``out``: ``results.csv`` (one row per run),
``medians.csv`` (one row per point), ``results.md`` (tables and an
auto-generated findings paragraph) and PNG plots when matplotlib is there.

``scaling``: pages touched per second for 1, 2, 4 ... host threads, against
the linear reference (1-thread rate x N), with the efficiency.

The package, one module a concern: ``_grid`` (the axes, knobs and
columns), ``_rows`` (rows, medians, paired deltas), ``_race_policies`` (the
passes and the files), ``_findings`` (the computed sentences),
``_markdown`` (results.md), ``_plots`` (the PNGs) and ``_scaling``.
"""

from __future__ import annotations

from ._findings import findings
from ._grid import (
    COLUMNS,
    KEYS,
    MEMORY,
    METRICS,
    ON_RACE,
    PASSES,
    RACE_POLICIES_CONFIG,
    DeltaRow,
    MedianRow,
    Point,
    RaceParams,
    RaceRow,
)
from ._race_policies import RacePoliciesResult, race_policies
from ._rows import medians, paired_deltas
from ._scaling import SCALING_COLUMNS, ScalingMedian, ScalingResult, ScalingRow, ScalingRun, scaling

__all__ = [
    "race_policies",
    "scaling",
    "RacePoliciesResult",
    "ScalingResult",
    "RACE_POLICIES_CONFIG",
    "MEMORY",
    "ON_RACE",
    "PASSES",
    "COLUMNS",
    "KEYS",
    "METRICS",
    "SCALING_COLUMNS",
    "medians",
    "paired_deltas",
    "findings",
    "Point",
    "RaceRow",
    "RaceParams",
    "MedianRow",
    "DeltaRow",
    "ScalingRun",
    "ScalingRow",
    "ScalingMedian",
]
