"""Prometheus alert and recording rules, built from catalog look-ups and the configured thresholds.

Every metric goes through :func:`exporter.dashboards.promql.m`, so a rule naming a metric the catalog
does not declare fails at generation. The ratios that dashboards and alerts share are written once here
(functions taking the rate window), recorded for the alerts with the configured window and used by the
dashboards with ``$__rate_interval``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from exporter import catalog as catalog_module
from exporter.config import AlertsConfig, Settings
from exporter.dashboards.promql import WRAPAROUND_HORIZON, duration, m, number

Severity = Literal["critical", "warning", "info"]

#: Recording rule names (level:metric:operations, see Prometheus' naming practices).
CACHE_HIT_DB = "target_datname:pg_cache_hit:ratio"
CACHE_HIT_TARGET = "target:pg_cache_hit:ratio"
BLOCKS_DB = "target_datname:pg_blocks_accessed:rate"
CONNECTIONS_UTILIZATION = "target:pg_connections:utilization"
POOL_UTILIZATION = "target_pool:pg_pool:utilization"
STATEMENT_MEAN = "target_statement:pg_stat_statements_exec:mean_seconds"
WRAPAROUND = "target_datname:pg_wraparound:ratio"

RULE_FILE = "pgvitals.rules.yml"


# -- the shared ratios --------------------------------------------------------------------------------------------

def blocks_rate(window: str, by: str = "") -> str:
    """Shared-buffer block accesses (hits + reads) per second."""
    hit, read = m("pg_stat_database_blks_hit_total"), m("pg_stat_database_blks_read_total")
    if by:
        return f"sum {by} (rate({hit}[{window}])) + sum {by} (rate({read}[{window}]))"
    return f"rate({hit}[{window}]) + rate({read}[{window}])"


def cache_hit_ratio(window: str, by: str = "", hit_selector: str = "", read_selector: str = "") -> str:
    """Buffer cache hit ratio as a ratio of summed rates; absent (not 0 or NaN) without any block access."""
    hit = hit_selector or m("pg_stat_database_blks_hit_total")
    read = read_selector or m("pg_stat_database_blks_read_total")
    def total(selector: str) -> str:
        return f"sum {by} (rate({selector}[{window}]))" if by else f"rate({selector}[{window}])"

    return f"{total(hit)} / ({total(hit)} + {total(read)} > 0)"


def connections_utilization(connections: str = "", connections_max: str = "") -> str:
    """Client sessions as a fraction of the slots ordinary roles may use."""
    sessions = connections or m("pg_connections")
    limit = connections_max or m("pg_connections_max")
    return f"sum without (datname, usename, application_name, state) ({sessions}) / {limit}"


def pool_utilization(connections: str = "", capacity: str = "") -> str:
    """An application pool's sessions (every state) as a fraction of its declared capacity."""
    sessions = connections or m("pg_pool_connections")
    limit = capacity or m("pg_pool_capacity")
    return f"sum without (state) ({sessions}) / {limit}"


def statement_mean_seconds(window: str, exec_selector: str = "", calls_selector: str = "") -> str:
    """Mean execution time per call of each statement over the window; absent when it was not called."""
    exec_time = exec_selector or m("pg_stat_statements_exec_seconds_total")
    calls = calls_selector or m("pg_stat_statements_calls_total")
    return f"rate({exec_time}[{window}]) / (rate({calls}[{window}]) > 0)"


def wraparound_ratio(age_metric: str, selector: str = "") -> str:
    """An ID age as a fraction of the 2^31 wraparound horizon."""
    return f"{selector or m(age_metric)} / {WRAPAROUND_HORIZON}"


# -- rule model ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recording:
    """A recording rule."""

    record: str
    expr: str
    group: str  # the alert group that uses it: evaluated first in that group, so alerts see this evaluation's value
    labels: dict[str, str] = field(default_factory=dict)

    def to_yaml(self) -> dict[str, Any]:
        """The rule as it appears in a Prometheus rule file."""
        out: dict[str, Any] = {"record": self.record, "expr": self.expr}
        if self.labels:
            out["labels"] = dict(self.labels)
        return out


@dataclass(frozen=True)
class Alert:
    """An alerting rule with its severity, texts and runbook anchor."""

    name: str
    group: str
    expr: str
    for_: float
    severity: Severity
    summary: str
    description: str
    config_key: str  # the `alerts:` key holding its thresholds

    def to_yaml(self, config: AlertsConfig) -> dict[str, Any]:
        """The rule as it appears in a Prometheus rule file."""
        out: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.for_ > 0:
            out["for"] = duration(self.for_)
        out["labels"] = {"severity": self.severity, **config.labels}
        out["annotations"] = {
            "summary": self.summary,
            "description": self.description,
            "runbook_url": f"{config.runbook_url}#{self.name.lower()}",
        }
        return out


def recording_rules(config: AlertsConfig) -> list[Recording]:
    """The ratios that dashboards and alerts share, recorded over the configured rate window."""
    window = duration(config.rate_window)
    return [
        Recording(CONNECTIONS_UTILIZATION, connections_utilization(), "connections"),
        Recording(POOL_UTILIZATION, pool_utilization(), "connections"),
        Recording(STATEMENT_MEAN, statement_mean_seconds(window), "queries"),
        Recording(CACHE_HIT_DB, cache_hit_ratio(window), "queries"),
        Recording(BLOCKS_DB, blocks_rate(window), "queries"),
        Recording(CACHE_HIT_TARGET, cache_hit_ratio(window, by="without (datname)"), "queries"),
        Recording(WRAPAROUND, wraparound_ratio("pg_database_xid_age"), "storage", {"kind": "xid"}),
        Recording(WRAPAROUND, wraparound_ratio("pg_database_mxid_age"), "storage", {"kind": "multixact"}),
    ]


def _bloat(prefix: str, ratio: float, min_bytes: int) -> str:
    """Tables whose bloat ratio is above ``ratio`` and whose size (bloat bytes / ratio) is above ``min_bytes``."""
    share, wasted = m(f"{prefix}_ratio"), m(f"{prefix}_bytes")
    return f"({share} > {number(ratio)} and {wasted} / {share} > {min_bytes})"


def _stale_expr(settings: Settings) -> str:
    """Data age above ``intervals`` times each collector's effective interval (collectors grouped by interval)."""
    from exporter.planner import effective_collectors

    factor = settings.alerts.collector_stale.intervals
    by_interval: dict[float, list[str]] = defaultdict(list)
    for eff in effective_collectors(catalog_module.load(), settings):
        if eff.enabled:
            by_interval[eff.interval].append(eff.collector.name)
    parts = [
        f"{m('pgvitals_collector_data_age_seconds', collector='~' + '|'.join(sorted(names)))}"
        f" > {number(round(interval * factor, 3))}"
        for interval, names in sorted(by_interval.items())
    ]
    return " or ".join(f"({part})" for part in parts) if len(parts) > 1 else parts[0]


def alert_rules(settings: Settings) -> list[Alert]:
    """Every alert rule, with thresholds and durations from ``settings.alerts`` (disabled ones left out)."""
    c = settings.alerts
    window = duration(c.rate_window)
    target = "{{ $labels.target }}"
    db = "{{ $labels.target }}/{{ $labels.datname }}"
    pct = "{{ $value | humanizePercentage }}"
    rules = [
        Alert("PgvitalsExporterDown", "availability", f'{m("up", job=c.job)} == 0', c.exporter_down.for_,
              "critical", "pgvitals exporter {{ $labels.instance }} cannot be scraped",
              "Prometheus has not scraped job {{ $labels.job }} at {{ $labels.instance }} successfully for "
              f"{duration(c.exporter_down.for_)}: every PostgreSQL alert below is blind until it is back.",
              "exporter_down"),
        Alert("PostgresDown", "availability", f"{m('pg_up')} == 0", c.postgres_down.for_, "critical",
              f"PostgreSQL {target} is down or refuses the exporter",
              f"pgvitals could not connect to PostgreSQL target {target} for {duration(c.postgres_down.for_)} "
              "(instance {{ $labels.instance }}).", "postgres_down"),
        Alert("PgBouncerDown", "availability", f"{m('pgbouncer_up')} == 0", c.pgbouncer_down.for_, "critical",
              f"PgBouncer {target} is down or refuses the exporter",
              f"pgvitals could not connect to the PgBouncer admin console of {target} for "
              f"{duration(c.pgbouncer_down.for_)}.", "pgbouncer_down"),
        Alert("PostgresConnectionsHigh", "connections", f"{CONNECTIONS_UTILIZATION} > {number(c.connections.warning)}",
              c.connections.for_, "warning", f"PostgreSQL {target} uses {pct} of its connection slots",
              f"Client sessions on {target} are at {pct} of the slots ordinary roles may use (max_connections "
              f"minus reserved), above {number(c.connections.warning * 100)} % for {duration(c.connections.for_)}.",
              "connections"),
        Alert("PostgresConnectionsCritical", "connections",
              f"{CONNECTIONS_UTILIZATION} > {number(c.connections.critical)}", c.connections.for_, "critical",
              f"PostgreSQL {target} is about to refuse connections ({pct} used)",
              f"Client sessions on {target} are at {pct} of the usable slots (threshold "
              f"{number(c.connections.critical * 100)} %): new application connections will soon fail with "
              "'too many clients'.", "connections"),
        Alert("PostgresPoolSaturated", "connections",
              f"{POOL_UTILIZATION} > {number(c.pool_utilization.utilization)}", c.pool_utilization.for_, "warning",
              "Application pool {{ $labels.pool }} on " + target + f" is at {pct} of its capacity",
              "Pool {{ $labels.pool }} holds " + pct + " of its declared capacity on " + target + " (threshold "
              f"{number(c.pool_utilization.utilization * 100)} %) for {duration(c.pool_utilization.for_)}: "
              "requests will wait for a connection (SQLAlchemy pool_timeout, SQLx acquire_timeout).",
              "pool_utilization"),
        Alert("PgBouncerClientsWaiting", "connections",
              f"{m('pgbouncer_pools_client_waiting_connections')} > {c.pgbouncer_waiting.clients}",
              c.pgbouncer_waiting.for_, "warning",
              "PgBouncer " + target + " has {{ $value }} clients waiting on {{ $labels.database }}/{{ $labels.user }}",
              "{{ $value }} clients of pool {{ $labels.database }}/{{ $labels.user }} on PgBouncer " + target
              + f" have waited for a server connection for {duration(c.pgbouncer_waiting.for_)}: pool_size is too "
              "small for the load or server queries are slow.", "pgbouncer_waiting"),
        Alert("PostgresReplicationLag", "replication",
              f"{m('pg_replication_lag_seconds')} > {number(c.replication_lag.warning)}", c.replication_lag.for_,
              "warning", f"Standby {target} replays {{{{ $value | humanizeDuration }}}} behind its primary",
              f"Standby {target} is {{{{ $value | humanizeDuration }}}} behind (threshold "
              f"{duration(c.replication_lag.warning)}): reads there are stale and a failover would lose that much.",
              "replication_lag"),
        Alert("PostgresReplicationLagCritical", "replication",
              f"{m('pg_replication_lag_seconds')} > {number(c.replication_lag.critical)}", c.replication_lag.for_,
              "critical", f"Standby {target} is {{{{ $value | humanizeDuration }}}} behind: beyond the RPO",
              f"Standby {target} is {{{{ $value | humanizeDuration }}}} behind its primary, past "
              f"{duration(c.replication_lag.critical)} (the recovery point objective): a failover now loses more "
              "data than planned.", "replication_lag"),
        Alert("PostgresReplicationLagBytes", "replication",
              f"{m('pg_stat_replication_replay_lag_bytes')} > {c.replication_lag_bytes.bytes}",
              c.replication_lag_bytes.for_, "warning",
              "Standby {{ $labels.application_name }} of " + target + " is {{ $value | humanize1024 }}B behind",
              "The primary " + target + " has sent WAL that standby {{ $labels.application_name }} "
              "({{ $labels.client_addr }}) has not replayed: {{ $value | humanize1024 }}B, above "
              f"{c.replication_lag_bytes.bytes} bytes for {duration(c.replication_lag_bytes.for_)}.",
              "replication_lag_bytes"),
        Alert("PostgresReplicationSlotInactive", "replication", f"{m('pg_replication_slot_active')} == 0",
              c.slot_inactive.for_, "warning",
              "Replication slot {{ $labels.slot_name }} on " + target + " is inactive",
              "Slot {{ $labels.slot_name }} ({{ $labels.slot_type }}) on " + target + " has had no consumer for "
              f"{duration(c.slot_inactive.for_)}: it keeps WAL (and for logical slots, catalog rows) until it is "
              "consumed or dropped.", "slot_inactive"),
        Alert("PostgresReplicationSlotRetainingWal", "replication",
              f"{m('pg_replication_slot_retained_bytes')} > {c.slot_retained.bytes}", c.slot_retained.for_,
              "warning", "Slot {{ $labels.slot_name }} on " + target + " retains {{ $value | humanize1024 }}B of WAL",
              "Replication slot {{ $labels.slot_name }} on " + target + " holds back {{ $value | humanize1024 }}B "
              f"of WAL (threshold {c.slot_retained.bytes} bytes): the disk fills if its consumer does not "
              "catch up.", "slot_retained"),
        Alert("PostgresWalArchivingFailing", "replication",
              f"increase({m('pg_stat_archiver_failed_total')}[{window}]) > 0 "
              f"unless {m('pg_stat_archiver_last_archive_age_seconds')} "
              f"< {m('pg_stat_archiver_last_failure_age_seconds')}",
              c.archiving.for_, "critical", f"WAL archiving is failing on {target}",
              f"archive_command failed {{{{ $value | humanize }}}} times in the last {window} on {target} and has "
              "not succeeded since: WAL piles up in pg_wal and point-in-time recovery falls behind.",
              "archiving"),
        Alert("PostgresLongRunningQuery", "activity",
              f"{m('pg_stat_activity_max_query_duration_seconds')} > {number(c.long_query.seconds)}",
              c.long_query.for_, "warning", f"A query on {db} has run for {{{{ $value | humanizeDuration }}}}",
              f"The longest active query on {db} has been running for {{{{ $value | humanizeDuration }}}} "
              f"(threshold {duration(c.long_query.seconds)}).", "long_query"),
        Alert("PostgresIdleInTransaction", "activity",
              f"{m('pg_stat_activity_max_idle_in_transaction_seconds')} > {number(c.idle_in_transaction.seconds)}",
              c.idle_in_transaction.for_, "warning",
              f"A session on {db} is idle in transaction for {{{{ $value | humanizeDuration }}}}",
              f"A session on {db} has been idle inside an open transaction for {{{{ $value | humanizeDuration }}}} "
              f"(threshold {duration(c.idle_in_transaction.seconds)}): it holds its locks and snapshot, which "
              "blocks vacuum.", "idle_in_transaction"),
        Alert("PostgresLockWaits", "activity",
              f"{m('pg_lock_wait_max_seconds')} > {number(c.lock_wait.seconds)}", c.lock_wait.for_, "warning",
              f"Sessions on {db} wait for locks for {{{{ $value | humanizeDuration }}}}",
              f"The oldest lock wait on {db} is {{{{ $value | humanizeDuration }}}} (threshold "
              f"{duration(c.lock_wait.seconds)}): a blocking chain is holding up work.", "lock_wait"),
        Alert("PostgresDeadlocks", "activity",
              f"increase({m('pg_stat_database_deadlocks_total')}[{window}]) > {c.deadlocks.count}",
              c.deadlocks.for_, "warning", f"Deadlocks on {db}",
              f"{{{{ $value | humanize }}}} deadlocks were detected on {db} in the last {window}; each aborted a "
              "transaction.", "deadlocks"),
        Alert("PostgresSlowStatements", "queries", f"{STATEMENT_MEAN} > {number(c.slow_statements.mean_seconds)}",
              c.slow_statements.for_, "warning",
              "Statement {{ $labels.queryid }} on " + db + " takes {{ $value | humanizeDuration }} per call",
              "Statement {{ $labels.queryid }} of {{ $labels.usename }} on " + db + " averaged "
              f"{{{{ $value | humanizeDuration }}}} per call over the last {window} (threshold "
              f"{duration(c.slow_statements.mean_seconds)}).", "slow_statements"),
        Alert("PostgresCacheHitLow", "queries",
              f"{CACHE_HIT_DB} < {number(c.cache_hit.ratio)} "
              f"and {BLOCKS_DB} > {number(c.cache_hit.min_blocks_per_second)}",
              c.cache_hit.for_, "warning", f"Cache hit ratio on {db} is {pct}",
              f"Only {pct} of block accesses on {db} were served from shared buffers over the last {window} "
              f"(threshold {number(c.cache_hit.ratio * 100)} %, under more than "
              f"{number(c.cache_hit.min_blocks_per_second)} block accesses/s): the working set no longer fits.",
              "cache_hit"),
        Alert("PostgresTableBloat", "storage",
              f"{_bloat('pg_table_bloat_measured', c.bloat.ratio, c.bloat.min_table_bytes)} or ignoring (method) "
              f"({_bloat('pg_table_bloat', c.bloat.ratio, c.bloat.min_table_bytes)} "
              f"unless ignoring (method) {m('pg_table_bloat_measured_ratio')})",
              c.bloat.for_, "info",
              "Table {{ $labels.schemaname }}.{{ $labels.relname }} on " + db + " is " + pct + " bloat",
              "About " + pct + " of table {{ $labels.schemaname }}.{{ $labels.relname }} on " + db
              + " is dead space, {{ $labels.method }} (threshold " + f"{number(c.bloat.ratio * 100)} % on tables over "
              f"{c.bloat.min_table_bytes} bytes; a measurement by pgstattuple_approx wins over the estimate).",
              "bloat"),
        Alert("PostgresWraparoundWarning", "storage", f"{WRAPAROUND} > {number(c.wraparound.warning)}",
              c.wraparound.for_, "warning", f"{{{{ $labels.kind }}}} ID age on {db} is {pct} of wraparound",
              f"The oldest {{{{ $labels.kind }}}} ID in {db} is {pct} of the way to wraparound (2^31); "
              "anti-wraparound vacuum is not keeping up.", "wraparound"),
        Alert("PostgresWraparoundCritical", "storage", f"{WRAPAROUND} > {number(c.wraparound.critical)}",
              c.wraparound.for_, "critical", f"{{{{ $labels.kind }}}} ID wraparound approaching on {db} ({pct})",
              f"The oldest {{{{ $labels.kind }}}} ID in {db} is {pct} of the way to wraparound: PostgreSQL stops "
              "accepting writes before it gets there.", "wraparound"),
        Alert("PgvitalsCollectorFailing", "exporter", f"{m('pgvitals_collector_success')} == 0",
              c.collector_failing.for_, "warning",
              "Collector {{ $labels.collector }} fails on " + target,
              "pgvitals collector {{ $labels.collector }} has failed on " + target + " for "
              f"{duration(c.collector_failing.for_)}; its metrics are missing (see pgvitals_collector_errors_total "
              "for the reason and the exporter log).", "collector_failing"),
        Alert("PgvitalsCollectorStale", "exporter", _stale_expr(settings), c.collector_stale.for_, "warning",
              "Data of collector {{ $labels.collector }} on " + target + " is {{ $value | humanizeDuration }} old",
              "pgvitals has not refreshed collector {{ $labels.collector }} on " + target + " for "
              f"{{{{ $value | humanizeDuration }}}}, more than {number(c.collector_stale.intervals)} of its "
              "intervals: its runs are slow or stuck.", "collector_stale"),
    ]
    return [rule for rule in rules if getattr(c, rule.config_key).enabled]


def rule_groups(settings: Settings) -> dict[str, Any]:
    """The whole rule file as a mapping: one group per alert family, its recording rules first.

    Rules of one group run in order at the same evaluation time, so an alert sees the value its recording
    rule produced in that evaluation (across groups it would see the previous one, or not, by chance).
    """
    config = settings.alerts
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rule in recording_rules(config):
        by_group[rule.group].append(rule.to_yaml())
    for alert in alert_rules(settings):
        by_group[alert.group].append(alert.to_yaml(config))
    return {"groups": [{"name": f"pgvitals.{name}", "rules": rules} for name, rules in by_group.items()]}


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings; never aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_rules(settings: Settings) -> str:
    """The rule file as YAML text."""
    header = ("# Generated by `pgvitals alerts` from the metric catalog and the `alerts:` configuration.\n"
              "# Do not edit: change the configuration and regenerate (a test fails when this file is stale).\n")
    return header + yaml.dump(rule_groups(settings), Dumper=_Dumper, sort_keys=False, width=10_000,
                              allow_unicode=True)
