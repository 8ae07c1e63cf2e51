"""Alert rules: promtool accepts them, and a promtool unit test proves every alert fires when it should, not
before its `for`, and not when it should not. Expected annotations are rendered here, independently of
Prometheus, from the expected value (Prometheus' humanize functions re-implemented), so templating is tested too.

Refresh the committed unit-test file after changing a rule: ``python -m tests.test_alerts``.
"""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from exporter.alerts import RULE_FILE, alert_rules, connections_utilization, fill, recording_rules, render_rules
from exporter.cli import main
from exporter.config import AlertsConfig, ConfigError, Settings, load_settings
from exporter.dashboards.promql import PROMETHEUS_BUILTINS, UnknownMetric, grouping, references
from tests.support.promql_check import reference_problems

ROOT = Path(__file__).parent.parent
PROMTOOL = "/usr/bin/promtool"
UNIT_TEST_FILE = ROOT / "alerts" / "tests" / "pgvitals.rules.test.yml"
SCRAPE = 'job="pgvitals", instance="exporter:9839"'
GIB = 2**30


# -- Prometheus' template functions, re-implemented (prometheus/template/template.go) -----------------------

def _g4(value: float) -> str:
    """Go's %.4g."""
    text = f"{value:.4g}"
    return text.replace("inf", "+Inf").replace("nan", "NaN") if not math.isfinite(value) else text


def humanize(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return _g4(v)
    prefix = ""
    if abs(v) >= 1:
        for p in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(v) < 1000:
                break
            prefix, v = p, v / 1000
        return f"{_g4(v)}{prefix}"
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(v) >= 1:
            break
        prefix, v = p, v * 1000
    return f"{_g4(v)}{prefix}"


def humanize1024(v: float) -> str:
    if abs(v) <= 1 or not math.isfinite(v):
        return _g4(v)
    prefix = ""
    for p in ("ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"):
        if abs(v) < 1024:
            break
        prefix, v = p, v / 1024
    return f"{_g4(v)}{prefix}"


def humanize_duration(v: float) -> str:
    if not math.isfinite(v):
        return _g4(v)
    if v == 0:
        return f"{_g4(v)}s"
    if abs(v) >= 1:
        sign = "-" if v < 0 else ""
        v = abs(v)
        whole = int(v)
        seconds, minutes, hours, days = whole % 60, whole // 60 % 60, whole // 3600 % 24, whole // 86400
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{_g4(v)}s"
    prefix = ""
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(v) >= 1:
            break
        prefix, v = p, v * 1000
    return f"{_g4(v)}{prefix}s"


def go_float(v: float) -> str:
    """How {{ $value }} prints a float64 (Go's %v), for the plain values our cases use."""
    v = float(v)
    assert 1e-4 <= abs(v) < 1e6 or v == 0, "Go switches to exponent notation here: pick another test value"
    return str(int(v)) if v.is_integer() else repr(v)


FILTERS = {"humanize": humanize, "humanize1024": humanize1024, "humanizeDuration": humanize_duration,
           "humanizePercentage": lambda v: f"{_g4(v * 100)}%"}


def render_template(text: str, labels: dict[str, str], value: float) -> str:
    """The subset of Go templates our annotations use: $labels.x, $value and one humanize filter."""
    def substitute(match: re.Match[str]) -> str:
        body = match.group(1).strip()
        if body.startswith("$labels."):
            return labels.get(body.removeprefix("$labels."), "")
        if body == "$value":
            return go_float(value)
        parts = [p.strip() for p in body.split("|")]
        assert parts[0] == "$value" and len(parts) == 2 and parts[1] in FILTERS, f"unsupported template {body!r}"
        return str(FILTERS[parts[1]](value))

    return re.sub(r"\{\{(.*?)\}\}", substitute, text)


def test_template_functions_match_prometheus_examples() -> None:
    assert humanize_duration(90) == "1m 30s" and humanize_duration(400) == "6m 40s"
    assert humanize_duration(3600) == "1h 0m 0s" and humanize_duration(5.5) == "5.5s"
    assert humanize_duration(0.25) == "250ms" and humanize_duration(0) == "0s"
    assert humanize1024(2 * GIB) == "2Gi" and humanize1024(1536) == "1.5ki"
    assert humanize(1234567) == "1.235M" and humanize(15) == "15"
    assert FILTERS["humanizePercentage"](0.93333) == "93.33%"
    assert go_float(3.0) == "3" and go_float(0.5) == "0.5"


# -- the cases: one per alert ----------------------------------------------------------------------------------

@dataclass
class Case:
    """Series that make ``alert`` fire (at ``fires_at``, with ``value``), and series that must never fire it."""

    alert: str
    series: dict[str, str]
    quiet_at: list[str]  # condition not yet true, or true for less than `for`
    fires_at: str
    value: float
    labels: dict[str, str]
    negative: dict[str, str]
    negative_at: str
    why_negative: str
    interval: str = "1m"
    extra: list[dict[str, Any]] = field(default_factory=list)  # more expected alerts at fires_at


def _series(name: str, labels: str = "") -> str:
    inner = ", ".join(part for part in (labels, SCRAPE) if part)
    return f"{name}{{{inner}}}"


T = 'target="db1"'
TDB = 'target="db1", datname="app"'
SCRAPE_LABELS = {"job": "pgvitals", "instance": "exporter:9839"}


def lbl(**labels: str) -> dict[str, str]:
    return {**SCRAPE_LABELS, **labels}


def _conn(active: int, idle: int, max_: int = 100) -> dict[str, str]:
    base = f'{TDB}, usename="app", application_name="api"'
    return {_series("pg_connections", f'{base}, state="active"'): f"10 {active}x10",
            _series("pg_connections", f'{base}, state="idle"'): f"10 {idle}x10",
            _series("pg_connections_max", T): f"{max_}x10"}


def _pool(active: int, idle: int, capacity: int = 30, unmatched: int = 0) -> dict[str, str]:
    out = {_series("pg_pool_connections", f'{T}, pool="api", state="active"'): f"0 {active}x10",
           _series("pg_pool_connections", f'{T}, pool="api", state="idle"'): f"0 {idle}x10",
           _series("pg_pool_capacity", f'{T}, pool="api"'): f"{capacity}x10"}
    if unmatched:
        out[_series("pg_pool_connections", f'{T}, pool="unmatched", state="idle"')] = f"{unmatched}x10"
    return out


def _statement(exec_per_min: float, calls_per_min: int = 1, queryid: str = "42") -> dict[str, str]:
    labels = f'{TDB}, usename="app", queryid="{queryid}"'
    return {_series("pg_stat_statements_exec_seconds_total", labels): f"0+{exec_per_min}x20",
            _series("pg_stat_statements_calls_total", labels): f"0+{calls_per_min}x20"}


def _bloat(method: str, ratio: float, size: float) -> dict[str, str]:
    labels = f'{TDB}, schemaname="public", relname="orders", method="{method}"'
    prefix = "pg_table_bloat_measured" if method == "pgstattuple_approx" else "pg_table_bloat"
    return {_series(f"{prefix}_ratio", labels): f"{ratio}x40", _series(f"{prefix}_bytes", labels): f"{ratio * size}x40"}


TABLE = {"datname": "app", "schemaname": "public", "relname": "orders"}
SEQUENCE = {"datname": "app", "schemaname": "public", "sequencename": "orders_id_seq"}
SUB = f'{TDB}, subname="sub1"'


def _sequence(name: str) -> str:
    return _series("pg_sequence_used_ratio", f'{TDB}, schemaname="public", sequencename="{name}"')


def _autovacuum(vacuum: int, wraparound: int, max_workers: int = 3) -> dict[str, str]:
    """Workers by state (0 analyze, 0 other) against autovacuum_max_workers, 1 worker for the first minute."""
    return {_series("pg_autovacuum_workers", f'{T}, state="vacuum"'): f"1 {vacuum}x40",
            _series("pg_autovacuum_workers", f'{T}, state="wraparound"'): f"0 {wraparound}x40",
            _series("pg_autovacuum_workers", f'{T}, state="analyze"'): "0x41",
            _series("pg_settings_autovacuum_max_workers", T): f"{max_workers}x41"}


def _subscription(enabled: str, workers: str) -> dict[str, str]:
    return {_series("pg_subscription_enabled", SUB): enabled, _series("pg_subscription_apply_workers", SUB): workers}

CASES = [
    Case("PgvitalsExporterDown", {'up{job="pgvitals", instance="exporter:9839"}': "1 1 0 0 0"}, ["2m"], "3m", 0,
         lbl(), {'up{job="pgvitals", instance="exporter:9839"}': "1 0 1 1 1",
                 'up{job="node", instance="other:9100"}': "0 0 0 0 0"}, "4m",
         "a one-scrape blip, and another job being down"),
    Case("PostgresDown", {_series("pg_up", T): "1 1 0 0 0"}, ["2m"], "3m", 0, lbl(target="db1"),
         {_series("pg_up", T): "1 0 1 0 1"}, "4m", "connection failures shorter than `for`"),
    Case("PgBouncerDown", {_series("pgbouncer_up", 'target="edge"'): "1 0 0 0"}, ["1m"], "2m", 0,
         lbl(target="edge"), {_series("pgbouncer_up", 'target="edge"'): "1 0 1 1"}, "3m", "a short blip"),
    Case("PostgresConnectionsHigh", _conn(50, 35), ["1m", "5m"], "6m", 0.85, lbl(target="db1"), _conn(50, 29),
         "8m", "79 % used, below the 80 % warning"),
    Case("PostgresConnectionsCritical", _conn(60, 36), ["5m"], "6m", 0.96, lbl(target="db1"), _conn(60, 34),
         "8m", "94 % used, below the 95 % critical level"),
    Case("PostgresPoolSaturated", _pool(20, 8), ["1m", "5m"], "6m", 28 / 30, lbl(target="db1", pool="api"),
         _pool(20, 7, unmatched=500), "8m", "exactly 90 % of capacity; 500 unmatched sessions have no capacity"),
    Case("PgBouncerClientsWaiting",
         {_series("pgbouncer_pools_client_waiting_connections", 'target="edge", database="app", user="u"'):
          "0 3 3 3 3"}, ["1m"], "2m", 3, lbl(target="edge", database="app", user="u"),
         {_series("pgbouncer_pools_client_waiting_connections", 'target="edge", database="app", user="u"'):
          "0 2 0 4 0"}, "4m", "clients waiting for less than `for` each time"),
    Case("PostgresReplicationLag", {_series("pg_replication_lag_seconds", 'target="replica"'): "0 90x10"},
         ["1m", "2m"], "3m", 90, lbl(target="replica"),
         {_series("pg_replication_lag_seconds", 'target="replica"'): "0 59x10"}, "6m", "59 s, below 60 s"),
    Case("PostgresReplicationLagCritical", {_series("pg_replication_lag_seconds", 'target="replica"'): "0 400x10"},
         ["2m"], "3m", 400, lbl(target="replica"),
         {_series("pg_replication_lag_seconds", 'target="replica"'): "0 299x10"}, "6m", "299 s, inside the RPO"),
    Case("PostgresReplicationLagBytes",
         {_series("pg_stat_replication_replay_lag_bytes",
                  f'{T}, application_name="replica", client_addr="10.0.0.2", state="streaming", sync_state="async"'):
          f"0 {2 * GIB}x10"}, ["5m"], "6m", 2 * GIB,
         lbl(target="db1", application_name="replica", client_addr="10.0.0.2", state="streaming", sync_state="async"),
         {_series("pg_stat_replication_replay_lag_bytes",
                  f'{T}, application_name="replica", client_addr="10.0.0.2", state="streaming", sync_state="async"'):
          f"0 {GIB}x10"}, "8m", "exactly 1 GiB behind"),
    Case("PostgresReplicationSlotInactive",
         {_series("pg_replication_slot_active", f'{T}, slot_name="s1", slot_type="physical", database=""'):
          "1 0x20"}, ["1m", "15m"], "16m", 0, lbl(target="db1", slot_name="s1", slot_type="physical"),
         {_series("pg_replication_slot_active", f'{T}, slot_name="s1", slot_type="physical", database=""'):
          "1 0x10 1x10"}, "20m", "a consumer that reconnects after 10 minutes"),
    Case("PostgresReplicationSlotRetainingWal",
         {_series("pg_replication_slot_retained_bytes", f'{T}, slot_name="s1", slot_type="logical", database="app"'):
          f"0 {6 * GIB}x10"}, ["5m"], "6m", 6 * GIB,
         lbl(target="db1", slot_name="s1", slot_type="logical", database="app"),
         {_series("pg_replication_slot_retained_bytes", f'{T}, slot_name="s1", slot_type="logical", database="app"'):
          f"0 {4 * GIB}x10"}, "8m", "4 GiB retained, below 5 GiB"),
    Case("PostgresWalArchivingFailing",
         {_series("pg_stat_archiver_failed_total", T): "0 0 3+3x20",
          _series("pg_stat_archiver_archived_total", T): "10x22",
          _series("pg_stat_archiver_last_archive_age_seconds", T): "60+60x22",
          _series("pg_stat_archiver_last_failure_age_seconds", T): "_ _ 5x20"}, ["2m", "6m"], "7m", 15,
         lbl(target="db1"),
         {_series("pg_stat_archiver_failed_total", T): "0 0 3x20",
          _series("pg_stat_archiver_archived_total", T): "10 10 10+1x20",
          _series("pg_stat_archiver_last_archive_age_seconds", T): "60 120 5x20",
          _series("pg_stat_archiver_last_failure_age_seconds", T): "_ _ 5+60x20"}, "5m",
         "failures followed by successful archiving"),
    Case("PostgresLongRunningQuery",
         {_series("pg_stat_activity_max_query_duration_seconds", TDB): "0 400+60x5"}, ["1m"], "2m", 460,
         lbl(target="db1", datname="app"),
         {_series("pg_stat_activity_max_query_duration_seconds", TDB): "100 200 290 10 20"}, "4m",
         "queries shorter than 5 minutes"),
    Case("PostgresIdleInTransaction",
         {_series("pg_stat_activity_max_idle_in_transaction_seconds", TDB): "0 350+60x5"}, ["1m"], "2m", 410,
         lbl(target="db1", datname="app"),
         {_series("pg_stat_activity_max_idle_in_transaction_seconds", TDB): "0 60 120 180 240 0"}, "5m",
         "a transaction idle for 4 minutes, then committed"),
    Case("PostgresLockWaits", {_series("pg_lock_wait_max_seconds", TDB): "0 40+60x5"}, ["1m"], "2m", 100,
         lbl(target="db1", datname="app"), {_series("pg_lock_wait_max_seconds", TDB): "0 20 25 0 29"}, "4m",
         "waits under 30 s"),
    Case("PostgresDeadlocks", {_series("pg_stat_database_deadlocks_total", TDB): "0 0 1 1 1"}, ["1m"], "2m", 1,
         lbl(target="db1", datname="app"), {_series("pg_stat_database_deadlocks_total", TDB): "5x10"}, "6m",
         "a deadlock counter that does not move"),
    Case("PostgresSlowStatements", _statement(6), ["1m", "5m"], "6m", 6,
         lbl(target="db1", datname="app", usename="app", queryid="42"),
         {**_statement(4), _series("pg_stat_statements_exec_seconds_total",
                                   f'{TDB}, usename="app", queryid="7"'): "100x20",
          _series("pg_stat_statements_calls_total", f'{TDB}, usename="app", queryid="7"'): "1x20"}, "10m",
         "4 s per call, and a statement with no calls in the window"),
    Case("PostgresCacheHitLow",
         {_series("pg_stat_database_blks_hit_total", TDB): "0+9000x30",
          # rate() divides by the whole window: the traffic guard (100/s) holds from 4m, when 4 of 5 minutes
          # are in the window (128/s), so the alert is pending from 4m and fires 15 minutes later.
          _series("pg_stat_database_blks_read_total", TDB): "0+600x30"}, ["3m", "18m"], "19m", 0.9375,
         lbl(target="db1", datname="app"),
         {_series("pg_stat_database_blks_hit_total", TDB): "0+3000x30",
          _series("pg_stat_database_blks_read_total", TDB): "0+600x30"}, "20m",
         "a poor ratio (83 %) under too little traffic (60 block accesses/s)"),
    Case("PostgresTableBloat", {**_bloat("estimate", 0.6, 2 * GIB), **_bloat("pgstattuple_approx", 0.7, 2 * GIB)},
         ["29m"], "30m", 0.7, lbl(target="db1", method="pgstattuple_approx", **TABLE),
         {**_bloat("estimate", 0.6, 2 * GIB), **_bloat("pgstattuple_approx", 0.2, 2 * GIB)}, "35m",
         "a high estimate that the measurement contradicts"),
    Case("PostgresWraparoundWarning",
         {_series("pg_database_xid_age", TDB): "1200000000x10", _series("pg_database_mxid_age", TDB): "1000x10"},
         ["4m"], "5m", 1200000000 / 2**31, lbl(target="db1", datname="app", kind="xid"),
         {_series("pg_database_xid_age", TDB): "1000000000x10", _series("pg_database_mxid_age", TDB): "1000x10"},
         "8m", "47 % of the horizon"),
    Case("PostgresWraparoundCritical",
         {_series("pg_database_xid_age", TDB): "1000x10", _series("pg_database_mxid_age", TDB): "1700000000x10"},
         ["4m"], "5m", 1700000000 / 2**31, lbl(target="db1", datname="app", kind="multixact"),
         {_series("pg_database_xid_age", TDB): "1500000000x10", _series("pg_database_mxid_age", TDB): "1000x10"},
         "8m", "70 % of the horizon"),
    Case("PgvitalsCollectorFailing", {_series("pgvitals_collector_success", f'{T}, collector="pg_locks"'): "1 0x15"},
         ["1m", "10m"], "11m", 0, lbl(target="db1", collector="pg_locks"),
         {_series("pgvitals_collector_success", f'{T}, collector="pg_locks"'): "1 0x5 1x10"}, "14m",
         "a collector that recovers after 5 minutes"),
    Case("PgvitalsCollectorDenied",
         {_series("pgvitals_collector_denied", f'{T}, collector="pg_wal_directory", object="pg_ls_waldir"'): "1x20"},
         ["1m", "14m"], "16m", 1, lbl(target="db1", collector="pg_wal_directory", object="pg_ls_waldir"),
         {_series("pgvitals_collector_denied", f'{T}, collector="pg_wal_directory", object="pg_ls_waldir"'):
          "1x5 _x15"}, "16m", "a denial cleared by a grant after 5 minutes"),
    Case("PgvitalsDatabaseUnavailable",
         {_series("pgvitals_database_unavailable", f'{TDB}, reason="database_unavailable"'): "1x20"},
         ["1m", "14m"], "16m", 1, lbl(target="db1", datname="app", reason="database_unavailable"),
         {_series("pgvitals_database_unavailable", f'{TDB}, reason="database_unavailable"'): "1x3 _x17"}, "16m",
         "a database refused for 3 minutes, then reachable again"),
    Case("PgvitalsConfigReloadFailed",
         {_series("pgvitals_config_last_reload_successful"): "1 0x15"}, ["1m", "10m"], "11m", 0, lbl(),
         {_series("pgvitals_config_last_reload_successful"): "1 0x5 1x10"}, "14m",
         "a broken config fixed by the next reload after 5 minutes"),
    Case("PgvitalsCollectorStale",
         {_series("pgvitals_collector_data_age_seconds", f'{T}, collector="pg_stat_database"'): "5 60+60x5"},
         ["1m", "2m"], "3m", 180, lbl(target="db1", collector="pg_stat_database"),
         {_series("pgvitals_collector_data_age_seconds", f'{T}, collector="pg_bloat_estimate"'): "5 1000+60x5"},
         "5m", "a 15-minute collector whose data is 20 minutes old (under 3 intervals)"),
    # A restart at 150 s (seen at 3m): the value is the uptime at 4m. Quiet once the change leaves the window.
    Case("PostgresRestarted", {_series("pg_postmaster_start_time_seconds", T): "100 100 100 150x15"},
         ["2m", "14m"], "4m", 90, lbl(target="db1"),
         {_series("pg_postmaster_start_time_seconds", T): "_ _ 100x15"}, "5m",
         "a server first seen mid-way (the exporter started), never restarted"),
    # The case: a sequence advanced to 96 % of its range.
    Case("PostgresSequenceNearExhaustion", {_sequence("orders_id_seq"): "0.79 0.85x10"}, ["1m", "5m"], "6m", 0.85,
         lbl(target="db1", **SEQUENCE), {_sequence("orders_id_seq"): "0.79 0.8x10"}, "8m", "exactly 80 % used"),
    Case("PostgresSequenceImminentExhaustion", {_sequence("orders_id_seq"): "0.9 0.96x10"}, ["1m", "5m"], "6m",
         0.96, lbl(target="db1", **SEQUENCE), {_sequence("orders_id_seq"): "0.9 0.94x10"}, "8m",
         "94 % used: the warning's business, not a page"),
    Case("PostgresUnusedIndexes", {_series("pg_index_unused_bytes", TDB): f"0 {2 * GIB}x70"}, ["1m", "60m"], "61m",
         2 * GIB, lbl(target="db1", datname="app"),
         {_series("pg_index_unused_bytes", TDB): f"{GIB // 2}x70",
          _series("pg_index_unused_bytes", 'target="db1", datname="other"'): f"{2 * GIB}x30 0x40"}, "65m",
         "512 MiB unused; 2 GiB unused for 30 minutes after a statistics reset, then scanned"),
    Case("PostgresAutovacuumWorkersBusy", _autovacuum(2, 1), ["1m", "30m"], "31m", 3, lbl(target="db1"),
         {**_autovacuum(2, 0), _series("pg_autovacuum_workers", f'{T}, state="other"'): "1x20 0x20"}, "35m",
         "2 of 3 workers busy, and all 3 for only 20 minutes"),
    Case("PostgresSubscriptionStopped", _subscription(enabled="1x20", workers="1 0x20"), ["1m", "5m"], "6m", 1,
         lbl(target="db1", datname="app", subname="sub1"),
         _subscription(enabled="1x20", workers="1 0 0 0 1x20"), "10m",
         "an apply worker that restarts within 3 minutes"),
    Case("PostgresSubscriptionErrors",
         {_series("pg_subscription_apply_errors_total", SUB): "0+3x30",
          _series("pg_subscription_sync_errors_total", SUB): "0x30"}, ["5m"], "6m", 15,
         lbl(target="db1", datname="app", subname="sub1"),
         {_series("pg_subscription_apply_errors_total", SUB): "0 0 1x20",
          _series("pg_subscription_sync_errors_total", SUB): "0x22"}, "8m",
         "one error (a publisher restart), then none"),
    Case("PostgresSubscriptionSilent",
         {_series("pg_subscription_last_message_age_seconds", SUB): "5 200+60x10"}, ["1m"], "2m", 260,
         lbl(target="db1", datname="app", subname="sub1"),
         {_series("pg_subscription_last_message_age_seconds", SUB): "10 30 20 30 10 30 20 30"}, "6m",
         "keepalives every 30 s"),
]


# -- building the promtool unit-test file ------------------------------------------------------------------------

def _alerts_by_name(settings: Settings) -> dict[str, Any]:
    return {rule.name: rule for rule in alert_rules(settings)}


def expected_alert(rule: Any, labels: dict[str, str], value: float, config: AlertsConfig) -> dict[str, Any]:
    """What promtool should report for ``rule`` firing with ``labels`` and ``value``."""
    yaml_rule = rule.to_yaml(config)
    all_labels = {**labels, **yaml_rule["labels"]}
    return {"exp_labels": all_labels,
            "exp_annotations": {k: render_template(v, all_labels, value) for k, v in yaml_rule["annotations"].items()}}


def unit_tests(settings: Settings, rule_file: str = f"../{RULE_FILE}") -> dict[str, Any]:
    """The promtool unit-test document: per alert a group where it fires and one where it must not."""
    rules = _alerts_by_name(settings)
    tests = []
    for case in CASES:
        rule = rules[case.alert]
        checks = [{"eval_time": t, "alertname": case.alert, "exp_alerts": []} for t in case.quiet_at]
        checks.append({"eval_time": case.fires_at, "alertname": case.alert,
                       "exp_alerts": [expected_alert(rule, case.labels, case.value, settings.alerts)]})
        tests.append({"name": f"{case.alert} fires, not before its `for`", "interval": case.interval,
                      "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
                      "alert_rule_test": checks})
        tests.append({"name": f"{case.alert} stays quiet: {case.why_negative}", "interval": case.interval,
                      "input_series": [{"series": s, "values": v} for s, v in case.negative.items()],
                      "alert_rule_test": [{"eval_time": case.negative_at, "alertname": case.alert,
                                           "exp_alerts": []}]})
    return {"rule_files": [rule_file], "evaluation_interval": "1m", "tests": tests}


def render_unit_tests(settings: Settings) -> str:
    header = ("# promtool unit tests of pgvitals.rules.yml (defaults): `promtool test rules alerts/tests/*.yml`.\n"
              "# Generated by `python -m tests.test_alerts` from the cases in tests/test_alerts.py.\n")
    return header + yaml.safe_dump(unit_tests(settings), sort_keys=False, width=10_000, allow_unicode=True)


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


# -- tests -----------------------------------------------------------------------------------------------------

def test_every_alert_has_a_case() -> None:
    names = set(_alerts_by_name(Settings()))
    covered = [case.alert for case in CASES]
    assert sorted(covered) == sorted(set(covered)), "one case per alert"
    assert names == set(covered), f"missing cases: {names - set(covered)}, unknown: {set(covered) - names}"


def test_every_case_checks_before_the_for_duration() -> None:
    rules = _alerts_by_name(Settings())
    for case in CASES:
        rule = rules[case.alert]
        fires = _seconds(case.fires_at)
        assert case.quiet_at, case.alert
        if rule.for_ > 0:
            # A quiet check less than `for` before the first firing evaluation proves `for` is honoured.
            assert any(fires - rule.for_ <= _seconds(t) < fires for t in case.quiet_at), case.alert


def _seconds(text: str) -> float:
    return float(text[:-1]) * {"s": 1, "m": 60, "h": 3600}[text[-1]]


def test_rule_file_passes_promtool_check(tmp_path: Path) -> None:
    path = tmp_path / RULE_FILE
    path.write_text(render_rules(Settings()))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    count = len(recording_rules(AlertsConfig())) + len(alert_rules(Settings()))
    assert f"SUCCESS: {count} rules found" in result.stdout


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    settings = Settings()
    (tmp_path / RULE_FILE).write_text(render_rules(settings))
    tests_dir = tmp_path / "tests"
    tests_dir.mkdir()
    (tests_dir / "unit.yml").write_text(render_unit_tests(settings))
    result = run_promtool("test", "rules", str(tests_dir / "unit.yml"))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a rule file with a looser threshold fails them."""
    loose = Settings(alerts=AlertsConfig.model_validate({"connections": {"warning": 0.78}}))
    (tmp_path / RULE_FILE).write_text(render_rules(loose))
    tests_dir = tmp_path / "tests"
    tests_dir.mkdir()
    (tests_dir / "unit.yml").write_text(render_unit_tests(Settings()))
    result = run_promtool("test", "rules", str(tests_dir / "unit.yml"))
    assert result.returncode != 0
    assert "PostgresConnectionsHigh" in result.stdout + result.stderr


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    runbooks = (ROOT / "docs" / "runbooks.md").read_text(encoding="utf-8")
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", runbooks,
                                                                                           re.M)}
    config = AlertsConfig()
    for rule in alert_rules(Settings()):
        data = rule.to_yaml(config)
        assert data["labels"]["severity"] in ("critical", "warning", "info")
        annotations = data["annotations"]
        assert annotations["summary"] and "{{" in annotations["summary"] + annotations["description"], rule.name
        assert "$value" in annotations["description"] or "$labels" in annotations["description"], rule.name
        url, _, anchor = annotations["runbook_url"].partition("#")
        assert url == "docs/runbooks.md" and anchor in anchors, f"{rule.name}: no runbook section {anchor}"


def check_references(expr: str, where: str) -> list[str]:
    return reference_problems(expr, where, frozenset(r.record for r in recording_rules(AlertsConfig())))


def test_rules_name_only_exported_metrics() -> None:
    problems = []
    for rule in recording_rules(AlertsConfig()):
        problems += check_references(rule.expr, f"record {rule.record}")
    for alert in alert_rules(Settings()):
        problems += check_references(alert.expr, f"alert {alert.name}")
        assert references(alert.expr), alert.name
    assert not problems, "\n".join(problems)
    assert "up" in PROMETHEUS_BUILTINS


def test_configuration_changes_thresholds_durations_and_switches() -> None:
    settings = load_settings(raw={
        "targets": [{"name": "a", "dsn": "host=x"}],
        "collectors": {"pg_stat_database": {"interval": "1m"}},
        "alerts": {"rate_window": "2m", "runbook_base_url": "https://wiki.example/pg/", "labels": {"team": "db"},
                   "connections": {"warning": 0.6, "critical": 0.7, "for": "30s"},
                   "bloat": {"enabled": False}, "deadlocks": {"for": 0},
                   "collector_stale": {"intervals": 2}},
    }, environ={})
    rules = {r.name: r.to_yaml(settings.alerts) for r in alert_rules(settings)}
    assert "PostgresTableBloat" not in rules
    assert rules["PostgresConnectionsHigh"]["expr"].endswith("> 0.6")
    assert rules["PostgresConnectionsHigh"]["for"] == "30s"
    assert "for" not in rules["PostgresDeadlocks"] and "[2m]" in rules["PostgresDeadlocks"]["expr"]
    assert rules["PostgresDown"]["labels"] == {"severity": "critical", "team": "db"}
    assert rules["PostgresDown"]["annotations"]["runbook_url"] == "https://wiki.example/pg/runbooks.md#postgresdown"
    stale = rules["PgvitalsCollectorStale"]["expr"]
    assert re.search(r'collector=~"[^"]*pg_stat_database[^"]*"} > 120\b', stale), stale


@pytest.mark.parametrize(("alerts", "message"), [
    ({"connections": {"warning": 0.95, "critical": 0.9}}, "alerts.connections: warning (0.95) must be below critical"),
    ({"cache_hit": {"ratio": 1.5}}, "alerts.cache_hit.ratio: Input should be less than or equal to 1"),
    ({"long_query": {"seconds": "soon"}}, "alerts.long_query.seconds: expected a duration"),
    ({"lock_wait": {"for": -1}}, "alerts.lock_wait.for: must be a positive duration"),
    ({"slow_statement": {}}, "alerts.slow_statement: unknown key"),
    ({"sequences": {"warning": 0.96, "critical": 0.95}}, "alerts.sequences: warning (0.96) must be below critical"),
    ({"sequences": {"warning": 0.4}}, "alerts.sequences.warning: 0.4 is below collectors.pg_sequences.floor (0.5)"),
    ({"restart": {"within": "soon"}}, "alerts.restart.within: expected a duration"),
    ({"subscription_errors": {"count": -1}}, "alerts.subscription_errors.count: Input should be greater than or "
                                             "equal to 0"),
    ({"bloat": {"min_table_bytes": -1}}, "alerts.bloat.min_table_bytes: Input should be greater than or equal to 0"),
    ({"labels": {"severity": "x", "bad-name": "y"}}, "alerts.labels: label name 'bad-name'"),
    ({"runbook_base_url": "docs/"}, "alerts.runbook_base_url: expected an absolute http:// or https:// URL"),
    ({"runbook_base_url": "ftp://files.example/docs"}, "alerts.runbook_base_url: expected an absolute http"),
    ({"runbook_base_url": "https:///docs"}, "alerts.runbook_base_url: expected an absolute http"),
    ({"runbook_base_url": "https://x.example/docs#top"}, "alerts.runbook_base_url: give the URL without a #fragment"),
    ({"runbook_url": "https://x.example/runbooks.md"}, "alerts.runbook_url: replaced by runbook_base_url"),
])
def test_bad_alert_configuration_is_reported_with_its_path(alerts: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(raw={"targets": [{"name": "a", "dsn": "host=x"}], "alerts": alerts}, environ={})
    assert any(problem.startswith(message) for problem in error.value.problems), error.value.problems


def test_sequence_thresholds_follow_the_collector_floor() -> None:
    """Below the default floor is fine once the floor is lowered too; a floor raised above the warning is not."""
    target = [{"name": "a", "dsn": "host=x"}]
    settings = load_settings(raw={"targets": target, "collectors": {"pg_sequences": {"floor": 0.3}},
                                  "alerts": {"sequences": {"warning": 0.4, "critical": 0.9}}}, environ={})
    rules = {r.name: r.expr for r in alert_rules(settings)}
    assert rules["PostgresSequenceNearExhaustion"] == "pg_sequence_used_ratio > 0.4"
    assert rules["PostgresSequenceImminentExhaustion"] == "pg_sequence_used_ratio > 0.9"
    with pytest.raises(ConfigError) as error:
        load_settings(raw={"targets": target, "collectors": {"pg_sequences": {"floor": 0.85}}}, environ={})
    assert error.value.problems == ["alerts.sequences.warning: 0.8 is below collectors.pg_sequences.floor (0.85): "
                                    "sequences under the floor are not exported, so the alert would not see them "
                                    "(lower the floor or raise the threshold)"]
    load_settings(raw={"targets": target, "collectors": {"pg_sequences": {"floor": 0.85}},
                       "alerts": {"sequences": {"enabled": False}}}, environ={})


@pytest.mark.parametrize(("base", "expected"), [
    ("https://github.com/acme/pgvitals/blob/main/docs", "https://github.com/acme/pgvitals/blob/main/docs/runbooks.md"),
    ("https://github.com/acme/pgvitals/blob/main/docs/", "https://github.com/acme/pgvitals/blob/main/docs/runbooks.md"),
    ("https://docs.example/pgvitals/runbooks.html", "https://docs.example/pgvitals/runbooks.html"),
    ("https://github.com/acme/pgvitals/wiki/Runbooks#", "https://github.com/acme/pgvitals/wiki/Runbooks"),
    ("http://intranet/docs?ref=v2", "http://intranet/docs/runbooks.md?ref=v2"),
])
def test_every_runbook_url_is_absolute_when_a_base_is_set(base: str, expected: str, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"targets: [{{name: a, dsn: 'host=x'}}]\nalerts:\n  runbook_base_url: '{base}'\n")
    assert main(["alerts", "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    written = yaml.safe_load((tmp_path / "out" / RULE_FILE).read_text(encoding="utf-8"))
    urls = {rule["alert"]: rule["annotations"]["runbook_url"]
            for group in written["groups"] for rule in group["rules"] if "alert" in rule}
    assert set(urls) == {rule.name for rule in alert_rules(Settings())}
    for name, url in urls.items():
        parts = urlsplit(url)
        assert parts.scheme in ("http", "https") and parts.netloc, url
        assert url == f"{expected}#{name.lower()}", url


def test_without_a_base_runbook_urls_stay_repository_relative() -> None:
    for rule in alert_rules(Settings()):
        assert rule.to_yaml(AlertsConfig())["annotations"]["runbook_url"] == f"docs/runbooks.md#{rule.name.lower()}"


def test_rules_without_any_enabled_collector(tmp_path: Path) -> None:
    """No collector enabled: nothing can go stale, so the stale alert is left out (it used to crash)."""
    from exporter.catalog import load

    settings = load_settings(raw={"targets": [{"name": "a", "dsn": "host=x"}],
                                  "collectors": {c.name: {"enabled": False} for c in load().collectors}}, environ={})
    names = {rule.name for rule in alert_rules(settings)}
    assert "PgvitalsCollectorStale" not in names
    assert "PgvitalsCollectorFailing" in names
    path = tmp_path / RULE_FILE
    path.write_text(render_rules(settings))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_templates_name_only_known_fields() -> None:
    """A text naming a value that is neither a setting nor a Prometheus field fails at generation."""
    section = AlertsConfig().connections
    assert fill("above {warning:%} % for {for}, {value_pct} on {labels.pool}", Settings(), section, metrics=False) \
        == "above 80 % for 5m, {{ $value | humanizePercentage }} on {{ $labels.pool }}"
    with pytest.raises(KeyError, match="thresold"):
        fill("above {thresold}", Settings(), section, metrics=False)
    with pytest.raises(UnknownMetric):
        fill("{pg_connection} > {warning}", Settings(), section, metrics=True)
    for rule in alert_rules(Settings()):
        for text in (rule.summary, rule.description):
            assert not re.search(r"(?<!\{)\{(?!\{)|(?<!\})\}(?!\})", text), f"{rule.name}: unfilled field in {text!r}"


def test_label_lists_come_from_the_catalog() -> None:
    assert "sum without (datname, usename, application_name, state)" in connections_utilization()
    with pytest.raises(UnknownMetric, match="no label"):
        grouping("without", ("datname",), "pg_connections_max")
    with pytest.raises(UnknownMetric, match="empty label list"):
        grouping("by", (), "pg_up")


def test_example_configuration_alerts_section_is_valid() -> None:
    text = (ROOT / "config.example.yaml").read_text(encoding="utf-8")
    block = text[text.index("\n# alerts:"):]
    uncommented = "\n".join(line.removeprefix("# ") if line.startswith("# ") else line.removeprefix("#")
                            for line in block.splitlines() if line.startswith("#"))
    section = yaml.safe_load(uncommented[uncommented.index("alerts:"):])
    parsed = AlertsConfig.model_validate(section["alerts"])
    assert parsed == AlertsConfig(), "the documented values must be the defaults"


# -- committed files -------------------------------------------------------------------------------------------

def test_committed_rule_file_and_unit_tests_are_up_to_date() -> None:
    rule_file = ROOT / "alerts" / RULE_FILE
    assert rule_file.read_text(encoding="utf-8") == render_rules(Settings()), "run: pgvitals alerts --out alerts"
    assert UNIT_TEST_FILE.read_text(encoding="utf-8") == render_unit_tests(Settings()), \
        "run: python -m tests.test_alerts"


def test_committed_unit_tests_pass_against_committed_rules() -> None:
    result = run_promtool("test", "rules", str(UNIT_TEST_FILE))
    assert result.returncode == 0, result.stdout[-4000:]


if __name__ == "__main__":
    UNIT_TEST_FILE.parent.mkdir(parents=True, exist_ok=True)
    UNIT_TEST_FILE.write_text(render_unit_tests(Settings()), encoding="utf-8")
    print(f"wrote {UNIT_TEST_FILE}")
