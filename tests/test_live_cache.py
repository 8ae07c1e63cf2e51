"""Table and index I/O counters on a real server, read by a pg_monitor-only role, against known truths."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from exporter import __version__
from exporter.catalog import load as load_catalog
from exporter.engine import Engine
from exporter.localpg import wait_until
from exporter.snapshot import Snapshot
from tests.support.exporters import collect_once
from tests.support.scrape import Metrics
from tests.support.servers import Server, settings_for
from tests.support.sessions import run_in_session

pytestmark = [pytest.mark.live, pytest.mark.family("cache_hit")]

TABLES = "pg_statio_user_tables"
INDEXES = "pg_statio_user_indexes"


def collect(pg: Server, dbname: str, top_n: int | None = None, engine: Engine | None = None) -> Metrics:
    """Both statio collectors, once, in ``dbname`` only (on ``engine`` to keep state between runs)."""
    own = engine is None
    engine = engine or statio_engine(pg, [dbname], top_n)
    try:
        runtime = engine.targets["main"]
        assert engine.probe(runtime)
        for name in (TABLES, INDEXES):
            engine.collect(runtime, engine.collectors[name])
        metrics = Metrics(engine.snapshot.render().decode())
    finally:
        if own:
            engine.close()
    assert metrics.value("pgvitals_collector_success", collector=TABLES) == 1
    assert metrics.value("pgvitals_collector_success", collector=INDEXES) == 1
    return metrics


def statio_engine(pg: Server, databases: list[str], top_n: int | None = None) -> Engine:
    """An engine on the monitor role whose target visits ``databases``, with both collectors' top_n set."""
    catalog = load_catalog()
    target = {"name": "main", "dsn": pg.monitor_dsn, "databases": {"include": databases}}
    extra: dict[str, Any] = {}
    if top_n is not None:
        extra["collectors"] = {TABLES: {"top_n": top_n}, INDEXES: {"top_n": top_n}}
    return Engine(catalog, settings_for([target], **extra), Snapshot(catalog, __version__))


def heap(metrics: Metrics, dbname: str, relname: str) -> tuple[float, float]:
    """(hits, reads) of a table's heap."""
    hit = metrics.value("pg_statio_user_tables_heap_blks_hit_total", datname=dbname, relname=relname)
    read = metrics.value("pg_statio_user_tables_heap_blks_read_total", datname=dbname, relname=relname)
    assert hit is not None and read is not None, f"{relname} not exported"
    return hit, read


def settled(pg: Server, dbname: str, top_n: int | None = None) -> Metrics:
    """A collection once the statistics of finished sessions have reached the shared view.

    Backends report at transaction end or exit, a little after the client sees the result (through the
    statistics collector before PostgreSQL 15): wait until two collections a second apart agree.
    """
    def stable() -> Metrics | None:
        first = collect(pg, dbname, top_n)
        time.sleep(1.0)
        second = collect(pg, dbname, top_n)
        keep = ("pg_statio_",)
        same = {k: v for k, v in first.samples.items() if k[0].startswith(keep)} == {
            k: v for k, v in second.samples.items() if k[0].startswith(keep)}
        return second if same else None

    result: Metrics = wait_until(stable, timeout=30, interval=0.1)
    return result


def pages(pg: Server, dbname: str, relname: str) -> int:
    rows = pg.execute(
        f"SELECT pg_relation_size('{relname}') / current_setting('block_size')::int AS pages", dbname)
    return int(rows[0]["pages"])


def test_known_heap_hits_and_reads(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE TABLE known (id int, pad text) WITH (autovacuum_enabled = false); "
               "INSERT INTO known SELECT g, repeat('x', 200) FROM generate_series(1, 3000) g", fresh_db)
    # VACUUM FULL writes the new heap without going through shared buffers (smgr directly), so none
    # of its pages are cached: the next scan must read every one of them.
    pg.execute("VACUUM FULL known", fresh_db)
    page_count = pages(pg, fresh_db, "known")
    assert 50 < page_count < 200
    hit0, read0 = heap(settled(pg, fresh_db), fresh_db, "known")

    scans = 4
    run_in_session(pg, fresh_db, *["SELECT count(*) FROM known"] * scans)
    expected_total = hit0 + read0 + scans * page_count

    def reported() -> Metrics | None:
        metrics = collect(pg, fresh_db)
        return metrics if sum(heap(metrics, fresh_db, "known")) >= expected_total else None

    after: Metrics = wait_until(reported, timeout=15, interval=0.5)
    hit1, read1 = heap(after, fresh_db, "known")
    assert hit1 + read1 == expected_total  # each sequential scan fetched every page once
    assert read1 - read0 == page_count  # the first scan read them all into shared buffers
    assert hit1 - hit0 == (scans - 1) * page_count  # the others found them there
    # No index: that series is absent rather than a made-up 0. The TOAST table exists (text column)
    # but 200-byte values are stored inline, so it was never touched.
    assert after.value("pg_statio_user_tables_idx_blks_hit_total", relname="known") is None
    assert after.value("pg_statio_user_tables_toast_blks_hit_total", relname="known") == 0
    assert after.value("pg_statio_user_tables_toast_blks_read_total", relname="known") == 0


def test_index_and_toast_counters_match_the_server(pg: Server, fresh_db: str) -> None:
    # Two indexes and a TOAST table holding incompressible 8 kB values (each needs its TOAST index).
    pg.execute("CREATE TABLE indexed (id int PRIMARY KEY, k int, pad text) WITH (autovacuum_enabled = false); "
               "CREATE INDEX indexed_k ON indexed (k); "
               "INSERT INTO indexed SELECT g, g, CASE WHEN g <= 50 THEN "
               "(SELECT string_agg(md5(g::text || s::text), '') FROM generate_series(1, 256) s) ELSE 'short' END "
               "FROM generate_series(1, 20000) g; "
               "ANALYZE indexed", fresh_db)
    before = settled(pg, fresh_db)
    lookups = 25
    run_in_session(pg, fresh_db, "SET enable_seqscan = off", "SET enable_bitmapscan = off",
                   *[f"SELECT md5(pad) FROM indexed WHERE id = {i * 2 + 1}" for i in range(lookups)],
                   *[f"SELECT md5(pad) FROM indexed WHERE k = {i * 2 + 2}" for i in range(lookups)])
    after = settled(pg, fresh_db)
    truth = {r["indexrelname"]: r["fetched"] for r in pg.execute(
        "SELECT i.indexrelname, i.idx_blks_hit + i.idx_blks_read AS fetched FROM pg_statio_all_indexes i "
        "JOIN pg_class c ON c.oid = 'indexed'::regclass "
        "WHERE i.relid IN (c.oid, c.reltoastrelid)", fresh_db)}
    toast_index = next(name for name in truth if name.startswith("pg_toast_"))

    def fetched(metrics: Metrics, kind: str, **labels: str) -> float:
        hit = metrics.value(f"pg_statio_user_{kind}_blks_hit_total", datname=fresh_db, relname="indexed", **labels)
        read = metrics.value(f"pg_statio_user_{kind}_blks_read_total", datname=fresh_db, relname="indexed", **labels)
        assert hit is not None and read is not None, (kind, labels)
        return hit + read

    for index in ("indexed_pkey", "indexed_k"):
        assert fetched(after, "indexes_idx", indexrelname=index) == truth[index]
        # Each lookup descends the btree (root and leaf at least: 20,000 keys need two levels).
        assert fetched(after, "indexes_idx", indexrelname=index) - fetched(before, "indexes_idx",
                                                                           indexrelname=index) >= 2 * lookups
    # The table's idx_blks_* sum its indexes, its tidx_blks_* its TOAST table's index (PostgreSQL 12's
    # view would multiply the latter by the number of the table's indexes).
    assert fetched(after, "tables_idx") == truth["indexed_pkey"] + truth["indexed_k"]
    assert fetched(after, "tables_tidx") == truth[toast_index] > fetched(before, "tables_tidx")
    assert fetched(after, "tables_toast") > fetched(before, "tables_toast")
    # And the heap fetches of those lookups landed on the table.
    assert fetched(after, "tables_heap") - fetched(before, "tables_heap") >= 2 * lookups


def test_top_n_and_remainder(pg: Server, fresh_db: str) -> None:
    tables = 12
    statements = []
    for i in range(1, tables + 1):
        # Table i holds i x 500 rows, so sizes are distinct; each has a primary key of matching size.
        statements.append(
            f"CREATE TABLE sized_{i:02d} (id int PRIMARY KEY, pad text) WITH (autovacuum_enabled = false); "
            f"INSERT INTO sized_{i:02d} SELECT g, repeat('z', 50) FROM generate_series(1, {i * 500}) g; "
            f"ANALYZE sized_{i:02d}; SELECT count(*) FROM sized_{i:02d}")
    run_in_session(pg, fresh_db, *statements)
    metrics = settled(pg, fresh_db, top_n=5)
    truth = {r["relname"]: r for r in pg.execute(
        "SELECT relname, heap_blks_hit, heap_blks_read, idx_blks_hit, idx_blks_read "
        "FROM pg_statio_user_tables", fresh_db)}

    exported = {labels["relname"]: labels for labels, _ in
                metrics.find("pg_statio_user_tables_heap_blks_hit_total", datname=fresh_db)}
    assert set(exported) == {f"sized_{i:02d}" for i in range(8, 13)} | {"other"}  # the 5 largest
    assert exported["other"]["schemaname"] == ""
    rest = [f"sized_{i:02d}" for i in range(1, 8)]
    for column in ("heap_blks_hit", "heap_blks_read", "idx_blks_hit", "idx_blks_read"):
        name = f"pg_statio_user_tables_{column}_total"
        assert metrics.value(name, datname=fresh_db, relname="other") == sum(truth[t][column] for t in rest)
        assert sum(v for _, v in metrics.find(name, datname=fresh_db)) == sum(r[column] for r in truth.values())
        assert metrics.value(name, datname=fresh_db, relname="sized_12") == truth["sized_12"][column]

    index_truth = {r["indexrelname"]: r for r in pg.execute(
        "SELECT indexrelname, idx_blks_hit FROM pg_statio_user_indexes", fresh_db)}
    index_rows = metrics.find("pg_statio_user_indexes_idx_blks_hit_total", datname=fresh_db)
    assert {labels["indexrelname"] for labels, _ in index_rows} == (
        {f"sized_{i:02d}_pkey" for i in range(8, 13)} | {"other"})
    other = metrics.value("pg_statio_user_indexes_idx_blks_hit_total", datname=fresh_db, indexrelname="other",
                          relname="other", schemaname="")
    assert other == sum(index_truth[f"{t}_pkey"]["idx_blks_hit"] for t in rest)

    # With room for everyone the remainder is still there, at zero, so the series never comes and goes.
    roomy = collect(pg, fresh_db, top_n=50)
    assert len(roomy.find("pg_statio_user_tables_heap_blks_hit_total", datname=fresh_db)) == tables + 1
    assert roomy.value("pg_statio_user_tables_heap_blks_hit_total", datname=fresh_db, relname="other") == 0


def test_runs_in_every_selected_database_and_ignores_ddl_locks(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE TABLE busy (id int)", fresh_db)
    with psycopg.connect(pg.dsn(fresh_db, monitor=False)) as holder:
        # As if an ALTER TABLE held or awaited the lock: anything taking a relation lock would queue.
        holder.execute("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        metrics = collect_once(pg, [TABLES, INDEXES],
                               targets=[{"name": "main", "dsn": pg.monitor_dsn,
                                         "databases": {"include": [fresh_db, "postgres"]}}])
        elapsed = time.monotonic() - started
        holder.rollback()
    assert metrics.value("pgvitals_collector_success", collector=TABLES) == 1
    assert metrics.value("pgvitals_collector_success", collector=INDEXES) == 1
    assert metrics.value("pg_statio_user_tables_heap_blks_hit_total", datname=fresh_db, relname="busy") is not None
    assert elapsed < 10  # sanity bound only: it did not wait for the lock holder
    for dbname in (fresh_db, "postgres"):
        assert metrics.value("pg_statio_user_tables_heap_blks_read_total", datname=dbname, relname="other") is not None
        assert metrics.value("pg_statio_user_indexes_idx_blks_read_total", datname=dbname, indexrelname="other") \
            is not None
    # Databases outside the target's filter are not visited.
    assert not metrics.find("pg_statio_user_tables_heap_blks_hit_total", datname="template1")


def test_top_n_membership_is_sticky(pg: Server, fresh_db: str) -> None:
    def grow(table: str, rows: int) -> None:
        pg.execute(f"INSERT INTO {table} SELECT g, repeat('z', 50) FROM generate_series(1, {rows}) g", fresh_db)
        pg.execute(f"VACUUM {table}", fresh_db)  # brings pg_class.relpages up to date

    def relpages(table: str) -> int:
        return int(pg.execute(f"SELECT relpages FROM pg_class WHERE relname = '{table}'", fresh_db)[0]["relpages"])

    def top(metrics: Metrics) -> set[str]:
        found = metrics.find("pg_statio_user_tables_heap_blks_hit_total", datname=fresh_db)
        return {labels["relname"] for labels, _ in found} - {"other"}

    for table in ("big", "mid", "small"):
        pg.execute(f"CREATE TABLE {table} (id int, pad text) WITH (autovacuum_enabled = false)", fresh_db)
    grow("big", 9000)
    grow("mid", 4500)
    grow("small", 4000)
    engine = statio_engine(pg, [fresh_db], top_n=2)
    try:
        assert top(collect(pg, fresh_db, engine=engine)) == {"big", "mid"}
        grow("small", 1000)  # now a little larger than mid, but not by a quarter
        assert relpages("mid") < relpages("small") < relpages("mid") * 1.25
        assert top(collect(pg, fresh_db, top_n=2)) == {"big", "small"}  # a first run ranks by size alone
        assert top(collect(pg, fresh_db, engine=engine)) == {"big", "mid"}  # the incumbent keeps its place
        grow("small", 2500)
        assert relpages("small") > relpages("mid") * 1.25
        assert top(collect(pg, fresh_db, engine=engine)) == {"big", "small"}
    finally:
        engine.close()
