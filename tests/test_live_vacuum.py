"""Dead tuples, vacuum history, sizes and wraparound ages against the server's own figures, as pg_monitor."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from exporter.localpg import wait_until
from tests.support.exporters import collect_once, run_collector
from tests.support.scrape import Metrics
from tests.support.servers import Server
from tests.support.sessions import PendingExclusiveLock

pytestmark = [pytest.mark.live, pytest.mark.family("vacuum")]

TABLES = "pg_stat_user_tables"


def _target(pg: Server, db: str) -> dict[str, Any]:
    return {"name": "main", "dsn": pg.dsn(db), "databases": {"include": [db]}}


def _tables(pg: Server, db: str, **params: Any) -> Metrics:
    return run_collector([_target(pg, db)], TABLES, **params)


def test_dead_tuples_appear_after_deletes_and_go_after_vacuum(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE TABLE queue (id int PRIMARY KEY, body text) WITH (autovacuum_enabled = false)", fresh_db)
    pg.execute("INSERT INTO queue SELECT g, md5(g::text) FROM generate_series(1, 10000) g", fresh_db)
    pg.execute("DELETE FROM queue WHERE id <= 4000", fresh_db)

    def counted() -> Metrics | None:  # statistics reach the shared counters shortly after the commit
        metrics = _tables(pg, fresh_db)
        dead = metrics.value("pg_stat_user_tables_n_dead_tup", datname=fresh_db, relname="queue")
        return metrics if dead == 4000 else None

    metrics: Metrics = wait_until(counted, timeout=30, interval=0.5)
    assert metrics.value("pg_stat_user_tables_n_live_tup", relname="queue", schemaname="public") == 6000
    assert metrics.value("pg_stat_user_tables_vacuum_count_total", relname="queue") == 0
    assert not metrics.find("pg_stat_user_tables_last_vacuum_timestamp_seconds", relname="queue")  # never
    sizes = pg.execute("SELECT pg_relation_size('queue') AS r, pg_total_relation_size('queue') AS t", fresh_db)[0]
    assert metrics.value("pg_relation_size_bytes", relname="queue") == sizes["r"]
    assert metrics.value("pg_total_relation_size_bytes", relname="queue") == sizes["t"]
    assert metrics.value("pgvitals_collector_success", collector=TABLES) == 1

    before = time.time()
    pg.execute("VACUUM queue", fresh_db)

    def vacuumed() -> Metrics | None:
        metrics = _tables(pg, fresh_db)
        count = metrics.value("pg_stat_user_tables_vacuum_count_total", relname="queue")
        return metrics if count == 1 else None

    metrics = wait_until(vacuumed, timeout=30, interval=0.5)
    assert metrics.value("pg_stat_user_tables_n_dead_tup", relname="queue") == 0
    last = metrics.value("pg_stat_user_tables_last_vacuum_timestamp_seconds", relname="queue")
    assert last is not None and before - 1 <= last <= time.time() + 1
    assert metrics.value("pg_stat_user_tables_autovacuum_count_total", relname="queue") == 0
    spent = metrics.value("pg_stat_user_tables_vacuum_time_seconds_total", relname="queue")
    if pg.version_num >= 180000:
        assert spent is not None and 0 <= spent < 60
    else:
        assert spent is None  # no such column before 18: no sample, not 0


def test_largest_and_busiest_tables_plus_a_remainder(pg: Server, fresh_db: str) -> None:
    for name, rows in (("big1", 30000), ("big2", 20000), ("small1", 100), ("small2", 50), ("hot", 10)):
        pg.execute(f"CREATE TABLE {name} (id int, v int) WITH (autovacuum_enabled = false)", fresh_db)
        pg.execute(f"INSERT INTO {name} SELECT g, g FROM generate_series(1, {rows}) g", fresh_db)
    pg.execute("ANALYZE", fresh_db)  # relpages, which rank the tables by size
    for _ in range(20):  # a tiny table with the most updates: where dead tuples come from
        pg.execute("UPDATE hot SET v = v + 1", fresh_db)

    def ranked() -> Metrics | None:  # statistics reach the shared counters shortly after the commits
        metrics = _tables(pg, fresh_db, top_n=2, top_n_churn=1)
        other = metrics.value("pg_stat_user_tables_n_live_tup", relname="other")
        return metrics if metrics.find("pg_stat_user_tables_n_live_tup", relname="hot") and other == 150 else None

    metrics: Metrics = wait_until(ranked, timeout=30, interval=0.5)
    exported = {labels["relname"] for labels, _ in metrics.find("pg_stat_user_tables_n_live_tup", datname=fresh_db)}
    assert exported == {"big1", "big2", "hot", "other"}
    assert metrics.value("pg_stat_user_tables_n_live_tup", relname="other", schemaname="") == 150
    assert metrics.value("pg_stat_user_tables_n_dead_tup", relname="hot") > 0  # type: ignore[operator]
    inserted = metrics.value("pg_stat_user_tables_n_ins_since_vacuum", relname="other")
    assert inserted == (150 if pg.version_num >= 130000 else None)  # the column exists from 13 on
    # Sizes only for the tables exported one by one.
    assert {labels["relname"] for labels, _ in metrics.find("pg_relation_size_bytes")} == {"big1", "big2", "hot"}


def test_sizes_skip_a_table_with_a_pending_exclusive_lock(pg: Server, fresh_db: str) -> None:
    for name in ("locked", "free"):
        pg.execute(f"CREATE TABLE {name} AS SELECT g AS id FROM generate_series(1, 1000) g", fresh_db)
    pending = PendingExclusiveLock(pg, "locked", fresh_db)
    with pending:
        metrics = _tables(pg, fresh_db)
        assert pending.waiting()
    assert metrics.value("pgvitals_collector_success", collector=TABLES) == 1
    assert metrics.value("pg_stat_user_tables_n_live_tup", relname="locked") is not None  # no lock needed
    assert not metrics.find("pg_relation_size_bytes", relname="locked")
    size = pg.execute("SELECT pg_relation_size('free') AS s", fresh_db)[0]["s"]
    assert metrics.value("pg_relation_size_bytes", relname="free") == size


def test_sizes_of_other_tables_survive_a_lock_the_check_cannot_see(pg: Server, fresh_db: str) -> None:
    # A pending ACCESS EXCLUSIVE lock on a TOAST table's index (REINDEX) is not mapped to its table by the
    # pg_locks check; pg_total_relation_size then gives up after lock_timeout, and the sizes are read
    # again table by table, each in a savepoint: only that table's sizes go missing.
    pg.execute("CREATE TABLE docs (id int, body text)", fresh_db)
    pg.execute("CREATE TABLE plain AS SELECT g AS id FROM generate_series(1, 1000) g", fresh_db)
    toast_table, toast_index = pg.execute(
        "SELECT c.reltoastrelid::regclass::text AS t, i.indexrelid::regclass::text AS i FROM pg_class c "
        "JOIN pg_index i ON i.indrelid = c.reltoastrelid WHERE c.relname = 'docs'", fresh_db)[0].values()
    reader = psycopg.connect(pg.dsn(fresh_db, monitor=False))
    reindex = psycopg.connect(pg.dsn(fresh_db, monitor=False), autocommit=True)
    thread = threading.Thread(target=lambda: reindex.execute(f"REINDEX INDEX {toast_index}"), daemon=True)
    try:
        reader.execute(f"SELECT count(*) FROM {toast_table}")  # planning locks its index until rollback
        thread.start()
        wait_until(lambda: pg.execute(
            "SELECT count(*) AS n FROM pg_locks WHERE NOT granted AND mode = 'AccessExclusiveLock' "
            f"AND relation = '{toast_index}'::regclass", fresh_db)[0]["n"], timeout=10)
        metrics = _tables(pg, fresh_db)
    finally:
        reader.rollback()
        thread.join(timeout=10)
        reader.close()
        reindex.close()
    assert metrics.value("pgvitals_collector_success", collector=TABLES) == 1
    assert metrics.value("pg_stat_user_tables_n_live_tup", relname="docs") is not None
    assert not metrics.find("pg_total_relation_size_bytes", relname="docs")
    size = pg.execute("SELECT pg_total_relation_size('plain') AS s", fresh_db)[0]["s"]
    assert metrics.value("pg_total_relation_size_bytes", relname="plain") == size


def test_database_size(pg: Server, fresh_db: str) -> None:
    metrics = collect_once(pg, ["pg_database_size"])
    value = metrics.value("pg_database_size_bytes", datname=fresh_db)
    truth = pg.execute(f"SELECT pg_database_size('{fresh_db}') AS s")[0]["s"]
    assert value is not None and abs(value - truth) < 1024 * 1024
    assert not metrics.find("pg_database_size_bytes", datname="template0")


def _ages(pg: Server, db: str) -> tuple[Metrics, float, float]:
    metrics = collect_once(pg, ["pg_database_wraparound", "pg_table_wraparound", "pg_settings"],
                           targets=[_target(pg, db)])
    database = metrics.value("pg_database_xid_age", datname=db)
    oldest = metrics.value("pg_database_oldest_table_xid_age", datname=db)
    assert database is not None and oldest is not None
    return metrics, database, oldest


def test_xid_age_grows_as_transaction_ids_are_consumed(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE TABLE t (id int)", fresh_db)
    metrics, database_before, oldest_before = _ages(pg, fresh_db)
    assert 0 < oldest_before <= database_before + 10  # the two collectors read a moment apart
    assert metrics.value("pg_database_xid_age", datname="template0") is not None  # templates age too
    assert metrics.value("pg_settings_autovacuum_freeze_max_age") == 200_000_000  # the limit to compare with
    assert metrics.find("pg_table_xid_age", datname=fresh_db)
    with psycopg.connect(pg.dsn(fresh_db, monitor=False), autocommit=True) as conn:
        for _ in range(500):
            conn.execute("SELECT txid_current()")  # one transaction ID each
    _metrics, database_after, oldest_after = _ages(pg, fresh_db)
    assert database_after - database_before >= 500
    assert oldest_after - oldest_before >= 500
    truth = pg.execute(f"SELECT age(datfrozenxid) AS a FROM pg_database WHERE datname = '{fresh_db}'")[0]["a"]
    assert database_after <= truth <= database_after + 50  # autoanalyze may take a few meanwhile


def test_multixact_age_grows_with_shared_row_locks(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)", fresh_db)
    pg.execute("INSERT INTO t VALUES (1)", fresh_db)
    metrics, _, _ = _ages(pg, fresh_db)
    before = metrics.value("pg_database_mxid_age", datname=fresh_db)
    table_before = metrics.value("pg_database_oldest_table_mxid_age", datname=fresh_db)
    assert before is not None and table_before is not None
    for _ in range(5):  # two transactions share-locking one row create a multixact
        first = psycopg.connect(pg.dsn(fresh_db, monitor=False))
        second = psycopg.connect(pg.dsn(fresh_db, monitor=False))
        first.execute("SELECT * FROM t WHERE id = 1 FOR SHARE")
        second.execute("SELECT * FROM t WHERE id = 1 FOR SHARE")
        first.commit()
        second.commit()
        first.close()
        second.close()
    metrics, _, _ = _ages(pg, fresh_db)
    assert metrics.value("pg_database_mxid_age", datname=fresh_db) >= before + 5  # type: ignore[operator]
    assert metrics.value("pg_database_oldest_table_mxid_age", datname=fresh_db) >= table_before + 5  # type: ignore[operator]


def test_top_n_membership_is_sticky(pg: Server, fresh_db: str) -> None:
    """The rule cache's statio collectors follow too: an exported table stays until another is 1.25x larger."""
    from exporter import __version__
    from exporter.catalog import load
    from exporter.engine import Engine
    from exporter.snapshot import Snapshot
    from tests.support.servers import settings_for

    def add_rows(table: str, rows: int) -> dict[str, int]:
        """Insert, VACUUM (which brings relpages up to date), and return every test table's relpages."""
        pg.execute(f"INSERT INTO {table} (id, pad) SELECT g, repeat('v', 50) FROM generate_series(1, {rows}) g",
                   fresh_db)
        pg.execute(f"VACUUM {table}", fresh_db)
        return {row["relname"]: int(row["relpages"]) for row in pg.execute(
            "SELECT relname, relpages FROM pg_class WHERE relname IN ('big', 'mid', 'small')", fresh_db)}

    catalog = load()
    settings = settings_for([_target(pg, fresh_db)], collectors={TABLES: {"top_n": 2, "top_n_churn": 0}})
    engine = Engine(catalog, settings, Snapshot(catalog, __version__))

    def top() -> set[str]:  # on the same engine: last run's choice is this run's incumbents
        runtime = engine.targets["main"]
        assert engine.probe(runtime)
        engine.collect(runtime, engine.collectors[TABLES])
        found = Metrics(engine.snapshot.render().decode()).find("pg_stat_user_tables_n_live_tup", datname=fresh_db)
        return {labels["relname"] for labels, _ in found} - {"other"}

    for table, rows in (("big", 9000), ("mid", 4500), ("small", 4000)):
        pg.execute(f"CREATE TABLE {table} (id int, pad text) WITH (autovacuum_enabled = false)", fresh_db)
        add_rows(table, rows)
    try:
        assert top() == {"big", "mid"}
        pages = add_rows("small", 1000)  # now a little larger than mid, but not by a quarter
        assert pages["mid"] < pages["small"] < pages["mid"] * 1.25
        first_run = _tables(pg, fresh_db, top_n=2, top_n_churn=0)  # a first run ranks by size alone
        assert {labels["relname"] for labels, _ in first_run.find("pg_stat_user_tables_n_live_tup",
                                                                   datname=fresh_db)} == {"big", "small", "other"}
        assert top() == {"big", "mid"}  # the incumbent keeps its place
        pages = add_rows("small", 2500)
        assert pages["small"] > pages["mid"] * 1.25
        assert top() == {"big", "small"}
    finally:
        engine.close()
