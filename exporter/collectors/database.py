"""Database-wide statistics (pg_stat_database) and the server settings that matter."""

from __future__ import annotations

from exporter.catalog import Collector, SqlVariant
from exporter.collectors._helpers import MS, counter, gauge

DB = ("datname",)

# Columns every variant returns; a typed NULL where the server has no such column. datid is read only for
# postgres_exporter's names (exporter/compat.py), which carry it.
_STAT_DATABASE_COMMON = """
  d.datid, d.datname, d.numbackends, d.xact_commit, d.xact_rollback, d.blks_read, d.blks_hit,
  d.tup_returned, d.tup_fetched, d.tup_inserted, d.tup_updated, d.tup_deleted,
  d.conflicts, d.temp_files, d.temp_bytes, d.deadlocks, d.checksum_failures,
  d.blk_read_time, d.blk_write_time,
  pg_catalog.date_part('epoch', d.stats_reset) AS stats_reset"""

STAT_DATABASE = Collector(
    name="pg_stat_database",
    family="database",
    help="Per-database activity counters from pg_stat_database (the row for shared objects is left out).",
    interval=15.0,
    timeout=5.0,
    # About 25 series per database: a server with 1,000 databases yields 25,000, above the default bound.
    max_series=100_000,
    variants=(
        SqlVariant(
            min_version=120000, max_version=140000,
            sql=f"""SELECT {_STAT_DATABASE_COMMON},
  NULL::float8 AS session_time, NULL::float8 AS active_time, NULL::float8 AS idle_in_transaction_time,
  NULL::bigint AS sessions, NULL::bigint AS sessions_abandoned, NULL::bigint AS sessions_fatal,
  NULL::bigint AS sessions_killed
FROM pg_catalog.pg_stat_database d WHERE d.datname IS NOT NULL""",
        ),
        SqlVariant(
            min_version=140000,
            sql=f"""SELECT {_STAT_DATABASE_COMMON},
  d.session_time, d.active_time, d.idle_in_transaction_time,
  d.sessions, d.sessions_abandoned, d.sessions_fatal, d.sessions_killed
FROM pg_catalog.pg_stat_database d WHERE d.datname IS NOT NULL""",
        ),
    ),
    metrics=(
        gauge("pg_stat_database_numbackends", "Backends currently connected to the database.", "numbackends", DB),
        counter("pg_stat_database_xact_commit_total", "Transactions committed.", "xact_commit", DB),
        counter("pg_stat_database_xact_rollback_total", "Transactions rolled back.", "xact_rollback", DB),
        counter("pg_stat_database_blks_read_total",
                "Disk blocks read (not found in shared buffers); cache hit = hit / (hit + read) over a rate.",
                "blks_read", DB),
        counter("pg_stat_database_blks_hit_total", "Disk blocks found in shared buffers.", "blks_hit", DB),
        counter("pg_stat_database_tup_returned_total", "Rows returned by sequential and index scans.",
                "tup_returned", DB),
        counter("pg_stat_database_tup_fetched_total", "Rows fetched by index scans.", "tup_fetched", DB),
        counter("pg_stat_database_tup_inserted_total", "Rows inserted.", "tup_inserted", DB),
        counter("pg_stat_database_tup_updated_total", "Rows updated.", "tup_updated", DB),
        counter("pg_stat_database_tup_deleted_total", "Rows deleted.", "tup_deleted", DB),
        counter("pg_stat_database_conflicts_total", "Queries cancelled by recovery conflicts (standbys).",
                "conflicts", DB),
        counter("pg_stat_database_temp_files_total", "Temporary files created by queries.", "temp_files", DB),
        counter("pg_stat_database_temp_bytes_total", "Bytes written to temporary files by queries.", "temp_bytes",
                DB, unit="bytes"),
        counter("pg_stat_database_deadlocks_total", "Deadlocks detected.", "deadlocks", DB),
        counter("pg_stat_database_checksum_failures_total",
                "Data page checksum failures (absent when checksums are off).", "checksum_failures", DB),
        counter("pg_stat_database_blk_read_time_seconds_total",
                "Time spent reading data file blocks (needs track_io_timing).", "blk_read_time", DB,
                unit="seconds", scale=MS),
        counter("pg_stat_database_blk_write_time_seconds_total",
                "Time spent writing data file blocks (needs track_io_timing).", "blk_write_time", DB,
                unit="seconds", scale=MS),
        counter("pg_stat_database_session_time_seconds_total", "Time spent by sessions (PostgreSQL 14+).",
                "session_time", DB, unit="seconds", scale=MS),
        counter("pg_stat_database_active_time_seconds_total", "Time spent executing statements (14+).",
                "active_time", DB, unit="seconds", scale=MS),
        counter("pg_stat_database_idle_in_transaction_time_seconds_total",
                "Time spent idle in a transaction (14+).", "idle_in_transaction_time", DB, unit="seconds",
                scale=MS),
        counter("pg_stat_database_sessions_total", "Sessions established (14+).", "sessions", DB),
        counter("pg_stat_database_sessions_abandoned_total",
                "Sessions ended because the client went away (14+).", "sessions_abandoned", DB),
        counter("pg_stat_database_sessions_fatal_total", "Sessions ended by fatal errors (14+).",
                "sessions_fatal", DB),
        counter("pg_stat_database_sessions_killed_total", "Sessions ended by operator intervention (14+).",
                "sessions_killed", DB),
        gauge("pg_stat_database_stats_reset_timestamp_seconds",
              "When these statistics were last reset (Unix time); absent if never.", "stats_reset", DB,
              unit="seconds"),
    ),
)


# Settings worth watching, in base units (bytes, seconds). current_setting(name, true) gives NULL
# for a setting this server does not have, so one statement serves every version.
_SETTINGS: tuple[tuple[str, str, str, str], ...] = (
    # (setting, metric suffix, unit of pg_settings value to base, help)
    ("max_connections", "max_connections", "", "Maximum concurrent connections (max_connections)."),
    ("superuser_reserved_connections", "superuser_reserved_connections", "",
     "Connection slots reserved for superusers."),
    ("reserved_connections", "reserved_connections", "",
     "Connection slots reserved for roles with pg_use_reserved_connections (16+)."),
    ("shared_buffers", "shared_buffers_bytes", "bytes", "Shared buffer cache size."),
    ("effective_cache_size", "effective_cache_size_bytes", "bytes", "Planner's assumption of cache size."),
    ("work_mem", "work_mem_bytes", "bytes", "Memory per sort or hash before spilling to disk."),
    ("maintenance_work_mem", "maintenance_work_mem_bytes", "bytes", "Memory for maintenance operations."),
    ("max_wal_size", "max_wal_size_bytes", "bytes", "WAL size that triggers a checkpoint."),
    ("max_slot_wal_keep_size", "max_slot_wal_keep_size_bytes", "bytes",
     "WAL replication slots may retain (-1: unlimited, an abandoned slot can fill the disk)."),
    ("wal_keep_size", "wal_keep_size_bytes", "bytes", "WAL kept for standbys without slots (13+)."),
    ("checkpoint_timeout", "checkpoint_timeout_seconds", "seconds", "Time between automatic checkpoints."),
    ("autovacuum_freeze_max_age", "autovacuum_freeze_max_age", "",
     "Transaction age that forces an anti-wraparound vacuum."),
    ("autovacuum_multixact_freeze_max_age", "autovacuum_multixact_freeze_max_age", "",
     "Multixact age that forces an anti-wraparound vacuum."),
    ("autovacuum_max_workers", "autovacuum_max_workers", "", "Maximum concurrent autovacuum workers."),
    ("autovacuum_vacuum_scale_factor", "autovacuum_vacuum_scale_factor", "",
     "Fraction of a table's rows that, changed, triggers autovacuum (server default)."),
    ("autovacuum_vacuum_threshold", "autovacuum_vacuum_threshold", "",
     "Changed rows added to the scale factor's share before autovacuum runs (server default)."),
    ("max_wal_senders", "max_wal_senders", "", "Maximum concurrent WAL sender processes."),
    ("max_replication_slots", "max_replication_slots", "", "Maximum replication slots."),
    ("max_locks_per_transaction", "max_locks_per_transaction", "", "Lock table size factor."),
    ("statement_timeout", "statement_timeout_seconds", "seconds", "Server default statement timeout (0: none)."),
    ("idle_in_transaction_session_timeout", "idle_in_transaction_session_timeout_seconds", "seconds",
     "Server default idle-in-transaction timeout (0: none)."),
    ("track_io_timing", "track_io_timing", "", "1 when I/O timing is collected."),
    ("pg_stat_statements.max", "pg_stat_statements_max", "",
     "Statements pg_stat_statements keeps before evicting (absent if not loaded)."),
)


def _settings_sql() -> str:
    names = ", ".join(f"'{name}'" for name, *_ in _SETTINGS)
    # Convert to base units using pg_settings.unit: memory units are multiples of kB/8kB/MB,
    # time units of ms/s/min. Booleans become 1/0.
    return f"""
SELECT s.name,
  CASE
    WHEN s.vartype = 'bool' THEN CASE WHEN s.setting = 'on' THEN 1 ELSE 0 END
    WHEN s.vartype IN ('integer', 'real') THEN s.setting::float8 * CASE
        WHEN s.setting::float8 < 0 THEN 1
        WHEN s.unit = 'B' THEN 1 WHEN s.unit = 'kB' THEN 1024 WHEN s.unit = '8kB' THEN 8192
        WHEN s.unit = 'MB' THEN 1048576 WHEN s.unit = '16MB' THEN 16777216
        WHEN s.unit = 'ms' THEN 0.001 WHEN s.unit = 's' THEN 1 WHEN s.unit = 'min' THEN 60
        ELSE 1 END
  END AS value
FROM pg_catalog.pg_settings s WHERE s.name IN ({names})"""


def _pivot_settings(rows: list[dict[str, object]], _ctx: object) -> list[dict[str, object]]:
    """One row with a column per setting, so that each setting is its own metric."""
    return [{str(r["name"]): r["value"] for r in rows}]


SETTINGS = Collector(
    name="pg_settings",
    family="server",
    help="Server settings that limits and alerts are computed against, in base units.",
    interval=60.0,
    timeout=5.0,
    variants=(SqlVariant(sql=_settings_sql(), min_version=120000),),
    transform=_pivot_settings,
    metrics=tuple(
        gauge(f"pg_settings_{suffix}", help_, name, unit=unit) for name, suffix, unit, help_ in _SETTINGS
    ),
)


COLLECTORS = (STAT_DATABASE, SETTINGS)
