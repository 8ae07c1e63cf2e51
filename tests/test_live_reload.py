"""Reload without losing data: SIGHUP to a real `pgvitals run`, and POST /-/reload in process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import yaml

from exporter import shards
from exporter.cli import build_parser, config_source
from exporter.daemon import Daemon
from exporter.localpg import wait_until
from tests.support.metrics_server import HANG, get
from tests.support.scrape import Metrics, http_status, scrape, wait_for_metric
from tests.support.servers import MONITOR_PASSWORD, MONITOR_ROLE, Server

pytestmark = [pytest.mark.live, pytest.mark.family("reload")]

ROOT = Path(__file__).resolve().parents[1]
DATA = "pg_postmaster_start_time_seconds"  # a data series of the first target, collected once a minute
PER_DATABASE = "pg_table_wraparound"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, targets: list[dict[str, Any]], **extra: Any) -> None:
    path.write_text(yaml.safe_dump({"probe_interval": "1s", "targets": targets, **extra}), encoding="utf-8")


class Scraper(threading.Thread):
    """Scrapes again and again, keeping what it saw of the first target, until stopped."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.halt = threading.Event()
        self.seen: list[tuple[float | None, float | None]] = []  # (pg_up, data) of the first target
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                metrics = scrape(self.port)
                self.seen.append((metrics.value("pg_up", target="first"), metrics.value(DATA, target="first")))
            except Exception as exc:  # every failed scrape is a finding
                self.errors.append(repr(exc))
            time.sleep(0.02)

    def __enter__(self) -> Scraper:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.halt.set()
        self.join(HANG)


@pytest.fixture
def exporter_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    """`pgvitals run -c <tmp>/pgvitals.yml` in a subprocess; the test writes the file before it starts."""
    procs: list[subprocess.Popen[bytes]] = []
    config, log = tmp_path / "pgvitals.yml", tmp_path / "stderr.log"
    port = free_port()

    def start() -> subprocess.Popen[bytes]:
        with log.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "exporter", "run", "-c", str(config)], cwd=ROOT,
                                    stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                     "PGVITALS_LISTEN": f"127.0.0.1:{port}"})
        procs.append(proc)

        def serving() -> bool:
            assert proc.poll() is None, log.read_text()
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(serving, timeout=HANG)
        return proc

    yield start, config, log, port  # type: ignore[misc]
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(HANG)


def test_sighup_adds_a_target_without_a_gap_and_a_broken_config_keeps_serving(
        pg: Server, fresh_db: str, exporter_process: Any) -> None:
    start, config, log, port = exporter_process
    first = {"name": "first", "dsn": pg.dsn(), "databases": {"include": ["postgres"]}}
    write_config(config, [first])
    proc = start()
    metrics = wait_for_metric(port, DATA, target="first")
    assert metrics.value("pgvitals_config_last_reload_successful") == 1
    started_at = metrics.value("pgvitals_config_last_reload_success_timestamp_seconds")
    assert started_at is not None

    second = {"name": "second", "dsn": pg.dsn(fresh_db), "databases": {"include": [fresh_db]}}
    write_config(config, [first, second])
    with Scraper(port) as scraper:
        time.sleep(0.3)
        proc.send_signal(signal.SIGHUP)
        metrics = wait_for_metric(port, "pg_up", lambda v: v == 1, target="second")
        time.sleep(0.3)
    assert scraper.errors == []
    assert len(scraper.seen) >= 10
    # The first target's series never left: not during the reload, not after it.
    assert all(up == 1 and data is not None for up, data in scraper.seen), scraper.seen
    assert metrics.value("pgvitals_config_last_reload_successful") == 1
    reloaded_at = metrics.value("pgvitals_config_last_reload_success_timestamp_seconds")
    assert reloaded_at is not None and reloaded_at > started_at
    assert "configuration reloaded: 1 target(s) kept, 0 removed, 1 added" in log.read_text()

    config.write_text("probe_interval: often\ntargets:\n"
                      f"  - {{name: first, dsn: '{pg.dsn()}', max_connections: 99}}\n"
                      "  - {name: second, dsn: 'host=/nowhere', colour: blue}\n", encoding="utf-8")
    proc.send_signal(signal.SIGHUP)
    metrics = wait_for_metric(port, "pgvitals_config_last_reload_successful", lambda v: v == 0)
    assert metrics.value("pgvitals_config_last_reload_success_timestamp_seconds") == reloaded_at
    assert metrics.value("pg_up", target="first") == 1 and metrics.value("pg_up", target="second") == 1
    assert metrics.value(DATA, target="first") is not None
    text = log.read_text()
    assert "reload failed, the running configuration stays in force" in text
    for path in ("probe_interval (line 1)", "targets[0].max_connections (line 3)", "targets[1].colour (line 4)"):
        assert path in text, text
    assert pg.dsn().split("@")[0].split(":")[-1] not in text  # the password of the DSN
    time.sleep(1.5)  # the old schedules go on: the second target is still probed and up
    assert scrape(port).value("pg_up", target="second") == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(HANG) == 0


def _daemon_for(config: Path) -> Daemon:
    args = build_parser().parse_args(["run", "-c", str(config), "--web.enable-lifecycle"])
    source = config_source(args)
    settings, web = source()
    daemon = Daemon(settings, web=web, source=source, lifecycle=True)
    daemon.start()
    return daemon


def _post_reload(port: int) -> tuple[int, str]:
    status, _headers, body = get(port, "/-/reload", method="POST")
    return status, body.decode()


def test_post_reload_keeps_what_did_not_change_and_restarts_what_did(
        pg: Server, fresh_db: str, tmp_path: Path) -> None:
    config = tmp_path / "pgvitals.yml"
    first = {"name": "first", "dsn": pg.dsn(), "databases": {"include": ["postgres"]}}
    second = {"name": "second", "dsn": pg.dsn(), "databases": {"include": ["postgres"]}, "labels": {"team": "a"}}
    write_config(config, [first, second], listen="127.0.0.1:0")
    daemon = _daemon_for(config)
    try:
        port = daemon.server.port  # type: ignore[union-attr]
        assert get(port, "/-/reload")[0] == 405
        wait_for_metric(port, "pgvitals_collector_success", lambda v: v == 1, target="first", collector=PER_DATABASE)
        wait_for_metric(port, DATA, target="second")
        wait_for_metric(port, "pgvitals_collector_success", lambda v: v == 1, target="first",
                        collector="pg_server_identity")
        runtime = daemon.engine.targets["first"]
        identity_job = daemon.scheduler.get_job("collect:first:pg_server_identity")
        assert identity_job is not None
        identity_next = identity_job.next_run_time
        identity_runs = daemon.snapshot.status("first", "pg_server_identity").runs  # type: ignore[union-attr]

        # second changes (a label), third is new, one collector's interval changes.
        third = {"name": "third", "dsn": pg.dsn(fresh_db), "databases": {"include": [fresh_db]}}
        write_config(config, [first, {**second, "labels": {"team": "b"}}, third], listen="127.0.0.1:0",
                     collectors={PER_DATABASE: {"interval": "7s", "timeout": "5s"}})
        status, body = _post_reload(port)
        assert (status, body.strip()) == (200, "configuration reloaded: 1 target(s) kept, 0 removed, 1 added, "
                                               "1 restarted, 1 collector(s) changed")
        assert daemon.engine.targets["first"] is runtime  # kept: same connections, state and schedules
        job = daemon.scheduler.get_job("collect:first:pg_server_identity")
        assert job is not None and job.next_run_time == identity_next
        status_now = daemon.snapshot.status("first", "pg_server_identity")
        assert status_now is not None and status_now.runs >= identity_runs
        changed = daemon.scheduler.get_job(f"collect:first:{PER_DATABASE}")
        assert changed is not None and changed.trigger.interval.total_seconds() == 7
        metrics = wait_for_metric(port, "pg_up", lambda v: v == 1, target="third")
        assert metrics.find("pg_up", target="second", team="a") == []
        wait_for_metric(port, "pg_up", lambda v: v == 1, target="second", team="b")
        wait_for_metric(port, "pgvitals_collector_success", lambda v: v == 1, target="first", collector=PER_DATABASE)

        # Removing a target: its series go at once.
        write_config(config, [first, third], listen="127.0.0.1:0",
                     collectors={PER_DATABASE: {"interval": "7s", "timeout": "5s"}})
        assert _post_reload(port)[0] == 200
        assert [key for key in scrape(port).samples if ("target", "second") in key[1]] == []

        # A bad web config keeps the old one (no authentication) and the old targets.
        web_file = tmp_path / "web.yml"
        web_file.write_text("basic_auth_users:\n  alice: not-a-hash\n", encoding="utf-8")
        write_config(config, [first], listen="127.0.0.1:0", web_config_file=str(web_file))
        status, body = _post_reload(port)
        assert status == 500 and "basic_auth_users.alice" in body and "not-a-hash" not in body
        metrics: Metrics = scrape(port)  # still no credentials needed
        assert metrics.value("pgvitals_config_last_reload_successful") == 0
        assert sorted(daemon.target_names()) == ["first", "third"]
    finally:
        daemon.stop()


def test_reload_keeps_discovered_targets_unless_their_auth_module_changed(pg: Server, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text(MONITOR_PASSWORD, encoding="utf-8")
    module = {"user": MONITOR_ROLE, "password_file": str(password), "sslmode": "disable"}
    config = tmp_path / "pgvitals.yml"
    first = {"name": "first", "dsn": pg.dsn(), "databases": {"include": ["postgres"]}}
    write_config(config, [first], listen="127.0.0.1:0", auth_modules={"monitor": module}, dynamic_target_ttl="1h")
    daemon = _daemon_for(config)
    try:
        port = daemon.server.port  # type: ignore[union-attr]
        found = f"127.0.0.1:{pg.cluster.port}/postgres"
        probe = f"/probe?{urlencode({'target': found, 'auth_module': 'monitor'})}"
        assert Metrics(http_status(port, probe)[1]).value("pg_up", target=found) == 1

        status, body = _post_reload(port)
        assert (status, body.strip()) == (200, "configuration reloaded: 2 target(s) kept, 0 removed, 0 added, "
                                               "0 restarted, 0 collector(s) changed")
        assert found in daemon.target_names()

        write_config(config, [first], listen="127.0.0.1:0", dynamic_target_ttl="1h",
                     auth_modules={"monitor": {**module, "labels": {"env": "new"}}})
        status, body = _post_reload(port)
        assert status == 200 and "1 discovered target(s) dropped" in body
        assert daemon.target_names() == ["first"]
        # Registered again at its next probe, with the new module.
        assert Metrics(http_status(port, probe)[1]).value("pg_up", target=found, env="new") == 1
    finally:
        daemon.stop()


def test_a_new_shard_count_moves_targets_in_and_out(pg: Server, tmp_path: Path) -> None:
    names = [f"db-{n}" for n in range(4)]
    config = tmp_path / "pgvitals.yml"
    targets = [{"name": name, "dsn": pg.dsn(), "databases": {"include": ["postgres"]}} for name in names]
    write_config(config, targets, listen="127.0.0.1:0")
    daemon = _daemon_for(config)
    try:
        port = daemon.server.port  # type: ignore[union-attr]
        assert scrape(port).value("pgvitals_shard_targets", shard="0", shards="1") == 4
        write_config(config, targets, listen="127.0.0.1:0", shard={"index": 1, "count": 2})
        assert _post_reload(port)[0] == 200
        mine = sorted(name for name in names if shards.owner(name, 2) == 1)
        assert sorted(daemon.target_names()) == mine
        metrics = scrape(port)
        assert metrics.value("pgvitals_shard_targets", shard="1", shards="2") == len(mine)
        assert {labels["target"] for labels, _ in metrics.find("pg_up")} <= set(mine)
    finally:
        daemon.stop()
