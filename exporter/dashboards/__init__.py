"""Grafana dashboards generated with grafanalib from the metric catalog, plus Grafana provisioning files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exporter.config import AlertsConfig

PROVISIONING_DATASOURCE = """\
# Grafana data source provisioning: a Prometheus that scrapes pgvitals and loads its rule file.
# Copy to /etc/grafana/provisioning/datasources/ and set the URL of your Prometheus.
apiVersion: 1
datasources:
  - name: Prometheus
    type: prometheus
    uid: prometheus
    access: proxy
    url: http://localhost:9090
    isDefault: true
    jsonData:
      timeInterval: 15s   # the scrape interval: $__rate_interval is at least four of these
"""

PROVISIONING_DASHBOARDS = """\
# Grafana dashboard provider: loads every pgvitals dashboard JSON from a folder.
# Copy to /etc/grafana/provisioning/dashboards/ and point `path` at a copy of the generated dashboards/*.json.
apiVersion: 1
providers:
  - name: pgvitals
    folder: pgvitals
    type: file
    disableDeletion: false
    allowUiUpdates: false
    updateIntervalSeconds: 60
    options:
      path: /var/lib/grafana/dashboards/pgvitals
      foldersFromFilesStructure: false
"""


def build_dashboards(config: AlertsConfig | None = None) -> dict[str, dict[str, Any]]:
    """Every dashboard as Grafana JSON, by file name; thresholds from ``config`` (defaults when None)."""
    from exporter.dashboards.pages import PAGES

    config = config or AlertsConfig()
    return {name: build(config) for name, build in PAGES.items()}


def render(board: dict[str, Any]) -> str:
    """Stable JSON text of one dashboard (what is committed)."""
    return json.dumps(board, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generated_files(config: AlertsConfig | None = None) -> dict[str, str]:
    """Relative path -> content of everything `pgvitals dashboards` writes."""
    files = {name: render(board) for name, board in build_dashboards(config).items()}
    files["provisioning/datasource.yml"] = PROVISIONING_DATASOURCE
    files["provisioning/dashboards.yml"] = PROVISIONING_DASHBOARDS
    return files


def write_dashboards(out: Path, config: AlertsConfig | None = None) -> list[Path]:
    """Write the dashboards and provisioning files under ``out``; return the paths written."""
    written = []
    for relative, text in generated_files(config).items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
