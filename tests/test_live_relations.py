"""The per-relation collectors read a database in one pass, and the others of the pass reuse it.

pg_stat_user_tables, pg_statio_user_tables, pg_statio_user_indexes and pg_table_wraparound share one query
(exporter/collectors/relations.py). Counted here with pg_stat_statements: how many times that query ran.
"""

from __future__ import annotations

from typing import Any

import pytest

from exporter.engine import SERVED_AT
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
