"""WAL, checkpoints, background writer, pg_stat_io, pg_stat_wal and the archiver against real servers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from exporter.localpg import wait_until
from tests.support.exporters import collect_once
from tests.support.scrape import Metrics
from tests.support.servers import Server, start_server

pytestmark = [pytest.mark.live, pytest.mark.family("wal")]

WAL_COLLECTORS = ["pg_wal", "pg_stat_checkpointer", "pg_stat_bgwriter", "pg_stat_io", "pg_stat_wal",
                  "pg_stat_archiver"]


@pytest.fixture(params=["monitor", "superuser"])
def monitor(request: pytest.FixtureRequest) -> bool:
    """Run the test as the pg_monitor-only role and as a superuser."""
    return bool(request.param == "monitor")


def _collect(server: Server, monitor: bool, names: list[str] | None = None) -> Metrics:
    return collect_once(server, names or WAL_COLLECTORS,
                        targets=[{"name": "main", "dsn": server.dsn(monitor=monitor)}])


def _row(server: Server, sql: str, dbname: str = "postgres") -> dict[str, Any]:
    return server.execute(sql, dbname)[0]


def _between(metrics: Metrics, name: str, low: Any, high: Any, scale: float = 1.0, **labels: str) -> float:
    """The metric's value, checked against the truth read just before and just after the collection."""
    value = metrics.value(name, **labels)
    assert value is not None, f"{name} {labels} missing"
    assert float(low) * scale - 1e-9 <= value <= float(high) * scale + 1e-9, (name, low, value, high)
    return value


def _no_errors(metrics: Metrics) -> None:
    errors = [labels for labels, _ in metrics.find("pgvitals_collector_errors_total")
              if labels["collector"] in WAL_COLLECTORS]
    assert not errors, errors


def test_checkpoint_counters_keep_their_names_on_every_version(pg: Server, fresh_db: str, monitor: bool) -> None:
    if pg.version_num >= 170000:
        truth = ("SELECT num_requested AS requested, buffers_written AS written, write_time, "
                 "(SELECT buffers_alloc FROM pg_stat_bgwriter) AS alloc FROM pg_stat_checkpointer")
    else:
        truth = ("SELECT checkpoints_req AS requested, buffers_checkpoint AS written, "
                 "checkpoint_write_time AS write_time, buffers_alloc AS alloc FROM pg_stat_bgwriter")
    start = _row(pg, truth)
    pg.execute("CREATE TABLE dirty AS SELECT g FROM generate_series(1, 20000) g", fresh_db)
    pg.execute("CHECKPOINT")
    wait_until(lambda: _row(pg, truth)["requested"] > start["requested"]
               and _row(pg, truth)["written"] > start["written"], timeout=30)
    before = _row(pg, truth)
    metrics = _collect(pg, monitor, ["pg_stat_checkpointer", "pg_stat_bgwriter"])
    after = _row(pg, truth)
    _no_errors(metrics)
    _between(metrics, "pg_stat_checkpointer_num_requested_total", before["requested"], after["requested"])
    _between(metrics, "pg_stat_checkpointer_buffers_written_total", before["written"], after["written"])
    _between(metrics, "pg_stat_checkpointer_write_time_seconds_total", before["write_time"], after["write_time"],
             scale=0.001)
    _between(metrics, "pg_stat_bgwriter_buffers_alloc_total", before["alloc"], after["alloc"])
    # The same names on 12 to 18; figures a version does not have are absent, never 0.
    for name in ("pg_stat_checkpointer_num_timed_total", "pg_stat_checkpointer_sync_time_seconds_total",
                 "pg_stat_checkpointer_stats_reset_timestamp_seconds", "pg_stat_bgwriter_buffers_clean_total",
                 "pg_stat_bgwriter_maxwritten_clean_total"):
        assert metrics.value(name) is not None, name
    expect = {
        "pg_stat_checkpointer_restartpoints_done_total": pg.version_num >= 170000,
        "pg_stat_checkpointer_num_done_total": pg.version_num >= 180000,
        "pg_stat_checkpointer_slru_written_total": pg.version_num >= 180000,
        "pg_stat_bgwriter_buffers_backend_total": pg.version_num < 170000,
    }
    for name, present in expect.items():
        assert (metrics.value(name) is not None) == present, name
    if pg.version_num >= 180000:
        done = metrics.value("pg_stat_checkpointer_num_done_total")
        assert done is not None and done >= 1


def test_wal_position_and_directory(pg: Server, monitor: bool) -> None:
    position = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') AS p"
    low = _row(pg, position)["p"]
    metrics = _collect(pg, monitor, ["pg_wal", "pg_stat_archiver", "pg_archive_status"])
    high = _row(pg, position)["p"]
    _between(metrics, "pg_wal_position_bytes", low, high)
    directory = ("SELECT sum(size) AS size, count(*) FILTER (WHERE name ~ '^[0-9A-F]{24}$') AS segments "
                 "FROM pg_ls_waldir()")

    def stable_match() -> bool:
        # pg_wal changes when segments are recycled: compare while it holds still.
        before = _row(pg, directory)
        found = _collect(pg, monitor, ["pg_wal_directory"])
        after = _row(pg, directory)
        return before == after and found.value("pg_wal_directory_size_bytes") == before["size"] \
            and found.value("pg_wal_directory_segments") == before["segments"]

    wait_until(stable_match, timeout=30, interval=0.2)
    # This server does not archive: the archiver says so and has nothing pending.
    assert metrics.value("pg_stat_archiver_enabled") == 0
    assert metrics.value("pg_stat_archiver_pending_files") == 0


def test_stat_wal(pg: Server, fresh_db: str, monitor: bool) -> None:
    if pg.version_num < 140000:
        metrics = _collect(pg, monitor, ["pg_stat_wal"])
        assert metrics.value("pgvitals_collector_skipped", collector="pg_stat_wal", reason="version") == 1
        pytest.skip("pg_stat_wal exists from PostgreSQL 14")
    truth = "SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal"
    start = _row(pg, truth)
    pg.execute("CREATE TABLE w AS SELECT g, repeat('z', 100) AS pad FROM generate_series(1, 20000) g", fresh_db)
    wait_until(lambda: _row(pg, truth)["wal_bytes"] > start["wal_bytes"] + 1_000_000, timeout=30)
    before = _row(pg, truth)
    metrics = _collect(pg, monitor, ["pg_stat_wal"])
    after = _row(pg, truth)
    _no_errors(metrics)
    _between(metrics, "pg_stat_wal_records_total", before["wal_records"], after["wal_records"])
    _between(metrics, "pg_stat_wal_fpi_total", before["wal_fpi"], after["wal_fpi"])
    _between(metrics, "pg_stat_wal_bytes_total", before["wal_bytes"], after["wal_bytes"])
    # 18 moved write/sync counts to pg_stat_io: absent there, present before.
    for name in ("pg_stat_wal_write_total", "pg_stat_wal_sync_total", "pg_stat_wal_write_time_seconds_total"):
        assert (metrics.value(name) is not None) == (pg.version_num < 180000), name


def test_stat_io(pg: Server, fresh_db: str, monitor: bool) -> None:
    if pg.version_num < 160000:
        metrics = _collect(pg, monitor, ["pg_stat_io"])
        assert metrics.value("pgvitals_collector_skipped", collector="pg_stat_io", reason="version") == 1
        pytest.skip("pg_stat_io exists from PostgreSQL 16")
    pg.execute("CREATE TABLE io AS SELECT g, repeat('q', 200) AS pad FROM generate_series(1, 20000) g", fresh_db)
    pg.execute("SELECT count(*) FROM io", fresh_db)
    row = "backend_type = 'client backend' AND object = 'relation' AND context = 'normal'"
    if pg.version_num >= 180000:
        truth = f"SELECT hits, extends, extend_bytes, reads, read_bytes FROM pg_stat_io WHERE {row}"
    else:
        truth = (f"SELECT hits, extends, extends * op_bytes AS extend_bytes, reads, reads * op_bytes AS read_bytes "
                 f"FROM pg_stat_io WHERE {row}")
    wait_until(lambda: _row(pg, truth)["extends"] > 0, timeout=30)
    before = _row(pg, truth)
    metrics = _collect(pg, monitor, ["pg_stat_io"])
    after = _row(pg, truth)
    _no_errors(metrics)
    labels = {"backend_type": "client backend", "object": "relation", "context": "normal"}
    for column in ("hits", "extends", "extend_bytes", "reads", "read_bytes"):
        _between(metrics, f"pg_stat_io_{column}_total", before[column], after[column], **labels)
    assert metrics.value("pg_stat_io_extend_bytes_total", **labels) >= 8192  # type: ignore[operator]
    # Rows that never saw I/O are left out: every exported row has some operation.
    ops = ("reads", "writes", "writebacks", "extends", "hits", "evictions", "reuses", "fsyncs")
    label_sets = {tuple(sorted(lbl.items())) for lbl, _ in metrics.find("pg_stat_io_reads_total")}
    assert label_sets
    for label_set in label_sets:
        as_dict = dict(label_set)
        assert any((metrics.value(f"pg_stat_io_{op}_total", **as_dict) or 0) > 0 for op in ops), as_dict
    total_rows = _row(pg, "SELECT count(*) AS n FROM pg_stat_io")["n"]
    assert len(label_sets) < total_rows


@pytest.fixture
def archiving_server() -> Iterator[Server]:
    """A server whose archive_command always fails."""
    server = start_server("archive", settings={"archive_mode": "on", "archive_command": "'false'"})
    yield server
    server.cluster.destroy()


def _switch_segment(server: Server) -> None:
    server.execute("CREATE TABLE IF NOT EXISTS churn (v int)")
    server.execute("INSERT INTO churn SELECT generate_series(1, 1000)")
    server.execute("SELECT pg_switch_wal()")


def test_failing_archive_command_is_counted(archiving_server: Server, monitor: bool) -> None:
    server = archiving_server
    truth = "SELECT archived_count, failed_count FROM pg_stat_archiver"
    _switch_segment(server)
    wait_until(lambda: _row(server, truth)["failed_count"] >= 2, timeout=60)
    before = _row(server, truth)
    metrics = _collect(server, monitor, ["pg_stat_archiver", "pg_archive_status"])
    after = _row(server, truth)
    _no_errors(metrics)
    failed = _between(metrics, "pg_stat_archiver_failed_total", before["failed_count"], after["failed_count"])
    assert failed >= 2
    assert metrics.value("pg_stat_archiver_archived_total") == 0
    assert metrics.value("pg_stat_archiver_enabled") == 1
    pending = metrics.value("pg_stat_archiver_pending_files")
    assert pending is not None and pending >= 1
    assert metrics.value("pg_stat_archiver_last_archive_age_seconds") is None  # never archived
    age = metrics.value("pg_stat_archiver_last_failure_age_seconds")
    assert age is not None and 0 <= age < 60

    # Repair the command: the backlog drains, successes are counted, the last-archive age appears.
    server.execute("ALTER SYSTEM SET archive_command = 'true'")
    server.execute("SELECT pg_reload_conf()")
    _switch_segment(server)

    def drained() -> Metrics | None:
        # Before 15 the archiver reports through the statistics collector: counts arrive a bit later.
        found = _collect(server, monitor, ["pg_stat_archiver", "pg_archive_status"])
        archived = found.value("pg_stat_archiver_archived_total")
        done = found.value("pg_stat_archiver_pending_files") == 0 and archived is not None and archived >= 2
        return found if done else None

    metrics = wait_until(drained, timeout=60, interval=0.5)
    _between(metrics, "pg_stat_archiver_archived_total", 2, _row(server, truth)["archived_count"])
    age = metrics.value("pg_stat_archiver_last_archive_age_seconds")
    assert age is not None and 0 <= age < 60
    assert metrics.value("pg_stat_archiver_failed_total") >= failed  # type: ignore[operator]
