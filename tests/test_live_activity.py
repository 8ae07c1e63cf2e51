"""pg_stat_activity on a real server, read as a pg_monitor-only role: slow queries and old transactions."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from exporter import __version__
from exporter.catalog import load
from exporter.engine import Engine
from exporter.localpg import wait_until
from exporter.snapshot import Snapshot
from tests.support.scrape import Metrics
from tests.support.servers import Server, settings_for

pytestmark = [pytest.mark.live, pytest.mark.family("slow_queries")]

COLLECTOR = "pg_stat_activity"


def collect(pg: Server, **params: Any) -> Metrics:
    """Probe and run the activity collector once, with the given parameters."""
    catalog = load()
    snapshot = Snapshot(catalog, __version__)
    settings = settings_for([{"name": "main", "dsn": pg.monitor_dsn}], collectors={COLLECTOR: params})
    engine = Engine(catalog, settings, snapshot)
    try:
        runtime = engine.targets["main"]
        assert engine.probe(runtime)
        engine.collect(runtime, engine.collectors[COLLECTOR])
        metrics = Metrics(snapshot.render().decode())
    finally:
        engine.close()
    assert metrics.value("pgvitals_collector_success", collector=COLLECTOR) == 1
    return metrics


def _age(pg: Server, application_name: str, column: str) -> float:
    rows = pg.execute(f"SELECT COALESCE(max(extract(epoch FROM now() - {column})), 0)::float8 AS age "
                      f"FROM pg_stat_activity WHERE application_name = '{application_name}'")
    return float(rows[0]["age"])


@contextmanager
def running(pg: Server, dbname: str, sql: str, application_name: str) -> Iterator[None]:
    """``sql`` running in a session of its own until the block ends (then cancelled)."""
    conn = psycopg.connect(pg.dsn(dbname, monitor=False), application_name=application_name, autocommit=True)
    pid = conn.info.backend_pid
    failures: list[BaseException] = []

    def work() -> None:
        try:
            conn.execute(sql)
        except psycopg.errors.QueryCanceled:
            pass
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield
    finally:
        pg.execute(f"SELECT pg_cancel_backend({pid})")
        thread.join(timeout=30)
        conn.close()
    assert not failures, failures


@contextmanager
def idle_in_transaction(pg: Server, dbname: str, application_name: str) -> Iterator[None]:
    """A session that opened a transaction, ran one statement and now waits."""
    with psycopg.connect(pg.dsn(dbname, monitor=False), application_name=application_name) as conn:
        conn.execute("SELECT 1")
        yield
        conn.rollback()


def test_long_query_shows_in_max_duration_and_slow_count(pg: Server, fresh_db: str) -> None:
    with running(pg, fresh_db, "SELECT pg_sleep(60)", "sleeper"):
        wait_until(lambda: _age(pg, "sleeper", "query_start") > 1.5, timeout=30)
        slow = collect(pg, slow_threshold_seconds=1.0)
        relaxed = collect(pg)  # default threshold: 5 s
        age = _age(pg, "sleeper", "query_start")
    duration = slow.value("pg_stat_activity_max_query_duration_seconds", datname=fresh_db)
    assert duration is not None and 1.5 <= duration <= age
    assert slow.value("pg_slow_queries", datname=fresh_db) == 1
    assert relaxed.value("pg_slow_queries", datname=fresh_db) == 0
    transaction = slow.value("pg_stat_activity_max_tx_duration_seconds", datname=fresh_db)
    assert transaction is not None and transaction >= duration - 0.001
    assert slow.value("pg_stat_activity_max_idle_in_transaction_seconds", datname=fresh_db) == 0
    # Databases with nothing running report 0, not nothing.
    for name in ("pg_stat_activity_max_query_duration_seconds", "pg_stat_activity_max_tx_duration_seconds",
                 "pg_stat_activity_max_idle_in_transaction_seconds", "pg_slow_queries"):
        assert slow.value(name, datname="template1") == 0, name
    assert not slow.find("pg_slow_queries", datname="template0")  # accepts no connections


def test_idle_in_transaction_shows_its_age(pg: Server, fresh_db: str) -> None:
    with idle_in_transaction(pg, fresh_db, "forgetful"):
        wait_until(lambda: _age(pg, "forgetful", "state_change") > 1.2, timeout=30)
        metrics = collect(pg, slow_threshold_seconds=0.0)
        age = _age(pg, "forgetful", "xact_start")
    idle = metrics.value("pg_stat_activity_max_idle_in_transaction_seconds", datname=fresh_db)
    assert idle is not None and 1.2 <= idle <= age
    transaction = metrics.value("pg_stat_activity_max_tx_duration_seconds", datname=fresh_db)
    assert transaction is not None and idle <= transaction <= age
    # Idle is not active: no running query, nothing slow even with a threshold of 0.
    assert metrics.value("pg_stat_activity_max_query_duration_seconds", datname=fresh_db) == 0
    assert metrics.value("pg_slow_queries", datname=fresh_db) == 0


def test_the_exporters_own_sessions_are_left_out(pg: Server, fresh_db: str) -> None:
    # Another pgvitals (same application_name as ours) idling in a transaction is not the workload.
    with idle_in_transaction(pg, fresh_db, "pgvitals"):
        wait_until(lambda: _age(pg, "pgvitals", "state_change") > 0.5, timeout=30)
        metrics = collect(pg, slow_threshold_seconds=0.0)
    assert metrics.value("pg_stat_activity_max_idle_in_transaction_seconds", datname=fresh_db) == 0
    assert metrics.value("pg_stat_activity_max_tx_duration_seconds", datname=fresh_db) == 0
    # Our own session is active while it reads pg_stat_activity: with a threshold of 0 it would count.
    dsn_database = "postgres"
    assert metrics.value("pg_slow_queries", datname=dsn_database) == 0
    assert metrics.value("pg_stat_activity_max_query_duration_seconds", datname=dsn_database) == 0
