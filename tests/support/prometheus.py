"""A real Prometheus for the end-to-end tests: scrapes one exporter, evaluates a rule file, answers queries."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.catalog import load
from exporter.localpg import free_port, wait_until
from tests.support.pgbouncer import PgBouncer, pgbouncer_available
from tests.support.servers import Server
from tests.support.standby import Standby

PROMETHEUS = Path("/usr/bin/prometheus")
SCRAPE_INTERVAL = 1.0
FIRE_TIMEOUT = 40.0
RESOLVE_TIMEOUT = 40.0


@dataclass
class Prometheus:
    """A Prometheus server on a free port with a temporary data directory."""

    url: str
    process: subprocess.Popen[bytes]
    base: Path

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/alerts")["alerts"])

    def matching(self, name: str, **labels: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts() if a["labels"].get("alertname") == name
                and all(a["labels"].get(k) == v for k, v in labels.items())]

    def wait_firing(self, name: str, timeout: float = FIRE_TIMEOUT, **labels: str) -> dict[str, Any]:
        found: dict[str, Any] = wait_until(
            lambda: next((a for a in self.matching(name, **labels) if a["state"] == "firing"), None),
            timeout=timeout, interval=0.25)
        return found

    def wait_resolved(self, name: str, timeout: float = RESOLVE_TIMEOUT, **labels: str) -> None:
        wait_until(lambda: not self.matching(name, **labels), timeout=timeout, interval=0.25)

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")
        return list(data["result"])

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/query", query=expr, time=f"{at:.3f}")["result"])


@contextmanager
def running_prometheus(exporter_port: int, rules: str, job: str = "pgvitals",
                       metric_relabel_configs: list[dict[str, Any]] | None = None,
                       scrape_configs: Callable[[Path], list[dict[str, Any]]] | None = None) -> Iterator[Prometheus]:
    """Prometheus scraping the exporter's /metrics as ``job``, or what ``scrape_configs`` (given its directory)
    says."""
    base = Path(tempfile.mkdtemp(prefix="pgvitals-prometheus-"))
    (base / "pgvitals.rules.yml").write_text(rules)
    scrape: dict[str, Any] = {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}
    if metric_relabel_configs:
        scrape["metric_relabel_configs"] = metric_relabel_configs
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL:g}s", "evaluation_interval": "1s",
                   "scrape_timeout": "900ms"},
        "rule_files": [str(base / "pgvitals.rules.yml")],
        "scrape_configs": scrape_configs(base) if scrape_configs else [scrape],
    }
    (base / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (base / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [str(PROMETHEUS), f"--config.file={base / 'prometheus.yml'}", f"--storage.tsdb.path={base / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d"],
        stdout=log, stderr=subprocess.STDOUT)
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, base)
    try:
        def ready() -> bool:
            with suppress(OSError), urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as response:
                return response.status == 200
            return False

        wait_until(ready, timeout=30, interval=0.2)
        groups = prometheus.get("/api/v1/rules")["groups"]
        assert groups, (base / "prometheus.log").read_text()
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def collector_overrides() -> dict[str, dict[str, Any]]:
    """Every collector every second (the slow, heavy ones every few seconds)."""
    out: dict[str, dict[str, Any]] = {}
    for collector in load().collectors:
        interval = 1.0
        if collector.name in ("pg_bloat_estimate", "pg_bloat_measured", "pg_database_size"):
            interval = 3.0
        override: dict[str, Any] = {"interval": f"{interval:g}s", "timeout": f"{interval * 0.8:g}s"}
        if collector.name == "pg_bloat_measured":
            override.update({"relation_timeout_seconds": 1.0, "min_size_bytes": 65536})
        if collector.name == "pg_bloat_estimate":
            override["min_size_bytes"] = 65536
        out[collector.name] = override
    return out


@dataclass
class Stack:
    """A primary with a streaming standby and a PgBouncer in front, scraped by a real Prometheus."""

    primary: Server
    standby: Standby
    bouncer: PgBouncer
    prometheus: Prometheus


def require_stack_tools() -> None:
    """Skip the calling test unless a real Prometheus and PgBouncer are installed (for a Stack)."""
    if not PROMETHEUS.exists() or not pgbouncer_available():
        pytest.skip("needs /usr/bin/prometheus and pgbouncer (scripts/setup installs them)")
