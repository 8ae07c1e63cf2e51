"""Logical replication on the subscriber, as pg_monitor, with a real publisher and subscriber pair."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from exporter.localpg import wait_until
from tests.support.exporters import collect_once
from tests.support.logical import Pair, drop_subscription, logical_pair, paused_sender, subscribe
from tests.support.scrape import Metrics

pytestmark = [pytest.mark.live, pytest.mark.family("subscriptions")]

SUBSCRIPTION_COLLECTORS = ["pg_stat_subscription", "pg_stat_subscription_stats"]


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with logical_pair() as started:
        yield started


def _collect(pair: Pair) -> Metrics:
    metrics = collect_once(pair.subscriber, SUBSCRIPTION_COLLECTORS)
    assert metrics.value("pgvitals_collector_success", collector="pg_stat_subscription") == 1
    return metrics


def test_a_paused_publisher_shows_growing_lag(pair: Pair) -> None:
    subscribe(pair, "watch")
    try:
        metrics = _collect(pair)
        labels = {"datname": "postgres", "subname": "watch"}
        assert metrics.value("pg_subscription_enabled", **labels) == 1
        assert metrics.value("pg_subscription_apply_workers", **labels) == 1
        assert metrics.value("pg_subscription_sync_workers", **labels) == 0
        assert (metrics.value("pg_subscription_parallel_apply_workers", **labels) is not None) == (
            pair.subscriber.version_num >= 160000)
        with paused_sender(pair, "watch"):
            paused = _collect(pair)
            start = paused.value("pg_subscription_last_message_age_seconds", **labels)
            assert start is not None

            def grown() -> Metrics | None:
                now = _collect(pair)
                age = now.value("pg_subscription_last_message_age_seconds", **labels)
                return now if age is not None and age > start + 2 else None

            later: Metrics = wait_until(grown, timeout=30, interval=0.5)
            report = later.value("pg_subscription_report_age_seconds", **labels)
            assert report is not None and report > 2
            truth = pair.subscriber.execute(
                "SELECT date_part('epoch', now() - last_msg_receipt_time) AS age FROM pg_stat_subscription "
                "WHERE subname = 'watch' AND relid IS NULL")[0]["age"]
            age = later.value("pg_subscription_last_message_age_seconds", **labels)
            assert age is not None and age <= truth  # the truth was read after the collection
            assert later.value("pg_subscription_apply_workers", **labels) == 1  # still connected, only silent
    finally:
        drop_subscription(pair, "watch")


def test_a_disabled_subscription_has_no_apply_worker(pair: Pair) -> None:
    subscribe(pair, "sleepy")
    try:
        pair.subscriber.execute("ALTER SUBSCRIPTION sleepy DISABLE")

        def stopped() -> Metrics | None:
            metrics = _collect(pair)
            return metrics if metrics.value("pg_subscription_apply_workers", subname="sleepy") == 0 else None

        metrics: Metrics = wait_until(stopped, timeout=30, interval=0.5)
        assert metrics.value("pg_subscription_enabled", subname="sleepy") == 0
        assert metrics.value("pg_subscription_last_message_age_seconds", subname="sleepy") is None
    finally:
        drop_subscription(pair, "sleepy")


def test_a_conflict_counts_apply_errors(pair: Pair) -> None:
    if pair.subscriber.version_num < 150000:
        metrics = _collect(pair)
        assert metrics.value("pgvitals_collector_skipped", collector="pg_stat_subscription_stats",
                             reason="version") == 1
        pytest.skip("pg_stat_subscription_stats exists from PostgreSQL 15")
    subscribe(pair, "clash")
    try:
        labels = {"datname": "postgres", "subname": "clash"}
        metrics = _collect(pair)
        assert metrics.value("pg_subscription_apply_errors_total", **labels) == 0
        assert metrics.value("pg_subscription_sync_errors_total", **labels) == 0
        # The same key on both sides: applying the publisher's insert violates the subscriber's primary key.
        pair.subscriber.execute("INSERT INTO items VALUES (42, 'local')")
        pair.publisher.execute("INSERT INTO items VALUES (42, 'remote')")

        def erroring() -> Metrics | None:
            metrics = _collect(pair)
            errors = metrics.value("pg_subscription_apply_errors_total", **labels)
            return metrics if errors is not None and errors >= 1 else None

        metrics = wait_until(erroring, timeout=60, interval=0.5)
        truth = pair.subscriber.execute(
            "SELECT apply_error_count AS n FROM pg_stat_subscription_stats WHERE subname = 'clash'")[0]["n"]
        errors = metrics.value("pg_subscription_apply_errors_total", **labels)
        assert errors is not None and 1 <= errors <= truth
        conflicts = metrics.value("pg_subscription_conflicts_total", conflict="insert_exists", **labels)
        if pair.subscriber.version_num >= 180000:
            assert conflicts is not None and conflicts >= 1
            assert len(metrics.find("pg_subscription_conflicts_total", **labels)) == 7
        else:
            assert conflicts is None
    finally:
        pair.subscriber.execute("DELETE FROM items WHERE id = 42")
        drop_subscription(pair, "clash")
        pair.publisher.execute("DELETE FROM items WHERE id = 42")


def test_one_name_in_two_databases_stays_two_subscriptions(pair: Pair) -> None:
    pair.subscriber.execute("CREATE DATABASE other")
    pair.subscriber.execute("CREATE TABLE items (id int PRIMARY KEY, note text)", "other")
    subscribe(pair, "twin")
    subscribe(pair, "twin", "other", slot="twin_other")
    try:
        pair.subscriber.execute("ALTER SUBSCRIPTION twin DISABLE", "other")
        wait_until(lambda: pair.subscriber.execute(
            "SELECT count(pid) AS n FROM pg_stat_subscription WHERE subname = 'twin'")[0]["n"] == 1, timeout=30)
        metrics = _collect(pair)
        assert metrics.value("pg_subscription_enabled", datname="postgres", subname="twin") == 1
        assert metrics.value("pg_subscription_apply_workers", datname="postgres", subname="twin") == 1
        if pair.subscriber.version_num >= 140000:
            assert metrics.value("pg_subscription_enabled", datname="other", subname="twin") == 0
            assert metrics.value("pg_subscription_apply_workers", datname="other", subname="twin") == 0
        else:  # matched by name (see the collector's notes): without a worker it cannot be told apart
            assert not metrics.find("pg_subscription_enabled", datname="other")
    finally:
        drop_subscription(pair, "twin", "other")
        drop_subscription(pair, "twin")
        pair.subscriber.execute("DROP DATABASE other")
