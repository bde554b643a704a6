"""Every simulation in the test suite ends with the invariant checker (every
present PTE maps a page of a live folio, mapcounts and refcounts match the
entries, no page mapped twice, pages conserved): ``ANONFOLIO_DEBUG_VM`` turns
it on in the core, for in-process runs and for the CLI subprocesses alike.

Tests marked ``host_thp`` set this machine's THP knobs in sysfs (and restore
them): a root user's plain ``pytest`` must not rewrite their settings, so
they run only when ``ANONFOLIO_KERNEL_TESTS=1`` asks for them (CI sets it)."""

from __future__ import annotations

import os

import pytest

os.environ["ANONFOLIO_DEBUG_VM"] = "1"

KERNEL_TESTS = os.environ.get("ANONFOLIO_KERNEL_TESTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if KERNEL_TESTS:
        return
    skip = pytest.mark.skip(reason="sets this machine's THP knobs: run with ANONFOLIO_KERNEL_TESTS=1")
    for item in items:
        if item.get_closest_marker("host_thp") is not None:
            item.add_marker(skip)
