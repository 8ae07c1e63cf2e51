"""Custom collectors on a real PostgreSQL: postgres_exporter's and pgMonitor's files unchanged, and our guards."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exporter.cli import main
from tests.support.exporters import Runner
from tests.support.scrape import wait_for_metric
from tests.support.servers import Server

pytestmark = [pytest.mark.live, pytest.mark.family("custom")]

DATA = Path(__file__).parent / "data"
PE_FILE = DATA / "postgres_exporter_queries.yaml"
PGMONITOR_FILE = DATA / "pgmonitor_pg15_queries_general.yml"


def test_postgres_exporter_example_file_runs_with_its_names_and_labels(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE TABLE orders (id int); INSERT INTO orders SELECT generate_series(1, 10); "
               "SELECT count(*) FROM orders", fresh_db)
    target = {"name": "main", "dsn": pg.dsn(fresh_db)}
    with Runner(pg, targets=[target], queries_files=[str(PE_FILE)]) as runner:
        metrics = runner.collect()
        shadowed = {item.name for item in runner.engine.catalog.shadowed}
    # pg_stat_user_tables: namespace_column, labels exactly the file's LABEL columns (plus our target).
    seq_scan = metrics.find("pg_stat_user_tables_seq_scan", relname="orders")
    assert [labels for labels, _ in seq_scan] == [
        {"target": "main", "datname": fresh_db, "schemaname": "public", "relname": "orders"}]
    assert seq_scan[0][1] >= 1
    assert "# TYPE pg_stat_user_tables_seq_scan counter" in metrics.body  # COUNTER kept without _total
    # A NULL timestamp COALESCEd to the epoch: a timestamp is exported as Unix seconds.
    assert metrics.value("pg_stat_user_tables_last_vacuum", relname="orders") == 0
    assert metrics.value("pg_statio_user_tables_heap_blks_hit", relname="orders", datname=fresh_db) is not None
    assert metrics.value("pg_replication_lag", target="main") == 0  # a primary
    # pg_process_idle: HISTOGRAM as client_golang writes it, le buckets and +Inf = _count.
    count = metrics.find("pg_process_idle_seconds_count")
    assert count, metrics.body
    labels, total = count[0]
    buckets = {b["le"]: v for b, v in metrics.find("pg_process_idle_seconds_bucket",
                                                      application_name=labels["application_name"])}
    assert set(buckets) == {"1", "2", "5", "15", "30", "60", "90", "120", "300", "+Inf"}
    assert buckets["+Inf"] == total
    assert metrics.value("pg_process_idle_seconds_sum", application_name=labels["application_name"]) is not None
    # Names we export ourselves stay ours: the built-in series, listed as skipped.
    assert {"pg_database_size_bytes", "pg_postmaster_start_time_seconds", "pg_stat_user_tables_n_live_tup"} <= shadowed
    assert "queries:pg_database" not in runner.engine.catalog.by_name  # every metric of it is built-in
    # pg_stat_statements' old columns (total_time) do not exist on PostgreSQL 13+: that query fails, alone.
    assert metrics.value("pgvitals_collector_success", collector="queries:pg_stat_statements") == 0
    for name in ("queries:pg_stat_user_tables", "queries:pg_statio_user_tables", "queries:pg_replication",
                 "queries:pg_process_idle"):
        assert metrics.value("pgvitals_collector_success", collector=name) == 1, name
    assert metrics.value("pgvitals_collector_success", collector="pg_stat_database") == 1  # built-ins unaffected


def test_pgmonitor_file_runs_with_its_names_and_labels(pg: Server) -> None:
    with Runner(pg, queries_files=[str(PGMONITOR_FILE)]) as runner:
        metrics = runner.collect()
    if pg.version_num >= 170000:  # the file is pgMonitor's PG15 one: 17 moved checkpoints to pg_stat_checkpointer
        assert metrics.value("pgvitals_collector_success", collector="queries:ccp_stat_bgwriter") == 0
    else:
        assert metrics.value("pgvitals_collector_success", collector="queries:ccp_stat_bgwriter") == 1
        assert metrics.value("ccp_stat_bgwriter_buffers_alloc", target="main") is not None
        stats_reset = metrics.value("ccp_stat_bgwriter_stats_reset", target="main")
        assert stats_reset is not None and stats_reset > 1_600_000_000  # a timestamptz as Unix seconds
    failures = metrics.find("ccp_data_checksum_failure_count")
    databases = {labels["dbname"] for labels, _ in failures}
    assert {"postgres", ""} <= databases  # the shared-objects row has a NULL name: an empty label, as in Go
    assert all(set(labels) == {"target", "dbname"} for labels, _ in failures)
    assert metrics.value("ccp_data_checksum_failure_time_since_last_failure_seconds", dbname="postgres") == 0


def test_slow_custom_query_is_cancelled_and_reported_without_stopping_the_others(pg: Server) -> None:
    slow = {"name": "slow_one", "sql": "SELECT 1 AS v FROM pg_sleep(5)", "interval": "10s", "timeout": "500ms",
            "metrics": [{"name": "slow_one_value", "value": "v", "help": "Never arrives."}]}
    quick = {"name": "quick_one", "sql": "SELECT 42 AS v", "timeout": "2s",
             "metrics": [{"name": "quick_one_value", "value": "v", "help": "The answer."}]}
    with Runner(pg, custom_collectors=[slow, quick]) as runner:
        metrics = runner.collect()
    assert metrics.value("pgvitals_collector_errors_total", collector="slow_one", reason="timeout") == 1
    assert metrics.value("pgvitals_collector_success", collector="slow_one") == 0
    assert metrics.value("slow_one_value") is None
    assert metrics.value("quick_one_value", target="main") == 42
    assert metrics.value("pgvitals_collector_success", collector="quick_one") == 1
    assert metrics.value("pgvitals_collector_success", collector="pg_settings") == 1


def test_writing_custom_query_fails_in_the_read_only_transaction(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE TABLE victim (id int); INSERT INTO victim VALUES (1)", fresh_db)
    writer = {"name": "sneaky", "sql": "WITH gone AS (DELETE FROM victim RETURNING id) SELECT count(*) AS n FROM gone",
              "metrics": [{"name": "sneaky_deleted", "value": "n", "help": "Rows it tried to delete."}]}
    with Runner(pg, targets=[{"name": "main", "dsn": pg.dsn(fresh_db, monitor=False)}],
                custom_collectors=[writer]) as runner:
        metrics = runner.collect()
    assert metrics.value("pgvitals_collector_success", collector="sneaky") == 0
    errors = metrics.find("pgvitals_collector_errors_total", collector="sneaky")
    assert errors and errors[0][1] == 1
    assert metrics.value("sneaky_deleted") is None
    assert pg.execute("SELECT count(*) AS n FROM victim", fresh_db) == [{"n": 1}]  # as a superuser, still refused


def test_native_per_database_collector_by_version_and_role(pg: Server, fresh_db: str) -> None:
    declared = {
        "name": "app_tables", "scope": "database", "role": "primary", "max_series": 50,
        "variants": [{"sql": "SELECT 'old' AS era, count(*) AS n FROM pg_catalog.pg_class", "max_version": 130000},
                     {"sql": "SELECT 'new' AS era, count(*) AS n FROM pg_catalog.pg_class", "min_version": 130000}],
        "metrics": [{"name": "app_tables_relations", "value": "n", "labels": ["era"], "help": "Relations."}],
    }
    standby_only = {"name": "standby_thing", "role": "standby", "sql": "SELECT 1 AS v",
                    "metrics": [{"name": "standby_thing_value", "value": "v", "help": "Only on a standby."}]}
    with Runner(pg, custom_collectors=[declared, standby_only]) as runner:
        metrics = runner.collect()
    found = metrics.find("app_tables_relations", datname=fresh_db)
    assert [labels["era"] for labels, _ in found] == ["new"]
    assert found[0][1] > 100
    assert metrics.value("pgvitals_collector_skipped", collector="standby_thing", reason="role") == 1


def test_check_lists_custom_collectors_and_the_metrics_left_to_built_ins(
    pg: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "pgvitals.yaml"
    config.write_text(f"targets: [{{name: main, dsn: '{pg.monitor_dsn}'}}]\nqueries_files: ['{PE_FILE}']\n")
    assert main(["check", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"^  queries:pg_stat_user_tables +ok \(\d+ series", out, re.M), out
    assert re.search(r"^  queries:pg_stat_statements +FAILED: ", out, re.M), out
    assert re.search(r"^  queries:pg_process_idle +.*postgres_exporter_queries.yaml: pg_process_idle: "
                     r"pg_process_idle_seconds_bucket, pg_process_idle_seconds_sum, pg_process_idle_seconds_count$",
                     out, re.M), out
    assert re.search(r"^  pg_database_size_bytes +from .*postgres_exporter_queries.yaml: pg_database; "
                     r"exported by built-in collector pg_database_size$", out, re.M), out
    warnings = [line for line in err.splitlines() if " WARNING pgvitals.custom: " in line]
    assert len([w for w in warnings if "pg_database_size_bytes" in w]) == 1, err  # once, at load


def test_daemon_serves_custom_metrics(pg: Server, exporter_for) -> None:
    declared = {"name": "answer", "sql": "SELECT 42 AS v, 'life' AS about", "interval": "1s", "timeout": "500ms",
                "metrics": [{"name": "answer_value", "value": "v", "labels": ["about"], "help": "The answer."}]}
    daemon = exporter_for([{"name": "main", "dsn": pg.monitor_dsn}], custom_collectors=[declared])
    metrics = wait_for_metric(daemon.server.port, "answer_value", about="life")
    assert metrics.value("answer_value", target="main", about="life") == 42
    assert "# HELP answer_value The answer." in metrics.body


def test_second_statement_is_refused_by_the_server_even_past_the_load_check(pg: Server, fresh_db: str) -> None:
    """``COMMIT; DELETE`` after a SELECT would leave the read-only transaction: the extended protocol refuses it."""
    from exporter import __version__
    from exporter.catalog import Catalog
    from exporter.config import CustomCollectorConfig
    from exporter.custom import native_collector
    from exporter.engine import Engine
    from exporter.snapshot import Snapshot
    from tests.support.scrape import Metrics
    from tests.support.servers import settings_for

    pg.execute("CREATE TABLE victim (id int); INSERT INTO victim VALUES (1)", fresh_db)
    declared = CustomCollectorConfig.model_validate({
        "name": "escape", "sql": "SELECT 1 AS n; COMMIT; DELETE FROM victim; SELECT 1 AS n",
        "metrics": [{"name": "escape_n", "value": "n", "help": "Never."}]})
    collector, problems = native_collector(0, declared)
    assert [message for _loc, message in problems] == [
        "one statement only: more SQL follows the ';' at character 14"]
    catalog = Catalog.builtin().with_custom([collector])  # as if the load check had missed it
    settings = settings_for([{"name": "main", "dsn": pg.dsn(fresh_db, monitor=False)}])
    snapshot = Snapshot(catalog, __version__)
    engine = Engine(catalog, settings, snapshot)
    try:
        runtime = engine.targets["main"]
        assert engine.probe(runtime)
        engine.collect(runtime, engine.collectors["escape"])
    finally:
        engine.close()
    metrics = Metrics(snapshot.render().decode())
    assert metrics.value("pgvitals_collector_success", collector="escape") == 0
    assert metrics.value("escape_n") is None
    assert pg.execute("SELECT count(*) AS n FROM victim", fresh_db) == [{"n": 1}]


def test_series_cap_bounds_a_custom_collector(pg: Server) -> None:
    declared = {"name": "many", "sql": "SELECT g AS i, g AS v FROM generate_series(1, 100) g", "max_series": 5,
                "metrics": [{"name": "many_value", "value": "v", "labels": ["i"], "help": "Rows."}]}
    with Runner(pg, custom_collectors=[declared]) as runner:
        metrics = runner.collect()
    assert len(metrics.find("many_value")) == 5
    assert metrics.value("pgvitals_collector_series", collector="many") == 5
