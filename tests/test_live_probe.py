"""/probe against a running exporter with real PostgreSQL targets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from exporter import catalog, shards
from exporter.localpg import free_port, wait_until
from tests.conftest import Metrics, Server, http_status, scrape

ROOT = Path(__file__).parent.parent


def test_probe_returns_only_the_named_targets_series(pg: Server, exporter_for: Callable[..., Any]) -> None:
    daemon = exporter_for([{"name": "a", "dsn": pg.dsn()}, {"name": "b", "dsn": pg.dsn(), "labels": {"env": "b"}}])
    port = daemon.server.port
    wait_until(lambda: daemon.ready()[0], timeout=60)  # every first collection done: the series set is settled
    probed = scrape(port, "/probe?target=a")
    targets = {labels.get("target") for (_name, pairs) in probed.samples for labels in [dict(pairs)]}
    assert targets == {"a", None}  # None: pgvitals_build_info, which has no target
    assert probed.value("pg_up", target="a") == 1
    assert probed.find("pg_stat_database_numbackends", target="a", datname="postgres")
    whole = scrape(port)
    # Every series of a in /metrics is in /probe, and nothing else of a's: the same snapshot.
    of_a = {key for key in whole.samples if ("target", "a") in key[1] and not key[0].endswith("_age_seconds")}
    assert of_a == {key for key in probed.samples if ("target", "a") in key[1]
                    and not key[0].endswith("_age_seconds")}
    status, body = http_status(port, "/probe?target=c")
    assert status == 404 and "unknown target 'c'" in body


def start_exporter(config: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    """``pgvitals run`` as its own process on a free port; returns it and the port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", "run", "-c", str(config), "--log-level", "WARNING", *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PGVITALS_LISTEN": f"127.0.0.1:{port}", **(env or {})},
    )
    return process, port


def test_three_shard_processes_poll_disjoint_sets_that_cover_every_target(pg: Server, tmp_path: Path) -> None:
    names = [f"db-{n}" for n in range(9)]
    config = tmp_path / "pgvitals.yaml"
    config.write_text(yaml.safe_dump({
        "targets": [{"name": name, "dsn": pg.dsn(), "max_connections": 1} for name in names],
        # Only what proves polling: the probe (pg_up) and one light collector.
        "collectors": {name: {"enabled": name == "pg_stat_database"} for name in catalog.load().by_name},
    }), encoding="utf-8")
    processes = [start_exporter(config, "--shard", "0/3"), start_exporter(config, "--shard", "1/3"),
                 # The StatefulSet way: the index from the pod's hostname.
                 start_exporter(config, "--shard", "auto/3", env={"HOSTNAME": "pgvitals-2"})]
    try:
        polled: list[set[str]] = []
        for index, (process, port) in enumerate(processes):
            expected = set(shards.owned(names, index, 3))
            metrics = wait_until(lambda port=port: _scraped(port), timeout=60)
            up = wait_until(lambda port=port, expected=expected: _up_targets(port, expected), timeout=60)
            assert metrics.value("pgvitals_shard_targets", shard=str(index), shards="3") == len(expected)
            polled.append(up)
            other = next(name for name in names if name not in expected)
            status, body = http_status(port, f"/probe?target={other}")
            assert status == 404 and f"polled by shard {shards.owner(other, 3)} of 3" in body
            assert process.poll() is None
        assert polled[0].isdisjoint(polled[1]) and polled[1].isdisjoint(polled[2]) and polled[0].isdisjoint(polled[2])
        assert polled[0] | polled[1] | polled[2] == set(names)
    finally:
        for process, _port in processes:
            process.send_signal(signal.SIGTERM)
        for process, _port in processes:
            process.wait(timeout=30)


def _scraped(port: int) -> Metrics | None:
    try:
        return scrape(port)
    except OSError:
        return None  # not listening yet


def _up_targets(port: int, expected: set[str]) -> set[str] | None:
    """The targets with pg_up 1 and a pg_stat_database run, once they are exactly ``expected``; else None."""
    metrics = scrape(port)
    up = {labels["target"] for labels, value in metrics.find("pg_up") if value == 1}
    ran = {labels["target"] for labels, _ in metrics.find("pgvitals_collector_success", collector="pg_stat_database")}
    seen = {labels["target"] for (_name, pairs) in metrics.samples for labels in [dict(pairs)] if "target" in labels}
    assert seen <= expected, f"a process polls targets of another shard: {seen - expected}"
    return up if up == ran == expected else None
