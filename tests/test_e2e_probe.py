"""docs/prometheus.md's scrape configurations: promtool accepts them, and a real Prometheus scraping /probe with
them stores each server under its own `instance`.

The Kubernetes example's discovery is replaced by a static target carrying the metadata Kubernetes discovery
would give: the Debian build of Prometheus here has no Kubernetes service discovery, and no cluster runs here.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.alerts import render_rules
from exporter.config import Settings, load_settings
from exporter.localpg import free_port, wait_until
from tests.support.exporters import running_exporter
from tests.support.prometheus import PROMETHEUS, Prometheus, running_prometheus
from tests.support.servers import MONITOR_PASSWORD, MONITOR_ROLE, Server

pytestmark = [pytest.mark.live, pytest.mark.slow]

DOC = Path(__file__).resolve().parent.parent / "docs" / "prometheus.md"
PROMTOOL = "/usr/bin/promtool"
DOC_EXPORTER = "pgvitals.example.org:9839"
#: What Kubernetes service discovery gives for a database Service (and one it must leave out).
KUBERNETES_SERVICES = [
    {"targets": ["orders.shop.svc:5432"],
     "labels": {"__meta_kubernetes_service_name": "orders", "__meta_kubernetes_namespace": "shop",
                "__meta_kubernetes_service_port_number": "5432", "__meta_kubernetes_service_port_name": "postgres",
                "__meta_kubernetes_service_label_pgvitals_io_probe": "true"}},
    {"targets": ["web.shop.svc:80"],
     "labels": {"__meta_kubernetes_service_name": "web", "__meta_kubernetes_namespace": "shop",
                "__meta_kubernetes_service_port_number": "80", "__meta_kubernetes_service_port_name": "http"}},
]


def documented_jobs() -> dict[str, dict[str, Any]]:
    """The scrape jobs of docs/prometheus.md's YAML blocks, by job name."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    jobs = [job for block in blocks for job in yaml.safe_load(block)["scrape_configs"]]
    return {job["job_name"]: job for job in jobs}


def without_kubernetes(job: dict[str, Any]) -> dict[str, Any]:
    """The job with Kubernetes discovery replaced by the metadata it would give."""
    job = {key: value for key, value in job.items() if key != "kubernetes_sd_configs"}
    return {**job, "static_configs": KUBERNETES_SERVICES}


def test_the_documented_scrape_configs_pass_promtool(tmp_path: Path) -> None:
    jobs = documented_jobs()
    assert set(jobs) == {"pgvitals", "pgvitals-discovered", "pgvitals-kubernetes"}
    assert "kubernetes_sd_configs" in jobs["pgvitals-kubernetes"]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"scrape_configs": [
        jobs["pgvitals"], jobs["pgvitals-discovered"], without_kubernetes(jobs["pgvitals-kubernetes"])]}))
    result = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def pointed_at(job: dict[str, Any], exporter: str) -> dict[str, Any]:
    """The documented job with its pgvitals address replaced by the test's exporter."""
    text = json.dumps(job).replace(DOC_EXPORTER, exporter)
    return dict(json.loads(text))


@pytest.fixture
def probed(pg: Server, tmp_path: Path) -> Iterator[tuple[Prometheus, str, str]]:
    """pgvitals with targets a and b and an auth module, scraped by Prometheus through the documented jobs."""
    password = tmp_path / "password"
    password.write_text(MONITOR_PASSWORD, encoding="utf-8")
    settings = load_settings(raw={
        "listen": "127.0.0.1:0", "connect_timeout": 1,
        "targets": [{"name": "a", "dsn": pg.dsn()}, {"name": "b", "dsn": pg.dsn()}],
        "auth_modules": {"monitor": {"user": MONITOR_ROLE, "password_file": str(password), "sslmode": "disable"}},
    }, environ={})
    live = f"127.0.0.1:{pg.cluster.port}/postgres"
    dead = f"127.0.0.1:{free_port()}/postgres"
    with running_exporter(settings) as daemon:
        exporter = f"127.0.0.1:{daemon.server.port}"

        def scrape_configs(base: Path) -> list[dict[str, Any]]:
            jobs = documented_jobs()
            (base / "postgres").mkdir()
            (base / "postgres" / "fleet.json").write_text(json.dumps([{"targets": [live, dead]}]))
            static = pointed_at(jobs["pgvitals"], exporter)
            static["static_configs"] = [{"targets": ["a", "b"]}]
            discovered = pointed_at(jobs["pgvitals-discovered"], exporter)
            discovered["file_sd_configs"] = [{"files": [str(base / "postgres" / "*.json")]}]
            return [static, discovered, without_kubernetes(jobs["pgvitals-kubernetes"])]

        rules = render_rules(Settings())
        with running_prometheus(daemon.server.port, rules, scrape_configs=scrape_configs) as prometheus:
            yield prometheus, live, dead


@pytest.mark.skipif(not PROMETHEUS.exists(), reason="prometheus is not installed")
def test_prometheus_stores_each_probed_server_under_its_own_instance(probed: tuple[Prometheus, str, str]) -> None:
    prometheus, live, dead = probed
    expected = {("pgvitals", "a"): 1.0, ("pgvitals", "b"): 1.0,
                ("pgvitals-discovered", live): 1.0, ("pgvitals-discovered", dead): 0.0}

    def pg_up() -> dict[tuple[str, str], float] | None:
        result = prometheus.get("/api/v1/query", query="pg_up")["result"]
        found = {(r["metric"]["job"], r["metric"]["instance"]): float(r["value"][1]) for r in result}
        return found if found == expected else None

    def pairs() -> set[tuple[str, str]] | None:
        query = 'count by (instance, target) ({job=~"pgvitals.*", target!=""})'
        found = {(r["metric"]["instance"], r["metric"]["target"])
                 for r in prometheus.get("/api/v1/query", query=query)["result"]}
        return found if len(found) == 4 else None

    wait_until(pg_up, timeout=60, interval=0.5)
    # Every series of an instance is that server's own: the target label matches the instance everywhere.

    assert wait_until(pairs, timeout=30, interval=0.5) == {("a", "a"), ("b", "b"), (live, live), (dead, dead)}
    # Data, not only pg_up, arrives under the discovered server's instance.
    backends = f'pg_stat_database_numbackends{{instance="{live}", datname="postgres"}}'
    wait_until(lambda: prometheus.get("/api/v1/query", query=backends)["result"], timeout=60, interval=0.5)
    # The Kubernetes relabeling: the labelled Service becomes a probe of its DNS name on one pinned replica.
    targets = prometheus.get("/api/v1/targets")["activeTargets"]
    (kube,) = [t for t in targets if t["labels"]["job"] == "pgvitals-kubernetes"]
    assert kube["labels"]["instance"] == "orders.shop.svc:5432/postgres"
    assert kube["labels"]["namespace"] == "shop"
    url = urllib.parse.urlsplit(kube["scrapeUrl"])
    assert re.fullmatch(r"pgvitals-[012]\.pgvitals\.monitoring\.svc:9839", url.netloc)
    assert urllib.parse.parse_qs(url.query) == {"target": ["orders.shop.svc:5432/postgres"],
                                                "auth_module": ["monitor"]}
