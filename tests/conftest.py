"""Every simulation in the test suite ends with the invariant checker (every
present PTE maps a page of a live folio, mapcounts and refcounts match the
entries, no page mapped twice, pages conserved): ``ANONFOLIO_DEBUG_VM`` turns
it on in the core, for in-process runs and for the CLI subprocesses alike."""

import os

os.environ["ANONFOLIO_DEBUG_VM"] = "1"
