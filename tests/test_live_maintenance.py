"""Maintenance in progress on a real server, as pg_monitor: commands the test holds mid-way by a cost delay."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from exporter.localpg import wait_until
from tests.support.exporters import collect_in, collect_once
from tests.support.scrape import Metrics
from tests.support.servers import Server, fresh_database, start_server
from tests.support.sessions import sessions
from tests.support.tables import big_table

pytestmark = [pytest.mark.live, pytest.mark.family("maintenance")]

PROGRESS = "pg_stat_progress"
WORKERS = "pg_autovacuum_workers"
# The slowest a session can make VACUUM and ANALYZE: a 100 ms sleep after every page or so.
CRAWL = "SET vacuum_cost_delay = 100; SET vacuum_cost_limit = 1"




def _progress(pg: Server, view: str, db: str) -> dict[str, Any] | None:
    rows = pg.execute(f"SELECT * FROM {view} WHERE datname = '{db}'")
    return rows[0] if rows else None


def _held_mid_way(pg: Server, db: str, command: str, view: str, counter: str
                  ) -> tuple[dict[str, Any], Metrics, dict[str, Any]]:
    """Run ``command`` at a crawl; once ``view`` shows ``counter`` moving, collect between two reads of it."""
    with sessions(pg, db) as group:
        crawler = group.open("crawler")
        crawler.autocommit = True
        crawler.execute(CRAWL)
        group.start("crawler", command)
        wait_until(lambda: (p := _progress(pg, view, db)) and p[counter] > 0, timeout=30)
        before = _progress(pg, view, db)
        metrics = collect_in(pg, db, [PROGRESS])
        after = _progress(pg, view, db)
    assert before is not None and after is not None
    return before, metrics, after


def test_a_vacuum_held_mid_way_shows_phase_and_fraction(pg: Server, fresh_db: str) -> None:
    pages = big_table(pg, fresh_db)
    before, metrics, after = _held_mid_way(pg, fresh_db, "VACUUM big", "pg_stat_progress_vacuum", "heap_blks_scanned")
    labels = {"datname": fresh_db, "schemaname": "public", "relname": "big", "phase": "scanning heap",
              "kind": "manual"}
    assert metrics.value("pg_stat_progress_vacuum_running", **labels) == 1
    assert metrics.value("pg_stat_progress_vacuum_heap_blks", **labels) == pages
    scanned = metrics.value("pg_stat_progress_vacuum_heap_blks_scanned", **labels)
    assert scanned is not None and before["heap_blks_scanned"] <= scanned <= after["heap_blks_scanned"]
    assert 0 < scanned / pages < 1
    assert metrics.value("pg_stat_progress_vacuum_index_vacuum_count", **labels) == 0
    seconds = metrics.value("pg_stat_progress_vacuum_seconds", **labels)
    assert seconds is not None and seconds > 0
    assert not metrics.find("pg_stat_progress_analyze_running")


def test_an_analyze_held_mid_way_shows_its_sample(pg: Server, fresh_db: str) -> None:
    if pg.version_num < 130000:
        pytest.skip("pg_stat_progress_analyze exists from PostgreSQL 13")
    pages = big_table(pg, fresh_db)
    before, metrics, after = _held_mid_way(pg, fresh_db, "ANALYZE big", "pg_stat_progress_analyze",
                                           "sample_blks_scanned")
    labels = {"relname": "big", "phase": "acquiring sample rows", "kind": "manual"}
    assert metrics.value("pg_stat_progress_analyze_running", **labels) == 1
    assert metrics.value("pg_stat_progress_analyze_sample_blks", **labels) == pages  # fewer than 30,000
    scanned = metrics.value("pg_stat_progress_analyze_sample_blks_scanned", **labels)
    assert scanned is not None and before["sample_blks_scanned"] <= scanned <= after["sample_blks_scanned"] < pages


def test_create_index_concurrently_waiting_for_writers(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE TABLE orders (id int, v int); INSERT INTO orders SELECT g, g FROM generate_series(1, 1000) g",
               fresh_db)
    with sessions(pg, fresh_db) as group:
        group.open("writer").execute("INSERT INTO orders VALUES (0, 0)")  # open transaction: a writer
        group.open("build").autocommit = True
        group.start("build", "CREATE INDEX CONCURRENTLY orders_v ON orders (v)")
        phase = "waiting for writers before build"
        wait_until(lambda: (p := _progress(pg, "pg_stat_progress_create_index", fresh_db)) and p["phase"] == phase,
                   timeout=30)
        metrics = collect_in(pg, fresh_db, [PROGRESS])
        group.conns["writer"].rollback()
        group.join("build")
    assert "build" not in group.errors
    running = metrics.find("pg_stat_progress_create_index_running", relname="orders")
    assert [(labels["indexrelname"], labels["phase"], labels["kind"], value) for labels, value in running] == [
        ("orders_v", phase, "CREATE INDEX CONCURRENTLY", 1)]
    # Finished: the series are gone at the next collection.
    assert not collect_in(pg, fresh_db, [PROGRESS]).find("pg_stat_progress_create_index_running")


@pytest.fixture
def slow_autovacuum() -> Iterator[Server]:
    """A cluster whose autovacuum wakes every second, with two workers at most."""
    server = start_server("autovacuum", settings={"autovacuum_naptime": "1", "autovacuum_max_workers": "2"})
    yield server
    server.cluster.destroy()


def _workers(pg: Server) -> int:
    rows = pg.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' "
                      "AND datname = 'busy' AND query LIKE 'autovacuum: VACUUM%' AND query NOT LIKE '%wraparound%'")
    return int(rows[0]["n"])


def test_busy_autovacuum_workers_are_counted(slow_autovacuum: Server) -> None:
    pg = slow_autovacuum
    pg.execute("CREATE DATABASE busy")
    for name in ("a", "b", "c"):
        big_table(pg, "busy", name, autovacuum=True)

    def all_busy() -> Metrics | None:
        before = _workers(pg)
        metrics = collect_in(pg, "busy", [WORKERS, PROGRESS])
        return metrics if before == _workers(pg) == 2 else None

    metrics: Metrics = wait_until(all_busy, timeout=60, interval=0.5)
    assert metrics.value("pg_autovacuum_workers", state="vacuum") == 2
    assert sum(v for _, v in metrics.find("pg_autovacuum_workers")) == 2
    assert {labels["state"] for labels, _ in metrics.find("pg_autovacuum_workers")} == {
        "vacuum", "analyze", "wraparound", "other"}
    vacuums = metrics.find("pg_stat_progress_vacuum_running", datname="busy", kind="autovacuum")
    assert sum(v for _, v in vacuums) == 2
    assert {labels["relname"] for labels, _ in vacuums} <= {"a", "b", "c"}


def test_idle_server_has_zero_workers_and_no_progress(pg: Server, fresh_db: str) -> None:
    metrics = collect_in(pg, fresh_db, [WORKERS, PROGRESS])
    assert metrics.value("pg_autovacuum_workers", state="wraparound") == 0
    assert not metrics.find("pg_stat_progress_vacuum_running", datname=fresh_db)


def test_progress_visits_only_the_databases_where_a_command_runs(pg: Server, fresh_db: str) -> None:
    """A database where nothing runs is not connected to: one that refuses every connection is never refused."""
    big_table(pg, fresh_db)
    with fresh_database(pg) as quiet, sessions(pg, fresh_db) as group:
        pg.execute(f"ALTER DATABASE {quiet} CONNECTION LIMIT 0")  # the role still may connect: it stays selected
        crawler = group.open("crawler")
        crawler.autocommit = True
        crawler.execute(CRAWL)
        group.start("crawler", "VACUUM big")
        wait_until(lambda: _progress(pg, "pg_stat_progress_vacuum", fresh_db) is not None, timeout=30)
        target = {"name": "main", "dsn": pg.dsn(fresh_db), "databases": {"include": [fresh_db, quiet]}}
        metrics = collect_once(pg, [PROGRESS, "pg_sequences"], targets=[target])
    assert metrics.value("pgvitals_collector_success", collector=PROGRESS) == 1
    assert metrics.find("pg_stat_progress_vacuum_running", datname=fresh_db, relname="big")
    assert not metrics.find("pgvitals_collector_errors_total", collector=PROGRESS)
    # The control: a collector that visits every selected database is refused by the quiet one.
    assert metrics.value("pgvitals_database_unavailable", datname=quiet) == 1
    assert metrics.find("pgvitals_collector_errors_total", collector="pg_sequences")
