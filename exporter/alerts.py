"""Prometheus alert and recording rules, built from catalog look-ups and the configured thresholds.

Alerts are declared as keyword data (``ALERTS``) whose expressions and texts share one ``{name}`` template
style. Every metric goes through :func:`exporter.dashboards.promql.m`, so a rule naming a metric the catalog
does not declare fails at generation, and label lists (``without (...)``) are checked against or derived from
the catalog. The ratios that dashboards and alerts share are written once here
(functions taking the rate window), recorded for the alerts with the configured window and used by the
dashboards with ``$__rate_interval``.
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml

from exporter import catalog as catalog_module
from exporter.config import AlertsConfig, Settings
from exporter.dashboards.promql import WRAPAROUND_HORIZON, duration, grouping, labels_beyond, m, number

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
RUNBOOK_PAGE = "runbooks.md"
#: Where the runbooks are when no ``alerts.runbook_base_url`` is set: relative to the repository root.
RELATIVE_RUNBOOKS = f"docs/{RUNBOOK_PAGE}"


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
    per_slot = grouping("without", labels_beyond("pg_connections", "pg_connections_max"), "pg_connections")
    return f"sum {per_slot} ({sessions}) / {limit}"


def pool_utilization(connections: str = "", capacity: str = "") -> str:
    """An application pool's sessions (every state) as a fraction of its declared capacity."""
    sessions = connections or m("pg_pool_connections")
    limit = capacity or m("pg_pool_capacity")
    per_pool = grouping("without", labels_beyond("pg_pool_connections", "pg_pool_capacity"), "pg_pool_connections")
    return f"sum {per_pool} ({sessions}) / {limit}"


def statement_mean_seconds(window: str, exec_selector: str = "", calls_selector: str = "") -> str:
    """Mean execution time per call of each statement over the window; absent when it was not called."""
    exec_time = exec_selector or m("pg_stat_statements_exec_seconds_total")
    calls = calls_selector or m("pg_stat_statements_calls_total")
    return f"rate({exec_time}[{window}]) / (rate({calls}[{window}]) > 0)"


def autovacuum_workers(selector: str = "") -> str:
    """Autovacuum workers running on each server, whatever they do, comparable with autovacuum_max_workers."""
    per_target = grouping("without", labels_beyond("pg_autovacuum_workers", "pg_settings_autovacuum_max_workers"),
                          "pg_autovacuum_workers")
    return f"sum {per_target} ({selector or m('pg_autovacuum_workers')})"


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


def runbook_url(config: AlertsConfig, anchor: str) -> str:
    """The link to ``anchor`` in the runbooks: absolute when ``runbook_base_url`` is set, else repository-relative.

    The base is where docs/ is published (a GitHub ``.../blob/main/docs`` URL, a docs site): ``runbooks.md`` is
    appended. A base whose last path segment is a page (``.md``, ``.html``) or that ends in ``#`` (a wiki page of
    any name) is the runbook page itself.
    """
    base = config.runbook_base_url
    if base is None:
        return f"{RELATIVE_RUNBOOKS}#{anchor}"
    if base.endswith("#"):
        return base + anchor
    parts = urlsplit(base)
    last = parts.path.rpartition("/")[2]
    path = parts.path if last.endswith((".md", ".html", ".htm")) else f"{parts.path.rstrip('/')}/{RUNBOOK_PAGE}"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, anchor))


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
            "runbook_url": runbook_url(config, self.name.lower()),
        }
        return out


def recording_rules(config: AlertsConfig) -> list[Recording]:
    """The ratios that dashboards and alerts share, recorded over the configured rate window."""
    window = duration(config.rate_window)
    per_target = grouping("without", labels_beyond("pg_stat_database_blks_hit_total", "pg_up"),
                          "pg_stat_database_blks_hit_total", "pg_stat_database_blks_read_total")
    return [
        Recording(CONNECTIONS_UTILIZATION, connections_utilization(), "connections"),
        Recording(POOL_UTILIZATION, pool_utilization(), "connections"),
        Recording(STATEMENT_MEAN, statement_mean_seconds(window), "queries"),
        Recording(CACHE_HIT_DB, cache_hit_ratio(window), "queries"),
        Recording(BLOCKS_DB, blocks_rate(window), "queries"),
        Recording(CACHE_HIT_TARGET, cache_hit_ratio(window, by=per_target), "queries"),
        Recording(WRAPAROUND, wraparound_ratio("pg_database_xid_age"), "storage", {"kind": "xid"}),
        Recording(WRAPAROUND, wraparound_ratio("pg_database_mxid_age"), "storage", {"kind": "multixact"}),
    ]


# -- declarations -------------------------------------------------------------------------------------------------
#
# One templating style for expressions and texts: ``{name}`` fields filled by str.format.
# - In texts, what Prometheus fills at evaluation: {target}, {db} (target/datname), {labels.NAME}, {value},
#   {value_pct}, {value_age}, {value_bytes} (binary prefixes, with B), {value_count}.
# - Everywhere, the alert's settings (its `alerts:` section): {warning}, {seconds}, ... as PromQL numbers;
#   ``:%`` gives percent, ``:dur`` a duration; {for} and {window} are durations.
# - In expressions, any catalog metric by name ({pg_up}, checked by promql.m), the recording rules and label
#   lists in RULE_NAMES; {up} is the scrape health of the configured job; {IGNORING_METHOD} and
#   {AUTOVACUUM_WORKERS} are built from the catalog's label lists.

#: Label lists and recording rule names expressions may use, derived from the catalog where they are label lists.
RULE_NAMES: Mapping[str, str] = {
    "CONNECTIONS_UTILIZATION": CONNECTIONS_UTILIZATION,
    "POOL_UTILIZATION": POOL_UTILIZATION,
    "STATEMENT_MEAN": STATEMENT_MEAN,
    "CACHE_HIT_DB": CACHE_HIT_DB,
    "BLOCKS_DB": BLOCKS_DB,
    "WRAPAROUND": WRAPAROUND,
}


def _bloat_method() -> str:
    """``ignoring (method)``: the label that tells a measured bloat figure from an estimated one of a table."""
    return grouping("ignoring", ("method",), "pg_table_bloat_ratio", "pg_table_bloat_measured_ratio")


@dataclass(frozen=True)
class AlertSpec:
    """The declaration of one alert: keyword data, texts and expression in the one ``{name}`` template style."""

    name: str
    group: str
    config: str  # the `alerts:` key holding its switch, `for` and thresholds
    severity: Severity
    expr: str | Callable[[Settings], str | None]  # a callable for expressions built from more than one section
    summary: str
    description: str


class _Labels:
    """``{labels.pool}`` in a text: the label's value when Prometheus renders the annotation."""

    def __getattr__(self, name: str) -> str:
        return "{{ $labels." + name + " }}"


#: What Prometheus fills in when it renders an annotation (Go templates); texts name them, never spell them.
RUNTIME: Mapping[str, object] = {
    "target": "{{ $labels.target }}",
    "db": "{{ $labels.target }}/{{ $labels.datname }}",
    "labels": _Labels(),
    "value": "{{ $value }}",
    "value_pct": "{{ $value | humanizePercentage }}",
    "value_age": "{{ $value | humanizeDuration }}",
    "value_bytes": "{{ $value | humanize1024 }}B",
    "value_count": "{{ $value | humanize }}",
}


@dataclass(frozen=True)
class _Setting:
    """A configured value: a PromQL number by default, ``:%`` in percent, ``:dur`` as a duration."""

    value: float

    def __format__(self, spec: str) -> str:
        if spec == "%":
            return number(self.value * 100)
        if spec == "dur":
            return duration(self.value)
        if spec:
            raise ValueError(f"unknown format {spec!r} for a setting (use '', '%' or 'dur')")
        return number(self.value)


class _Fields(dict[str, object]):
    """The values of one alert's template fields; an unknown name in an expression is a catalog metric."""

    def __init__(self, settings: Settings, section: Any, metrics: bool):
        super().__init__()
        self.metrics = metrics
        for name, value in section:
            if isinstance(value, int | float) and not isinstance(value, bool):
                self[name.rstrip("_")] = _Setting(value)
        self["for"] = duration(section.for_)
        self["window"] = duration(settings.alerts.rate_window)
        if metrics:
            self.update(RULE_NAMES)
            self["up"] = m("up", job=settings.alerts.job)
            self["IGNORING_METHOD"] = _bloat_method()
            self["AUTOVACUUM_WORKERS"] = autovacuum_workers()
        else:
            self.update(RUNTIME)

    def __missing__(self, name: str) -> str:
        if not self.metrics:
            raise KeyError(f"{{{name}}} is not a setting of this alert nor a value Prometheus fills in")
        return m(name)


def fill(template: str, settings: Settings, section: Any, metrics: bool) -> str:
    """``template`` with its ``{name}`` fields filled for an expression (``metrics``) or an annotation."""
    return string.Formatter().vformat(template, (), _Fields(settings, section, metrics))


def _stale_expr(settings: Settings) -> str | None:
    """Data age above ``intervals`` times each collector's effective interval (collectors grouped by interval).

    None when no collector is enabled: there is no data to go stale, so the alert is left out.
    """
    from exporter.planner import effective_collectors

    factor = settings.alerts.collector_stale.intervals
    by_interval: dict[float, list[str]] = defaultdict(list)
    for eff in effective_collectors(catalog_module.Catalog.builtin(), settings):
        if eff.enabled:
            by_interval[eff.interval].append(eff.collector.name)
    parts = [
        f"{m('pgvitals_collector_data_age_seconds', collector='~' + '|'.join(sorted(names)))}"
        f" > {number(round(interval * factor, 3))}"
        for interval, names in sorted(by_interval.items())
    ]
    if len(parts) <= 1:
        return parts[0] if parts else None
    return " or ".join(f"({part})" for part in parts)


ALERTS: tuple[AlertSpec, ...] = (
    AlertSpec(
        name="PgvitalsExporterDown", group="availability", config="exporter_down", severity="critical",
        expr="{up} == 0",
        summary="pgvitals exporter {labels.instance} cannot be scraped",
        description="Prometheus has not scraped job {labels.job} at {labels.instance} successfully for {for}: "
                    "every PostgreSQL alert below is blind until it is back.",
    ),
    AlertSpec(
        name="PostgresDown", group="availability", config="postgres_down", severity="critical",
        expr="{pg_up} == 0",
        summary="PostgreSQL {target} is down or refuses the exporter",
        description="pgvitals could not connect to PostgreSQL target {target} for {for} "
                    "(instance {labels.instance}).",
    ),
    AlertSpec(
        name="PgBouncerDown", group="availability", config="pgbouncer_down", severity="critical",
        expr="{pgbouncer_up} == 0",
        summary="PgBouncer {target} is down or refuses the exporter",
        description="pgvitals could not connect to the PgBouncer admin console of {target} for {for}.",
    ),
    AlertSpec(
        name="PostgresRestarted", group="availability", config="restart", severity="warning",
        # The value is the uptime; the series is only compared within the window, so an exporter that starts
        # watching a server does not count as a restart.
        expr="time() - {pg_postmaster_start_time_seconds} "
             "and changes({pg_postmaster_start_time_seconds}[{within:dur}]) > 0",
        summary="PostgreSQL {target} restarted {value_age} ago",
        description="The server {target} started again within the last {within:dur} (up {value_age}): every "
                    "session was dropped and its caches start cold. A restart nobody planned is a crash or an "
                    "out-of-memory kill: read the server log.",
    ),
    AlertSpec(
        name="PostgresConnectionsHigh", group="connections", config="connections", severity="warning",
        expr="{CONNECTIONS_UTILIZATION} > {warning}",
        summary="PostgreSQL {target} uses {value_pct} of its connection slots",
        description="Client sessions on {target} are at {value_pct} of the slots ordinary roles may use "
                    "(max_connections minus reserved), above {warning:%} % for {for}.",
    ),
    AlertSpec(
        name="PostgresConnectionsCritical", group="connections", config="connections", severity="critical",
        expr="{CONNECTIONS_UTILIZATION} > {critical}",
        summary="PostgreSQL {target} is about to refuse connections ({value_pct} used)",
        description="Client sessions on {target} are at {value_pct} of the usable slots (threshold {critical:%} %): "
                    "new application connections will soon fail with 'too many clients'.",
    ),
    AlertSpec(
        name="PostgresPoolSaturated", group="connections", config="pool_utilization", severity="warning",
        expr="{POOL_UTILIZATION} > {utilization}",
        summary="Application pool {labels.pool} on {target} is at {value_pct} of its capacity",
        description="Pool {labels.pool} holds {value_pct} of its declared capacity on {target} (threshold "
                    "{utilization:%} %) for {for}: requests will wait for a connection (SQLAlchemy pool_timeout, "
                    "SQLx acquire_timeout).",
    ),
    AlertSpec(
        name="PgBouncerClientsWaiting", group="connections", config="pgbouncer_waiting", severity="warning",
        expr="{pgbouncer_pools_client_waiting_connections} > {clients}",
        summary="PgBouncer {target} has {value} clients waiting on {labels.database}/{labels.user}",
        description="{value} clients of pool {labels.database}/{labels.user} on PgBouncer {target} have waited "
                    "for a server connection for {for}: pool_size is too small for the load or server queries "
                    "are slow.",
    ),
    AlertSpec(
        name="PostgresReplicationLag", group="replication", config="replication_lag", severity="warning",
        expr="{pg_replication_lag_seconds} > {warning}",
        summary="Standby {target} replays {value_age} behind its primary",
        description="Standby {target} is {value_age} behind (threshold {warning:dur}): reads there are stale and a "
                    "failover would lose that much.",
    ),
    AlertSpec(
        name="PostgresReplicationLagCritical", group="replication", config="replication_lag", severity="critical",
        expr="{pg_replication_lag_seconds} > {critical}",
        summary="Standby {target} is {value_age} behind: beyond the RPO",
        description="Standby {target} is {value_age} behind its primary, past {critical:dur} (the recovery point "
                    "objective): a failover now loses more data than planned.",
    ),
    AlertSpec(
        name="PostgresReplicationLagBytes", group="replication", config="replication_lag_bytes", severity="warning",
        expr="{pg_stat_replication_replay_lag_bytes} > {bytes}",
        summary="Standby {labels.application_name} of {target} is {value_bytes} behind",
        description="The primary {target} has sent WAL that standby {labels.application_name} "
                    "({labels.client_addr}) has not replayed: {value_bytes}, above {bytes} bytes for {for}.",
    ),
    AlertSpec(
        name="PostgresReplicationSlotInactive", group="replication", config="slot_inactive", severity="warning",
        expr="{pg_replication_slot_active} == 0",
        summary="Replication slot {labels.slot_name} on {target} is inactive",
        description="Slot {labels.slot_name} ({labels.slot_type}) on {target} has had no consumer for {for}: it "
                    "keeps WAL (and for logical slots, catalog rows) until it is consumed or dropped.",
    ),
    AlertSpec(
        name="PostgresReplicationSlotRetainingWal", group="replication", config="slot_retained", severity="warning",
        expr="{pg_replication_slot_retained_bytes} > {bytes}",
        summary="Slot {labels.slot_name} on {target} retains {value_bytes} of WAL",
        description="Replication slot {labels.slot_name} on {target} holds back {value_bytes} of WAL (threshold "
                    "{bytes} bytes): the disk fills if its consumer does not catch up.",
    ),
    AlertSpec(
        name="PostgresWalArchivingFailing", group="replication", config="archiving", severity="critical",
        expr="increase({pg_stat_archiver_failed_total}[{window}]) > 0 "
             "unless {pg_stat_archiver_last_archive_age_seconds} < {pg_stat_archiver_last_failure_age_seconds}",
        summary="WAL archiving is failing on {target}",
        description="archive_command failed {value_count} times in the last {window} on {target} and has not "
                    "succeeded since: WAL piles up in pg_wal and point-in-time recovery falls behind.",
    ),
    AlertSpec(
        name="PostgresSubscriptionStopped", group="replication", config="subscription_stopped", severity="warning",
        # The value tells the two cases apart: enabled (1) with no apply worker, or disabled (0).
        expr="{pg_subscription_enabled} unless {pg_subscription_apply_workers} > 0",
        summary="Subscription {labels.subname} on {db} does not replicate",
        description="Subscription {labels.subname} on {db} has had no apply worker for {for} (enabled: {value}; 0 "
                    "means disabled, by ALTER SUBSCRIPTION ... DISABLE or disable_on_error): no change arrives from "
                    "the publisher, whose slot retains WAL meanwhile.",
    ),
    AlertSpec(
        name="PostgresSubscriptionErrors", group="replication", config="subscription_errors", severity="warning",
        expr="increase({pg_subscription_apply_errors_total}[{window}]) "
             "+ increase({pg_subscription_sync_errors_total}[{window}]) > {count}",
        summary="Subscription {labels.subname} on {db} keeps failing ({value_count} errors in {window})",
        description="The apply and table synchronization workers of subscription {labels.subname} on {db} hit "
                    "{value_count} errors in the last {window} (threshold {count}), for {for}: each error stops "
                    "the worker, which restarts and usually fails on the same change (a conflict, a missing table "
                    "or privilege). The subscriber's log names it.",
    ),
    AlertSpec(
        name="PostgresSubscriptionSilent", group="replication", config="subscription_silent", severity="warning",
        expr="{pg_subscription_last_message_age_seconds} > {seconds}",
        summary="Subscription {labels.subname} on {db} has heard nothing from its publisher for {value_age}",
        description="The apply worker of subscription {labels.subname} on {db} last received a message (data or "
                    "keepalive) {value_age} ago (threshold {seconds:dur}): the publisher or the link is stalled.",
    ),
    AlertSpec(
        name="PostgresLongRunningQuery", group="activity", config="long_query", severity="warning",
        expr="{pg_stat_activity_max_query_duration_seconds} > {seconds}",
        summary="A query on {db} has run for {value_age}",
        description="The longest active query on {db} has been running for {value_age} (threshold {seconds:dur}).",
    ),
    AlertSpec(
        name="PostgresIdleInTransaction", group="activity", config="idle_in_transaction", severity="warning",
        expr="{pg_stat_activity_max_idle_in_transaction_seconds} > {seconds}",
        summary="A session on {db} is idle in transaction for {value_age}",
        description="A session on {db} has been idle inside an open transaction for {value_age} (threshold "
                    "{seconds:dur}): it holds its locks and snapshot, which blocks vacuum.",
    ),
    AlertSpec(
        name="PostgresLockWaits", group="activity", config="lock_wait", severity="warning",
        expr="{pg_lock_wait_max_seconds} > {seconds}",
        summary="Sessions on {db} wait for locks for {value_age}",
        description="The oldest lock wait on {db} is {value_age} (threshold {seconds:dur}): a blocking chain is "
                    "holding up work.",
    ),
    AlertSpec(
        name="PostgresDeadlocks", group="activity", config="deadlocks", severity="warning",
        expr="increase({pg_stat_database_deadlocks_total}[{window}]) > {count}",
        summary="Deadlocks on {db}",
        description="{value_count} deadlocks were detected on {db} in the last {window}; each aborted a "
                    "transaction.",
    ),
    AlertSpec(
        name="PostgresSlowStatements", group="queries", config="slow_statements", severity="warning",
        expr="{STATEMENT_MEAN} > {mean_seconds}",
        summary="Statement {labels.queryid} on {db} takes {value_age} per call",
        description="Statement {labels.queryid} of {labels.usename} on {db} averaged {value_age} per call over "
                    "the last {window} (threshold {mean_seconds:dur}).",
    ),
    AlertSpec(
        name="PostgresCacheHitLow", group="queries", config="cache_hit", severity="warning",
        expr="{CACHE_HIT_DB} < {ratio} and {BLOCKS_DB} > {min_blocks_per_second}",
        summary="Cache hit ratio on {db} is {value_pct}",
        description="Only {value_pct} of block accesses on {db} were served from shared buffers over the last "
                    "{window} (threshold {ratio:%} %, under more than {min_blocks_per_second} block accesses/s): "
                    "the working set no longer fits.",
    ),
    AlertSpec(
        name="PostgresTableBloat", group="storage", config="bloat", severity="info",
        # Size = bloat bytes / ratio; a measurement (pgstattuple_approx) wins over the estimate of the same table.
        expr="({pg_table_bloat_measured_ratio} > {ratio} and "
             "{pg_table_bloat_measured_bytes} / {pg_table_bloat_measured_ratio} > {min_table_bytes}) "
             "or {IGNORING_METHOD} (({pg_table_bloat_ratio} > {ratio} and "
             "{pg_table_bloat_bytes} / {pg_table_bloat_ratio} > {min_table_bytes}) "
             "unless {IGNORING_METHOD} {pg_table_bloat_measured_ratio})",
        summary="Table {labels.schemaname}.{labels.relname} on {db} is {value_pct} bloat",
        description="About {value_pct} of table {labels.schemaname}.{labels.relname} on {db} is dead space, "
                    "{labels.method} (threshold {ratio:%} % on tables over {min_table_bytes} bytes; a measurement "
                    "by pgstattuple_approx wins over the estimate).",
    ),
    AlertSpec(
        name="PostgresWraparoundWarning", group="storage", config="wraparound", severity="warning",
        expr="{WRAPAROUND} > {warning}",
        summary="{labels.kind} ID age on {db} is {value_pct} of wraparound",
        description="The oldest {labels.kind} ID in {db} is {value_pct} of the way to wraparound (2^31); "
                    "anti-wraparound vacuum is not keeping up.",
    ),
    AlertSpec(
        name="PostgresWraparoundCritical", group="storage", config="wraparound", severity="critical",
        expr="{WRAPAROUND} > {critical}",
        summary="{labels.kind} ID wraparound approaching on {db} ({value_pct})",
        description="The oldest {labels.kind} ID in {db} is {value_pct} of the way to wraparound: PostgreSQL "
                    "stops accepting writes before it gets there.",
    ),
    AlertSpec(
        name="PostgresSequenceNearExhaustion", group="storage", config="sequences", severity="warning",
        expr="{pg_sequence_used_ratio} > {warning}",
        summary="Sequence {labels.schemaname}.{labels.sequencename} on {db} has used {value_pct} of its range",
        description="Sequence {labels.schemaname}.{labels.sequencename} on {db} has handed out {value_pct} of the "
                    "values it (or the integer column it feeds) can hold, above {warning:%} %: once it is used up, "
                    "inserts fail. Plan the switch to bigint now.",
    ),
    AlertSpec(
        name="PostgresSequenceImminentExhaustion", group="storage", config="sequences", severity="critical",
        expr="{pg_sequence_used_ratio} > {critical}",
        summary="Sequence {labels.schemaname}.{labels.sequencename} on {db} is about to run out ({value_pct} used)",
        description="Sequence {labels.schemaname}.{labels.sequencename} on {db} has handed out {value_pct} of its "
                    "usable range (threshold {critical:%} %): inserts that draw from it fail with 'reached maximum "
                    "value' or an integer overflow when it is used up.",
    ),
    AlertSpec(
        name="PostgresUnusedIndexes", group="storage", config="unused_indexes", severity="info",
        expr="{pg_index_unused_bytes} > {bytes}",
        summary="{value_bytes} of unused indexes on {db}",
        description="Indexes on {db} that enforce nothing (not unique, primary or exclusion) and have not been "
                    "scanned since the statistics were reset take {value_bytes} (threshold {bytes} bytes): disk, "
                    "cache and write work that buys nothing. Check standbys and rare jobs before dropping one.",
    ),
    AlertSpec(
        name="PostgresAutovacuumWorkersBusy", group="storage", config="autovacuum_workers", severity="warning",
        expr="{AUTOVACUUM_WORKERS} >= {pg_settings_autovacuum_max_workers}",
        summary="All {value} autovacuum workers on {target} have been busy for {for}",
        description="Every autovacuum worker on {target} ({value}, autovacuum_max_workers) has been busy for {for}: "
                    "other tables wait for vacuum meanwhile, so dead tuples and transaction ID age grow.",
    ),
    AlertSpec(
        name="PgvitalsCollectorFailing", group="exporter", config="collector_failing", severity="warning",
        expr="{pgvitals_collector_success} == 0",
        summary="Collector {labels.collector} fails on {target}",
        description="pgvitals collector {labels.collector} has failed on {target} for {for}; its metrics are "
                    "missing (see pgvitals_collector_errors_total for the reason and the exporter log).",
    ),
    AlertSpec(
        name="PgvitalsCollectorStale", group="exporter", config="collector_stale", severity="warning",
        expr=_stale_expr,
        summary="Data of collector {labels.collector} on {target} is {value_age} old",
        description="pgvitals has not refreshed collector {labels.collector} on {target} for {value_age}, more "
                    "than {intervals} of its intervals: its runs are slow or stuck.",
    ),
    AlertSpec(
        name="PgvitalsCollectorDenied", group="exporter", config="collector_denied", severity="info",
        expr="{pgvitals_collector_denied} == 1",
        summary="Collector {labels.collector} may not use {labels.object} on {target}",
        description="The monitoring role on {target} may not use {labels.object} (or the platform does not "
                    "support it), so collector {labels.collector} is skipped and its metrics are missing. Grant "
                    "the privilege to collect them; nothing else is affected.",
    ),
    AlertSpec(
        name="PgvitalsConfigReloadFailed", group="exporter", config="config_reload", severity="warning",
        expr="{pgvitals_config_last_reload_successful} == 0",
        summary="pgvitals {labels.instance} rejected its new configuration",
        description="The last configuration reload of pgvitals at {labels.instance} was invalid for {for}: it "
                    "still runs on the previous configuration, so recent changes (targets, collectors, web "
                    "config) are not in force. The exporter log lists every problem with its YAML path.",
    ),
    AlertSpec(
        name="PgvitalsDatabaseUnavailable", group="exporter", config="database_unavailable", severity="info",
        expr="{pgvitals_database_unavailable} == 1",
        summary="Database {db} on {target} refuses the monitoring role ({labels.reason})",
        description="{target} refuses pgvitals' connections to database {db} ({labels.reason}: pg_hba.conf, a "
                    "revoked CONNECT or its connection limit), so its per-database metrics are missing. The "
                    "server and its other databases are monitored as usual.",
    ),
)


def alert_rules(settings: Settings) -> list[Alert]:
    """Every alert rule, with thresholds and durations from ``settings.alerts`` (disabled ones left out)."""
    rules = []
    for declared in ALERTS:
        section = getattr(settings.alerts, declared.config)
        if not section.enabled:
            continue
        expr = fill(declared.expr, settings, section, metrics=True) if isinstance(declared.expr, str) \
            else declared.expr(settings)
        if expr is None:
            continue
        rules.append(Alert(
            name=declared.name, group=declared.group, expr=expr, for_=section.for_, severity=declared.severity,
            summary=fill(declared.summary, settings, section, metrics=False),
            description=fill(declared.description, settings, section, metrics=False), config_key=declared.config,
        ))
    return rules


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
