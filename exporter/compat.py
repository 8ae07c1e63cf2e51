"""postgres_exporter and pgbouncer_exporter names, declared metric by metric as views of native metrics.

No second exporter: each compatible series is derived, at collection time, from the rows that produce a
native metric (``source``): another name, renamed labels, mapped label values (lower-case lock modes),
a unit scale (seconds back to milliseconds), their counter/gauge type and ``_total`` habits, and extra
labels they carry (``datid``, ``server``). What they export and we do not is declared too, with the
reason, so that docs/compat.md lists every one of their metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from exporter.catalog import Catalog, CatalogError, Collector, MetricSpec
from exporter.collectors.database import SETTINGS
from exporter.exposition import escape_label, format_value, label_value, to_number

Naming = Literal["native", "postgres_exporter", "both"]
NAMINGS: tuple[Naming, ...] = ("native", "postgres_exporter", "both")
Exporter = Literal["postgres_exporter", "pgbouncer_exporter"]

#: Label value rewrites a declaration may name (kept few and explicit).
VALUE_MAPS: Mapping[str, Callable[[str], str]] = {
    "lower": str.lower,
}

#: A label whose value is the target's ``host:port`` (postgres_exporter's ``server`` on its legacy metrics).
SERVER = "@server"


@dataclass(frozen=True)
class CompatMetric:
    """One of their metrics, derived from our metric ``source``."""

    name: str
    source: str
    kind: Literal["counter", "gauge"]
    exporter: Exporter = "postgres_exporter"
    # (their label, our label or row column, or SERVER, or "=constant")
    labels: tuple[tuple[str, str], ...] = ()
    value_maps: tuple[tuple[str, str], ...] = ()  # (their label, VALUE_MAPS key)
    scale: float = 1.0  # applied to our (already scaled) value: 1000.0 turns seconds into milliseconds
    note: str = ""  # how it differs from theirs, if it does

    def same_as(self, spec: MetricSpec) -> bool:
        """True when this is exactly our metric (same name, labels and values)."""
        return (self.name == spec.name and self.scale == 1.0 and not self.value_maps
                and self.labels == tuple((label, label) for label in spec.labels))


@dataclass(frozen=True)
class NotProvided:
    """One of their metrics we do not export under their name, and why."""

    name: str
    reason: str
    exporter: Exporter = "postgres_exporter"


def _same(name: str, *labels: str, exporter: Exporter = "postgres_exporter", note: str = "",
          kind: Literal["counter", "gauge"] = "gauge") -> CompatMetric:
    return CompatMetric(name, name, kind, exporter, tuple((label, label) for label in labels), note=note)


def _renamed(name: str, source: str, kind: Literal["counter", "gauge"], labels: Iterable[str | tuple[str, str]],
             exporter: Exporter = "postgres_exporter", scale: float = 1.0, note: str = "",
             value_maps: tuple[tuple[str, str], ...] = ()) -> CompatMetric:
    pairs = tuple(label if isinstance(label, tuple) else (label, label) for label in labels)
    return CompatMetric(name, source, kind, exporter, pairs, value_maps, scale, note)


_DATABASE = (("datid", "datid"), "datname")
_TABLE = ("datname", "schemaname", "relname")
_MS = 1000.0  # our seconds, their milliseconds
_STAT_DATABASE_COUNTERS = ("xact_commit", "xact_rollback", "blks_read", "blks_hit", "tup_returned",
                           "tup_fetched", "tup_inserted", "tup_updated", "tup_deleted", "conflicts",
                           "temp_files", "temp_bytes", "deadlocks")

#: Their one error flag per server, from our per-collector status (the snapshot renders it with the self-metrics).
LAST_SCRAPE_ERROR = CompatMetric(
    "pg_exporter_last_scrape_error", "pgvitals_collector_success", "gauge",
    note="1 while the server is down or any collector's last run on it failed (theirs: the last scrape's "
         "queries); per collector: pgvitals_collector_success")
LAST_SCRAPE_ERROR_SPEC = MetricSpec(
    name=LAST_SCRAPE_ERROR.name, kind="gauge",
    help="1 when the target is down or a collector's last run on it failed, else 0 (postgres_exporter's name; "
         "pgvitals_collector_success says which collector).")

POSTGRES_EXPORTER: tuple[CompatMetric, ...] = (
    _same("pg_up", note="served in every naming (the exporter's own series, like pgvitals_*)"),
    LAST_SCRAPE_ERROR,
    # collector/pg_stat_database.go: no _total, times in milliseconds, datid next to datname
    _same("pg_stat_database_numbackends", "datname", note="without their datid label (same name: one series)"),
    *(_renamed(f"pg_stat_database_{column}", f"pg_stat_database_{column}_total", "counter", _DATABASE)
      for column in _STAT_DATABASE_COUNTERS),
    _renamed("pg_stat_database_blk_read_time", "pg_stat_database_blk_read_time_seconds_total", "counter",
             _DATABASE, scale=_MS),
    _renamed("pg_stat_database_blk_write_time", "pg_stat_database_blk_write_time_seconds_total", "counter",
             _DATABASE, scale=_MS),
    _renamed("pg_stat_database_stats_reset", "pg_stat_database_stats_reset_timestamp_seconds", "counter",
             _DATABASE, note="absent (not 0) while the statistics were never reset"),
    _same("pg_stat_database_active_time_seconds_total", "datname", kind="counter",
          note="without their datid label (same name: one series)"),
    # collector/pg_stat_bgwriter.go: on 17+ the checkpoint columns come from pg_stat_checkpointer, names unchanged
    _renamed("pg_stat_bgwriter_checkpoints_timed_total", "pg_stat_checkpointer_num_timed_total", "counter", ()),
    _renamed("pg_stat_bgwriter_checkpoints_req_total", "pg_stat_checkpointer_num_requested_total", "counter", ()),
    _renamed("pg_stat_bgwriter_checkpoint_write_time_total", "pg_stat_checkpointer_write_time_seconds_total",
             "counter", (), scale=_MS),
    _renamed("pg_stat_bgwriter_checkpoint_sync_time_total", "pg_stat_checkpointer_sync_time_seconds_total",
             "counter", (), scale=_MS),
    _renamed("pg_stat_bgwriter_buffers_checkpoint_total", "pg_stat_checkpointer_buffers_written_total", "counter",
             ()),
    _same("pg_stat_bgwriter_buffers_clean_total", kind="counter"),
    _same("pg_stat_bgwriter_maxwritten_clean_total", kind="counter"),
    _same("pg_stat_bgwriter_buffers_backend_total", kind="counter", note="PostgreSQL 12-16 (the column left in 17)"),
    _same("pg_stat_bgwriter_buffers_backend_fsync_total", kind="counter",
          note="PostgreSQL 12-16 (the column left in 17)"),
    _same("pg_stat_bgwriter_buffers_alloc_total", kind="counter"),
    _renamed("pg_stat_bgwriter_stats_reset_total", "pg_stat_bgwriter_stats_reset_timestamp_seconds", "counter", ()),
    # collector/pg_locks.go: lower-case modes, granted and waiting together, per database
    _renamed("pg_locks_count", "pg_locks", "gauge", ("datname", "mode"), value_maps=(("mode", "lower"),),
             note="granted and waiting locks summed; also locks on no database object, by the session's database"),
    # collector/pg_database.go
    _same("pg_database_size_bytes", "datname"),
    # collector/pg_replication.go
    _same("pg_replication_lag_seconds"),
    _renamed("pg_replication_lag", "pg_replication_lag_seconds", "gauge", (),
             note="name of the old queries.yaml the postgres_mixin alerts use"),
    _same("pg_replication_is_replica"),
    _renamed("pg_replication_last_replay_seconds", "pg_replication_last_xact_replay_age_seconds", "gauge", ()),
    # collector/pg_replication_slot.go
    _renamed("pg_replication_slot_slot_is_active", "pg_replication_slot_active", "gauge",
             ("slot_name", "slot_type")),
    _same("pg_replication_slot_safe_wal_size_bytes", "slot_name", "slot_type", "database",
          note="ours also carry database"),
    _same("pg_replication_slot_wal_status", "slot_name", "slot_type", "database", "wal_status",
          note="ours also carry database"),
    # collector/pg_stat_user_tables.go: counters without _total, last_* as Unix times
    *(_same(f"pg_stat_user_tables_{column}", *_TABLE) for column in
      ("n_live_tup", "n_dead_tup", "n_mod_since_analyze")),
    *(_renamed(f"pg_stat_user_tables_{column}", f"pg_stat_user_tables_{column}_timestamp_seconds", "gauge", _TABLE)
      for column in ("last_vacuum", "last_autovacuum", "last_analyze", "last_autoanalyze")),
    *(_renamed(f"pg_stat_user_tables_{column}", f"pg_stat_user_tables_{column}_total", "counter", _TABLE)
      for column in ("vacuum_count", "autovacuum_count", "analyze_count", "autoanalyze_count")),
    _renamed("pg_stat_user_tables_table_size_bytes", "pg_relation_size_bytes", "gauge", _TABLE,
             note="main fork only (theirs, pg_table_size, adds TOAST, free space and visibility maps)"),
    # collector/pg_statio_user_tables.go: "blocks", not "blks"
    *(_renamed(f"pg_statio_user_tables_{part}_blocks_{what}", f"pg_statio_user_tables_{part}_blks_{what}_total",
               "counter", _TABLE)
      for part in ("heap", "idx", "toast", "tidx") for what in ("read", "hit")),
    # collector/pg_statio_user_indexes.go (disabled by default there)
    *(_same(f"pg_statio_user_indexes_idx_blks_{what}_total", "datname", "schemaname", "relname", "indexrelname",
            kind="counter", note="ours also carry datname") for what in ("read", "hit")),
    # collector/pg_wal.go
    _renamed("pg_wal_size_bytes", "pg_wal_directory_size_bytes", "gauge", ()),
    _renamed("pg_wal_segments", "pg_wal_directory_segments", "gauge", ()),
    # collector/pg_xlog_location.go (disabled by default) and the queries.yaml-era name the mixin uses
    _renamed("pg_xlog_location_bytes", "pg_wal_position_bytes", "gauge", ()),
    _renamed("pg_xlog_position_bytes", "pg_wal_position_bytes", "gauge", (),
             note="name of the old queries.yaml the postgres_mixin alerts use"),
    # collector/pg_postmaster.go (disabled by default)
    _same("pg_postmaster_start_time_seconds"),
    # collector/pg_database_wraparound.go (disabled by default)
    _renamed("pg_database_wraparound_age_datfrozenxid_seconds", "pg_database_xid_age", "gauge", ("datname",),
             note="their name says seconds, the value is a transaction count (as ours)"),
    _renamed("pg_database_wraparound_age_datminmxid_seconds", "pg_database_mxid_age", "gauge", ("datname",),
             note="their name says seconds, the value is a multixact count (as ours)"),
    # collector/pg_stat_statements.go (disabled by default): user, not usename
    *(_same(f"pg_stat_statements_{name}", "datname", "usename", "queryid", kind="counter",
            note="same name, so our labels: usename where theirs say user; top-N plus queryid=\"other\"")
      for name in ("calls_total", "rows_total", "block_read_seconds_total", "block_write_seconds_total")),
    _renamed("pg_stat_statements_seconds_total", "pg_stat_statements_exec_seconds_total", "counter",
             (("user", "usename"), "datname", "queryid")),
    # the built-in (legacy, queries.go) maps: each carries server="host:port"
    _renamed("pg_stat_activity_count", "pg_connections", "gauge", ("datname", "state", ("server", SERVER)),
             note="client sessions only, summed over role and application (theirs: every backend with a database, "
                  "0 for each state a database has none in)"),
    _renamed("pg_stat_activity_max_tx_duration", "pg_stat_activity_max_tx_duration_seconds", "gauge",
             ("datname", ("server", SERVER)), note="per database, not per state"),
    _renamed("pg_stat_replication_pg_wal_lsn_diff", "pg_stat_replication_replay_lag_bytes", "gauge",
             ("application_name", "client_addr", "state", ("server", SERVER)), note="without their slot_name label"),
    _renamed("pg_stat_replication_pg_xlog_location_diff", "pg_stat_replication_replay_lag_bytes", "gauge",
             ("application_name", "client_addr", "state", ("server", SERVER)),
             note="their name before PostgreSQL 10, still used by the postgres_mixin alerts"),
    _renamed("pg_replication_slots_active", "pg_replication_slot_active", "gauge",
             ("slot_name", "database", ("server", SERVER))),
    _renamed("pg_replication_slots_pg_wal_lsn_diff", "pg_replication_slot_retained_bytes", "gauge",
             ("slot_name", "database", ("server", SERVER))),
    _renamed("pg_replication_slots_xmin_age", "pg_replication_slot_xmin_age", "gauge",
             ("slot_name", "database", ("server", SERVER)),
             note="not in postgres_exporter itself: a queries.yaml name the postgres_mixin alerts use"),
    _renamed("pg_stat_archiver_archived_count", "pg_stat_archiver_archived_total", "counter", (("server", SERVER),)),
    _renamed("pg_stat_archiver_failed_count", "pg_stat_archiver_failed_total", "counter", (("server", SERVER),)),
    _renamed("pg_stat_archiver_last_archive_age", "pg_stat_archiver_last_archive_age_seconds", "gauge",
             (("server", SERVER),)),
    # pg_settings: every setting we read has their name (they export every setting, in base units, dots as
    # underscores); theirs carry server, ours do not (same name, one series)
    *(_same(spec.name, note="without their server label") for spec in SETTINGS.metrics),
)

_POOL = ("database", "user")
PGBOUNCER_EXPORTER: tuple[CompatMetric, ...] = (
    _same("pgbouncer_up", exporter="pgbouncer_exporter", note="served in every naming"),
    # SHOW STATS
    _renamed("pgbouncer_stats_queries_pooled_total", "pgbouncer_stats_queries_total", "counter", ("database",),
             "pgbouncer_exporter"),
    _renamed("pgbouncer_stats_sql_transactions_pooled_total", "pgbouncer_stats_transactions_total", "counter",
             ("database",), "pgbouncer_exporter"),
    _same("pgbouncer_stats_received_bytes_total", "database", exporter="pgbouncer_exporter", kind="counter"),
    _same("pgbouncer_stats_sent_bytes_total", "database", exporter="pgbouncer_exporter", kind="counter"),
    _renamed("pgbouncer_stats_server_in_transaction_seconds_total", "pgbouncer_stats_transaction_seconds_total",
             "counter", ("database",), "pgbouncer_exporter"),
    _renamed("pgbouncer_stats_queries_duration_seconds_total", "pgbouncer_stats_query_seconds_total", "counter",
             ("database",), "pgbouncer_exporter"),
    _same("pgbouncer_stats_client_wait_seconds_total", "database", exporter="pgbouncer_exporter", kind="counter"),
    _same("pgbouncer_stats_server_assignments_total", "database", exporter="pgbouncer_exporter", kind="counter"),
    # SHOW STATS_TOTALS (v0.11): the same totals under stats_totals
    *(_renamed(f"pgbouncer_stats_totals_{name}", f"pgbouncer_stats_{source}", "counter", ("database",),
               "pgbouncer_exporter", note="v0.11 reads SHOW STATS_TOTALS; pgvitals the total_* columns of SHOW STATS")
      for name, source in (("queries_pooled_total", "queries_total"),
                           ("sql_transactions_pooled_total", "transactions_total"),
                           ("received_bytes_total", "received_bytes_total"), ("sent_bytes_total", "sent_bytes_total"),
                           ("server_in_transaction_seconds_total", "transaction_seconds_total"),
                           ("queries_duration_seconds_total", "query_seconds_total"),
                           ("client_wait_seconds_total", "client_wait_seconds_total"))),
    # SHOW POOLS
    *(_same(f"pgbouncer_pools_{name}", *_POOL, exporter="pgbouncer_exporter") for name in (
        "client_active_connections", "client_waiting_connections", "server_active_connections",
        "server_idle_connections", "server_used_connections", "server_login_connections",
        "client_maxwait_seconds")),
    _renamed("pgbouncer_pools_server_testing_connections", "pgbouncer_pools_server_tested_connections", "gauge",
             _POOL, "pgbouncer_exporter"),
    # SHOW DATABASES: their entry label is name
    *(_same(f"pgbouncer_databases_{name}", "database", exporter="pgbouncer_exporter",
            note="same name, so our labels: database is the entry (theirs: name is the entry, database the "
                 "server database)")
      for name in ("pool_size", "max_connections", "current_connections", "paused", "disabled")),
    _renamed("pgbouncer_databases_reserve_pool", "pgbouncer_databases_reserve_pool_size", "gauge",
             (("name", "database"), ("database", "server_database")), "pgbouncer_exporter",
             note="without their host, port, force_user and pool_mode labels"),
    # SHOW CONFIG
    _same("pgbouncer_config_max_client_connections", exporter="pgbouncer_exporter"),
    _same("pgbouncer_config_max_user_connections", exporter="pgbouncer_exporter"),
    _renamed("pgbouncer_used_clients", "pgbouncer_client_connections", "gauge", (), "pgbouncer_exporter"),
    _renamed("pgbouncer_used_servers", "pgbouncer_server_connections", "gauge", (), "pgbouncer_exporter"),
)

COMPAT: tuple[CompatMetric, ...] = POSTGRES_EXPORTER + PGBOUNCER_EXPORTER

_PLAIN = "a plain gauge/counter of the view column"
NOT_PROVIDED: tuple[NotProvided, ...] = (
    NotProvided("pg_exporter_last_scrape_duration_seconds",
                "scrapes do not query PostgreSQL; collection time per collector: pgvitals_collector_duration_seconds"),
    NotProvided("pg_exporter_scrapes_total", "scrapes do not query PostgreSQL; nothing to count per scrape"),
    NotProvided("pg_exporter_user_queries_load_error", "custom queries are issue 12 part 2 (not built yet)"),
    NotProvided("pg_scrape_collector_success",
                "per collector: pgvitals_collector_success{collector} (our collector names)"),
    NotProvided("pg_scrape_collector_duration_seconds",
                "per collector: pgvitals_collector_duration_seconds{collector} (our collector names)"),
    NotProvided("pg_static", "pg_server_info{version, server_version_num} carries the version"),
    NotProvided("pg_database_connection_limit", "not collected (pg_database.datconnlimit)"),
    NotProvided("pg_roles_connection_limit", "not collected (pg_roles.rolconnlimit)"),
    NotProvided("pg_replication_slot_slot_current_wal_lsn",
                "an absolute LSN; pgvitals exports what it means: pg_replication_slot_retained_bytes"),
    NotProvided("pg_replication_slot_slot_confirmed_flush_lsn",
                "an absolute LSN; pgvitals exports pg_replication_slot_confirmed_flush_lag_bytes"),
    NotProvided("pg_stat_replication_pg_current_wal_lsn_bytes",
                "one copy of the primary's WAL position per standby; use pg_wal_position_bytes"),
    NotProvided("pg_stat_database_conflicts_confl_tablespace", "not collected per conflict kind; "
                "the total is pg_stat_database_conflicts"),
    NotProvided("pg_stat_database_conflicts_confl_lock", "not collected per conflict kind; "
                "the total is pg_stat_database_conflicts"),
    NotProvided("pg_stat_database_conflicts_confl_snapshot", "not collected per conflict kind; "
                "the total is pg_stat_database_conflicts"),
    NotProvided("pg_stat_database_conflicts_confl_bufferpin", "not collected per conflict kind; "
                "the total is pg_stat_database_conflicts"),
    NotProvided("pg_stat_database_conflicts_confl_deadlock", "not collected per conflict kind; "
                "the total is pg_stat_database_conflicts"),
    *(NotProvided(f"pg_stat_user_tables_{column}",
                  "not collected: pgvitals keeps per-table series to the vacuum-relevant columns")
      for column in ("seq_scan", "seq_tup_read", "idx_scan", "idx_tup_fetch", "n_tup_ins", "n_tup_upd",
                     "n_tup_del", "n_tup_hot_upd")),
    NotProvided("pg_stat_user_tables_index_size_bytes",
                "per index instead: pg_index_size_bytes{indexrelname}"),
    NotProvided("pg_settings_*", "postgres_exporter exports every setting; pgvitals the ones its dashboards and "
                "alerts use (listed as same above)"),
    NotProvided("pg_process_idle_seconds", "histogram of idle sessions (disabled by default there); not collected"),
    NotProvided("pg_long_running_transactions",
                "disabled by default there; pg_stat_activity_max_tx_duration_seconds per database instead"),
    NotProvided("pg_long_running_transactions_oldest_timestamp_seconds",
                "disabled by default there; pg_stat_activity_max_tx_duration_seconds per database instead"),
    NotProvided("pg_stat_walreceiver_*", "disabled by default there; pg_replication_wal_receiver_* instead"),
    NotProvided("pg_stat_progress_vacuum_*", "disabled by default there; pg_stat_progress_vacuum_* with our "
                "labels (schemaname, relname, phase) instead"),
    NotProvided("pg_stat_checkpointer_*", "disabled by default there; our pg_stat_checkpointer_* keep our names "
                "(the mixin reads the pg_stat_bgwriter_* names, derived above)"),
    NotProvided("pg_buffercache_summary_*", "disabled by default there (needs the pg_buffercache extension); "
                "not collected"),
    NotProvided("pg_stat_activity_autovacuum_timestamp_seconds",
                "disabled by default there; pg_autovacuum_workers and pg_stat_progress_vacuum_* instead"),
    NotProvided("pgbouncer_exporter_*", "process metrics of the exporter itself", "pgbouncer_exporter"),
    NotProvided("pgbouncer_version_info", "not collected (SHOW VERSION is read, not exported)", "pgbouncer_exporter"),
    NotProvided("pgbouncer_databases", "SHOW LISTS counts other than clients and servers are not collected",
                "pgbouncer_exporter"),
    NotProvided("pgbouncer_users", "SHOW LISTS counts other than clients and servers are not collected",
                "pgbouncer_exporter"),
    NotProvided("pgbouncer_pools", "SHOW LISTS counts other than clients and servers are not collected",
                "pgbouncer_exporter"),
    NotProvided("pgbouncer_free_clients", "SHOW LISTS counts other than clients and servers are not collected",
                "pgbouncer_exporter"),
    NotProvided("pgbouncer_free_servers", "SHOW LISTS counts other than clients and servers are not collected",
                "pgbouncer_exporter"),
    NotProvided("pgbouncer_login_clients", "SHOW LISTS counts other than clients and servers are not collected",
                "pgbouncer_exporter"),
    NotProvided("pgbouncer_stats_queries_total",
                "theirs counts total_requests of PgBouncer before 1.8 (a column gone since); the same name in "
                "pgvitals' native naming counts total_query_count (theirs: pgbouncer_stats_queries_pooled_total)",
                "pgbouncer_exporter"),
    NotProvided("pgbouncer_stats_totals_queries_total", "total_requests of PgBouncer before 1.8 (a column gone since)",
                "pgbouncer_exporter"),
    *(NotProvided(f"pgbouncer_stats_totals_{name}", "prepared-statement counters (PgBouncer 1.21+) are not collected",
                  "pgbouncer_exporter") for name in ("client_parses_total", "server_parses_total", "binds_total")),
    *(NotProvided(f"pgbouncer_pools_{name}", "cancel-request counts (PgBouncer 1.18+) are not collected",
                  "pgbouncer_exporter") for name in (
        "client_active_cancel_connections", "client_waiting_cancel_connections", "server_active_cancel_connections",
        "server_being_canceled_connections")),
    *(NotProvided(f"pgbouncer_{name}", "SHOW LISTS DNS counts are not collected", "pgbouncer_exporter")
      for name in ("cached_dns_names", "cached_dns_zones", "in_flight_dns_queries")),
)


def exported_owners(catalog: Catalog, naming: Naming, table: Iterable[CompatMetric] = COMPAT) -> dict[str, str]:
    """Each metric name served in ``naming`` mode, with the collector whose rows it comes from."""
    owners = dict(catalog.metric_owner) if naming != "postgres_exporter" else {}
    if naming != "native":
        for entry in table:
            owner = catalog.metric_owner.get(entry.source)
            if owner is not None:
                owners.setdefault(entry.name, owner)
    return owners


def validate(catalog: Catalog, table: Iterable[CompatMetric] = COMPAT) -> tuple[CompatMetric, ...]:
    """Check each declaration against the catalog; raise CatalogError listing every problem."""
    problems: list[str] = []
    entries = tuple(table)
    native = {spec.name: spec for spec in catalog.metrics()}
    seen: set[str] = set()
    for entry in entries:
        source = native.get(entry.source)
        if source is None:
            problems.append(f"compat {entry.name}: source {entry.source} is not a native metric")
            continue
        if entry.name in seen:
            problems.append(f"compat {entry.name}: declared twice")
        seen.add(entry.name)
        own = native.get(entry.name)
        # A name both namings use must be one and the same series, or `both` would export it twice.
        if own is not None and not (entry.same_as(own) and entry.kind == own.exposition_type):
            problems.append(f"compat {entry.name}: also a native metric, so it must be the very same series")
        for their, ours in entry.labels:
            if ours.startswith("=") or ours == SERVER:
                continue
            if ours not in source.labels and ours not in _ROW_COLUMNS.get(entry.source, ()):
                problems.append(f"compat {entry.name}: label {their} reads {ours!r}, not a label of {entry.source}")
        for label, how in entry.value_maps:
            if how not in VALUE_MAPS or label not in dict(entry.labels):
                problems.append(f"compat {entry.name}: bad value map {label}={how}")
    if problems:
        raise CatalogError("invalid compatibility table:\n  " + "\n  ".join(problems))
    return entries


#: Row columns beyond the native labels that a declaration may read (selected by the collector's SQL for it).
_ROW_COLUMNS: Mapping[str, tuple[str, ...]] = {
    **{spec: ("datid",) for spec in (
        "pg_stat_database_numbackends", "pg_stat_database_blk_read_time_seconds_total",
        "pg_stat_database_blk_write_time_seconds_total", "pg_stat_database_stats_reset_timestamp_seconds",
        "pg_stat_database_active_time_seconds_total",
        *(f"pg_stat_database_{c}_total" for c in _STAT_DATABASE_COUNTERS))},
    "pgbouncer_databases_reserve_pool_size": ("server_database",),
}


@dataclass(frozen=True)
class Plan:
    """What one collector renders in a naming mode: its native specs and the derived metrics by source."""

    native: tuple[MetricSpec, ...]
    derived: tuple[tuple[MetricSpec, CompatMetric, MetricSpec], ...]  # (source spec, declaration, header spec)


def plan(collector: Collector, naming: Naming, table: Iterable[CompatMetric] = COMPAT) -> Plan:
    """The metrics ``collector`` renders under ``naming``: ours, theirs, or both without a series twice."""
    ours = {spec.name: spec for spec in collector.metrics}
    native = tuple(collector.metrics) if naming != "postgres_exporter" else ()
    derived = []
    for entry in table:
        source = ours.get(entry.source)
        if source is None or naming == "native":
            continue
        if naming == "both" and entry.name in ours:
            continue  # the same series: the native one is already there
        derived.append((source, entry, header_spec(entry, source)))
    return Plan(native, tuple(derived))


def header_spec(entry: CompatMetric, source: MetricSpec) -> MetricSpec:
    """A spec that gives the derived metric its HELP and TYPE lines."""
    where = "" if entry.same_as(source) else f" (pgvitals: {entry.source})"
    return MetricSpec(name=entry.name, kind=entry.kind, help=source.help + where,
                      labels=tuple(label for label, _ in entry.labels))


def exposition_order(catalog: Catalog, naming: Naming, table: Iterable[CompatMetric] = COMPAT
                     ) -> tuple[MetricSpec, ...]:
    """Every family the snapshot may serve, in order: native ones (unless postgres_exporter only), then derived."""
    entries = tuple(table)
    specs: list[MetricSpec] = []
    for collector in catalog.collectors:
        chosen = plan(collector, naming, entries)
        specs.extend(chosen.native)
        specs.extend(header for _, _, header in chosen.derived)
    specs.extend(catalog.self_metrics)
    return tuple(specs)


def self_order(catalog: Catalog, naming: Naming) -> tuple[MetricSpec, ...]:
    """The exporter's own families in this naming mode: ours, and their error flag unless native."""
    extra = (LAST_SCRAPE_ERROR_SPEC,) if naming != "native" else ()
    return (*catalog.self_metrics, *extra)


def render_derived(derived: Iterable[tuple[MetricSpec, CompatMetric, MetricSpec]], rows: list[dict[str, Any]],
                   prefix: str, server: str, limit: int) -> tuple[dict[str, bytes], int, bool]:
    """Sample lines of the derived metrics; series whose labels coincide are summed (e.g. granted + waiting)."""
    chunks: dict[str, bytes] = {}
    total = 0
    truncated = False
    # Their metrics of one collector mostly share a label mapping: build each row's label text once per mapping.
    label_cache: dict[tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]], list[str]] = {}
    for source, entry, _header in derived:
        key = (entry.labels, entry.value_maps)
        texts = label_cache.get(key)
        if texts is None:
            texts = label_cache[key] = [_label_text(entry, row, prefix, server) for row in rows]
        scale = source.scale * entry.scale
        series: dict[str, float | int] = {}
        for row, labels in zip(rows, texts, strict=True):
            raw = to_number(row.get(source.value)) if source.value else 1
            if raw is None:
                continue  # NULL: no sample, as in the native metric
            if labels in series:
                series[labels] += raw * scale if scale != 1.0 else raw
                continue
            if len(series) + total >= limit:
                truncated = True
                break
            series[labels] = raw * scale if scale != 1.0 else raw
        if series:
            name = entry.name
            chunks[name] = "".join(f"{name}{{{labels}}} {format_value(value)}\n"
                                   for labels, value in series.items()).encode()
            total += len(series)
    return chunks, total, truncated


def _label_text(entry: CompatMetric, row: dict[str, Any], prefix: str, server: str) -> str:
    """The label text of one derived series: the target's prefix, then their labels in their order."""
    maps = dict(entry.value_maps)
    parts = [prefix] if prefix else []
    for their, ours in entry.labels:
        if ours == SERVER:
            text = server
        elif ours.startswith("="):
            text = ours[1:]
        else:
            text = label_value(row.get(ours))
        if their in maps:
            text = VALUE_MAPS[maps[their]](text)
        parts.append(f'{their}="{escape_label(text)}"')
    return ",".join(parts)
