"""The pgvitals dashboards: an overview of every target, a page per target, and one page per query family.

Metrics are reached only through catalog look-ups (``sel``/``rate``/``m``); thresholds come from the same
``alerts:`` configuration the alert rules use, so a panel turns red where an alert fires.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exporter import alerts as rules
from exporter.config import AlertsConfig
from exporter.dashboards.grafana import (
    BLUE,
    GREEN,
    ORANGE,
    RED,
    YELLOW,
    PanelSpec,
    Query,
    alarm,
    dashboard,
    datasource_variable,
    datname_variable,
    falling,
    link_to,
    rate,
    rising,
    sel,
    steps,
    target_variable,
)
from exporter.dashboards.promql import duration, m

UID_OVERVIEW = "pgvitals-overview"
UID_TARGET = "pgvitals-target"
UID_QUERIES = "pgvitals-queries"
UID_LOCKS = "pgvitals-locks"
UID_STORAGE = "pgvitals-storage"
UID_REPLICATION = "pgvitals-replication"
UID_CONNECTIONS = "pgvitals-connections"
UID_CACHE = "pgvitals-cache"

TOP = 10  # rows in "top N" panels
RANGE = "$__range"


def _t(kind: str, title: str, about: str, *queries: Query, **options: Any) -> PanelSpec:
    return PanelSpec(kind=kind, title=title, about=about, queries=queries, **options)


def _cache_hit(by: str) -> str:
    """The shared cache hit ratio (see alerts.cache_hit_ratio) over $__rate_interval for the selected targets."""
    return rules.cache_hit_ratio("$__rate_interval", by=by, hit_selector=sel("pg_stat_database_blks_hit_total"),
                                 read_selector=sel("pg_stat_database_blks_read_total"))


def _connections_utilization() -> str:
    return rules.connections_utilization(sel("pg_connections"), sel("pg_connections_max"))


def _pool_utilization() -> str:
    return rules.pool_utilization(sel("pg_pool_connections"), sel("pg_pool_capacity"))


ROLE_MAPPING = [{"type": "value", "options": {
    "0": {"text": "primary", "color": BLUE, "index": 0},
    "1": {"text": "standby", "color": "purple", "index": 1},
}}]
UP_MAPPING = [{"type": "value", "options": {
    "0": {"text": "DOWN", "color": RED, "index": 0},
    "1": {"text": "UP", "color": GREEN, "index": 1},
}}]


def overview(c: AlertsConfig) -> dict[str, Any]:
    """Every target at a glance; each tile links to that target's page."""
    to_target = [link_to(UID_TARGET, "Open ${__field.labels.target}")]
    tile: dict[str, Any] = {"width": 6, "height": 6, "links": to_target}
    panels: list[PanelSpec | str] = [
        _t("stat", "PostgreSQL up", "Whether pgvitals can connect to each PostgreSQL target.",
           Query(f"{sel('pg_up')}", "{{target}}"), mappings=UP_MAPPING, thresholds=steps((1, GREEN), base=RED),
           unit="none", **tile),
        _t("stat", "Role", "Primary or standby (in recovery), as seen at the last probe.",
           Query(sel("pg_replication_is_replica"), "{{target}}"), mappings=ROLE_MAPPING, unit="none",
           thresholds=steps(base=BLUE), **tile),
        _t("stat", "Connections used",
           "Client sessions as a share of the slots ordinary roles can use (max_connections minus reserved). "
           f"Yellow at {c.connections.warning:.0%}, red at {c.connections.critical:.0%}, as the alerts.",
           Query(_connections_utilization(), "{{target}}"), unit="percentunit",
           thresholds=rising(c.connections.warning, c.connections.critical), **tile),
        _t("stat", "Replication lag (standbys)",
           f"How far each standby's replay is behind. Yellow at {duration(c.replication_lag.warning)}, red at "
           f"{duration(c.replication_lag.critical)} (the RPO), as the alerts.",
           Query(sel("pg_replication_lag_seconds"), "{{target}}"), unit="s",
           thresholds=rising(c.replication_lag.warning, c.replication_lag.critical), **tile),
        _t("stat", "Slow queries", "Active queries running longer than the slow threshold (default 5 s), all "
           "databases.", Query(f"sum by (target) ({sel('pg_slow_queries')})", "{{target}}"), unit="none",
           thresholds=rising(1), **tile),
        _t("stat", "Sessions waiting for locks", "Sessions waiting on a heavyweight lock, all databases.",
           Query(f"sum by (target) ({sel('pg_lock_waiting_sessions')})", "{{target}}"), unit="none",
           thresholds=rising(1), **tile),
        _t("stat", "Cache hit", f"Share of block accesses served from shared buffers over the rate interval; red "
           f"below {c.cache_hit.ratio:.0%} (the alert also needs real traffic).",
           Query(_cache_hit("by (target)"), "{{target}}"), unit="percentunit", decimals=2,
           thresholds=falling(c.cache_hit.ratio), **tile),
        _t("stat", "Firing alerts", "pgvitals alerts firing now, per target (needs the pgvitals rule file loaded "
           "in Prometheus).", Query(f'count by (target) ({m("ALERTS", alertstate="firing", target="~$target")})',
                                    "{{target}}"),
           unit="none", thresholds=rising(1), no_value="0", **tile),
        _t("stat", "PgBouncer up", "Whether pgvitals can connect to each PgBouncer admin console.",
           Query(sel("pgbouncer_up"), "{{target}}"), mappings=UP_MAPPING, thresholds=steps((1, GREEN), base=RED),
           unit="none", links=[link_to(UID_CONNECTIONS, "Open ${__field.labels.target}")], width=6, height=6),
        _t("table", "Firing and pending alerts", "Every pgvitals alert that is pending or firing, with its labels.",
           Query(m("ALERTS", target="~$target"), table=True, instant=True), width=18, height=6,
           transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True,
                                                                            "__name__": True}}}]),
    ]
    return dashboard(UID_OVERVIEW, "pgvitals / Overview",
                     "Health of every monitored PostgreSQL and PgBouncer target; click a tile for its page.",
                     panels, [datasource_variable(), target_variable(), datname_variable()])


def target_page(c: AlertsConfig) -> dict[str, Any]:
    """One target's vital signs, with links to each family page."""
    panels: list[PanelSpec | str] = [
        _t("stat", "Up", "Whether pgvitals can connect.", Query(sel("pg_up"), "{{target}}"), mappings=UP_MAPPING,
           thresholds=steps((1, GREEN), base=RED), unit="none", width=4, height=5),
        _t("stat", "Role", "Primary or standby.", Query(sel("pg_replication_is_replica"), "{{target}}"),
           mappings=ROLE_MAPPING, unit="none", thresholds=steps(base=BLUE), width=4, height=5),
        _t("stat", "Connections used", "Client sessions over usable connection slots.",
           Query(_connections_utilization(), "{{target}}"), unit="percentunit",
           thresholds=rising(c.connections.warning, c.connections.critical), width=4, height=5),
        _t("stat", "Cache hit", "Shared buffer hit ratio, all selected databases.",
           Query(_cache_hit("by (target)"), "{{target}}"), unit="percentunit", decimals=2,
           thresholds=falling(c.cache_hit.ratio), width=4, height=5),
        _t("stat", "Longest query", "The longest-running active query in the selected databases.",
           Query(f"max by (target) ({sel('pg_stat_activity_max_query_duration_seconds')})", "{{target}}"),
           unit="s", thresholds=rising(c.slow_statements.mean_seconds, c.long_query.seconds), width=4, height=5),
        _t("stat", "Oldest lock wait", "The longest a session has been waiting for a lock.",
           Query(f"max by (target) ({sel('pg_lock_wait_max_seconds')})", "{{target}}"), unit="s",
           thresholds=alarm(c.lock_wait.seconds), width=4, height=5),
        _t("stat", "Uptime", "Time since the server (postmaster) started; yellow for "
           f"{duration(c.restart.within)} after a restart (the restart alert's window).",
           Query(f"time() - {sel('pg_postmaster_start_time_seconds')}", "{{target}}"), unit="s",
           thresholds=steps((c.restart.within, GREEN), base=YELLOW), width=6, height=5),
        _t("table", "Server", "Version, checksums, cluster name and system identifier of each target, and when it "
           "last reloaded its configuration.",
           Query(sel("pg_server_info"), table=True, instant=True),
           Query(f"time() - {sel('pg_config_reload_time_seconds')}", table=True, instant=True), width=18, height=5,
           transformations=[{"id": "merge", "options": {}},
                            {"id": "organize", "options": {
                                "excludeByName": {"Time": True, "Value #A": True, "__name__": True},
                                "renameByName": {"Value #B": "since last reload (s)"}}}]),
        _t("timeseries", "Transactions per second", "Commits and rollbacks per second, by database.",
           Query(f"sum by (target, datname) ({rate('pg_stat_database_xact_commit_total')})",
                 "commit {{target}}/{{datname}}"),
           Query(f"sum by (target, datname) ({rate('pg_stat_database_xact_rollback_total')})",
                 "rollback {{target}}/{{datname}}"), unit="ops"),
        _t("timeseries", "Connections by state", "Client sessions by state, against the usable maximum.",
           Query(f"sum by (target, state) ({sel('pg_connections')})", "{{target}} {{state}}"),
           Query(sel("pg_connections_max"), "{{target}} usable max"), unit="short"),
        _t("timeseries", "Rows per second", "Rows returned, fetched, inserted, updated and deleted per second.",
           Query(f"sum by (target) ({rate('pg_stat_database_tup_returned_total')})", "returned {{target}}"),
           Query(f"sum by (target) ({rate('pg_stat_database_tup_fetched_total')})", "fetched {{target}}"),
           Query(f"sum by (target) ({rate('pg_stat_database_tup_inserted_total')})", "inserted {{target}}"),
           Query(f"sum by (target) ({rate('pg_stat_database_tup_updated_total')})", "updated {{target}}"),
           Query(f"sum by (target) ({rate('pg_stat_database_tup_deleted_total')})", "deleted {{target}}"),
           unit="rowsps"),
        _t("timeseries", "Collector health", "pgvitals' own view: 1 when a collector's last run succeeded.",
           Query(f"min by (target, collector) ({sel('pgvitals_collector_success')})", "{{target}} {{collector}}"),
           unit="none", min=0, max=1, thresholds=steps((1, GREEN), base=RED), threshold_lines=False),
        _t("table", "What the monitoring role may not use",
           "Objects a collector needs that the role may not use (or the platform does not support), and databases "
           "the server refuses: those metrics are missing until granted; nothing else is affected.",
           Query(f"max by (target, collector, object) ({sel('pgvitals_collector_denied')})", table=True,
                 instant=True),
           Query(f"max by (target, datname, reason) ({sel('pgvitals_database_unavailable')})", table=True,
                 instant=True),
           transformations=[{"id": "merge", "options": {}},
                            {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]),
    ]
    return dashboard(UID_TARGET, "pgvitals / Target",
                     "Vital signs of the selected target(s); the links at the top open each family page.",
                     panels, [datasource_variable(), target_variable(), datname_variable()])


def queries_page(c: AlertsConfig) -> dict[str, Any]:
    """Statements (pg_stat_statements) and long-running sessions (pg_stat_activity)."""
    key = "target, datname, usename, queryid"
    exec_time = rate("pg_stat_statements_exec_seconds_total")
    calls = rate("pg_stat_statements_calls_total")
    mean = rules.statement_mean_seconds("$__rate_interval", sel("pg_stat_statements_exec_seconds_total"),
                                        sel("pg_stat_statements_calls_total"))
    panels: list[PanelSpec | str] = [
        "Statements (pg_stat_statements)",
        _t("timeseries", "Top statements by execution time", "Execution time spent per second by the statements "
           f"that spend the most (top {TOP}); queryid=\"other\" is everything outside the exporter's top N.",
           Query(f"topk({TOP}, sum by ({key}) ({exec_time}))", "{{datname}} {{queryid}} ({{usename}})"), unit="s"),
        _t("timeseries", "Slowest statements (mean time per call)", "Mean execution time per call over the rate "
           f"interval; yellow from {duration(c.slow_statements.mean_seconds)} (the slow-statement alert).",
           Query(f"topk({TOP}, {mean})", "{{datname}} {{queryid}} ({{usename}})"), unit="s",
           thresholds=rising(c.slow_statements.mean_seconds)),
        _t("timeseries", "Most frequent statements", f"Calls per second (top {TOP}).",
           Query(f"topk({TOP}, sum by ({key}) ({calls}))", "{{datname}} {{queryid}} ({{usename}})"), unit="ops"),
        _t("table", "Statements in the selected range", "Total execution time, calls and rows of each statement "
           f"over the dashboard's time range (top {TOP} by time).",
           Query(f"topk({TOP}, sum by ({key}) (increase({sel('pg_stat_statements_exec_seconds_total')}[{RANGE}])))",
                 table=True, instant=True),
           transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True}}}]),
        "Sessions (pg_stat_activity)",
        _t("timeseries", "Longest running query", "Age of the oldest active query per database; yellow at "
           f"{duration(c.slow_statements.mean_seconds)} (slow), red at {duration(c.long_query.seconds)} (the alert).",
           Query(sel("pg_stat_activity_max_query_duration_seconds"), "{{target}}/{{datname}}"), unit="s",
           thresholds=rising(c.slow_statements.mean_seconds, c.long_query.seconds), width=8),
        _t("timeseries", "Longest idle in transaction", "Age of the oldest session idle inside an open transaction; "
           f"red at {duration(c.idle_in_transaction.seconds)} (the alert).",
           Query(sel("pg_stat_activity_max_idle_in_transaction_seconds"), "{{target}}/{{datname}}"), unit="s",
           thresholds=alarm(c.idle_in_transaction.seconds), width=8),
        _t("timeseries", "Longest open transaction", "Age of the oldest open transaction (it holds back vacuum).",
           Query(sel("pg_stat_activity_max_tx_duration_seconds"), "{{target}}/{{datname}}"), unit="s", width=8),
        _t("timeseries", "What sessions wait on", "Client sessions that are not idle, by what they wait on at each "
           "sample (wait_event_type/wait_event; none/none: running on CPU or in a wait PostgreSQL does not name). "
           "Client/ClientRead while idle in transaction is the application, not the database.",
           Query(f"sum by (target, wait_event_type, wait_event) "
                 f"({sel('pg_wait_event_sessions', backend_type='client backend', state='!idle')})",
                 "{{target}} {{wait_event_type}}/{{wait_event}}"), unit="short", stack=True, width=24),
        _t("timeseries", "Slow queries running", "Active queries running longer than the slow threshold.",
           Query(sel("pg_slow_queries"), "{{target}}/{{datname}}"), unit="short", thresholds=rising(1)),
        _t("timeseries", "Temporary files written", "Bytes per second queries spill to temporary files "
           "(work_mem too small for their sorts and hashes).",
           Query(f"sum by (target, datname) ({rate('pg_stat_database_temp_bytes_total')})", "{{target}}/{{datname}}"),
           unit="Bps"),
    ]
    return dashboard(UID_QUERIES, "pgvitals / Queries", "Statements and long-running sessions.", panels,
                     [datasource_variable(), target_variable(), datname_variable()])


def locks_page(c: AlertsConfig) -> dict[str, Any]:
    """Lock waits, blocking chains and deadlocks."""
    panels: list[PanelSpec | str] = [
        _t("timeseries", "Sessions waiting for locks", "Sessions waiting on a heavyweight lock, per database.",
           Query(sel("pg_lock_waiting_sessions"), "{{target}}/{{datname}}"), unit="short", thresholds=rising(1),
           width=8),
        _t("timeseries", "Oldest lock wait", f"How long the oldest waiter has waited; red at "
           f"{duration(c.lock_wait.seconds)} (the alert).",
           Query(sel("pg_lock_wait_max_seconds"), "{{target}}/{{datname}}"), unit="s",
           thresholds=rising(c.lock_wait.seconds), width=8),
        _t("timeseries", "Blocking roots", "Sessions at the head of a blocking chain: they block others and "
           "wait for nothing (terminate these to release the chain).",
           Query(sel("pg_lock_blocking_roots"), "{{target}}/{{datname}}"), unit="short", thresholds=rising(1),
           width=8),
        _t("stat", "Most sessions behind one root", "The largest number of sessions stuck behind one blocker.",
           Query(sel("pg_lock_max_blocked_by_one_root"), "{{target}}"), unit="short", thresholds=rising(1, 5),
           width=6),
        _t("timeseries", "Deadlocks", "Deadlocks detected per rate interval; each one aborted a transaction.",
           Query(f"sum by (target, datname) (increase({sel('pg_stat_database_deadlocks_total')}"
                 f"[$__rate_interval]))", "{{target}}/{{datname}}"), unit="short", thresholds=rising(1), width=9),
        _t("timeseries", "Locks by mode", "Lock counts by mode, granted and waiting.",
           Query(f"sum by (target, mode, granted) ({sel('pg_locks')})", "{{target}} {{mode}} granted={{granted}}"),
           unit="short", width=9),
    ]
    return dashboard(UID_LOCKS, "pgvitals / Locks", "Who waits, who blocks, and deadlocks.", panels,
                     [datasource_variable(), target_variable(), datname_variable()])


def storage_page(c: AlertsConfig) -> dict[str, Any]:
    """Bloat, dead tuples, vacuum, wraparound and sizes."""
    table = "{{target}}/{{datname}} {{schemaname}}.{{relname}}"
    panels: list[PanelSpec | str] = [
        "Bloat and vacuum",
        _t("bargauge", "Table bloat", f"Share of each table that is dead space (top {TOP}): measured by "
           "pgstattuple_approx on the largest tables where the extension is installed, estimated from statistics "
           f"elsewhere (method label). The alert fires above {c.bloat.ratio:.0%} on tables over "
           f"{c.bloat.min_table_bytes / 2**30:g} GiB.",
           Query(f"topk({TOP}, {sel('pg_table_bloat_measured_ratio')})", table + " measured"),
           Query(f"topk({TOP}, {sel('pg_table_bloat_ratio')})", table + " estimated"),
           unit="percentunit", min=0, max=1, thresholds=alarm(c.bloat.ratio)),
        _t("bargauge", "Index bloat", f"Share of each btree index that is dead space (top {TOP}), measured by "
           "pgstatindex or estimated.",
           Query(f"topk({TOP}, {sel('pg_index_bloat_measured_ratio')})",
                 "{{target}}/{{datname}} {{schemaname}}.{{indexrelname}} measured"),
           Query(f"topk({TOP}, {sel('pg_index_bloat_ratio')})",
                 "{{target}}/{{datname}} {{schemaname}}.{{indexrelname}} estimated"),
           unit="percentunit", min=0, max=1, thresholds=rising(c.bloat.ratio)),
        _t("bargauge", "Wasted bytes in tables", f"Dead space in bytes (top {TOP}), measured or estimated.",
           Query(f"topk({TOP}, {sel('pg_table_bloat_measured_bytes')})", table + " measured"),
           Query(f"topk({TOP}, {sel('pg_table_bloat_bytes')})", table + " estimated"), unit="bytes",
           thresholds=rising(c.bloat.min_table_bytes * c.bloat.ratio)),
        _t("timeseries", "Dead tuples", f"Dead rows waiting for vacuum (top {TOP} tables).",
           Query(f"topk({TOP}, {sel('pg_stat_user_tables_n_dead_tup')})", table), unit="short"),
        _t("bargauge", "Longest without vacuum", f"Time since the last vacuum, manual or automatic, of the tables "
           f"vacuumed longest ago (top {TOP}); tables never vacuumed have no timestamp and are not listed.",
           # The later of the two timestamps: autovacuum where newer, else manual, else whichever exists.
           Query(f"topk({TOP}, time() - ({sel('pg_stat_user_tables_last_autovacuum_timestamp_seconds')} > "
                 f"{sel('pg_stat_user_tables_last_vacuum_timestamp_seconds')} or "
                 f"{sel('pg_stat_user_tables_last_vacuum_timestamp_seconds')} or "
                 f"{sel('pg_stat_user_tables_last_autovacuum_timestamp_seconds')}))", table),
           unit="s", thresholds=rising(86400, 7 * 86400)),
        _t("timeseries", "Autovacuum runs", "Autovacuum and autoanalyze runs per rate interval, by database.",
           Query(f"sum by (target, datname) (increase({sel('pg_stat_user_tables_autovacuum_count_total')}"
                 "[$__rate_interval]))", "autovacuum {{target}}/{{datname}}"),
           Query(f"sum by (target, datname) (increase({sel('pg_stat_user_tables_autoanalyze_count_total')}"
                 "[$__rate_interval]))", "autoanalyze {{target}}/{{datname}}"), unit="short"),
        "Maintenance in progress",
        _t("bargauge", "Vacuum progress", "Share of the heap each running VACUUM has scanned, with its phase and kind "
           "(manual, autovacuum, wraparound). Empty while nothing runs.",
           Query(f"{sel('pg_stat_progress_vacuum_heap_blks_scanned')} / ({sel('pg_stat_progress_vacuum_heap_blks')} "
                 "> 0)", table + " {{phase}} ({{kind}})"), unit="percentunit", min=0, max=1, width=8),
        _t("timeseries", "Autovacuum workers", "Autovacuum workers by what they do, against autovacuum_max_workers: "
           f"all of them busy for {duration(c.autovacuum_workers.for_)} fires the alert (tables queue for vacuum).",
           Query(f"sum by (target, state) ({sel('pg_autovacuum_workers')})", "{{target}} {{state}}"),
           Query(sel("pg_settings_autovacuum_max_workers"), "{{target}} autovacuum_max_workers"), unit="short",
           width=8),
        _t("bargauge", "Index builds", "Share of the current phase's blocks each running CREATE INDEX or REINDEX "
           "has done. Empty while nothing runs.",
           Query(f"{sel('pg_stat_progress_create_index_blocks_done')} / "
                 f"({sel('pg_stat_progress_create_index_blocks')} > 0)",
                 "{{target}}/{{datname}} {{indexrelname}} {{phase}}"), unit="percentunit", min=0, max=1, width=8),
        "Indexes",
        _t("table", "Largest unused indexes", "Indexes nothing has scanned since the statistics reset that enforce "
           "nothing (not unique, primary or exclusion). Check standbys and rare jobs before dropping one.",
           Query(f"topk({TOP}, {sel('pg_index_unused_size_bytes')})", table=True, instant=True), unit="bytes",
           transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "__name__": True}}}]),
        _t("timeseries", "Unused index space", "Summed size of the unused indexes of each database; the info alert "
           f"fires above {c.unused_indexes.bytes / 2**20:g} MiB.",
           Query(sel("pg_index_unused_bytes"), "{{target}}/{{datname}}"), unit="bytes",
           thresholds=alarm(c.unused_indexes.bytes)),
        _t("bargauge", "Most scanned indexes", f"Index scans per second (top {TOP}).",
           Query(f"topk({TOP}, sum by (target, datname, schemaname, relname, indexrelname) "
                 f"({rate('pg_stat_user_indexes_scans_total')}))", "{{datname}} {{indexrelname}}"), unit="ops"),
        _t("bargauge", "Largest indexes", f"Index size as of its last VACUUM or ANALYZE (top {TOP}).",
           Query(f"topk({TOP}, {sel('pg_index_size_bytes', indexrelname='!other')})",
                 "{{datname}} {{indexrelname}}"), unit="bytes"),
        "Sequences",
        _t("bargauge", "Sequences closest to exhaustion", "Share of its range each sequence has used, bounded by the "
           "column it feeds (sequences over the exporter's floor, default 50 %); yellow at "
           f"{c.sequences.warning:.0%}, red at {c.sequences.critical:.0%} (the alerts).",
           Query(f"topk({TOP}, {sel('pg_sequence_used_ratio')})", "{{datname}} {{schemaname}}.{{sequencename}}"),
           unit="percentunit", min=0, max=1, thresholds=rising(c.sequences.warning, c.sequences.critical), width=12),
        _t("timeseries", "Highest sequence use per database", "The most used sequence of each database, whatever "
           "the floor; sequences the exporter's role cannot read are not measured (see the next panel).",
           Query(sel("pg_sequences_max_used_ratio"), "{{target}}/{{datname}}"), unit="percentunit", min=0,
           thresholds=rising(c.sequences.warning, c.sequences.critical), width=8),
        _t("stat", "Unreadable sequences", "Sequences whose value the exporter's role may not read (grant SELECT or "
           "pg_read_all_data): they are not watched.",
           Query(f"sum by (target) ({sel('pg_sequences_unreadable')})", "{{target}}"), unit="none",
           thresholds=rising(1), width=4),
        "Wraparound",
        _t("timeseries", "Transaction ID age towards wraparound", "Age of the oldest transaction and multixact "
           f"ID as a share of 2^31; yellow at {c.wraparound.warning:.0%}, red at {c.wraparound.critical:.0%} "
           "(the alerts).",
           Query(rules.wraparound_ratio("pg_database_xid_age", sel("pg_database_xid_age")),
                 "xid {{target}}/{{datname}}"),
           Query(rules.wraparound_ratio("pg_database_mxid_age", sel("pg_database_mxid_age")),
                 "multixact {{target}}/{{datname}}"),
           unit="percentunit", min=0, thresholds=rising(c.wraparound.warning, c.wraparound.critical)),
        _t("timeseries", "Transaction ID age", "Oldest transaction ID age per database and of its oldest table, "
           "against autovacuum_freeze_max_age (where anti-wraparound vacuum starts).",
           Query(sel("pg_database_xid_age"), "{{target}}/{{datname}}"),
           Query(sel("pg_database_oldest_table_xid_age"), "oldest table {{target}}/{{datname}}"),
           Query(sel("pg_settings_autovacuum_freeze_max_age"), "{{target}} autovacuum_freeze_max_age"),
           unit="short"),
        "Sizes",
        _t("timeseries", "Database size", "On-disk size of each database.",
           Query(sel("pg_database_size_bytes"), "{{target}}/{{datname}}"), unit="bytes"),
        _t("timeseries", "Database growth", "Size change per hour, from the size samples over the rate interval.",
           Query(f"deriv({sel('pg_database_size_bytes')}[$__rate_interval]) * 3600", "{{target}}/{{datname}}"),
           unit="bytes"),
        _t("bargauge", "Largest tables", f"Total size with indexes and TOAST (top {TOP}).",
           Query(f"topk({TOP}, {sel('pg_total_relation_size_bytes')})", table), unit="bytes"),
        _t("bargauge", "Fastest-growing tables", f"Total size change over the selected range (top {TOP}).",
           Query(f"topk({TOP}, delta({sel('pg_total_relation_size_bytes')}[{RANGE}]))", table), unit="bytes"),
    ]
    return dashboard(UID_STORAGE, "pgvitals / Storage", "Bloat, vacuum, wraparound and sizes.", panels,
                     [datasource_variable(), target_variable(), datname_variable()])


def replication_page(c: AlertsConfig) -> dict[str, Any]:
    """Standby lag, replication slots and WAL archiving."""
    standby = "{{target}} → {{application_name}}"
    slot = "{{target}} {{slot_name}}"
    panels: list[PanelSpec | str] = [
        "Lag",
        _t("timeseries", "Standby replay lag (seen on the standby)", "How far each standby's replay is behind "
           f"its primary; yellow at {duration(c.replication_lag.warning)}, red at "
           f"{duration(c.replication_lag.critical)} (the alerts; the RPO).",
           Query(sel("pg_replication_lag_seconds"), "{{target}}"), unit="s",
           thresholds=rising(c.replication_lag.warning, c.replication_lag.critical)),
        _t("timeseries", "Replay lag in bytes (seen on the primary)", "WAL each standby has received but not "
           f"replayed, from the primary; red at {c.replication_lag_bytes.bytes / 2**20:g} MiB (the alert).",
           Query(sel("pg_stat_replication_replay_lag_bytes"), standby), unit="bytes",
           thresholds=alarm(c.replication_lag_bytes.bytes)),
        _t("timeseries", "Standby lag stages (seen on the primary)", "Write, flush and replay lag of each standby "
           "as the primary measures them (sampled: empty while idle).",
           Query(sel("pg_stat_replication_write_lag_seconds"), "write " + standby),
           Query(sel("pg_stat_replication_flush_lag_seconds"), "flush " + standby),
           Query(sel("pg_stat_replication_replay_lag_seconds"), "replay " + standby), unit="s"),
        _t("stat", "Replay paused", "1 while replay is paused on a standby (pg_wal_replay_pause()).",
           Query(sel("pg_replication_replay_paused"), "{{target}}"), unit="none", thresholds=rising(1)),
        "Slots",
        _t("timeseries", "WAL retained by slots", "WAL each slot keeps from being recycled; red at "
           f"{c.slot_retained.bytes / 2**30:g} GiB (the alert).",
           Query(sel("pg_replication_slot_retained_bytes"), slot), unit="bytes",
           thresholds=alarm(c.slot_retained.bytes)),
        _t("stat", "Slot active", "Whether a consumer is connected to each slot; an inactive slot retains WAL "
           f"(alert after {duration(c.slot_inactive.for_)}).",
           Query(sel("pg_replication_slot_active"), slot), unit="none", mappings=[{"type": "value", "options": {
               "0": {"text": "inactive", "color": RED, "index": 0},
               "1": {"text": "active", "color": GREEN, "index": 1}}}], thresholds=steps((1, GREEN), base=RED)),
        "Logical replication (subscriber)",
        _t("timeseries", "Subscription apply workers", "Apply workers of each subscription on this subscriber: 0 "
           "while enabled means it is stopped (cannot connect, or errors and restarts); no worker for "
           f"{duration(c.subscription_stopped.for_)} fires the alert.",
           Query(sel("pg_subscription_apply_workers"), "{{target}}/{{datname}} {{subname}} apply"),
           Query(sel("pg_subscription_enabled"), "{{target}}/{{datname}} {{subname}} enabled"), unit="short",
           min=0, width=8),
        _t("timeseries", "Time since the publisher was heard from", "Seconds since each subscription's apply worker "
           "last received anything from its publisher; keepalives keep it under wal_sender_timeout / 2. Red at "
           f"{duration(c.subscription_silent.seconds)} (the alert).",
           Query(sel("pg_subscription_last_message_age_seconds"), "{{target}}/{{datname}} {{subname}}"), unit="s",
           thresholds=alarm(c.subscription_silent.seconds), width=8),
        _t("timeseries", "Subscription errors", "Apply and table synchronization errors per rate interval (15+); "
           f"the alert fires above {c.subscription_errors.count} in {duration(c.rate_window)} for "
           f"{duration(c.subscription_errors.for_)}.",
           Query(f"increase({sel('pg_subscription_apply_errors_total')}[$__rate_interval])",
                 "apply {{target}}/{{datname}} {{subname}}"),
           Query(f"increase({sel('pg_subscription_sync_errors_total')}[$__rate_interval])",
                 "sync {{target}}/{{datname}} {{subname}}"), unit="short", thresholds=rising(1), width=8),
        "WAL archiving",
        _t("timeseries", "Archiver", "Segments archived and archive_command failures per rate interval.",
           Query(f"increase({sel('pg_stat_archiver_archived_total')}[$__rate_interval])", "archived {{target}}"),
           Query(f"increase({sel('pg_stat_archiver_failed_total')}[$__rate_interval])", "failed {{target}}"),
           unit="short", overrides=[{"matcher": {"id": "byRegexp", "options": "failed.*"},
                                     "properties": [{"id": "color", "value": {"mode": "fixed",
                                                                              "fixedColor": RED}}]}]),
        _t("timeseries", "Time since last archived segment", "Age of the last successfully archived WAL segment.",
           Query(sel("pg_stat_archiver_last_archive_age_seconds"), "{{target}}"), unit="s"),
    ]
    return dashboard(UID_REPLICATION, "pgvitals / Replication",
                     "Standby lag, slots, logical subscriptions and WAL archiving.", panels,
                     [datasource_variable(), target_variable(), datname_variable()])


def connections_page(c: AlertsConfig) -> dict[str, Any]:
    """Server connections, application pools and PgBouncer."""
    pool = "{{target}}/{{database}} {{user}}"
    panels: list[PanelSpec | str] = [
        "Server",
        _t("timeseries", "Connection slots used", "Client sessions over usable max_connections; yellow at "
           f"{c.connections.warning:.0%}, red at {c.connections.critical:.0%} (the alerts).",
           Query(_connections_utilization(), "{{target}}"), unit="percentunit", min=0, max=1,
           thresholds=rising(c.connections.warning, c.connections.critical)),
        _t("timeseries", "Sessions by application", "Client sessions by application_name and state.",
           Query(f"sum by (target, application_name, state) ({sel('pg_connections')})",
                 "{{target}} {{application_name}} {{state}}"), unit="short", stack=True),
        "Application pools",
        _t("bargauge", "Pool utilization", "Each declared application pool's sessions over its capacity; red at "
           f"{c.pool_utilization.utilization:.0%} (the alert).",
           Query(_pool_utilization(), "{{target}} {{pool}}"), unit="percentunit", min=0, max=1,
           thresholds=rising(c.pool_utilization.utilization * 0.8, c.pool_utilization.utilization)),
        _t("timeseries", "Pool sessions against capacity", "Sessions of each pool by state, and its capacity.",
           Query(f"sum by (target, pool, state) ({sel('pg_pool_connections')})", "{{target}} {{pool}} {{state}}"),
           Query(sel("pg_pool_capacity"), "{{target}} {{pool}} capacity"), unit="short"),
        "PgBouncer",
        _t("timeseries", "Clients waiting", "Clients queued for a server connection; any for "
           f"{duration(c.pgbouncer_waiting.for_)} fires the alert.",
           Query(sel("pgbouncer_pools_client_waiting_connections"), pool), unit="short",
           thresholds=rising(c.pgbouncer_waiting.clients + 1)),
        _t("timeseries", "Longest client wait", "How long the oldest waiting client of each pool has waited.",
           Query(sel("pgbouncer_pools_client_maxwait_seconds"), pool), unit="s", thresholds=rising(1, 5)),
        _t("timeseries", "Server connections", "Server connections per pool: active (linked to a client) and idle, "
           "against pool_size.",
           Query(sel("pgbouncer_pools_server_active_connections"), "active " + pool),
           Query(sel("pgbouncer_pools_server_idle_connections"), "idle " + pool),
           Query(sel("pgbouncer_databases_pool_size"), "pool_size {{target}}/{{database}}"), unit="short"),
        _t("timeseries", "Client wait time", "Seconds clients spent waiting for a server per second of wall time.",
           Query(f"sum by (target, database) ({rate('pgbouncer_stats_client_wait_seconds_total')})",
                 "{{target}}/{{database}}"), unit="s"),
    ]
    return dashboard(UID_CONNECTIONS, "pgvitals / Connections and pools",
                     "Server connection slots, declared application pools and PgBouncer pools.", panels,
                     [datasource_variable(), target_variable(), datname_variable()])


def cache_page(c: AlertsConfig) -> dict[str, Any]:
    """Buffer cache hit ratios: databases, tables, indexes."""
    table = "{{datname}} {{schemaname}}.{{relname}}"
    key = "target, datname, schemaname, relname"
    heap_hit, heap_read = rate("pg_statio_user_tables_heap_blks_hit_total"), rate(
        "pg_statio_user_tables_heap_blks_read_total")
    idx_hit, idx_read = rate("pg_statio_user_indexes_idx_blks_hit_total"), rate(
        "pg_statio_user_indexes_idx_blks_read_total")
    panels: list[PanelSpec | str] = [
        _t("timeseries", "Cache hit by database", "Share of block accesses served from shared buffers, as a ratio "
           f"of summed rates; red below {c.cache_hit.ratio:.0%} (the alert, which also requires more than "
           f"{c.cache_hit.min_blocks_per_second:g} block accesses/s).",
           Query(_cache_hit("by (target, datname)"), "{{target}}/{{datname}}"), unit="percentunit", decimals=2,
           max=1, thresholds=falling(c.cache_hit.ratio)),
        _t("timeseries", "Block accesses", "Blocks read from disk (or the OS cache) and found in shared buffers "
           "per second: the traffic behind the ratio.",
           Query(f"sum by (target, datname) ({rate('pg_stat_database_blks_read_total')})",
                 "read {{target}}/{{datname}}"),
           Query(f"sum by (target, datname) ({rate('pg_stat_database_blks_hit_total')})",
                 "hit {{target}}/{{datname}}"), unit="short"),
        _t("bargauge", "Tables reading most from disk", f"Heap blocks read per second (top {TOP}).",
           Query(f"topk({TOP}, sum by ({key}) ({heap_read}))", table), unit="short",
           thresholds=steps((1, ORANGE))),
        _t("bargauge", "Tables with the lowest cache hit", f"Heap hit ratio of tables with block accesses in the "
           f"rate interval (the {TOP} lowest).",
           Query(f"bottomk({TOP}, sum by ({key}) ({heap_hit}) / (sum by ({key}) ({heap_hit}) + "
                 f"sum by ({key}) ({heap_read}) > 0))", table),
           unit="percentunit", min=0, max=1, thresholds=falling(c.cache_hit.ratio)),
        _t("bargauge", "Indexes with the lowest cache hit", f"Index hit ratio of indexes with block accesses in "
           f"the rate interval (the {TOP} lowest).",
           Query(f"bottomk({TOP}, sum by ({key}, indexrelname) ({idx_hit}) / (sum by ({key}, indexrelname) "
                 f"({idx_hit}) + sum by ({key}, indexrelname) ({idx_read}) > 0))", "{{datname}} {{indexrelname}}"),
           unit="percentunit", min=0, max=1, thresholds=falling(c.cache_hit.ratio)),
        _t("bargauge", "Indexes reading most from disk", f"Index blocks read per second (top {TOP}).",
           Query(f"topk({TOP}, sum by ({key}, indexrelname) ({idx_read}))", "{{datname}} {{indexrelname}}"),
           unit="short", thresholds=steps((1, ORANGE))),
    ]
    return dashboard(UID_CACHE, "pgvitals / Cache hit", "Shared buffer hit ratios of databases, tables and indexes.",
                     panels, [datasource_variable(), target_variable(), datname_variable()])


#: File name -> builder, in the order of the drill-down.
PAGES: dict[str, Callable[[AlertsConfig], dict[str, Any]]] = {
    "overview.json": overview,
    "target.json": target_page,
    "queries.json": queries_page,
    "locks.json": locks_page,
    "storage.json": storage_page,
    "replication.json": replication_page,
    "connections.json": connections_page,
    "cache.json": cache_page,
}
