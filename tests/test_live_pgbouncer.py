"""PgBouncer through its admin console: a real pgbouncer in front of a real server, clients we control."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from exporter import __version__
from exporter.catalog import load
from exporter.collectors.pgbouncer import DATABASES, POOLS, database_rows, pool_rows
from exporter.engine import Engine
from exporter.exposition import render_rows
from exporter.hooks import RunContext
from exporter.localpg import wait_until
from exporter.snapshot import Snapshot
from tests.support.pgbouncer import APP_USER, PgBouncer, pgbouncer_available, pgbouncer_version, running_pgbouncer
from tests.support.scrape import Metrics, http_status, wait_for_metric
from tests.support.servers import Server, settings_for

pytestmark = [
    pytest.mark.live,
    pytest.mark.family("pgbouncer"),
    pytest.mark.skipif(not pgbouncer_available(), reason="pgbouncer is not installed"),
]

MAX_CLIENT_CONN = 150


@pytest.fixture(scope="module")
def bouncer(pg: Server) -> Iterator[PgBouncer]:
    """One PgBouncer for the module: pool_size 2, session pooling, auth_file."""
    with running_pgbouncer(pg, pool_size=2, max_client_conn=MAX_CLIENT_CONN) as running:
        yield running


class Poller:
    """An engine watching one PgBouncer, kept across polls (its admin connection is reused)."""

    def __init__(self, bouncer: PgBouncer, password_file: Path):
        password_file.write_text(bouncer.stats_password + "\n")
        settings = settings_for([], pgbouncers=[{"name": "edge", "dsn": bouncer.admin_dsn_without_password,
                                                 "password_file": str(password_file)}])
        catalog = load()
        self.snapshot = Snapshot(catalog, __version__)
        self.engine = Engine(catalog, settings, self.snapshot)
        self.runtime = self.engine.targets["edge"]

    def poll(self) -> Metrics:
        """Probe and run every PgBouncer collector once; the parsed exposition."""
        if self.engine.probe(self.runtime):
            for eff in self.engine.applicable(self.runtime):
                self.engine.collect(self.runtime, eff)
        return Metrics(self.snapshot.render().decode())

    def close(self) -> None:
        self.engine.close()


@pytest.fixture
def poller(bouncer: PgBouncer, tmp_path: Path) -> Iterator[Poller]:
    watcher = Poller(bouncer, tmp_path / "stats-password")
    yield watcher
    watcher.close()


@pytest.fixture
def dbname(bouncer: PgBouncer, fresh_db: str) -> Iterator[str]:
    """A fresh database served through the module's PgBouncer; its server connections closed afterwards."""
    yield fresh_db
    bouncer.release(fresh_db)


def _sleep_through(bouncer: PgBouncer, dbname: str, seconds: float) -> None:
    with psycopg.connect(bouncer.client_dsn(dbname), autocommit=True) as conn:
        conn.execute(f"SELECT pg_sleep({seconds})")


def test_small_pool_makes_clients_wait(bouncer: PgBouncer, poller: Poller, dbname: str) -> None:
    clients = [threading.Thread(target=_sleep_through, args=(bouncer, dbname, 2.0)) for _ in range(5)]
    for client in clients:
        client.start()
    try:
        def waiting() -> Metrics | None:
            metrics = poller.poll()
            labels = {"database": dbname, "user": APP_USER}
            value = metrics.value("pgbouncer_pools_client_waiting_connections", **labels)
            maxwait = metrics.value("pgbouncer_pools_client_maxwait_seconds", **labels)
            # While the first two servers log in, clients wait too: look at the steady state behind them.
            busy = metrics.value("pgbouncer_pools_server_active_connections", **labels) == 2
            return metrics if value and maxwait and busy else None

        metrics = wait_until(waiting, timeout=15, interval=0.2)
    finally:
        for client in clients:
            client.join(timeout=30)
    labels = {"target": "edge", "database": dbname, "user": APP_USER}
    # Two servers at most (pool_size=2): the other clients queue for them.
    assert 1 <= metrics.value("pgbouncer_pools_client_waiting_connections", **labels) <= 3  # type: ignore[operator]
    assert metrics.value("pgbouncer_pools_server_active_connections", **labels) == 2
    assert metrics.value("pgbouncer_pools_client_active_connections", **labels) >= 2  # type: ignore[operator]
    assert 0 < metrics.value("pgbouncer_pools_client_maxwait_seconds", **labels) < 30  # type: ignore[operator]
    assert metrics.value("pgbouncer_databases_pool_size", target="edge", database=dbname) == 2
    assert metrics.value("pgbouncer_databases_current_connections", database=dbname) == 2
    assert metrics.value("pgbouncer_up", target="edge") == 1

    # Once everyone is served the queue is empty, and the wait shows in the totals: the last
    # client waited for two rounds of 2 s sleeps, the two before it for one round.
    after = poller.poll()
    assert after.value("pgbouncer_pools_client_waiting_connections", **labels) == 0
    assert after.value("pgbouncer_pools_client_maxwait_seconds", **labels) == 0
    assert after.value("pgbouncer_stats_client_wait_seconds_total", database=dbname) >= 2  # type: ignore[operator]
    assert after.value("pgbouncer_stats_transactions_total", database=dbname) >= 5  # type: ignore[operator]


def test_stats_counters_increase(bouncer: PgBouncer, poller: Poller, dbname: str) -> None:
    names = ["pgbouncer_stats_transactions_total", "pgbouncer_stats_queries_total",
             "pgbouncer_stats_received_bytes_total", "pgbouncer_stats_sent_bytes_total",
             "pgbouncer_stats_query_seconds_total", "pgbouncer_stats_transaction_seconds_total"]
    with psycopg.connect(bouncer.client_dsn(dbname), autocommit=True) as conn:
        conn.execute("SELECT 1")  # the database's stats row exists from its first query on
        before = poller.poll()
        for _ in range(20):
            conn.execute("SELECT pg_sleep(0.01)")
        with conn.transaction():
            conn.execute("SELECT 1")
            conn.execute("SELECT 2")

    def grown() -> Metrics | None:
        metrics = poller.poll()
        queries = metrics.value("pgbouncer_stats_queries_total", database=dbname) or 0
        return metrics if queries >= (before.value("pgbouncer_stats_queries_total", database=dbname) or 0) + 22 \
            else None

    after = wait_until(grown, timeout=15, interval=0.2)
    for name in names:
        old, new = before.value(name, database=dbname), after.value(name, database=dbname)
        assert old is not None and new is not None and new > old, name
    # 20 autocommit statements are 20 transactions, the explicit one adds one more.
    assert after.value("pgbouncer_stats_transactions_total", database=dbname) - before.value(  # type: ignore[operator]
        "pgbouncer_stats_transactions_total", database=dbname) >= 21
    # 20 sleeps of 10 ms executed on the server: at least 0.2 s of query time.
    assert after.value("pgbouncer_stats_query_seconds_total", database=dbname) - before.value(  # type: ignore[operator]
        "pgbouncer_stats_query_seconds_total", database=dbname) >= 0.2


def test_many_polls_on_one_admin_connection(bouncer: PgBouncer, poller: Poller) -> None:
    collectors = [e.collector.name for e in poller.engine.applicable(poller.runtime)]
    assert sorted(collectors) == ["pgbouncer_config", "pgbouncer_databases", "pgbouncer_pools", "pgbouncer_stats"]
    for round_ in range(12):  # psycopg's automatic prepared statements would break the 6th
        metrics = poller.poll()
        assert metrics.value("pgbouncer_up", target="edge") == 1, round_
        for name in collectors:
            assert metrics.value("pgvitals_collector_success", collector=name) == 1, (round_, name)
            assert not metrics.find("pgvitals_collector_errors_total", collector=name), (round_, name)
    # All of it went through one admin-console connection, opened once.
    ours = [c for c in bouncer.show("CLIENTS") if c.get("application_name") == "pgvitals"]
    assert len(ours) == 1, ours


def test_limits_and_version_specific_columns(bouncer: PgBouncer, poller: Poller) -> None:
    # Entries come and go (other tests' databases, auto-database entries): read the console before
    # and after the poll; an entry on both lists must have its series, and no series may name one on neither.
    stats_before = {row["database"]: row for row in bouncer.show("STATS")}
    databases_before = {row["name"]: row for row in bouncer.show("DATABASES")}
    metrics = poller.poll()
    stats_after = {row["database"]: row for row in bouncer.show("STATS")}
    databases_after = {row["name"]: row for row in bouncer.show("DATABASES")}

    def covers(series: list[tuple[dict[str, str], float]], before: dict[str, Any], after: dict[str, Any]) -> None:
        labelled = {labels["database"] for labels, _ in series}
        assert before.keys() & after.keys() <= labelled <= before.keys() | after.keys()

    assert metrics.value("pgbouncer_config_max_client_connections", target="edge") == MAX_CLIENT_CONN
    assert metrics.value("pgbouncer_config_default_pool_size") == 2
    assert metrics.value("pgbouncer_client_connections") >= 1  # type: ignore[operator]
    assert metrics.value("pgbouncer_databases_reserve_pool_size", database="pgbouncer") == 0
    show_config = {row["key"]: row["value"] for row in bouncer.show("CONFIG")}
    assert metrics.value("pgbouncer_config_max_db_connections") == float(show_config["max_db_connections"])
    # Columns newer PgBouncers have are read by name; where this one lacks them: no sample, never a zero.
    assignments = metrics.find("pgbouncer_stats_server_assignments_total")
    if "total_server_assignment_count" in stats_after["pgbouncer"]:  # 1.23+
        assert pgbouncer_version() >= (1, 23)
        covers(assignments, stats_before, stats_after)
    else:
        assert not assignments
    clients = metrics.find("pgbouncer_databases_current_client_connections")
    if "current_client_connections" in databases_after["pgbouncer"]:  # 1.24+
        assert pgbouncer_version() >= (1, 24)
        covers(clients, databases_before, databases_after)
        assert metrics.value("pgbouncer_databases_current_client_connections", database="pgbouncer") >= 1  # type: ignore[operator]
    else:
        assert not clients
    # reserve_pool in SHOW DATABASES was renamed reserve_pool_size in 1.24: the metric exists either way.
    covers(metrics.find("pgbouncer_databases_reserve_pool_size"), databases_before, databases_after)


def test_newer_column_sets_are_read_by_name() -> None:
    """Rows shaped like PgBouncer 1.24's SHOW POOLS / SHOW DATABASES render by column name."""
    ctx = RunContext(target="edge", database=None, facts=None, params={}, state={},
                     settings=settings_for([], pgbouncers=[{"name": "edge", "dsn": "host=x dbname=pgbouncer"}]))
    pools_124 = [{"database": "app", "user": "u", "cl_active": 3, "cl_waiting": 4, "cl_active_cancel_req": 0,
                  "cl_waiting_cancel_req": 0, "sv_active": 2, "sv_active_cancel": 0, "sv_being_canceled": 0,
                  "sv_idle": 0, "sv_used": 0, "sv_tested": 0, "sv_login": 0, "maxwait": 1, "maxwait_us": 250000,
                  "pool_mode": "transaction", "load_balance_hosts": None}]
    chunks, _, _ = render_rows(POOLS.metrics, pool_rows(pools_124, ctx), 'target="edge"', 100)
    assert chunks["pgbouncer_pools_client_maxwait_seconds"] == (
        b'pgbouncer_pools_client_maxwait_seconds{target="edge",database="app",user="u"} 1.25\n')
    databases_124: list[dict[str, Any]] = [{
        "name": "app", "host": "db", "port": 5432, "database": "app_prod", "force_user": None, "pool_size": 20,
        "min_pool_size": 0, "reserve_pool_size": 5, "server_lifetime": 3600, "pool_mode": None,
        "load_balance_hosts": None, "max_connections": 0, "current_connections": 7, "max_client_connections": 0,
        "current_client_connections": 41, "paused": 0, "disabled": 0}]
    chunks, _, _ = render_rows(DATABASES.metrics, database_rows(databases_124, ctx), 'target="edge"', 100)
    assert b'{target="edge",database="app"} 5\n' in chunks["pgbouncer_databases_reserve_pool_size"]
    assert b'{target="edge",database="app"} 41\n' in chunks["pgbouncer_databases_current_client_connections"]


def test_auth_query_and_daemon_scrape(pg: Server, fresh_db: str, exporter_for: Any) -> None:
    """A PgBouncer that looks passwords up with auth_query, watched by the running exporter."""
    with running_pgbouncer(pg, pool_size=3, auth="query", pool_mode="transaction") as other, \
            psycopg.connect(other.client_dsn(fresh_db), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)
        daemon = exporter_for([], pgbouncers=[{"name": "tx", "dsn": other.admin_dsn}])
        wait_until(lambda: http_status(daemon.server.port, "/readyz")[0] == 200, timeout=30)
        metrics = wait_for_metric(daemon.server.port, "pgbouncer_databases_pool_size", target="tx",
                                  database=fresh_db)
        assert metrics.value("pgbouncer_databases_pool_size", target="tx", database=fresh_db) == 3
        assert metrics.value("pgbouncer_up", target="tx") == 1
        assert metrics.value("pgbouncer_pools_client_active_connections", database=fresh_db, user=APP_USER) == 1
        # The password is in the DSN here: it must not leak into the exposition.
        assert other.stats_password not in metrics.body


def test_pgbouncer_going_away(pg: Server, tmp_path: Path) -> None:
    with running_pgbouncer(pg, pool_size=1) as short_lived:
        watcher = Poller(short_lived, tmp_path / "pw")
        try:
            assert watcher.poll().value("pgbouncer_up", target="edge") == 1
            short_lived.stop()
            metrics = watcher.poll()
            assert metrics.value("pgbouncer_up", target="edge") == 0
            assert not metrics.find("pgbouncer_pools_client_active_connections")  # nothing stale served
        finally:
            watcher.close()


def test_a_frozen_pgbouncer_does_not_hold_a_worker(pg: Server) -> None:
    """PgBouncer's console has no statement_timeout: a client-side watchdog must give up instead."""
    import os
    import signal
    import time

    with running_pgbouncer(pg, pool_size=2) as bouncer:
        settings = settings_for([], pgbouncers=[{"name": "edge", "dsn": bouncer.admin_dsn}],
                                collectors={"pgbouncer_pools": {"timeout": "1s"}})
        catalog = load()
        snapshot = Snapshot(catalog, __version__)
        engine = Engine(catalog, settings, snapshot)
        runtime = engine.targets["edge"]
        assert engine.probe(runtime)  # leaves an idle admin connection in the target's set
        os.kill(bouncer.process.pid, signal.SIGSTOP)  # frozen: the socket stays open, nothing answers
        try:
            started = time.monotonic()
            engine.collect(runtime, engine.collectors["pgbouncer_pools"])
            assert time.monotonic() - started < 10
            assert snapshot.status("edge", "pgbouncer_pools").errors == {"timeout": 1}
        finally:
            os.kill(bouncer.process.pid, signal.SIGCONT)
        engine.collect(runtime, engine.collectors["pgbouncer_pools"])
        assert snapshot.status("edge", "pgbouncer_pools").success is True
        engine.close()
