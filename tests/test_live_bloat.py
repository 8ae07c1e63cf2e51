"""Bloat with known truth: the estimate and the measured figures against pgstattuple, guards, locks, privileges."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.exporters import collect_once, run_collector
from tests.support.scrape import Metrics
from tests.support.servers import MONITOR_ROLE, Server
from tests.support.sessions import PendingExclusiveLock

pytestmark = [pytest.mark.live, pytest.mark.family("bloat")]

DB = "bloat_scenarios"
ESTIMATE = "pg_bloat_estimate"
MEASURED = "pg_bloat_measured"


@pytest.fixture(scope="module")
def scenario_db(pg: Server) -> Iterator[str]:
    """One database holding every scenario, built once (200,000-row tables load in well under a second)."""
    pg.execute(f"CREATE DATABASE {DB}")
    run = lambda sql: pg.execute(sql, DB)  # noqa: E731
    run("CREATE EXTENSION pgstattuple")
    off = "WITH (autovacuum_enabled = false)"  # nothing may vacuum or analyze behind the test's back
    # 200,000 rows, the upper half deleted, vacuumed without truncation: about half the table is free space.
    run(f"CREATE TABLE half (id int PRIMARY KEY, label text, amount numeric, seen timestamptz) {off}")
    run("INSERT INTO half SELECT g, 'row ' || g, g * 1.5, now() FROM generate_series(1, 200000) g")
    run("DELETE FROM half WHERE id > 100000")
    run("VACUUM (TRUNCATE false, ANALYZE) half")
    # Freshly loaded and analyzed: no bloat; grp is a low-cardinality index (deduplicated on 13+).
    run(f"CREATE TABLE fresh (id bigint PRIMARY KEY, grp int, note text, flag bool) {off}")
    run("INSERT INTO fresh SELECT g, g % 10, CASE WHEN g % 3 = 0 THEN NULL ELSE md5(g::text) END, g % 2 = 0 "
        "FROM generate_series(1, 200000) g")
    run("CREATE INDEX fresh_grp ON fresh (grp)")
    run("ANALYZE fresh")
    # An index after heavy updates of its key: every update moves the entry to the right end of the tree.
    run(f"CREATE TABLE churn (id int PRIMARY KEY, k int, payload text) {off}")
    run("INSERT INTO churn SELECT g, g, 'payload ' || g FROM generate_series(1, 100000) g")
    run("CREATE INDEX churn_k ON churn (k)")
    for _ in range(3):
        run("UPDATE churn SET k = k + 1000000")
    run("VACUUM (ANALYZE) churn")
    run("CREATE INDEX churn_k_rebuilt ON churn (k)")  # the same key, freshly built: the reference
    # Never analyzed (nothing to estimate from), and tiny.
    run(f"CREATE TABLE never_analyzed (id int, v text) {off}")
    run("INSERT INTO never_analyzed SELECT g, md5(g::text) FROM generate_series(1, 50000) g")
    # Statistics older than the data: analyzed with wide rows, then shrunk and rewritten compactly.
    run(f"CREATE TABLE stale (id int, body text) {off}")
    run("INSERT INTO stale SELECT g, repeat('x', 200) FROM generate_series(1, 50000) g")
    run("ANALYZE stale")
    run("UPDATE stale SET body = 'x'")
    run("VACUUM FULL stale")
    run(f"CREATE TABLE tiny (id int) {off}")
    run("INSERT INTO tiny VALUES (1), (2), (3)")
    run("ANALYZE tiny")
    yield DB
    pg.execute(f"DROP DATABASE IF EXISTS {DB}")


def _collect(pg: Server, collector: str, superuser: bool, **params: Any) -> Metrics:
    target = {"name": "main", "dsn": pg.dsn(DB, monitor=not superuser), "databases": {"include": [DB]}}
    return run_collector([target], collector, **params)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.value(name, datname=DB, **labels)
    assert value is not None, f"{name} {labels} missing in:\n{metrics.body}"
    return value


def _pgstattuple_ratio(pg: Server, table: str) -> float:
    """The exact share of the table that is free space or dead tuples, from a full pgstattuple scan."""
    row = pg.execute(f"SELECT table_len, free_space, dead_tuple_len FROM pgstattuple('{table}')", DB)[0]
    return float(row["free_space"] + row["dead_tuple_len"]) / float(row["table_len"])


def test_estimate_is_within_a_tenth_of_pgstattuple_on_a_half_deleted_table(pg: Server, scenario_db: str) -> None:
    truth = _pgstattuple_ratio(pg, "half")
    assert 0.4 < truth < 0.6, truth  # the scenario is what it claims to be
    metrics = _collect(pg, ESTIMATE, superuser=True)
    ratio = _value(metrics, "pg_table_bloat_ratio", relname="half", schemaname="public", method="estimate")
    assert abs(ratio - truth) <= 0.10, (ratio, truth)
    size = pg.execute("SELECT pg_relation_size('half') AS s", DB)[0]["s"]
    assert _value(metrics, "pg_table_bloat_bytes", relname="half") == pytest.approx(ratio * size, rel=1e-6)
    assert metrics.value("pgvitals_collector_success", collector=ESTIMATE) == 1


def test_freshly_loaded_table_and_indexes_estimate_near_zero(pg: Server, scenario_db: str) -> None:
    metrics = _collect(pg, ESTIMATE, superuser=True)
    assert _value(metrics, "pg_table_bloat_ratio", relname="fresh") < 0.05
    assert _value(metrics, "pg_index_bloat_ratio", relname="fresh", indexrelname="fresh_pkey") < 0.10
    # 20,000 rows per key value: deduplicated into posting lists on 13+, modelled as such.
    assert _value(metrics, "pg_index_bloat_ratio", relname="fresh", indexrelname="fresh_grp") < 0.10
    assert _value(metrics, "pg_index_bloat_ratio", relname="churn", indexrelname="churn_k_rebuilt") < 0.10


def test_index_after_heavy_updates_shows_bloat(pg: Server, scenario_db: str) -> None:
    estimate = _collect(pg, ESTIMATE, superuser=True)
    assert _value(estimate, "pg_index_bloat_ratio", indexrelname="churn_k", method="estimate") > 0.5
    assert _value(estimate, "pg_index_bloat_bytes", indexrelname="churn_k") > 1_000_000
    measured = _collect(pg, MEASURED, superuser=False, relations=10)
    bloated = _value(measured, "pg_index_bloat_measured_ratio", indexrelname="churn_k", method="pgstatindex")
    rebuilt = _value(measured, "pg_index_bloat_measured_ratio", indexrelname="churn_k_rebuilt")
    assert bloated > 0.5 and rebuilt < 0.10, (bloated, rebuilt)
    # The estimate agrees with pgstatindex's figure.
    assert abs(_value(estimate, "pg_index_bloat_ratio", indexrelname="churn_k") - bloated) < 0.10


def test_estimate_leaves_out_what_it_cannot_estimate_and_counts_it(pg: Server, scenario_db: str) -> None:
    metrics = _collect(pg, ESTIMATE, superuser=True)
    assert not metrics.find("pg_table_bloat_ratio", relname="never_analyzed")
    assert not metrics.find("pg_table_bloat_ratio", relname="tiny")
    # The statistics promise rows six times wider than they are: far below zero is no estimate at all.
    assert not metrics.find("pg_table_bloat_ratio", relname="stale")
    assert _value(metrics, "pg_bloat_estimate_relations", kind="table", status="model_mismatch") >= 1
    assert _value(metrics, "pg_bloat_estimate_relations", kind="table", status="not_analyzed") >= 1
    assert _value(metrics, "pg_bloat_estimate_relations", kind="table", status="too_small") >= 1
    assert _value(metrics, "pg_bloat_estimate_relations", kind="table", status="estimated") >= 3
    # Every ratio is a share of the relation: never negative, never above 1.
    for name in ("pg_table_bloat_ratio", "pg_index_bloat_ratio"):
        for _labels, value in metrics.find(name):
            assert 0 <= value <= 1
    # Only the top N are exported one by one; the rest are summed.
    top1 = _collect(pg, ESTIMATE, superuser=True, top_n=1)
    tables = top1.find("pg_table_bloat_bytes", datname=DB)
    assert len(tables) == 2  # the most bloated table and "other"
    assert top1.value("pg_table_bloat_bytes", datname=DB, relname="other") is not None
    total = sum(v for _labels, v in metrics.find("pg_table_bloat_bytes", datname=DB))
    assert sum(v for _labels, v in tables) == pytest.approx(total, rel=1e-9)


def test_monitor_role_gets_the_estimate_only_where_granted(pg: Server, scenario_db: str) -> None:
    # pg_stats hides the columns of tables a pg_monitor-only role may not SELECT.
    before = _collect(pg, ESTIMATE, superuser=False)
    assert not before.find("pg_table_bloat_ratio", relname="half")
    assert _value(before, "pg_bloat_estimate_relations", kind="table", status="no_privilege") >= 3
    assert before.value("pgvitals_collector_success", collector=ESTIMATE) == 1
    # A grant on some columns only: the others' statistics stay hidden, so no (wrong) estimate either.
    pg.execute(f"GRANT SELECT (id, label) ON half TO {MONITOR_ROLE}", DB)
    try:
        partial = _collect(pg, ESTIMATE, superuser=False)
    finally:
        pg.execute(f"REVOKE SELECT (id, label) ON half FROM {MONITOR_ROLE}", DB)
    assert not partial.find("pg_table_bloat_ratio", relname="half")
    assert _value(partial, "pg_bloat_estimate_relations", kind="table", status="no_privilege") >= 3
    pg.execute(f"GRANT SELECT ON half TO {MONITOR_ROLE}", DB)
    try:
        granted = _collect(pg, ESTIMATE, superuser=False)
    finally:
        pg.execute(f"REVOKE SELECT ON half FROM {MONITOR_ROLE}", DB)
    superuser = _collect(pg, ESTIMATE, superuser=True)
    assert _value(granted, "pg_table_bloat_ratio", relname="half") == pytest.approx(
        _value(superuser, "pg_table_bloat_ratio", relname="half"))


def test_measured_by_monitor_role_agrees_with_pgstattuple(pg: Server, scenario_db: str) -> None:
    metrics = _collect(pg, MEASURED, superuser=False, relations=10)
    assert metrics.value("pgvitals_collector_success", collector=MEASURED) == 1
    half = _value(metrics, "pg_table_bloat_measured_ratio", relname="half", method="pgstattuple_approx")
    assert abs(half - _pgstattuple_ratio(pg, "half")) < 0.05
    assert _value(metrics, "pg_table_bloat_measured_ratio", relname="fresh") < 0.05
    assert _value(metrics, "pg_bloat_measured_skipped_relations", kind="table", reason="lock_conflict") == 0
    # The largest relations only: a bound of 1 measures one table and one index.
    one = _collect(pg, MEASURED, superuser=False, relations=1)
    assert len(one.find("pg_table_bloat_measured_bytes")) == 1
    assert len(one.find("pg_index_bloat_measured_bytes")) == 1


def test_measured_prefers_what_the_estimate_cannot_cover(pg: Server, scenario_db: str) -> None:
    largest, second = (r["relname"] for r in pg.execute(
        "SELECT relname FROM pg_class WHERE relname IN ('half', 'fresh', 'churn', 'stale') "
        "ORDER BY relpages DESC LIMIT 2", DB))
    assert _value(_collect(pg, MEASURED, superuser=False, relations=1), "pg_table_bloat_measured_ratio",
                  relname=largest) is not None  # without privileges: the largest
    # Once the role may read the largest table, the estimate covers it: the measurement goes elsewhere.
    pg.execute(f"GRANT SELECT ON {largest} TO {MONITOR_ROLE}", DB)
    try:
        metrics = _collect(pg, MEASURED, superuser=False, relations=1)
    finally:
        pg.execute(f"REVOKE SELECT ON {largest} FROM {MONITOR_ROLE}", DB)
    assert [labels["relname"] for labels, _ in metrics.find("pg_table_bloat_measured_ratio")] == [second]


def _exporter_waits(pg: Server) -> int:
    return int(pg.execute(
        "SELECT count(*) AS n FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE NOT l.granted AND a.application_name = 'pgvitals'")[0]["n"])


def test_measured_skips_a_relation_with_a_pending_exclusive_lock(pg: Server, scenario_db: str) -> None:
    with PendingExclusiveLock(pg, "half", DB) as lock:
        metrics = _collect(pg, MEASURED, superuser=False, relations=10)
        assert lock.waiting() and _exporter_waits(pg) == 0
    assert metrics.value("pgvitals_collector_success", collector=MEASURED) == 1
    assert _value(metrics, "pg_bloat_measured_skipped_relations", kind="table", reason="lock_conflict") == 1
    # Its indexes are skipped too (DDL on a table may rebuild them), the other relations are measured.
    assert _value(metrics, "pg_bloat_measured_skipped_relations", kind="index", reason="lock_conflict") == 1
    assert not metrics.find("pg_table_bloat_measured_ratio", relname="half")
    assert not metrics.find("pg_index_bloat_measured_ratio", indexrelname="half_pkey")
    assert metrics.find("pg_table_bloat_measured_ratio", relname="fresh")


def test_measured_gives_up_on_a_lock_instead_of_queuing(pg: Server, scenario_db: str) -> None:
    # Without the pg_locks check the measurement asks for the lock: lock_timeout (100 ms) makes it give up,
    # its savepoint is rolled back, and the run goes on with the next relation.
    with PendingExclusiveLock(pg, "half", DB) as lock:
        metrics = _collect(pg, MEASURED, superuser=False, relations=10, check_locks=False)
        assert lock.waiting() and _exporter_waits(pg) == 0
    assert metrics.value("pgvitals_collector_success", collector=MEASURED) == 1
    assert _value(metrics, "pg_bloat_measured_skipped_relations", kind="table", reason="lock_timeout") == 1
    assert not metrics.find("pg_table_bloat_measured_ratio", relname="half")
    assert metrics.find("pg_table_bloat_measured_ratio", relname="fresh")
    assert metrics.find("pg_table_bloat_measured_ratio", relname="churn")


def test_measured_says_when_pgstattuple_is_missing(pg: Server, fresh_db: str) -> None:
    target = {"name": "main", "dsn": pg.dsn(fresh_db), "databases": {"include": [fresh_db]}}
    metrics = collect_once(pg, [MEASURED], targets=[target])
    assert metrics.value("pgvitals_collector_skipped", collector=MEASURED, reason="extension") == 1
    assert not metrics.find("pg_table_bloat_measured_bytes")


def test_measured_finds_pgstattuple_in_a_schema_that_needs_quoting(pg: Server, fresh_db: str) -> None:
    # The schema comes from the facts the engine planned with, composed as an identifier (not re-read, not
    # pasted in): a name with a space, an upper-case letter and a double quote must still resolve.
    schema = 'Stats "tools"'
    quoted = '"Stats ""tools"""'
    pg.execute(f"CREATE SCHEMA {quoted}", fresh_db)
    pg.execute(f"CREATE EXTENSION pgstattuple SCHEMA {quoted}", fresh_db)
    pg.execute(f"GRANT USAGE ON SCHEMA {quoted} TO {MONITOR_ROLE}", fresh_db)
    pg.execute("CREATE TABLE filled (id int, note text)", fresh_db)
    pg.execute("INSERT INTO filled SELECT g, md5(g::text) FROM generate_series(1, 50000) g", fresh_db)
    pg.execute("ANALYZE filled", fresh_db)
    assert pg.execute("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                      "WHERE e.extname = 'pgstattuple'", fresh_db)[0]["nspname"] == schema
    target = {"name": "main", "dsn": pg.dsn(fresh_db), "databases": {"include": [fresh_db]}}
    metrics = run_collector([target], MEASURED, relations=10)
    assert metrics.value("pgvitals_collector_success", collector=MEASURED) == 1
    ratio = metrics.value("pg_table_bloat_measured_ratio", datname=fresh_db, relname="filled")
    assert ratio is not None and 0 <= ratio < 0.2, metrics.body
    assert not metrics.find("pg_bloat_measured_skipped_relations", reason="query")
