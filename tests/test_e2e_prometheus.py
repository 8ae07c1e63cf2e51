"""End to end: PostgreSQL (+ streaming standby + PgBouncer) -> pgvitals -> a real Prometheus with our rule file.

One condition at a time is created for real (a lock chain, a long query, an idle transaction, replay paused,
a saturated application pool, PgBouncer clients queued, a failing archive_command, an abandoned slot, a server
stopped); Prometheus' HTTP API must show the matching alert firing, then resolved once the condition is gone.
Conditions built into the stack (a sequence at 96 % of its range, an unused index) and the restart of the
stopped server must fire their alerts too.
Every query of every generated dashboard is then evaluated against that Prometheus while one test holds those
conditions at once, over that test's own window (it needs no earlier test): a query that returns nothing fails
the test unless it is listed in NOT_FILLED with the reason.

The rule file is the generated one, rendered from this test's `alerts:` configuration (short `for`
durations and thresholds): the same code path as `pgvitals alerts --config`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from typing import Any

import psycopg
import pytest

from exporter.alerts import render_rules
from exporter.dashboards import build_dashboards
from exporter.localpg import wait_until
from tests.support.exporters import running_exporter
from tests.support.pgbouncer import start_pgbouncer
from tests.support.prometheus import (
    Prometheus,
    Stack,
    collector_overrides,
    require_stack_tools,
    running_prometheus,
)
from tests.support.promql_check import expand_variables
from tests.support.servers import Server, settings_for, start_server
from tests.support.sessions import run_in_background
from tests.support.standby import drop_slot, start_standby

pytestmark = [pytest.mark.live, pytest.mark.slow]

RATE_INTERVAL = "4s"  # Grafana: $__rate_interval is at least four scrape intervals
POOL_CAPACITY = 4

#: Thresholds and durations scaled down so that each condition fires within seconds.
TEST_ALERTS: dict[str, Any] = {
    "rate_window": "60s",  # the archiver retries a failing command only every minute: keep failures in view
    "exporter_down": {"for": "5s"},
    "postgres_down": {"for": "2s"},
    "pgbouncer_down": {"for": "2s"},
    "pool_utilization": {"utilization": 0.9, "for": "2s"},
    "pgbouncer_waiting": {"clients": 0, "for": "2s"},
    "replication_lag": {"warning": "2s", "critical": "1h", "for": "2s"},
    "replication_lag_bytes": {"bytes": 65536, "for": "2s"},
    "slot_inactive": {"for": "2s"},
    "archiving": {"for": "2s"},
    "long_query": {"seconds": "3s", "for": "1s"},
    "idle_in_transaction": {"seconds": "3s", "for": "1s"},
    "lock_wait": {"seconds": "2s", "for": "1s"},
    "sequences": {"for": "1s"},  # the default thresholds, 0.8 and 0.95
    "unused_indexes": {"bytes": 0, "for": "1s"},
}

RESTRICTED_PASSWORD = "Restricted-Role-Pw-9"
TICKET_VALUE = 960  # e2e_ticket's value, of 1..1000

#: Panel queries allowed to stay empty in this scenario, and why.
NOT_FILLED: dict[tuple[str, str], str] = {
    ("storage.json", "Vacuum progress"): "series exist only while a VACUUM runs (tests/test_live_maintenance.py)",
    ("storage.json", "Index builds"): "series exist only while CREATE INDEX runs (tests/test_live_maintenance.py)",
    **{("replication.json", title): "no logical subscriber in this stack (tests/test_live_subscriptions.py)"
       for title in ("Subscription apply workers", "Time since the publisher was heard from",
                     "Subscription errors")},
}


# -- the stack ----------------------------------------------------------------------------------------------------

def _workload(primary: Server, stop: threading.Event) -> None:
    """A small application: index lookups and inserts, so that rates, ratios and statements have data."""
    with psycopg.connect(primary.dsn(monitor=False), autocommit=True, application_name="e2e_workload") as conn:
        step = 0
        while not stop.is_set():
            step += 1
            conn.execute("SELECT v FROM e2e_orders WHERE id = %s", (step % 5000 + 1,))
            conn.execute("INSERT INTO e2e_events (note) VALUES ('tick')")
            if step % 20 == 0:
                conn.execute("SELECT count(*) FROM e2e_orders")  # a sequential scan: heap reads and hits
            stop.wait(0.05)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_stack_tools()
    with ExitStack() as cleanup:
        primary = start_server("e2e", settings={"archive_mode": "on", "archive_command": "'true'",
                                                "autovacuum_naptime": "1"})
        cleanup.callback(primary.cluster.destroy)
        primary.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        primary.execute("CREATE TABLE e2e_orders (id int PRIMARY KEY, v text)")
        primary.execute("INSERT INTO e2e_orders SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g")
        primary.execute("DELETE FROM e2e_orders WHERE id % 2 = 0")  # bloat to estimate and measure
        primary.execute("INSERT INTO e2e_orders SELECT g * 2, 'y' FROM generate_series(1, 2500) g")
        primary.execute("VACUUM (ANALYZE) e2e_orders")
        primary.execute("CREATE TABLE e2e_events (id bigserial PRIMARY KEY, note text)")
        primary.execute("CREATE TABLE e2e_locked (id int)")
        # An index no query uses, and a sequence 96 % through its range (960 of 1..1000) the monitor role may read.
        primary.execute("CREATE INDEX e2e_orders_unused ON e2e_orders (id) WHERE v = 'never'")
        primary.execute(f"CREATE SEQUENCE e2e_ticket MAXVALUE 1000; SELECT setval('e2e_ticket', {TICKET_VALUE}); "
                        "GRANT SELECT ON SEQUENCE e2e_ticket TO pgvitals_mon")
        # The statistical estimate needs the role to see pg_stats of the table (see postgres-facts.md).
        primary.execute("GRANT SELECT ON e2e_orders, e2e_events, e2e_locked TO pgvitals_mon")
        primary.execute("SELECT pg_switch_wal()")  # one successful archive, so archive age exists
        # As a managed service looks to a monitoring role: a database pg_hba.conf refuses, and a role
        # without pg_monitor (pg_ls_waldir() and pg_ls_archive_statusdir() are denied to it).
        primary.execute("CREATE DATABASE e2e_refused")
        hba = primary.cluster.data / "pg_hba.conf"
        hba.write_text("host e2e_refused all 127.0.0.1/32 reject\n" + hba.read_text())
        primary.execute("SELECT pg_catalog.pg_reload_conf()")
        primary.execute(f"CREATE ROLE e2e_restricted LOGIN PASSWORD '{RESTRICTED_PASSWORD}'")

        standby = start_standby(primary, slot="e2e_standby", name="e2e-standby")
        cleanup.callback(standby.destroy)
        bouncer = start_pgbouncer(primary, pool_size=2)
        cleanup.callback(bouncer.stop)

        run_in_background(cleanup, lambda stop: _workload(primary, stop))

        settings = settings_for(
            [{"name": "primary", "dsn": primary.monitor_dsn, "max_connections": 4},
             {"name": "replica", "dsn": standby.monitor_dsn, "max_connections": 4},
             {"name": "restricted", "dsn": primary.cluster.dsn("e2e_restricted", RESTRICTED_PASSWORD)}],
            pgbouncers=[{"name": "edge", "dsn": bouncer.admin_dsn}],
            pools=[{"name": "api", "application_name": "e2e_api*", "capacity": POOL_CAPACITY}],
            collectors=collector_overrides(), probe_interval="1s", max_backoff="2s", alerts=TEST_ALERTS,
        )
        daemon = cleanup.enter_context(running_exporter(settings))
        assert daemon.server is not None
        prometheus = cleanup.enter_context(running_prometheus(daemon.server.port, render_rules(settings)))
        stack = Stack(primary, standby, bouncer, prometheus)
        wait_until(lambda: prometheus.query("pg_up", time.time()) and prometheus.query(
            "pgbouncer_up", time.time()), timeout=30)
        yield stack


def _session(server: Server, application_name: str = "e2e") -> psycopg.Connection[Any]:
    return psycopg.connect(server.dsn(monitor=False), autocommit=True, application_name=application_name)


def _in_thread(action: Callable[[], Any]) -> threading.Thread:
    """Run a statement that blocks (it ends with an error when cancelled: that is expected)."""
    thread = threading.Thread(target=_swallow, args=(action,), daemon=True)
    thread.start()
    return thread


def _swallow(action: Callable[[], Any]) -> None:
    with suppress(psycopg.Error):
        action()


def _labels(alert: dict[str, Any]) -> dict[str, str]:
    return dict(alert["labels"])


# -- conditions, each created for real and removed again -------------------------------------------------------

@contextmanager
def lock_chain(stack: Stack) -> Iterator[None]:
    """A session holds ACCESS EXCLUSIVE on e2e_locked; another waits for it."""
    holder = _session(stack.primary)
    holder.execute("BEGIN")
    holder.execute("LOCK TABLE e2e_locked IN ACCESS EXCLUSIVE MODE")
    waiter = _session(stack.primary)
    thread = _in_thread(lambda: waiter.execute("SELECT count(*) FROM e2e_locked"))
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        thread.join(10)
        holder.close()
        waiter.close()


@contextmanager
def long_query(stack: Stack) -> Iterator[None]:
    """A minute-long pg_sleep, cancelled at the end."""
    session = _session(stack.primary)
    pid = session.info.backend_pid
    thread = _in_thread(lambda: session.execute("SELECT pg_sleep(60)"))
    try:
        yield
    finally:
        stack.primary.execute(f"SELECT pg_cancel_backend({pid})")
        thread.join(10)
        session.close()


@contextmanager
def idle_transaction(stack: Stack) -> Iterator[None]:
    """A transaction left open between statements."""
    session = _session(stack.primary)
    session.execute("BEGIN")
    session.execute("SELECT 1")
    try:
        yield
    finally:
        session.execute("ROLLBACK")
        session.close()


@contextmanager
def paused_replay(stack: Stack) -> Iterator[None]:
    """Replay paused on the standby while the primary keeps writing."""
    stack.standby.pause_replay()
    stop = threading.Event()

    def write() -> None:
        with _session(stack.primary) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO e2e_events (note) SELECT repeat('w', 500) FROM generate_series(1, 200)")
                stop.wait(0.5)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join(10)
        stack.standby.resume_replay()


@contextmanager
def saturated_pool(stack: Stack) -> Iterator[None]:
    """As many sessions of the "api" application pool as its declared capacity."""
    sessions = [_session(stack.primary, f"e2e_api_{i}") for i in range(POOL_CAPACITY)]
    try:
        yield
    finally:
        for session in sessions:
            session.close()


@contextmanager
def queued_pgbouncer_clients(stack: Stack) -> Iterator[None]:
    """Session pooling with pool_size=2: two clients hold both server connections, three more queue."""
    holders = [psycopg.connect(stack.bouncer.client_dsn("postgres"), autocommit=True) for _ in range(2)]
    for holder in holders:
        holder.execute("SELECT 1")
    queued = [psycopg.connect(stack.bouncer.client_dsn("postgres"), autocommit=True) for _ in range(3)]
    threads = [_in_thread(lambda c=c: c.execute("SELECT 1")) for c in queued]
    try:
        yield
    finally:
        for holder in holders:
            holder.close()
        for thread in threads:
            thread.join(10)
        for client in queued:
            client.close()


@contextmanager
def failing_archive_command(stack: Stack) -> Iterator[None]:
    """archive_command fails for a switched segment; afterwards the pending segments are archived."""
    primary = stack.primary
    primary.execute("ALTER SYSTEM SET archive_command = 'exit 1'")
    primary.execute("SELECT pg_reload_conf()")
    try:
        time.sleep(0.5)  # the archiver reads the new command on reload
        primary.execute("INSERT INTO e2e_events (note) VALUES ('segment')")
        primary.execute("SELECT pg_switch_wal()")
        yield
    finally:
        primary.execute("ALTER SYSTEM RESET archive_command")
        primary.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)
        primary.execute("INSERT INTO e2e_events (note) VALUES ('segment')")
        primary.execute("SELECT pg_switch_wal()")  # wakes the archiver: the pending segments now succeed


@contextmanager
def abandoned_slot(stack: Stack) -> Iterator[None]:
    """A physical slot nothing consumes (reserving WAL at once)."""
    stack.primary.execute("SELECT pg_create_physical_replication_slot('e2e_abandoned', true)")
    try:
        yield
    finally:
        drop_slot(stack.primary, "e2e_abandoned")


# -- scenarios, one condition at a time ----------------------------------------------------------------------

def test_lock_chain_fires_lock_waits(stack: Stack) -> None:
    with lock_chain(stack):
        alert = stack.prometheus.wait_firing("PostgresLockWaits", target="primary", datname="postgres")
        assert float(alert["value"]) > 2
        assert alert["annotations"]["runbook_url"].endswith("#postgreslockwaits")
    stack.prometheus.wait_resolved("PostgresLockWaits", target="primary")


def test_long_query_fires_long_running_query(stack: Stack) -> None:
    with long_query(stack):
        alert = stack.prometheus.wait_firing("PostgresLongRunningQuery", target="primary", datname="postgres")
        assert float(alert["value"]) > 3
    stack.prometheus.wait_resolved("PostgresLongRunningQuery", target="primary")


def test_idle_transaction_fires_idle_in_transaction(stack: Stack) -> None:
    with idle_transaction(stack):
        alert = stack.prometheus.wait_firing("PostgresIdleInTransaction", target="primary", datname="postgres")
        assert float(alert["value"]) > 3
    stack.prometheus.wait_resolved("PostgresIdleInTransaction", target="primary")


def test_paused_replay_fires_lag_on_standby_and_primary(stack: Stack) -> None:
    with paused_replay(stack):
        seconds = stack.prometheus.wait_firing("PostgresReplicationLag", target="replica")
        assert float(seconds["value"]) > 2
        in_bytes = stack.prometheus.wait_firing("PostgresReplicationLagBytes", target="primary")
        assert _labels(in_bytes)["application_name"] == stack.standby.application_name
        assert float(in_bytes["value"]) > 65536
    stack.prometheus.wait_resolved("PostgresReplicationLag", target="replica")
    stack.prometheus.wait_resolved("PostgresReplicationLagBytes", target="primary")


def test_saturated_application_pool_fires_pool_saturated(stack: Stack) -> None:
    with saturated_pool(stack):
        alert = stack.prometheus.wait_firing("PostgresPoolSaturated", target="primary", pool="api")
        assert float(alert["value"]) >= 1.0
    stack.prometheus.wait_resolved("PostgresPoolSaturated", target="primary", pool="api")


def test_queued_pgbouncer_clients_fire_clients_waiting(stack: Stack) -> None:
    with queued_pgbouncer_clients(stack):
        alert = stack.prometheus.wait_firing("PgBouncerClientsWaiting", target="edge", database="postgres")
        assert float(alert["value"]) >= 1
    stack.prometheus.wait_resolved("PgBouncerClientsWaiting", target="edge")


def test_failing_archive_command_fires_archiving_failing(stack: Stack) -> None:
    with failing_archive_command(stack):
        alert = stack.prometheus.wait_firing("PostgresWalArchivingFailing", target="primary")
        assert float(alert["value"]) > 0
    stack.prometheus.wait_resolved("PostgresWalArchivingFailing", target="primary", timeout=75)


def test_abandoned_slot_fires_slot_inactive(stack: Stack) -> None:
    with abandoned_slot(stack):
        stack.prometheus.wait_firing("PostgresReplicationSlotInactive", target="primary", slot_name="e2e_abandoned")
    stack.prometheus.wait_resolved("PostgresReplicationSlotInactive", target="primary", slot_name="e2e_abandoned")


def test_sequence_at_96_percent_fires_both_exhaustion_alerts(stack: Stack) -> None:
    """The issue's case, live: setval to 96 % of the range gives 0.96 ± 0.001 and both sequence alerts fire."""
    labels = {"target": "primary", "datname": "postgres", "schemaname": "public", "sequencename": "e2e_ticket"}
    critical = stack.prometheus.wait_firing("PostgresSequenceImminentExhaustion", **labels)
    assert float(critical["value"]) == pytest.approx(0.96, abs=0.001)
    assert critical["labels"]["severity"] == "critical"
    assert critical["annotations"]["runbook_url"].endswith("#postgressequenceimminentexhaustion")
    warning = stack.prometheus.wait_firing("PostgresSequenceNearExhaustion", **labels)
    assert float(warning["value"]) == pytest.approx((TICKET_VALUE - 1) / (1000 - 1))
    # The restricted role may not read the sequence: it is not measured there, so nothing fires for it.
    assert not stack.prometheus.matching("PostgresSequenceNearExhaustion", target="restricted")


def test_unused_index_fires_unused_indexes(stack: Stack) -> None:
    alert = stack.prometheus.wait_firing("PostgresUnusedIndexes", target="primary", datname="postgres")
    size = stack.primary.execute("SELECT relpages::bigint * current_setting('block_size')::bigint AS size "
                                 "FROM pg_class WHERE relname = 'e2e_orders_unused'")[0]["size"]
    assert float(alert["value"]) == size > 0  # the only non-unique index of the database, never scanned
    assert alert["labels"]["severity"] == "info"


def test_stopped_server_fires_postgres_down_then_restarted(stack: Stack) -> None:
    stack.standby.cluster.stop()
    try:
        alert = stack.prometheus.wait_firing("PostgresDown", target="replica")
        assert alert["labels"]["severity"] == "critical"
    finally:
        stack.standby.cluster.start()
    stack.prometheus.wait_resolved("PostgresDown", target="replica")
    stack.standby.wait_streaming()
    restarted = stack.prometheus.wait_firing("PostgresRestarted", target="replica")
    started = stack.standby.execute("SELECT extract(epoch FROM pg_postmaster_start_time())::float8 AS t")[0]["t"]
    assert 0 < float(restarted["value"]) < time.time() - started + 5  # the uptime, seen a little earlier
    assert not stack.prometheus.matching("PostgresRestarted", target="primary")


# -- every dashboard panel has data ------------------------------------------------------------------------

#: The conditions the dashboards are built to show, each with an alert that says Prometheus has seen it.
#: A failing archive_command and a stopped server are left out: their panels (Archiver, Up) have series
#: without them, and undoing them takes the longest.
INCIDENTS: list[tuple[Callable[[Stack], AbstractContextManager[None]], str, dict[str, str]]] = [
    (lock_chain, "PostgresLockWaits", {"target": "primary", "datname": "postgres"}),
    (long_query, "PostgresLongRunningQuery", {"target": "primary", "datname": "postgres"}),
    (idle_transaction, "PostgresIdleInTransaction", {"target": "primary", "datname": "postgres"}),
    (paused_replay, "PostgresReplicationLagBytes", {"target": "primary"}),
    (saturated_pool, "PostgresPoolSaturated", {"target": "primary", "pool": "api"}),
    (queued_pgbouncer_clients, "PgBouncerClientsWaiting", {"target": "edge", "database": "postgres"}),
    (abandoned_slot, "PostgresReplicationSlotInactive", {"target": "primary", "slot_name": "e2e_abandoned"}),
]


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    """Every panel has data over this test's own window, with the incidents it creates (no earlier test's)."""
    started = time.time()
    with ExitStack() as incidents:
        for condition, _, _ in INCIDENTS:
            incidents.enter_context(condition(stack))
        for _, alert, labels in INCIDENTS:
            stack.prometheus.wait_firing(alert, **labels)
        empty, evaluated = _empty_panels(stack.prometheus, started, time.time())
    for _, alert, labels in INCIDENTS:  # the stack as this test found it, for whatever runs next
        stack.prometheus.wait_resolved(alert, **labels)
    assert evaluated > 50
    assert not empty, "panels without data:\n  " + "\n  ".join(empty)


def _empty_panels(prometheus: Prometheus, start: float, end: float) -> tuple[list[str], int]:
    """Dashboard queries without a result between ``start`` and ``end`` (NOT_FILLED aside), and how many ran."""
    window = f"{int(end - start) + 1}s"
    # The evaluation itself can tell empty from filled: a selector of a target that does not exist is empty.
    assert not prometheus.query_range('pg_up{target="no-such-target"}', start, end)
    empty = []
    evaluated = 0
    for file, board in build_dashboards().items():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                expr = expand_variables(target["expr"], rate_interval=RATE_INTERVAL, time_range=window)
                if target.get("instant"):
                    result = prometheus.query(expr, end)
                    if not result:  # instant panels show the range end; the condition may have passed
                        result = prometheus.query_range(expr, start, end)
                else:
                    result = prometheus.query_range(expr, start, end)
                evaluated += 1
                key = (file, panel["title"])
                if not result and key not in NOT_FILLED:
                    empty.append(f"{file}: {panel['title']} [{target['refId']}]: {expr}")
    return empty, evaluated
