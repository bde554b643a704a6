"""The simulated machine's configuration, as ``/sys/kernel/mm/transparent_hugepage/`` has it.

>>> from anonfolio import Config
>>> c = Config(hugepages={"64K": "always"})
>>> c.hugepages["64kB"], c.hugepages["2048kB"], c.enabled
('always', 'inherit', 'madvise')
>>> c.sysfs()["hugepages-64kB/enabled"]
'always'

Validation happens in the native module (the same code the command line
uses), so a value is accepted here exactly when the simulator accepts it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

from . import _anonfolio
from .results import ConfigDict

__all__ = ["Config", "THP_SIZES", "ENABLED_MODES", "SIZE_MODES", "POLICIES"]

#: Sizes that have a ``hugepages-*`` folder, smallest first (``"8kB"`` .. ``"2048kB"``).
THP_SIZES: tuple[str, ...] = tuple(_anonfolio.THP_SIZES)
#: Values of ``transparent_hugepage/enabled``.
ENABLED_MODES: tuple[str, ...] = ("always", "madvise", "never")
#: Values of ``hugepages-<size>/enabled``.
SIZE_MODES: tuple[str, ...] = ("always", "inherit", "madvise", "never")
#: Fault-path policies: upstream (Linux 6.8 .. 6.18), the v1 seed patch, the reviewers' alternative.
POLICIES: tuple[str, ...] = ("upstream", "v1", "preferred")

Bytes = Union[int, str]

_SYSFS_ROOT = "/sys/kernel/mm/transparent_hugepage"


@dataclasses.dataclass(frozen=True)
class Config:
    """A frozen configuration of the simulated machine and its THP knobs.

    Arguments:
        enabled: ``transparent_hugepage/enabled``: ``always``, ``madvise`` or ``never``.
        hugepages: ``hugepages-<size>/enabled`` for the sizes to change, e.g.
            ``{"64kB": "always"}``; sizes may be spelt ``"64K"`` or ``"2M"``. Sizes
            not named keep this kernel's default: ``2048kB`` ``inherit``, every
            other ``never``. The stored mapping is read-only and names every size
            (``8kB`` too, always ``never``: the kernel has no anonymous knob for
            order 1, so asking for it is a ConfigError).
        use_zero_page: ``transparent_hugepage/use_zero_page``: read faults that
            could get a PMD THP map the huge zero page instead (order-0 read
            faults always map the shared zero page).
        policy: ``upstream`` (Linux 6.8 .. 6.18), ``v1`` (the seed patch) or
            ``preferred`` (the preferred order, else order 0).
        on_race: what a fault does after losing a race: ``refault`` (drop the
            folio, fault again) or ``retry-lower`` (v1: retry one order lower
            in the same fault while the faulting PTE is still none); None is
            the policy's own (v1 retries, the others refault).
        preempt: deterministic mode only: the probability 0..1 of switching to
            another CPU at each point where the fault path can be overtaken
            (the fault's entry, after the lockless estimate, after
            allocation, before the PTL). Higher widens the race windows.
        memory: simulated physical memory, bytes or a string such as ``"64G"``.
        memcg_limit: memcg ``memory.max`` in bytes (or ``"512M"``); None for no limit.
        fragmentation: fraction 0..1 of pageblocks to pin before the run.
        fail_orders: orders (ints) or sizes (``"64kB"``) at which every allocation fails.
        fail_rate: probability 0..1 that an allocation above order 0 fails.
        seed: seed of the failure injection.
        check_invariants: check mapcounts and page conservation after each run.

    Raises:
        ConfigError: a value out of its domain (also a ValueError).
    """

    enabled: str = "madvise"
    hugepages: Mapping[str, str] = dataclasses.field(default_factory=dict)
    use_zero_page: bool = True
    policy: str = "upstream"
    on_race: Optional[str] = None
    preempt: float = 0.5
    memory: Bytes = "4T"
    memcg_limit: Optional[Bytes] = None
    fragmentation: float = 0.0
    fail_orders: Iterable[Union[int, str]] = ()
    fail_rate: float = 0.0
    seed: int = 0
    check_invariants: bool = False

    def __post_init__(self) -> None:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if fields["hugepages"] is not None and not isinstance(fields["hugepages"], Mapping):
            raise _anonfolio.ConfigError("hugepages: expected a mapping like {'64kB': 'always'}")
        for size, mode in (fields["hugepages"] or {}).items():
            if mode != "never" and _is_order_1(size):
                raise _anonfolio.ConfigError(
                    f"hugepages: {size} has no anonymous-memory knob (order 1 is never used for anon; "
                    "hugepages-8kB exists for files only); sizes: 16kB, 32kB, ..., 2048kB"
                )
        if isinstance(fields["fail_orders"], Iterable) and not isinstance(fields["fail_orders"], (str, bytes)):
            fields["fail_orders"] = list(fields["fail_orders"])
        norm: Mapping[str, Any] = _anonfolio.normalize_config(fields)
        for name, value in norm.items():
            if name == "hugepages":
                value = types.MappingProxyType(dict(value))
            object.__setattr__(self, name, value)

    # The read-only mapping is not hashable; hash what it holds instead.
    def __hash__(self) -> int:
        return hash(
            tuple(
                tuple(sorted(v.items())) if isinstance(v, Mapping) else v
                for v in (getattr(self, f.name) for f in dataclasses.fields(self))
            )
        )

    def __repr__(self) -> str:
        parts = []
        default_sizes = _default_sizes()
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "hugepages":
                changed = {k: m for k, m in v.items() if default_sizes.get(k) != m}
                if changed:
                    parts.append(f"hugepages={changed!r}")
                continue
            if v != _DEFAULT_FIELDS[f.name]:
                parts.append(f"{f.name}={v!r}")
        return f"Config({', '.join(parts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_from_fields, (self.to_dict(),))

    # ------------------------------------------------------------------
    def to_dict(self) -> ConfigDict:
        """The fields as a plain dict (``hugepages`` a dict, ``fail_orders`` a list)."""
        # The fields are normalised (byte counts and orders are ints) by __post_init__.
        return ConfigDict(
            enabled=self.enabled,
            hugepages=dict(self.hugepages),
            use_zero_page=self.use_zero_page,
            policy=self.policy,
            on_race=self.on_race,
            preempt=self.preempt,
            memory=int(self.memory),
            memcg_limit=None if self.memcg_limit is None else int(self.memcg_limit),
            fragmentation=self.fragmentation,
            fail_orders=[int(o) for o in self.fail_orders],
            fail_rate=self.fail_rate,
            seed=self.seed,
            check_invariants=self.check_invariants,
        )

    def _to_native(self) -> ConfigDict:
        """The dict ``anonfolio._anonfolio.Simulator`` takes."""
        return self.to_dict()

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied; ``hugepages`` entries are merged
        into the current ones rather than replacing them all."""
        if "hugepages" in changes and changes["hugepages"] is not None:
            merged = dict(self.hugepages)
            merged.update(changes["hugepages"])
            changes["hugepages"] = merged
        return dataclasses.replace(self, **changes)

    def sysfs(self) -> dict[str, str]:
        """The knobs as sysfs files relative to ``/sys/kernel/mm/transparent_hugepage/``
        with the values one would ``echo`` into them.

        >>> Config().sysfs()["enabled"], Config().sysfs()["hugepages-2048kB/enabled"]
        ('madvise', 'inherit')
        """
        out = {"enabled": self.enabled, "use_zero_page": "1" if self.use_zero_page else "0"}
        for size, mode in self.hugepages.items():
            # hugepages-8kB exists for files only: anon has no order-1 knob.
            if size != "8kB":
                out[f"hugepages-{size}/enabled"] = mode
        return out

    @property
    def thp_args(self) -> list[str]:
        """The command-line options that express the THP knobs (``--thp-enabled``, ``--thp``, ``--policy``)."""
        args = ["--thp-enabled", self.enabled]
        for size, mode in self.hugepages.items():
            args += ["--thp", f"{size}={mode}"]
        args += ["--policy", self.policy]
        return args

    def allowed_sizes(self, *, hugepage: bool = False, nohugepage: bool = False) -> tuple[str, ...]:
        """Sizes a page fault may allocate in a VMA with (or without)
        ``MADV_HUGEPAGE``/``MADV_NOHUGEPAGE``, as ``thp_vma_allowable_orders()``
        decides; largest first. Order 1 (8kB) is never used for anonymous memory."""
        if nohugepage:
            return ()
        out = []
        for size in reversed(THP_SIZES):
            if size == "8kB":
                continue
            mode = self.hugepages[size]
            on = (
                mode == "always"
                or (mode == "madvise" and hugepage)
                or (mode == "inherit" and (self.enabled == "always" or (hugepage and self.enabled != "never")))
            )
            if on:
                out.append(size)
        return tuple(out)

    # ------------------------------------------------------------------
    @classmethod
    def from_args(
        cls,
        args: Optional[argparse.Namespace] = None,
        *,
        thp_enabled: Optional[str] = None,
        thp: Iterable[str] = (),
        policy: Optional[str] = None,
        **fields: Any,
    ) -> Config:
        """A configuration from command-line style options.

        ``args`` may be an ``argparse.Namespace`` with ``thp_enabled``, ``thp``
        (a list of ``SIZE=MODE``) and ``policy`` attributes; keyword options
        override it. Other keywords are fields of :class:`Config`.

        >>> Config.from_args(thp=["64K=always", "2M=never"]).hugepages["64kB"]
        'always'
        """
        if args is not None:
            thp_enabled = thp_enabled if thp_enabled is not None else getattr(args, "thp_enabled", None)
            thp = list(getattr(args, "thp", None) or ()) + list(thp)
            policy = policy if policy is not None else getattr(args, "policy", None)
        hugepages: dict[str, str] = dict(fields.pop("hugepages", None) or {})
        for spec in thp:
            size, sep, mode = spec.partition("=")
            if not sep or not size or not mode:
                raise _anonfolio.ConfigError(
                    f"malformed --thp {spec!r} (want SIZE=always|inherit|madvise|never)"
                )
            hugepages[_anonfolio.size_name(_anonfolio.parse_thp_size(size))] = mode
        if thp_enabled is not None:
            fields["enabled"] = thp_enabled
        if policy is not None:
            fields["policy"] = policy
        return cls(hugepages=hugepages, **fields)

    @classmethod
    def from_sysfs(cls, files: Mapping[str, str], **fields: Any) -> Config:
        """A configuration from sysfs file contents, as :meth:`sysfs` returns
        them or as the kernel shows them (``"always [madvise] never"``)."""
        hugepages = {}
        for path, text in files.items():
            value = _selected(text)
            name = path.rsplit(_SYSFS_ROOT + "/", 1)[-1]
            if name == "enabled":
                fields.setdefault("enabled", value)
            elif name == "use_zero_page":
                fields.setdefault("use_zero_page", value.strip() == "1")
            elif name.startswith("hugepages-") and name.endswith("/enabled"):
                hugepages[name[len("hugepages-") : -len("/enabled")]] = value
        fields.setdefault("hugepages", hugepages)
        return cls(**fields)

    @classmethod
    def from_host(cls, root: str = _SYSFS_ROOT, **fields: Any) -> Config:
        """The THP knobs of the machine this runs on (read from sysfs); other
        fields from ``fields``. Sizes the host has no folder for (or that this
        simulator does not model) are left at their defaults."""
        import os

        files: dict[str, str] = {}
        for name in ["enabled", "use_zero_page"] + [f"hugepages-{s}/enabled" for s in THP_SIZES]:
            try:
                with open(os.path.join(root, name)) as f:
                    files[name] = f.read()
            except OSError:
                pass
        if not files:
            raise _anonfolio.ConfigError(f"no THP knobs under {root}")
        return cls.from_sysfs(files, **fields)


def _selected(text: str) -> str:
    """``"always [madvise] never"`` -> ``"madvise"``; a plain value as is."""
    text = text.strip()
    if "[" in text and "]" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text


def _is_order_1(size: object) -> bool:
    try:
        return isinstance(size, str) and _anonfolio.parse_thp_size(size) == 1
    except _anonfolio.AnonfolioError:
        return False  # not a size at all: the native check words that error


def _from_fields(d: Mapping[str, Any]) -> Config:
    return Config(**d)


def _default_sizes() -> dict[str, str]:
    return dict(_anonfolio.normalize_config()["hugepages"])


_DEFAULT_FIELDS: Mapping[str, Any] = _anonfolio.normalize_config()
