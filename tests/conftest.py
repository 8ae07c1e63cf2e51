"""Fixtures only: real PostgreSQL clusters started by the suite and exporters started on demand.

The helpers behind them live in tests/support/ (servers, scrape, exporters, sessions, ...); test modules
import those, never this file or each other (tests/test_suite_layout.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.exporters import running_exporter
from tests.support.pgbins import selected_major
from tests.support.servers import Server, fresh_database, settings_for, start_server

# Records test outcomes and the SQL variants that ran, when scripts/matrix asks for it.
pytest_plugins = ["tests.support.plugin_matrix"]


def pytest_report_header(config: pytest.Config) -> str:
    major = selected_major()
    return f"pgvitals: PostgreSQL {'from the machine' if major is None else major} for live tests"


@pytest.fixture(scope="session")
def pg() -> Iterator[Server]:
    """The session-wide primary server (a module may override it with a server of its own)."""
    server = start_server()
    yield server
    server.cluster.destroy()


@pytest.fixture
def fresh_db(pg: Server) -> Iterator[str]:
    """A database of its own on ``pg`` for a test that needs isolation; dropped afterwards (WITH (FORCE))."""
    with fresh_database(pg) as name:
        yield name


@pytest.fixture
def exporter_for() -> Iterator[Callable[..., Any]]:
    """Start exporters on demand; each is stopped at the end of the test."""
    stack: list[Any] = []

    def start(targets: list[dict[str, Any]], **extra: Any) -> Any:
        ctx = running_exporter(settings_for(targets, **extra))
        daemon = ctx.__enter__()
        stack.append(ctx)
        return daemon

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)
