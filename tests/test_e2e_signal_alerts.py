"""End to end, the alerts of issue 13 that need a server of their own: pgvitals and a real Prometheus evaluating
the generated rules against a publisher/subscriber pair (a frozen WAL sender, a disabled subscription, a conflict)
and against a server whose autovacuum workers are all kept busy. Each alert fires for the condition that defines
it and resolves once the condition is gone.

The rule files are rendered from TEST_ALERTS (thresholds and `for` scaled down to seconds), as
`pgvitals alerts --config` renders them.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from exporter.alerts import render_rules
from exporter.catalog import load
from exporter.localpg import wait_until
from tests.support.exporters import running_exporter
from tests.support.logical import Pair, drop_subscription, logical_pair, paused_sender, subscribe
from tests.support.prometheus import PROMETHEUS, Prometheus, running_prometheus
from tests.support.servers import Server, settings_for, start_server
from tests.support.tables import big_table

pytestmark = [pytest.mark.live, pytest.mark.slow]

SUBSCRIPTION_COLLECTORS = ("pg_stat_subscription", "pg_stat_subscription_stats")
SILENCE = 4.0  # seconds without a message from the publisher that fire PostgresSubscriptionSilent here
TEST_ALERTS: dict[str, Any] = {
    "rate_window": "10s",
    "subscription_stopped": {"for": "2s"},
    "subscription_errors": {"count": 0, "for": "2s"},
    "subscription_silent": {"seconds": f"{SILENCE:g}s", "for": "1s"},
    "autovacuum_workers": {"for": "2s"},
}


@dataclass
class Stack:
    pair: Pair
    prometheus: Prometheus


@contextmanager
def watched(server: Server, name: str, collectors: tuple[str, ...]) -> Iterator[Prometheus]:
    """pgvitals running only ``collectors`` (every second) on ``server`` as target ``name``, scraped by Prometheus."""
    if not PROMETHEUS.exists():
        pytest.skip("needs /usr/bin/prometheus (scripts/setup installs it)")
    overrides = {c.name: {"interval": "1s", "timeout": "0.8s"} if c.name in collectors else {"enabled": False}
                 for c in load().collectors}
    settings = settings_for([{"name": name, "dsn": server.monitor_dsn}], collectors=overrides, probe_interval="1s",
                            max_backoff="2s", alerts=TEST_ALERTS)
    with running_exporter(settings) as daemon:
        assert daemon.server is not None
        with running_prometheus(daemon.server.port, render_rules(settings)) as prometheus:
            wait_until(lambda: prometheus.query("pg_up == 1", time.time()), timeout=30)
            yield prometheus


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with ExitStack() as cleanup:
        pair = cleanup.enter_context(logical_pair())
        prometheus = cleanup.enter_context(watched(pair.subscriber, "subscriber", SUBSCRIPTION_COLLECTORS))
        yield Stack(pair, prometheus)


def _series_seen(stack: Stack, expr: str) -> None:
    wait_until(lambda: stack.prometheus.query(expr, time.time()), timeout=30, interval=0.25)


@pytest.mark.family("subscriptions")
def test_frozen_publisher_fires_subscription_silent(stack: Stack) -> None:
    pair = stack.pair
    subscribe(pair, "watch")
    stop = threading.Event()

    def write() -> None:  # a steady stream of changes: a healthy subscription hears from its publisher often
        for key in itertools.count(100_000):
            if stop.wait(0.2):
                return
            pair.publisher.execute(f"INSERT INTO items VALUES ({key}, 'stream')")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        _series_seen(stack, 'pg_subscription_last_message_age_seconds{subname="watch"}')
        time.sleep(SILENCE + 2)  # past the threshold and `for`: a healthy stream fires nothing
        assert not stack.prometheus.matching("PostgresSubscriptionSilent", subname="watch")
        with paused_sender(pair, "watch"):
            alert = stack.prometheus.wait_firing("PostgresSubscriptionSilent", subname="watch")
            assert float(alert["value"]) > SILENCE
            assert alert["labels"]["datname"] == "postgres" and alert["labels"]["target"] == "subscriber"
            # Still connected, only silent: not stopped.
            assert not stack.prometheus.matching("PostgresSubscriptionStopped", subname="watch")
        stack.prometheus.wait_resolved("PostgresSubscriptionSilent", subname="watch")
    finally:
        stop.set()
        writer.join(10)
        drop_subscription(pair, "watch")


@pytest.mark.family("subscriptions")
def test_disabled_subscription_fires_subscription_stopped(stack: Stack) -> None:
    pair = stack.pair
    subscribe(pair, "sleepy")
    try:
        _series_seen(stack, 'pg_subscription_apply_workers{subname="sleepy"} == 1')
        # Created a moment before its worker started, it may be pending: no longer once the worker runs.
        stack.prometheus.wait_resolved("PostgresSubscriptionStopped", subname="sleepy", timeout=10)
        pair.subscriber.execute("ALTER SUBSCRIPTION sleepy DISABLE")
        alert = stack.prometheus.wait_firing("PostgresSubscriptionStopped", subname="sleepy")
        assert float(alert["value"]) == 0  # pg_subscription_enabled: disabled, not a worker failing
        assert alert["annotations"]["runbook_url"].endswith("#postgressubscriptionstopped")
        pair.subscriber.execute("ALTER SUBSCRIPTION sleepy ENABLE")
        stack.prometheus.wait_resolved("PostgresSubscriptionStopped", subname="sleepy")
    finally:
        drop_subscription(pair, "sleepy")


@pytest.mark.family("subscriptions")
def test_conflict_fires_subscription_errors(stack: Stack) -> None:
    pair = stack.pair
    if pair.subscriber.version_num < 150000:
        pytest.skip("pg_stat_subscription_stats (the error counters) exists from PostgreSQL 15")
    subscribe(pair, "clash")
    try:
        _series_seen(stack, 'pg_subscription_apply_errors_total{subname="clash"}')
        # The same key on both sides: applying the publisher's insert violates the subscriber's primary key,
        # and the worker fails on it again at every restart.
        pair.subscriber.execute("INSERT INTO items VALUES (42, 'local')")
        pair.publisher.execute("INSERT INTO items VALUES (42, 'remote')")
        alert = stack.prometheus.wait_firing("PostgresSubscriptionErrors", subname="clash")
        assert float(alert["value"]) >= 1
        wait_until(lambda: pair.subscriber.execute(  # an error loop, not one error
            "SELECT apply_error_count AS n FROM pg_stat_subscription_stats WHERE subname = 'clash'")[0]["n"] >= 2,
            timeout=30, interval=0.25)
        pair.subscriber.execute("DELETE FROM items WHERE id = 42")  # the conflict resolved: the change applies

        def applied() -> bool:
            rows = pair.subscriber.execute("SELECT note FROM items WHERE id = 42")
            return bool(rows) and rows[0]["note"] == "remote"

        wait_until(applied, timeout=30, interval=0.25)
        stack.prometheus.wait_resolved("PostgresSubscriptionErrors", subname="clash")
    finally:
        drop_subscription(pair, "clash")
        pair.subscriber.execute("DELETE FROM items WHERE id = 42")
        pair.publisher.execute("DELETE FROM items WHERE id = 42")


@pytest.mark.family("maintenance")
def test_every_autovacuum_worker_busy_fires_autovacuum_workers_busy() -> None:
    server = start_server("autovacuum", settings={"autovacuum_naptime": "1", "autovacuum_max_workers": "2"})
    try:
        with watched(server, "autovacuum", ("pg_autovacuum_workers", "pg_settings")) as prometheus:
            wait_until(lambda: prometheus.query("pg_settings_autovacuum_max_workers == 2", time.time())
                       and prometheus.query("sum(pg_autovacuum_workers) == 0", time.time()), timeout=30)
            time.sleep(3)  # longer than the `for`: idle workers fire nothing
            assert not prometheus.matching("PostgresAutovacuumWorkersBusy")
            # Three tables autovacuum crawls through (its own cost delay per table) keep both workers busy.
            server.execute("CREATE DATABASE busy")
            for name in ("a", "b", "c"):
                big_table(server, "busy", name, autovacuum=True)
            alert = prometheus.wait_firing("PostgresAutovacuumWorkersBusy", target="autovacuum", timeout=90)
            assert float(alert["value"]) == 2
            # DROP DATABASE stops the workers in it; no table is left to vacuum.
            server.execute("DROP DATABASE busy")
            prometheus.wait_resolved("PostgresAutovacuumWorkersBusy", target="autovacuum")
    finally:
        server.cluster.destroy()
