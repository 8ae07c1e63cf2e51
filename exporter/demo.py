"""`pgvitals demo`: a throwaway PostgreSQL, a small workload on it, and the exporter watching it."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time

import psycopg

from exporter.config import load_settings
from exporter.localpg import LocalCluster

log = logging.getLogger("pgvitals.demo")

DEMO_PASSWORD = "demo-monitor-password"


def _prepare(cluster: LocalCluster) -> str:
    cluster.execute("CREATE DATABASE shop")
    cluster.execute("CREATE EXTENSION pg_stat_statements")
    cluster.execute("CREATE EXTENSION pg_stat_statements", dbname="shop")
    cluster.execute(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, customer int NOT NULL, total numeric NOT NULL, "
        "created_at timestamptz NOT NULL DEFAULT now());"
        "CREATE INDEX ON orders (customer);"
        "INSERT INTO orders (customer, total) SELECT g % 1000, (g % 97) * 1.5 FROM generate_series(1, 50000) g;"
        "ANALYZE orders;",
        dbname="shop",
    )
    return cluster.create_monitor_role("pgvitals_monitor", DEMO_PASSWORD)


def _workload(cluster: LocalCluster, stop: threading.Event) -> None:
    """A few application sessions doing reads, writes and the occasional slow query."""
    try:
        with psycopg.connect(cluster.dsn(dbname="shop"), autocommit=True, application_name="shop_api") as conn:
            while not stop.is_set():
                customer = random.randrange(1000)
                conn.execute("SELECT sum(total) FROM orders WHERE customer = %s", (customer,))
                conn.execute("INSERT INTO orders (customer, total) VALUES (%s, %s)", (customer, 9.5))
                if random.random() < 0.02:
                    conn.execute("SELECT pg_sleep(0.5), count(*) FROM orders")
                stop.wait(0.05)
    except psycopg.Error as exc:
        if not stop.is_set():
            log.warning("workload stopped: %s", exc)


def run_demo(port: int = 9839, duration: float | None = None) -> int:
    """Run until Ctrl-C (or ``duration`` seconds), then remove everything."""
    from exporter.daemon import Daemon

    cluster = LocalCluster(name="demo")
    stop = threading.Event()
    daemon = None
    try:
        log.info("starting a throwaway PostgreSQL from %s", cluster.bindir)
        cluster.init().start()
        dsn = _prepare(cluster)
        worker = threading.Thread(target=_workload, args=(cluster, stop), daemon=True)
        worker.start()
        settings = load_settings(raw={
            "listen": f"127.0.0.1:{port}",
            "targets": [{"name": "demo", "dsn": dsn}],
            "collectors": {},
        }, environ={})
        daemon = Daemon(settings)
        daemon.start()
        assert daemon.server is not None
        url = f"http://127.0.0.1:{daemon.server.port}/metrics"
        print(f"\npgvitals demo: PostgreSQL {cluster.major} on port {cluster.port}, exporter at {url}\n"
              f"  curl -s {url} | grep -v '^#' | head\nPress Ctrl-C to stop and clean up.\n", flush=True)
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        done.wait(duration)
        return 0
    finally:
        stop.set()
        if daemon is not None:
            daemon.stop()
        time.sleep(0.1)
        cluster.destroy()
        log.info("demo cleaned up")
