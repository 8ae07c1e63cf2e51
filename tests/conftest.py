"""Fixtures: real PostgreSQL clusters started by the suite, an in-process exporter, scrape helpers."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from exporter.config import Settings, load_settings
from exporter.localpg import LocalCluster, wait_until
from tests.pgbins import bindir_for, selected_major

# Records test outcomes and the SQL variants that ran, when scripts/matrix asks for it.
pytest_plugins = ["tests.plugin_matrix"]

MONITOR_ROLE = "pgvitals_mon"
MONITOR_PASSWORD = "Mon1tor-Secret-Zebra"


def pytest_report_header(config: pytest.Config) -> str:
    major = selected_major()
    return f"pgvitals: PostgreSQL {'from the machine' if major is None else major} for live tests"


@dataclass
class Server:
    """A running test cluster with a pg_monitor-only login role."""

    cluster: LocalCluster
    monitor_dsn: str
    superuser_dsn: str

    @property
    def version_num(self) -> int:
        return self.cluster.version_num

    def execute(self, sql: str, dbname: str = "postgres") -> list[dict[str, Any]]:
        return self.cluster.execute(sql, dbname)

    def dsn(self, dbname: str = "postgres", monitor: bool = True) -> str:
        if monitor:
            return self.cluster.dsn(MONITOR_ROLE, MONITOR_PASSWORD, dbname)
        return self.cluster.dsn(dbname=dbname)


def start_server(name: str = "primary", settings: dict[str, Any] | None = None) -> Server:
    """Start a fresh cluster of the selected major with pg_stat_statements and a monitor role."""
    cluster = LocalCluster(bindir=bindir_for(selected_major()), name=name, settings=settings).init().start()
    cluster.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    monitor = cluster.create_monitor_role(MONITOR_ROLE, MONITOR_PASSWORD)
    return Server(cluster=cluster, monitor_dsn=monitor, superuser_dsn=cluster.dsn())


@pytest.fixture(scope="session")
def pg() -> Iterator[Server]:
    """The session-wide primary server."""
    server = start_server()
    yield server
    server.cluster.destroy()


_db_counter = 0


@pytest.fixture
def fresh_db(pg: Server) -> Iterator[str]:
    """A database of its own for a test that needs isolation; dropped afterwards."""
    global _db_counter
    _db_counter += 1
    name = f"t{_db_counter}_{re.sub('[^a-z0-9]', '', pg.cluster.base.name[-6:].lower())}"
    pg.execute(f"CREATE DATABASE {name}")
    yield name
    pg.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)" if pg.version_num >= 130000
               else f"DROP DATABASE IF EXISTS {name}")


def settings_for(targets: list[dict[str, Any]], **extra: Any) -> Settings:
    """Settings for an in-process exporter on a free port."""
    raw: dict[str, Any] = {"listen": "127.0.0.1:0", "targets": targets}
    raw.update(extra)
    return load_settings(raw=raw, environ={})


def parse_exposition(body: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a text exposition keyed by (name, labels); checks families are never split."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    seen_types: set[str] = set()
    current: str | None = None
    finished: set[str] = set()
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert name not in seen_types, f"family {name} declared twice"
            seen_types.add(name)
            if current:
                finished.add(current)
            current = name
            continue
        if not line or line.startswith("#"):
            continue
        match = line_re.match(line)
        assert match, f"bad exposition line: {line!r}"
        name, labels, value = match.groups()
        family = current or name
        assert family not in finished, f"samples of {family} are split"
        key = (name, frozenset(label_re.findall(labels or "")))
        assert key not in samples, f"duplicate series {line}"
        samples[key] = float(value)
    return samples


class Metrics:
    """A parsed scrape with convenient look-ups."""

    def __init__(self, body: str):
        self.body = body
        self.samples = parse_exposition(body)

    def find(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of ``name`` whose labels include ``labels``."""
        out = []
        for (sample_name, sample_labels), value in self.samples.items():
            if sample_name == name:
                as_dict = dict(sample_labels)
                if all(as_dict.get(k) == v for k, v in labels.items()):
                    out.append((as_dict, value))
        return out

    def value(self, name: str, **labels: str) -> float | None:
        """The one value of ``name`` with ``labels`` (None when absent; error when ambiguous)."""
        found = self.find(name, **labels)
        assert len(found) <= 1, f"{name} {labels} is ambiguous: {found}"
        return found[0][1] if found else None

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


def scrape(port: int, path: str = "/metrics") -> Metrics:
    """GET /metrics from an exporter on localhost."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return Metrics(response.read().decode())


def http_status(port: int, path: str) -> tuple[int, str]:
    """Status code and body of a GET."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextmanager
def running_exporter(settings: Settings) -> Iterator[Any]:
    """An exporter daemon in this process (scheduler, HTTP server), stopped afterwards."""
    from exporter.daemon import Daemon

    daemon = Daemon(settings)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def exporter_for() -> Iterator[Callable[..., Any]]:
    """Start exporters on demand; each is stopped at the end of the test."""
    stack: list[Any] = []

    def start(targets: list[dict[str, Any]], **extra: Any) -> Any:
        ctx = running_exporter(settings_for(targets, **extra))
        daemon = ctx.__enter__()
        stack.append(ctx)
        return daemon

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


def wait_for_metric(port: int, name: str, predicate: Callable[[float], bool] = lambda v: True,
                    timeout: float = 30.0, **labels: str) -> Metrics:
    """Scrape until ``name`` with ``labels`` has a value satisfying ``predicate``."""
    def check() -> Metrics | None:
        metrics = scrape(port)
        value = metrics.value(name, **labels)
        return metrics if value is not None and predicate(value) else None

    result: Metrics = wait_until(check, timeout=timeout, interval=0.2)
    return result


class Runner:
    """Collectors run again and again through one engine, as the daemon does (collector state persists).

    Deterministic alternative to a running daemon for scenario tests: no scheduler, no waiting.
    ``settings`` are config keys (e.g. ``collectors={"pg_locks": {"top_n": 5}}``); with ``strict`` a
    target that cannot be probed fails the test instead of being left out.
    """

    def __init__(self, server: Server, only: list[str] | None = None, targets: list[dict[str, Any]] | None = None,
                 monitor: bool = True, strict: bool = False, **settings: Any) -> None:
        from exporter import __version__
        from exporter.custom import build_catalog
        from exporter.engine import Engine
        from exporter.snapshot import Snapshot

        targets = targets or [{"name": "main", "dsn": server.dsn(monitor=monitor)}]
        config = settings_for(targets, **settings)
        catalog = build_catalog(config)  # the built-ins plus any queries_files / custom_collectors given
        self.snapshot = Snapshot(catalog, __version__)
        self.engine = Engine(catalog, config, self.snapshot)
        self.only = only
        self.strict = strict

    def collect(self) -> Metrics:
        """Probe every target, run the selected collectors once, return the exposition."""
        for runtime in self.engine.targets.values():
            up = self.engine.probe(runtime)
            assert up or not self.strict, f"{runtime.name} is not reachable"
            if not up:
                continue
            for eff in self.engine.applicable(runtime):
                if self.only is None or eff.collector.name in self.only:
                    self.engine.collect(runtime, eff)
        return Metrics(self.snapshot.render().decode())

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def collect_once(server: Server, only: list[str] | None = None, targets: list[dict[str, Any]] | None = None,
                 **extra: Any) -> Metrics:
    """Probe the target(s) and run the collectors named in ``only`` (default: all) once; parse the result."""
    with Runner(server, only, targets, **extra) as runner:
        return runner.collect()
