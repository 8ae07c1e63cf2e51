"""/probe against a running exporter with real PostgreSQL targets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import yaml

from exporter import catalog, shards
from exporter.config import load_settings
from exporter.daemon import FIRST_PROBE_WAITERS
from exporter.localpg import free_port, wait_until
from tests.support.exporters import running_exporter
from tests.support.scrape import Metrics, http_status, scrape
from tests.support.servers import MONITOR_PASSWORD, MONITOR_ROLE, Server

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


def dynamic_settings(pg: Server, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """An exporter configured with nothing but an auth module (the monitor role, its password in a file)."""
    password = tmp_path / "password"
    password.write_text(MONITOR_PASSWORD, encoding="utf-8")
    return {"listen": "127.0.0.1:0", "connect_timeout": 1, "application_name": "pgvitals_dynamic",
            "auth_modules": {"monitor": {"user": MONITOR_ROLE, "password_file": str(password), "sslmode": "disable"}},
            **extra}


def probe(port: int, target: str, auth_module: str = "monitor") -> tuple[int, str]:
    return http_status(port, f"/probe?{urlencode({'target': target, 'auth_module': auth_module})}")


def exporter_connections(pg: Server) -> int:
    rows = pg.execute("SELECT count(*) AS n FROM pg_catalog.pg_stat_activity "
                      "WHERE application_name = 'pgvitals_dynamic'")
    return int(rows[0]["n"])


def last_success(port: int, target: str) -> float | None:
    """pg_stat_database's last success on ``target``, as /probe shows it (the probe keeps the target alive)."""
    return Metrics(probe(port, target)[1]).value("pgvitals_collector_last_success_timestamp_seconds",
                                                 target=target, collector="pg_stat_database")


def test_a_dynamic_target_appears_on_its_first_probe_is_polled_and_goes_after_its_ttl(
        pg: Server, tmp_path: Path) -> None:
    quick = {"pg_stat_database": {"interval": "2s", "timeout": "1s"}}
    settings = load_settings(raw=dynamic_settings(pg, tmp_path, dynamic_target_ttl="3s", collectors=quick), environ={})
    target = f"127.0.0.1:{pg.cluster.port}/postgres"
    with running_exporter(settings) as daemon:
        port = daemon.server.port
        # The first probe registers it and answers once the first connection attempt ended: pg_up is there.
        status, body = probe(port, target)
        assert status == 200, body
        first = Metrics(body)
        assert first.value("pg_up", target=target) == 1
        # Polled on its collectors' schedules while probed: the last success moves on between probes.
        seen = wait_until(lambda: last_success(port, target), timeout=30)
        wait_until(lambda: (last_success(port, target) or 0) > seen, timeout=30)
        polled = Metrics(probe(port, target)[1])
        assert polled.find("pg_stat_database_numbackends", target=target, datname="postgres")
        # /metrics stays what is configured: nothing of the probed target.
        assert not [key for key in scrape(port).samples if ("target", target) in key[1]]
        assert exporter_connections(pg) >= 1
        # No probe for the TTL: dropped, with its connections.
        wait_until(lambda: target not in daemon.engine.targets, timeout=30)
        wait_until(lambda: exporter_connections(pg) == 0, timeout=30)
        # A later probe registers it again.
        status, body = probe(port, target)
        assert status == 200 and Metrics(body).value("pg_up", target=target) == 1


def test_dynamic_probe_errors(pg: Server, tmp_path: Path) -> None:
    settings = load_settings(raw=dynamic_settings(pg, tmp_path, max_dynamic_targets=2), environ={})
    with running_exporter(settings) as daemon:
        port = daemon.server.port
        status, body = probe(port, f"127.0.0.1:{pg.cluster.port}/postgres", auth_module="nope")
        assert status == 400 and "unknown auth_module 'nope' (auth_modules: monitor)" in body
        status, body = probe(port, "not a host")
        assert status == 400 and "is not HOST:PORT/DB" in body
        # A server that does not answer: the probe still answers within its bound, with pg_up 0.
        dead = f"127.0.0.1:{free_port()}/postgres"
        status, body = probe(port, dead)
        assert status == 200 and Metrics(body).value("pg_up", target=dead) == 0
        assert probe(port, f"localhost:{pg.cluster.port}/postgres")[0] == 200
        status, body = probe(port, f"127.0.0.1:{pg.cluster.port}/postgres")
        assert status == 429 and "max_dynamic_targets (2) reached" in body
        assert probe(port, dead)[0] == 200  # a known one is still served
        status, body = http_status(port, "/probe?target=nope")
        assert status == 404 and "add &auth_module=NAME" in body
        assert MONITOR_PASSWORD not in body


def test_an_auth_modules_password_command_is_told_which_server(pg: Server, tmp_path: Path) -> None:
    """A per-server token (RDS IAM's kind): the command gets the probed host and port, each target its own."""
    (tmp_path / f"token-127.0.0.1-{pg.cluster.port}").write_text(MONITOR_PASSWORD + "\n", encoding="utf-8")
    module = {"user": MONITOR_ROLE, "sslmode": "disable",
              "password_command": ["cat", str(tmp_path / "token-{host}-{port}")]}
    settings = load_settings(raw=dynamic_settings(pg, tmp_path, auth_modules={"monitor": module}), environ={})
    with running_exporter(settings) as daemon:
        port = daemon.server.port
        known = f"127.0.0.1:{pg.cluster.port}/postgres"
        status, body = probe(port, known)
        assert status == 200 and Metrics(body).value("pg_up", target=known) == 1, body
        # The same server by another name has no token of its own: the command fails, the target is down.
        other = f"localhost:{pg.cluster.port}/postgres"
        status, body = probe(port, other)
        assert status == 200 and Metrics(body).value("pg_up", target=other) == 0, body
        assert MONITOR_PASSWORD not in body


def test_only_a_few_first_probes_wait_for_their_connection_attempt(pg: Server, tmp_path: Path) -> None:
    """Many servers discovered at once, none answering: the HTTP workers are not all held by waiting probes."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:  # accepts TCP, never says a word
        targets = [f"127.0.0.1:{silent.getsockname()[1]}/db{n}" for n in range(6)]
        settings = load_settings(raw=dynamic_settings(pg, tmp_path, connect_timeout=2), environ={})
        with running_exporter(settings) as daemon:
            port = daemon.server.port
            with ThreadPoolExecutor(len(targets)) as pool:
                answers = list(pool.map(lambda target: probe(port, target), targets))
            assert [status for status, _ in answers] == [200] * len(targets)
            waited = [target for target, (_, body) in zip(targets, answers, strict=True)
                      if Metrics(body).value("pg_up", target=target) is not None]
            assert len(waited) <= FIRST_PROBE_WAITERS
            # Every one is registered and polled all the same: later probes show each down.
            wait_until(lambda: all(Metrics(probe(port, target)[1]).value("pg_up", target=target) == 0
                                   for target in targets), timeout=60)


def test_probe_serves_the_configured_metric_names(pg: Server, exporter_for: Callable[..., Any]) -> None:
    """In postgres_exporter naming, /probe serves their names, one target's only, like /metrics does."""
    daemon = exporter_for([{"name": "a", "dsn": pg.dsn()}, {"name": "b", "dsn": pg.dsn()}],
                          metric_names="postgres_exporter")
    wait_until(lambda: daemon.ready()[0], timeout=60)
    probed = scrape(daemon.server.port, "/probe?target=b")
    assert probed.find("pg_stat_database_xact_commit", target="b", datname="postgres")
    assert not probed.find("pg_stat_database_xact_commit_total")
    assert probed.value("pg_exporter_last_scrape_error", target="b") == 0
    assert {labels.get("target") for labels, _ in probed.find("pg_up")} == {"b"}
