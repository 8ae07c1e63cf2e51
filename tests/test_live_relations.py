"""The per-relation collectors read a database in one pass, and the others of the pass reuse it.

pg_stat_user_tables, pg_statio_user_tables, pg_statio_user_indexes and pg_table_wraparound share one query
(exporter/collectors/relations.py). Counted here with pg_stat_statements: how many times that query ran.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from exporter.engine import SERVED_AT
from exporter.localpg import wait_until
from tests.support.exporters import Runner
from tests.support.scrape import Metrics
from tests.support.servers import MONITOR_ROLE, Server

pytestmark = [pytest.mark.live, pytest.mark.family("vacuum")]

PASS = ["pg_stat_user_tables", "pg_statio_user_tables", "pg_statio_user_indexes", "pg_table_wraparound"]
FAMILIES = ("pg_stat_user_tables_", "pg_statio_user_tables_", "pg_statio_user_indexes_", "pg_table_",
            "pg_database_oldest_table_", "pg_relation_size_bytes", "pg_total_relation_size_bytes")


def _pass_runs(pg: Server, db: str) -> int:
    """Times the monitoring role ran the relations pass in ``db`` (pg_stat_statements)."""
    rows = pg.execute(
        "SELECT coalesce(sum(s.calls), 0)::bigint AS n FROM pg_stat_statements s "
        "JOIN pg_roles r ON r.oid = s.userid JOIN pg_database d ON d.oid = s.dbid "
        f"WHERE r.rolname = '{MONITOR_ROLE}' AND d.datname = '{db}' AND s.query LIKE '%json_agg%'")
    return int(rows[0]["n"])


def _target(pg: Server, db: str) -> list[dict[str, Any]]:
    return [{"name": "main", "dsn": pg.dsn(db), "databases": {"include": [db]}}]


def _samples(metrics: Metrics) -> dict[Any, float]:
    return {key: value for key, value in metrics.samples.items() if key[0].startswith(FAMILIES)}


def _some_tables(pg: Server, db: str) -> None:
    for i in range(3):
        pg.execute(f"CREATE TABLE t{i} (id int PRIMARY KEY, v text)", db)
        pg.execute(f"INSERT INTO t{i} SELECT g, repeat('x', 3000) FROM generate_series(1, {200 * (i + 1)}) g", db)
        pg.execute(f"SELECT count(*) FROM t{i}", db)  # some buffer hits
    pg.execute("ANALYZE", db)
    # The counts reach the shared statistics shortly after the sessions end (through the collector before 15).
    wait_until(lambda: pg.execute("SELECT heap_blks_hit FROM pg_statio_user_tables WHERE relname = 't2'",
                                  db)[0]["heap_blks_hit"] > 0, timeout=30)


def test_four_collectors_one_query_per_database(pg: Server, fresh_db: str) -> None:
    _some_tables(pg, fresh_db)
    before = _pass_runs(pg, fresh_db)
    with Runner(pg, only=PASS, targets=_target(pg, fresh_db), strict=True) as runner:
        metrics = runner.collect()
        assert _pass_runs(pg, fresh_db) - before == 1
        for name in PASS:
            assert metrics.value("pgvitals_collector_success", collector=name) == 1
        assert metrics.value("pg_statio_user_tables_heap_blks_hit_total", datname=fresh_db, relname="t2") > 0
        assert metrics.value("pg_statio_user_indexes_idx_blks_hit_total", relname="t1", indexrelname="t1_pkey") \
            is not None
        assert metrics.value("pg_stat_user_tables_n_live_tup", relname="t0") == 200
        assert metrics.value("pg_database_oldest_table_xid_age", datname=fresh_db) > 0
        assert metrics.value("pg_total_relation_size_bytes", relname="t2") > 0

        # An interval later (as the daemon runs them): again one pass, the three others reuse it.
        runtime = runner.engine.targets["main"]
        for state in runtime.state.values():
            if SERVED_AT in state:
                state[SERVED_AT] -= 3600
        for shared in runtime.passes.values():
            shared["at"] -= 3600
        runner.collect()
        assert _pass_runs(pg, fresh_db) - before == 2

        # Run again at once (a test's pace, not the daemon's): each collector reads afresh, nothing stale.
        runner.collect()
        assert _pass_runs(pg, fresh_db) - before == 2 + len(PASS)


def test_collectors_a_start_jitter_apart_share_one_pass(pg: Server, fresh_db: str) -> None:
    """Every 60 s, runs start up to 5 s early or late: two collectors of the pass can start 10 s apart."""
    _some_tables(pg, fresh_db)
    every_minute = {name: {"interval": "60s", "timeout": "30s"} for name in PASS}
    with Runner(pg, only=PASS, targets=_target(pg, fresh_db), strict=True, collectors=every_minute) as runner:
        runner.collect()
        before = _pass_runs(pg, fresh_db)
        runtime = runner.engine.targets["main"]
        first, *others = (runner.engine.collectors[name] for name in PASS)
        # A minute later the first of them comes and reads the pass ...
        for state in runtime.state.values():
            if SERVED_AT in state:
                state[SERVED_AT] -= 60
        for shared in runtime.passes.values():
            shared["at"] -= 60
        runner.engine.collect(runtime, first)
        # ... and the other three 10 s after it: they reuse what it read.
        for shared in runtime.passes.values():
            shared["at"] -= 10
        for eff in others:
            runner.engine.collect(runtime, eff)
        assert _pass_runs(pg, fresh_db) - before == 1
        metrics = Metrics(runner.snapshot.render().decode())
        for name in PASS:
            assert metrics.value("pgvitals_collector_success", collector=name) == 1


def test_a_reused_pass_gives_what_each_collector_reads_alone(pg: Server, fresh_db: str) -> None:
    _some_tables(pg, fresh_db)
    with Runner(pg, only=PASS, targets=_target(pg, fresh_db), strict=True) as runner:
        together = _samples(runner.collect())
    alone: dict[Any, float] = {}
    for name in PASS:
        with Runner(pg, only=[name], targets=_target(pg, fresh_db), strict=True) as runner:
            alone.update(_samples(runner.collect()))
    assert together == alone
    assert len(together) > 50


# Each section's columns: (metric, view column); the view is read beside the collection for the truth.
_TABLE_COLUMNS = [(f"pg_stat_user_tables_{c}", c) for c in ("n_live_tup", "n_dead_tup", "n_mod_since_analyze")] + [
    (f"pg_stat_user_tables_{c}_total", c) for c in ("vacuum_count", "autovacuum_count", "analyze_count",
                                                    "autoanalyze_count")]
_STATIO_COLUMNS = [(f"pg_statio_user_tables_{c}_total", c) for c in (
    "heap_blks_read", "heap_blks_hit", "idx_blks_read", "idx_blks_hit", "toast_blks_read", "toast_blks_hit",
    "tidx_blks_read", "tidx_blks_hit")]
_INDEX_COLUMNS = [(f"pg_statio_user_indexes_{c}_total", c) for c in ("idx_blks_read", "idx_blks_hit")]


def test_remainders_are_the_views_totals_minus_the_exported_rows(pg: Server, fresh_db: str) -> None:
    """With a small top N, what each section exports one by one plus its "other" row is the view's total."""
    for i in range(6):  # sizes apart, two indexes each, TOAST data, updates, deletes, VACUUM and ANALYZE
        pg.execute(f"CREATE TABLE r{i} (id int PRIMARY KEY, k int, v text) WITH (autovacuum_enabled = false); "
                   f"CREATE INDEX r{i}_k ON r{i} (k); "
                   f"INSERT INTO r{i} SELECT g, g, CASE WHEN g % 50 = 0 THEN (SELECT string_agg(md5(g::text || "
                   f"s::text), '') FROM generate_series(1, 100) s) ELSE 'x' END "
                   f"FROM generate_series(1, {300 * (i + 1)}) g; "
                   f"UPDATE r{i} SET k = k + 1 WHERE id <= {10 * i}; "
                   f"DELETE FROM r{i} WHERE id > {300 * (i + 1) - 5 * i}", fresh_db)
        pg.execute(f"SELECT count(*), max(length(v)) FROM r{i} WHERE k > 0", fresh_db)
    pg.execute("VACUUM ANALYZE r0, r2, r4", fresh_db)
    pg.execute("ANALYZE r1", fresh_db)
    top = {"top_n": 2}
    settings = {"collectors": {"pg_stat_user_tables": {"top_n": 2, "top_n_churn": 1}, "pg_statio_user_tables": top,
                               "pg_statio_user_indexes": top, "pg_table_wraparound": top}}

    def settled() -> Metrics | None:  # statistics reach the shared counters shortly after the commits
        with Runner(pg, only=PASS, targets=_target(pg, fresh_db), strict=True, **settings) as runner:
            first = _samples(runner.collect())
        time.sleep(1.0)
        with Runner(pg, only=PASS, targets=_target(pg, fresh_db), strict=True, **settings) as runner:
            metrics = runner.collect()
        return metrics if _samples(metrics) == first else None

    metrics: Metrics = wait_until(settled, timeout=30, interval=0.1)
    tables = pg.execute("SELECT * FROM pg_stat_user_tables", fresh_db)
    statio = pg.execute("SELECT * FROM pg_statio_user_tables", fresh_db)
    indexes = pg.execute("SELECT * FROM pg_statio_user_indexes", fresh_db)
    columns = _TABLE_COLUMNS + [("pg_stat_user_tables_n_ins_since_vacuum", "n_ins_since_vacuum")] * (
        pg.version_num >= 130000)
    # PostgreSQL 12's view multiplies the TOAST index counters by the table's number of indexes (fixed in 13).
    statio_columns = _STATIO_COLUMNS if pg.version_num >= 130000 else _STATIO_COLUMNS[:-2]
    for rows, checked in ((tables, columns), (statio, statio_columns), (indexes, _INDEX_COLUMNS)):
        for metric, column in checked:
            exported = metrics.find(metric, datname=fresh_db)
            # Two or three (top N, and the busiest) one by one and "other": some rows were left over.
            assert 3 <= len(exported) <= len(rows), (metric, exported)
            assert sum(value for _, value in exported) == sum(row[column] or 0 for row in rows), metric
            one_by_one = sum(value for labels, value in exported if labels["relname"] != "other")
            assert metrics.value(metric, datname=fresh_db, relname="other") == \
                sum(row[column] or 0 for row in rows) - one_by_one, metric
    assert sum(row["n_dead_tup"] for row in tables) > 0 and sum(row["toast_blks_hit"] for row in statio) > 0
