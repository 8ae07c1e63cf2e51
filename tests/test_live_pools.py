"""Connections and application pools on a real server: sessions we open land in the pools we declare."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

import psycopg
import pytest

from exporter import catalog
from exporter.collectors.pools import BASE_STATES, UNMATCHED, assign_pool, parse_address, pools_for
from exporter.config import PoolConfig
from exporter.localpg import wait_until
from tests.support.exporters import collect_once
from tests.support.scrape import Metrics
from tests.support.servers import Server, start_server

pytestmark = [pytest.mark.live, pytest.mark.family("connections")]

POOL_COLLECTORS = ["pg_connections", "pg_connections_max"]
API_ROLE = "api_svc"
API_PASSWORD = "Api-Role-Secret-4"


@pytest.fixture(scope="module")
def api_role(pg: Server) -> str:
    """An application login role, as an SQLx service would use."""
    pg.execute(f"DROP ROLE IF EXISTS {API_ROLE}")
    pg.execute(f"CREATE ROLE {API_ROLE} LOGIN PASSWORD '{API_PASSWORD}'")
    return API_ROLE


def _tcp_dsn(pg: Server, dbname: str, user: str | None = None) -> str:
    if user == API_ROLE:
        return pg.cluster.dsn(API_ROLE, API_PASSWORD, dbname)
    return pg.dsn(dbname, monitor=False)


@contextmanager
def sessions(pg: Server, dbname: str, count: int, application_name: str, user: str | None = None,
             unix_socket: bool = False) -> Iterator[list[psycopg.Connection[Any]]]:
    """``count`` idle client sessions with ``application_name`` (TCP from 127.0.0.1 unless ``unix_socket``)."""
    conns: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(count):
            if unix_socket:
                conns.append(pg.cluster.connect(dbname, application_name=application_name))
            else:
                conns.append(psycopg.connect(_tcp_dsn(pg, dbname, user), application_name=application_name,
                                             autocommit=True))
        yield conns
    finally:
        for conn in conns:
            conn.close()


def _wait_visible(pg: Server, application_name: str, count: int) -> None:
    """Wait until pg_stat_activity shows ``count`` sessions of ``application_name`` (the view lags a moment)."""
    sql = f"SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = '{application_name}'"
    wait_until(lambda: pg.execute(sql)[0]["n"] == count, timeout=10)


def _sleep_until_cancelled(conn: psycopg.Connection[Any]) -> None:
    with suppress(psycopg.errors.QueryCanceled):  # the test cancels the sleep once it has measured
        conn.execute("SELECT pg_sleep(30)")


def _pool_total(metrics: Metrics, pool: str) -> float:
    return sum(value for _, value in metrics.find("pg_pool_connections", pool=pool))


def test_sessions_land_in_declared_pools(pg: Server, fresh_db: str, api_role: str) -> None:
    pools = [
        {"name": "mandate-vault", "application_name": "mandate_vault*", "capacity": 30},  # SQLAlchemy 20 + 10
        {"name": "ledger-api", "usename": "api_*", "capacity": 10},  # SQLx max_connections
        {"name": "reporting", "application_name": "reporting", "capacity": 5},  # declared, no sessions
    ]
    with ExitStack() as stack:
        vault = stack.enter_context(sessions(pg, fresh_db, 4, "mandate_vault-worker"))
        stack.enter_context(sessions(pg, fresh_db, 2, "ledger", user=api_role))
        stack.enter_context(sessions(pg, fresh_db, 3, "someone_else"))
        vault[0].execute("BEGIN")
        vault[0].execute("SELECT 1")  # idle in transaction
        for name, count in (("mandate_vault-worker", 4), ("ledger", 2), ("someone_else", 3)):
            _wait_visible(pg, name, count)
        metrics = collect_once(pg, POOL_COLLECTORS, pools=pools)

    assert metrics.value("pgvitals_collector_success", collector="pg_connections") == 1
    assert metrics.value("pg_pool_connections", target="main", pool="mandate-vault", state="idle") == 3
    assert metrics.value("pg_pool_connections", pool="mandate-vault", state="idle in transaction") == 1
    assert metrics.value("pg_pool_connections", pool="mandate-vault", state="active") == 0
    assert metrics.value("pg_pool_capacity", target="main", pool="mandate-vault") == 30
    assert metrics.value("pg_pool_connections", pool="ledger-api", state="idle") == 2
    assert metrics.value("pg_pool_capacity", pool="ledger-api") == 10
    # A declared pool without sessions still has its series, at zero, in every base state.
    for state in BASE_STATES:
        assert metrics.value("pg_pool_connections", pool="reporting", state=state) == 0
    assert metrics.value("pg_pool_capacity", pool="reporting") == 5
    # The three other sessions, and the exporter's own (active while it reads), are unmatched.
    assert metrics.value("pg_pool_connections", pool=UNMATCHED, state="idle") >= 3  # type: ignore[operator]
    assert metrics.value("pg_pool_connections", pool=UNMATCHED, state="active") >= 1  # type: ignore[operator]
    assert not metrics.find("pg_pool_capacity", pool=UNMATCHED)
    # Every client session is counted exactly once, in one scan: the pools add up to pg_connections.
    assert sum(v for _, v in metrics.find("pg_connections", datname=fresh_db)) == 9
    all_pools = sum(v for _, v in metrics.find("pg_pool_connections"))
    assert all_pools == sum(v for _, v in metrics.find("pg_connections"))


def test_exporter_sessions_count_under_their_application_name(pg: Server) -> None:
    # A name of its own: sessions of other tests' exporters on this shared server must not count.
    name = "pgvitals_pools_test"
    pools = [{"name": "monitoring", "application_name": name, "capacity": 2}]
    metrics = collect_once(pg, ["pg_connections"], pools=pools, application_name=name)
    # The exporter's one session is active while it reads pg_stat_activity.
    assert metrics.value("pg_pool_connections", pool="monitoring", state="active") == 1
    assert metrics.value("pg_pool_connections", pool="monitoring", state="idle") == 0


def test_client_addr_ranges_and_first_match_wins(pg: Server, fresh_db: str, api_role: str) -> None:
    pools = [
        {"name": "far-away", "application_name": "cidr_app", "client_addr": "10.0.0.0/8", "capacity": 3},
        {"name": "loopback", "application_name": "cidr_app", "client_addr": "127.0.0.1/32", "capacity": 4},
        # Both of the next two match the api role's sessions: the first declared wins.
        {"name": "by-user", "usename": "api_*", "capacity": 6},
        {"name": "by-name", "application_name": "api_app", "capacity": 7},
        {"name": "elsewhere", "application_name": "cidr_app", "targets": ["other-target"], "capacity": 8},
    ]
    with ExitStack() as stack:
        stack.enter_context(sessions(pg, fresh_db, 2, "cidr_app"))  # TCP from 127.0.0.1
        stack.enter_context(sessions(pg, fresh_db, 1, "cidr_app", unix_socket=True))  # no address
        stack.enter_context(sessions(pg, fresh_db, 2, "api_app", user=api_role))
        _wait_visible(pg, "cidr_app", 3)
        _wait_visible(pg, "api_app", 2)
        metrics = collect_once(pg, ["pg_connections"], pools=pools)

    assert _pool_total(metrics, "far-away") == 0
    assert metrics.value("pg_pool_connections", pool="loopback", state="idle") == 2
    assert metrics.value("pg_pool_connections", pool="by-user", state="idle") == 2
    assert _pool_total(metrics, "by-name") == 0
    # A pool restricted to other targets is not exported here at all.
    assert not metrics.find("pg_pool_connections", pool="elsewhere")
    assert not metrics.find("pg_pool_capacity", pool="elsewhere")
    # The Unix-socket session has no client address, so it is unmatched (with the exporter's own).
    assert metrics.value("pg_pool_connections", pool=UNMATCHED, state="idle") >= 1  # type: ignore[operator]
    # The scan groups by address too (for the pools); pg_connections has no address label, so the TCP and
    # the Unix-socket sessions of one role, application and state are one series.
    assert metrics.value("pg_connections", datname=fresh_db, application_name="cidr_app", state="idle") == 3


def test_one_collector_feeds_connections_and_pools() -> None:
    """pg_connections and the pool metrics come from one pg_stat_activity scan per interval."""
    owners = catalog.load().metric_owner
    assert owners["pg_connections"] == owners["pg_pool_connections"] == owners["pg_pool_capacity"]


def test_active_sessions_are_counted_as_active(pg: Server, fresh_db: str) -> None:
    pools = [{"name": "sleepers", "application_name": "sleeper", "capacity": 10}]
    with sessions(pg, fresh_db, 2, "sleeper") as conns:
        threads = [threading.Thread(target=_sleep_until_cancelled, args=(c,)) for c in conns]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: pg.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = "
                                          "'sleeper' AND state = 'active'")[0]["n"] == 2, timeout=10)
            metrics = collect_once(pg, ["pg_connections"], pools=pools)
        finally:
            pg.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'sleeper'")
            for thread in threads:
                thread.join(timeout=10)
    assert metrics.value("pg_pool_connections", pool="sleepers", state="active") == 2
    assert metrics.value("pg_pool_connections", pool="sleepers", state="idle") == 0


def test_connections_max_subtracts_reserved_slots() -> None:
    probe = start_server("connmax", {"max_connections": 40, "superuser_reserved_connections": 4})
    try:
        reserved = 0
        if probe.version_num >= 160000:
            # reserved_connections (16+) needs a restart; give it a value so the subtraction is visible.
            probe.execute("ALTER SYSTEM SET reserved_connections = 6")
            probe.cluster.restart()
            reserved = 6
        metrics = collect_once(probe, ["pg_connections_max", "pg_settings"])
        assert metrics.value("pg_connections_max", target="main") == 40 - 4 - reserved
        settings_max = metrics.value("pg_settings_max_connections")
        assert settings_max == 40
    finally:
        probe.cluster.destroy()


def test_pool_assignment_rules() -> None:
    """Matching semantics without a server: globs are case-sensitive, ranges respect address families."""
    configs = [
        PoolConfig(name="v6", capacity=1, client_addr="fd00::/8"),
        PoolConfig(name="v4", capacity=1, client_addr="192.168.0.0/16", usename="app"),
        PoolConfig(name="glob", capacity=1, application_name="Web[0-9]*"),
        PoolConfig(name="only-b", capacity=1, application_name="*", targets=["b"]),
    ]
    matchers = pools_for("a", configs)
    assert [m.name for m in matchers] == ["v6", "v4", "glob"]
    assert assign_pool(matchers, "x", "app", "192.168.3.4") == "v4"
    assert assign_pool(matchers, "x", "other", "192.168.3.4") == UNMATCHED  # every criterion must hold
    assert assign_pool(matchers, "x", "app", "::ffff:192.168.3.4") == "v4"  # IPv4-mapped IPv6
    assert assign_pool(matchers, "x", "app", "fd12::1") == "v6"
    assert assign_pool(matchers, "Web1-eu", None, None) == "glob"
    assert assign_pool(matchers, "web1-eu", None, None) == UNMATCHED
    assert assign_pool(matchers, "x", "app", None) == UNMATCHED
    assert assign_pool(pools_for("b", configs), "anything", None, None) == "only-b"
    assert parse_address("not an address") is None
