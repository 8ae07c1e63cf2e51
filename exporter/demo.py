"""`pgvitals demo`: a throwaway PostgreSQL, a small workload on it, the exporter watching it and, when
``prometheus`` is installed, a throwaway Prometheus that scrapes it and evaluates the generated alert rules."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
import yaml

from exporter.alerts import RULE_FILE, render_rules
from exporter.config import Settings, load_settings
from exporter.localpg import LocalCluster, free_port, wait_until

log = logging.getLogger("pgvitals.demo")

DEMO_PASSWORD = "demo-monitor-password"

#: Seconds between Prometheus scrapes and rule evaluations: short, so that the demo shows results at once.
PROMETHEUS_INTERVAL = 5
#: The lock chain: first after a few seconds, then each time held this long, with this pause between.
LOCK_CHAIN_START, LOCK_CHAIN_HOLD, LOCK_CHAIN_PAUSE = 3.0, 60.0, 30.0
#: The demo's alert thresholds: the lock chain makes PostgresLockWaits fire within about half a minute.
DEMO_ALERTS: dict[str, Any] = {
    "lock_wait": {"seconds": "5s", "for": "10s"},
    "long_query": {"seconds": "30s", "for": "10s"},
}
#: Collect lock waits and sessions as often as Prometheus scrapes.
DEMO_COLLECTORS: dict[str, Any] = {
    "pg_lock_waits": {"interval": f"{PROMETHEUS_INTERVAL}s", "timeout": "2s"},
    "pg_stat_activity": {"interval": f"{PROMETHEUS_INTERVAL}s", "timeout": "2s"},
}


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


@contextlib.contextmanager
def _session(cluster: LocalCluster, stop: threading.Event, application_name: str) -> Iterator[psycopg.Connection[Any]]:
    """An application session on the shop database; its error once the demo stops (the server goes) is quiet."""
    try:
        with psycopg.connect(cluster.dsn(dbname="shop"), autocommit=True, application_name=application_name) as conn:
            yield conn
    except psycopg.Error as exc:
        if not stop.is_set():
            log.warning("session %s stopped: %s", application_name, exc)


def _workload(cluster: LocalCluster, stop: threading.Event) -> None:
    """A few application sessions doing reads, writes and the occasional slow query."""
    with _session(cluster, stop, "shop_api") as conn:
        while not stop.is_set():
            customer = random.randrange(1000)
            conn.execute("SELECT sum(total) FROM orders WHERE customer = %s", (customer,))
            conn.execute("INSERT INTO orders (customer, total) VALUES (%s, %s)", (customer, 9.5))
            if random.random() < 0.02:
                conn.execute("SELECT pg_sleep(0.5), count(*) FROM orders")
            stop.wait(0.05)


def _wait_for_row_lock(cluster: LocalCluster, stop: threading.Event) -> None:
    """A checkout that updates the order a batch job holds: it waits until the batch job lets go."""
    with _session(cluster, stop, "shop_checkout") as conn:
        conn.execute("UPDATE orders SET total = total WHERE id = 1")


def _lock_chain(cluster: LocalCluster, stop: threading.Event) -> None:
    """A batch job that keeps a row locked for a minute now and then, with a session queued behind it."""
    with _session(cluster, stop, "shop_batch") as conn:
        stop.wait(LOCK_CHAIN_START)
        while not stop.is_set():
            conn.execute("BEGIN")
            conn.execute("SELECT id FROM orders WHERE id = 1 FOR UPDATE")
            waiter = threading.Thread(target=_wait_for_row_lock, args=(cluster, stop), daemon=True)
            waiter.start()
            stop.wait(LOCK_CHAIN_HOLD)
            conn.execute("ROLLBACK")
            waiter.join(timeout=10)
            stop.wait(LOCK_CHAIN_PAUSE)


# -- Prometheus ---------------------------------------------------------------------------------------------------

def find_prometheus() -> Path | None:
    """The Prometheus server binary (Debian's package installs /usr/bin/prometheus), or None."""
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    return Path(found) if found else None


@dataclass
class DemoPrometheus:
    """A Prometheus server on a free loopback port, its configuration and data in a temporary directory."""

    url: str
    process: subprocess.Popen[bytes]
    base: Path

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.base, ignore_errors=True)

    def firing_alerts(self) -> list[str]:
        """Names of the alerts firing now, from the HTTP API."""
        with urllib.request.urlopen(f"{self.url}/api/v1/alerts", timeout=5) as response:
            body = json.loads(response.read())
        return sorted({a["labels"]["alertname"] for a in body["data"]["alerts"] if a["state"] == "firing"})


def start_prometheus(binary: Path, exporter_port: int, settings: Settings) -> DemoPrometheus:
    """Start Prometheus scraping the exporter under the rules' job name, with the rules rendered from ``settings``."""
    base = Path(tempfile.mkdtemp(prefix="pgvitals-demo-prometheus-"))
    try:
        (base / RULE_FILE).write_text(render_rules(settings), encoding="utf-8")
        interval = f"{PROMETHEUS_INTERVAL}s"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(base / RULE_FILE)],
            "scrape_configs": [{"job_name": settings.alerts.job,
                                "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}],
        }
        (base / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        port = free_port()
        with (base / "prometheus.log").open("wb") as output:
            # A session of its own: Ctrl-C reaches the demo only, which stops Prometheus after the exporter.
            process = subprocess.Popen(
                [str(binary), f"--config.file={base / 'prometheus.yml'}", f"--storage.tsdb.path={base / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d"],
                stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    prometheus = DemoPrometheus(f"http://127.0.0.1:{port}", process, base)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited ({process.returncode}): "
                               + (base / "prometheus.log").read_text(errors="replace")[-2000:])
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as answer:
            return bool(answer.status == 200)
        return False

    try:
        wait_until(ready, timeout=60, interval=0.2)
    except BaseException:
        prometheus.stop()
        raise
    return prometheus


# -- the demo -----------------------------------------------------------------------------------------------------

def demo_settings(port: int, dsn: str) -> Settings:
    """The exporter's settings: one target, lock and session collectors as often as Prometheus scrapes."""
    return load_settings(raw={
        "listen": f"127.0.0.1:{port}",
        "targets": [{"name": "demo", "dsn": dsn}],
        "collectors": DEMO_COLLECTORS,
        "alerts": DEMO_ALERTS,
    }, environ={})


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(port: int = 9839, duration: float | None = None, with_prometheus: bool = True) -> int:
    """Run until Ctrl-C or SIGTERM (or ``duration`` seconds), then remove everything."""
    from exporter.daemon import Daemon

    # Signal handlers can only be set from the main thread (a test may call this from another).
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, _interrupt) for sig in signals}
    stop = threading.Event()
    cleanup = ExitStack()
    try:
        cluster = LocalCluster(name="demo")
        cleanup.callback(cluster.destroy)
        log.info("starting a throwaway PostgreSQL from %s", cluster.bindir)
        cluster.init().start()
        dsn = _prepare(cluster)
        cleanup.callback(stop.set)  # runs before the cluster goes away: the sessions end quietly
        for job in (_workload, _lock_chain):
            threading.Thread(target=job, args=(cluster, stop), daemon=True, name=job.__name__).start()
        settings = demo_settings(port, dsn)
        daemon = Daemon(settings)
        cleanup.callback(daemon.stop)
        daemon.start()
        assert daemon.server is not None
        url = f"http://127.0.0.1:{daemon.server.port}/metrics"
        lines = [f"pgvitals demo: PostgreSQL {cluster.major} on port {cluster.port}, exporter at {url}",
                 f"  curl -s {url} | grep -v '^#' | head"]
        binary = find_prometheus() if with_prometheus else None
        if binary is not None:
            prometheus = start_prometheus(binary, daemon.server.port, settings)
            cleanup.callback(prometheus.stop)
            lines += [f"Prometheus at {prometheus.url} with pgvitals' alert rules: {prometheus.url}/alerts",
                      "  a session waits for a lock held by a batch job: PostgresLockWaits fires within a minute",
                      f"  curl -s {prometheus.url}/api/v1/alerts"]
        elif with_prometheus:
            lines.append("(install prometheus to also get a throwaway Prometheus evaluating pgvitals' alert rules)")
        print("\n" + "\n".join(lines) + "\nPress Ctrl-C to stop and clean up.\n", flush=True)
        threading.Event().wait(duration)
    except KeyboardInterrupt:
        pass
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        cleanup.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("demo cleaned up")
    return 0
