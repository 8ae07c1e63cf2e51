"""postgres_exporter's own mixin against pgvitals in `metric_names: postgres_exporter` mode, in a real Prometheus.

A primary, a streaming standby (through a repmgr-style slot, hot_standby_feedback on) and PgBouncer are
watched by one pgvitals; a real Prometheus scrapes it with the relabeling the README documents (`target`
becomes `instance`) and loads the mixin's alert rules as its rule file. Every alert input and dashboard
query stored in tests/data/postgres_mixin.yaml must return data, except those listed there with the reason
(which must indeed stay empty, so docs/compat.md tells the truth). Then `both` and `native` exporters on the
same primary: `both` serves the union of the two namings with no series twice, `native` none of theirs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest

from exporter.catalog import load
from exporter.compat import COMPAT
from exporter.localpg import wait_until
from tests.support.exporters import running_exporter
from tests.support.mixin import MIXIN, mixin_rule_file
from tests.support.pgbouncer import start_pgbouncer
from tests.support.prometheus import Stack, collector_overrides, require_stack_tools, running_prometheus
from tests.support.scrape import http_status, scrape
from tests.support.servers import Server, settings_for, start_server
from tests.support.sessions import run_in_background
from tests.support.standby import start_standby

pytestmark = [pytest.mark.live, pytest.mark.slow]

#: The relabeling the README documents: each target's series get their own instance, as from postgres_exporter.
RELABEL: list[dict[str, Any]] = [
    {"source_labels": ["target"], "regex": "(.+)", "target_label": "instance"},
    {"regex": "target", "action": "labeldrop"},
]


def _workload(primary: Server, stop: threading.Event) -> None:
    """Reads, writes, rollbacks in an application database, so that the rates have something to show."""
    with psycopg.connect(primary.dsn("app", monitor=False), autocommit=True, application_name="app") as conn:
        step = 0
        while not stop.is_set():
            step += 1
            conn.execute("SELECT v FROM orders WHERE id = %s", (step % 1000 + 1,))
            conn.execute("UPDATE orders SET v = v WHERE id = %s", (step % 1000 + 1,))
            with conn.transaction(force_rollback=True):
                conn.execute("INSERT INTO orders VALUES (-1, 'rolled back')")
            stop.wait(0.05)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_stack_tools()
    with ExitStack() as cleanup:
        primary = start_server("compat")
        cleanup.callback(primary.cluster.destroy)
        primary.execute("CREATE DATABASE app")
        primary.execute("CREATE TABLE orders (id int PRIMARY KEY, v text)", dbname="app")
        primary.execute("INSERT INTO orders SELECT g, 'x' FROM generate_series(1, 1000) g", dbname="app")
        primary.execute("DELETE FROM orders WHERE id > 900", dbname="app")  # dead tuples
        standby = start_standby(primary, slot="repmgr_slot_2", name="compat-standby",
                                settings={"hot_standby_feedback": "on", "wal_receiver_status_interval": "1s"})
        cleanup.callback(standby.destroy)
        bouncer = start_pgbouncer(primary, pool_size=2)
        cleanup.callback(bouncer.stop)

        run_in_background(cleanup, lambda stop: _workload(primary, stop))

        settings = settings_for(
            [{"name": "primary", "dsn": primary.monitor_dsn}, {"name": "replica", "dsn": standby.monitor_dsn}],
            pgbouncers=[{"name": "edge", "dsn": bouncer.admin_dsn}],
            collectors=collector_overrides(), probe_interval="1s", metric_names="postgres_exporter",
        )
        daemon = cleanup.enter_context(running_exporter(settings))
        assert daemon.server is not None
        prometheus = cleanup.enter_context(running_prometheus(
            daemon.server.port, mixin_rule_file(), job="postgres", metric_relabel_configs=RELABEL))
        # A checkpoint and a PgBouncer client, so that their rates and pools have data.
        primary.execute("CHECKPOINT")
        with psycopg.connect(bouncer.client_dsn(), autocommit=True) as client:
            client.execute("SELECT 1")
        wait_until(lambda: prometheus.query("pg_replication_slots_xmin_age", time.time())
                   and prometheus.query("pgbouncer_stats_queries_pooled_total", time.time()), timeout=60)
        time.sleep(6)  # a few more scrapes: rate() and irate() need two samples in their window
        yield Stack(primary, standby, bouncer, prometheus)


def _expand(expr: str) -> str:
    """Grafana's variables as a user picks them: every database, the primary's instance."""
    return expr.replace("$db", ".*").replace("$instance", "primary")


def _expected_empty(item: dict[str, Any], version_num: int) -> bool:
    return bool(item.get("no_data")) and version_num >= int(item.get("only_from", 0))


def test_mixin_alerts_and_dashboard_against_pgvitals(stack: Stack) -> None:
    now = time.time()
    version = stack.primary.version_num
    results: dict[str, bool] = {}
    wrong: list[str] = []
    for kind, items, key in (("alert", MIXIN["alerts"], "input"), ("panel", MIXIN["panels"], "expr")):
        for item in items:
            expr = _expand(item[key])
            has_data = bool(stack.prometheus.query(expr, now))
            label = f"{kind} {item.get('name') or item.get('title')}: {' '.join(expr.split())}"
            results[label] = has_data
            if has_data == _expected_empty(item, version):
                wrong.append(f"{label} -> {'data' if has_data else 'nothing'}")
    alerts = [v for k, v in results.items() if k.startswith("alert")]
    panels = [v for k, v in results.items() if k.startswith("panel")]
    print(f"\npostgres_mixin against pgvitals (PostgreSQL {version // 10000}): "
          f"alert inputs with data {sum(alerts)}/{len(alerts)}, dashboard queries with data "
          f"{sum(panels)}/{len(panels)}")
    for label, has_data in results.items():
        if not has_data:
            print(f"  empty: {label}")
    assert not wrong, "not as tests/data/postgres_mixin.yaml says:\n" + "\n".join(wrong)


def test_prometheus_evaluates_every_mixin_rule(stack: Stack) -> None:
    rules = [r for g in stack.prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {a["name"] for a in MIXIN["alerts"]}
    wait_until(lambda: all(r.get("lastEvaluation", "").startswith("2") for r in
                           (x for g in stack.prometheus.get("/api/v1/rules")["groups"] for x in g["rules"])),
               timeout=20)
    rules = [r for g in stack.prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_each_target_is_its_own_instance(stack: Stack) -> None:
    now = time.time()
    up = {s["metric"]["instance"]: s["value"][1] for s in stack.prometheus.query("pg_up", now)}
    assert up == {"primary": "1", "replica": "1"}
    replica = stack.prometheus.query("pg_replication_is_replica", now)
    assert {s["metric"]["instance"]: s["value"][1] for s in replica} == {"primary": "0", "replica": "1"}
    assert [s["metric"]["instance"] for s in stack.prometheus.query("pgbouncer_up", now)] == ["edge"]
    # postgres_exporter's legacy maps carry server="host:port"
    activity = stack.prometheus.query('pg_stat_activity_count{datname="app",instance="primary"}', now)
    assert activity and all(s["metric"]["server"] == f"127.0.0.1:{stack.primary.cluster.port}" for s in activity)


def test_their_label_values_and_units(stack: Stack) -> None:
    now = time.time()
    modes = {s["metric"]["mode"] for s in stack.prometheus.query('pg_locks_count{instance="primary"}', now)}
    assert "accesssharelock" in modes and all(mode == mode.lower() for mode in modes)
    datid = stack.primary.execute("SELECT oid::text AS oid FROM pg_database WHERE datname = 'app'")[0]["oid"]
    commits = stack.prometheus.query('pg_stat_database_xact_commit{datname="app",instance="primary"}', now)
    assert [s["metric"]["datid"] for s in commits] == [datid]
    pools = stack.prometheus.query('pgbouncer_databases_reserve_pool{instance="edge"}', now)
    assert pools and all("name" in s["metric"] for s in pools)
    assert not stack.prometheus.query('{__name__=~"pg_stat_database_.*_total",__name__!~".*seconds_total"}', now)


def test_both_serves_each_naming_once_and_native_is_unchanged(stack: Stack) -> None:
    catalog = load()
    ours = catalog.metric_names()
    own = {spec.name for spec in catalog.self_metrics}
    theirs_declared = {e.name for e in COMPAT}
    targets = [{"name": "primary", "dsn": stack.primary.monitor_dsn}]
    names: dict[str, set[str]] = {}
    for naming in ("native", "postgres_exporter", "both"):
        settings = settings_for(targets, metric_names=naming, collectors=collector_overrides(), probe_interval="1s")
        with running_exporter(settings) as daemon:
            assert daemon.server is not None
            port = daemon.server.port
            wait_until(lambda: http_status(port, "/readyz")[0] == 200, timeout=60)  # noqa: B023 (called here)
            time.sleep(3)  # every collector has run after ready (1 s intervals)
            # parse_exposition (in scrape) fails on a series served twice or a family split in two
            # (the process_* and python_* families of the HTTP process are the same in every mode)
            names[naming] = {n for n in scrape(port).names() if n.startswith("pg")}
    assert names["native"] <= ours, "native mode serves only the catalog's names"
    assert names["postgres_exporter"] <= theirs_declared | own
    assert "pg_stat_database_xact_commit_total" in names["native"] | names["both"]
    assert "pg_stat_database_xact_commit" in names["postgres_exporter"] & names["both"]
    assert "pg_stat_database_xact_commit_total" not in names["postgres_exporter"]
    assert names["both"] <= ours | theirs_declared
    # Within the one `both` scrape: a derived name is there exactly when its source is.
    for entry in COMPAT:
        if entry.exporter == "postgres_exporter":
            assert (entry.source in names["both"]) == (entry.name in names["both"]), entry.name
