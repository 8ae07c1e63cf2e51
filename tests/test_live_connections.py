"""Connections per target: idle ones are reused per database, the count opened stays bounded by ``idle_connections``.

Sessions are counted by the server itself (``pg_stat_database.sessions``, PostgreSQL 14+), after the
exporter's sessions have ended so that every backend has flushed its statistics.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from exporter.db import CollectError, TargetDown
from exporter.localpg import wait_until
from tests.support.exporters import Runner
from tests.support.servers import Server, start_server

pytestmark = [pytest.mark.live, pytest.mark.family("connections")]

DATABASES = [f"fleet_{i:02d}" for i in range(30)]
# Two per-database collectors: two sweeps over the 30 databases per round, as several collectors make.
SWEEPERS = ["pg_table_wraparound", "pg_sequences"]
ROUNDS = 3


@pytest.fixture(scope="module")
def many_databases() -> Iterator[Server]:
    """A server of its own with 30 databases (session counters must see no other test's sessions)."""
    server = start_server("manydbs")
    if server.version_num < 140000:
        server.cluster.destroy()
        pytest.skip("pg_stat_database.sessions exists from PostgreSQL 14")
    for name in DATABASES:
        server.execute(f"CREATE DATABASE {name}")
    yield server
    server.cluster.destroy()


def _sessions(server: Server) -> int:
    """Sessions ever opened to the 30 databases, once no exporter session is left to flush its counters."""
    wait_until(lambda: not server.execute(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgvitals'"), timeout=30)
    rows = server.execute("SELECT coalesce(sum(sessions), 0)::bigint AS n FROM pg_stat_database "
                          "WHERE datname LIKE 'fleet\\_%'")
    return int(rows[0]["n"])


def _sweep(server: Server, idle: int | None) -> tuple[int, int]:
    """(sessions the server counted, most exporter sessions open at once) over ROUNDS rounds of both sweeps."""
    before = _sessions(server)
    target: dict[str, object] = {"name": "fleet", "dsn": server.dsn(), "databases": {"include": ["fleet_*"]}}
    if idle is not None:
        target["idle_connections"] = idle
    most_open = 0
    with Runner(server, only=SWEEPERS, targets=[target], strict=True) as runner:
        for _ in range(ROUNDS):
            metrics = runner.collect()
            assert len(metrics.find("pg_database_oldest_table_xid_age", target="fleet")) == len(DATABASES)
            rows = server.execute("SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = 'pgvitals'")
            most_open = max(most_open, int(rows[0]["n"]))
    return _sessions(server) - before, most_open


def test_idle_connections_bound_the_sessions_a_sweep_opens(many_databases: Server) -> None:
    sweeps = ROUNDS * len(SWEEPERS)
    # Default (idle = max_connections = 2: the DSN's database and one other): a sweep reuses the one
    # database still connected and reconnects to the 29 others.
    opened, most_open = _sweep(many_databases, None)
    assert opened == len(DATABASES) + (sweeps - 1) * (len(DATABASES) - 1)
    assert most_open <= 2
    # A few idle connections: 5 kept (the DSN's database among them), so 4 fewer per sweep.
    opened, most_open = _sweep(many_databases, 5)
    assert opened == len(DATABASES) + (sweeps - 1) * (len(DATABASES) - 4)
    assert most_open <= 5
    # One per database plus the DSN's: each database is connected once, then only reused.
    opened, most_open = _sweep(many_databases, len(DATABASES) + 1)
    assert opened == len(DATABASES)
    assert most_open <= len(DATABASES) + 1


def test_a_sweep_leaves_one_connection_for_server_level_collectors(many_databases: Server) -> None:
    target = {"name": "fleet", "dsn": many_databases.dsn(), "max_connections": 2, "idle_connections": 3}
    with Runner(many_databases, only=[], targets=[target], strict=True) as runner:
        runner.collect()
        conns = runner.engine.targets["fleet"].conns
        with conns.session(DATABASES[0]) as sweeping:
            assert sweeping.query("SELECT current_database() AS d")[0]["d"] == DATABASES[0]
            # A second database of the sweep must wait: the other slot is the server-level collectors'.
            with pytest.raises(CollectError) as refused, conns.session(DATABASES[1], wait=0.2):
                pass
            assert refused.value.reason == "busy"
            with conns.session(None, wait=5) as server_level:
                assert server_level.query("SELECT current_database() AS d")[0]["d"] == "postgres"


def test_a_run_waits_for_its_databases_busy_connection_rather_than_open_one_it_cannot_keep(
        pg: Server, fresh_db: str) -> None:
    target = {"name": "share", "dsn": pg.dsn(), "max_connections": 2, "idle_connections": 2,
              "databases": {"include": [fresh_db]}}
    with Runner(pg, only=[], targets=[target], strict=True) as runner:
        runner.collect()
        conns = runner.engine.targets["share"].conns
        with conns.session(fresh_db):
            pass  # two open now: the DSN's database (idle) and fresh_db (idle)
        opened = conns.opened
        got: list[int] = []

        def second_run() -> None:
            with conns.session(None, wait=10) as session:
                got.append(int(session.query("SELECT pg_backend_pid() AS pid")[0]["pid"]))

        with conns.session(None) as first:
            first_pid = int(first.query("SELECT pg_backend_pid() AS pid")[0]["pid"])
            waiting = threading.Thread(target=second_run)
            waiting.start()
            wait_until(lambda: conns._returned._waiters, timeout=10, interval=0.01)  # type: ignore[attr-defined]
        waiting.join(10)
        # The second run got the first one's connection: no new session, fresh_db's connection kept.
        assert got == [first_pid] and conns.opened == opened
        assert conns.idle_databases() == [fresh_db, "postgres"]

        # Held longer than the wait: the second run opens a connection of its own after SHARE_WAIT.
        conns.SHARE_WAIT = 0.2
        with conns.session(None):
            waiting = threading.Thread(target=second_run)
            waiting.start()
            waiting.join(10)
            assert not waiting.is_alive() and got[-1] != first_pid and conns.opened == opened + 1


def test_a_run_opens_another_connection_at_once_when_it_can_be_kept_idle(pg: Server) -> None:
    target = {"name": "parallel", "dsn": pg.dsn(), "max_connections": 2, "idle_connections": 3}
    with Runner(pg, only=[], targets=[target], strict=True) as runner:
        runner.collect()
        conns = runner.engine.targets["parallel"].conns
        opened = conns.opened
        with conns.session(None), conns.session(None, wait=0.5) as second:
            assert second.query("SELECT 1 AS one")[0]["one"] == 1
        assert conns.opened == opened + 1


def test_closing_the_target_wakes_a_run_waiting_for_its_busy_connection(pg: Server) -> None:
    target = {"name": "closing", "dsn": pg.dsn(), "max_connections": 2, "idle_connections": 1}
    with Runner(pg, only=[], targets=[target], strict=True) as runner:
        runner.collect()
        conns = runner.engine.targets["closing"].conns
        conns.SHARE_WAIT = 600.0  # only close() can end this wait within the join below
        outcome: list[BaseException] = []

        def waiting_run() -> None:
            try:
                with conns.session(None, wait=600):
                    pass
            except BaseException as exc:  # the test inspects what the run raised
                outcome.append(exc)

        with conns.session(None):
            waiter = threading.Thread(target=waiting_run)
            waiter.start()
            wait_until(lambda: conns._returned._waiters, timeout=10, interval=0.01)  # type: ignore[attr-defined]
            conns.close()
            waiter.join(30)
            assert not waiter.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], TargetDown) and outcome[0].reason == "removed"
