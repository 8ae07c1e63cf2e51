"""The exporter run by tests: a daemon in this process, or collectors run directly through one engine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from exporter.config import Settings
from tests.support.scrape import Metrics
from tests.support.servers import Server, settings_for


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


def collect_in(server: Server, db: str, collectors: list[str], **params: Any) -> Metrics:
    """The collectors, once, as pg_monitor, in database ``db`` only; ``params`` go to each of them. All succeed."""
    target = {"name": "main", "dsn": server.dsn(db), "databases": {"include": [db]}}
    extra = {"collectors": {name: params for name in collectors}} if params else {}
    metrics = collect_once(server, collectors, targets=[target], **extra)
    for name in collectors:
        assert metrics.value("pgvitals_collector_success", collector=name) == 1, name
    return metrics


def run_collector(targets: list[dict[str, Any]], collector: str, **params: Any) -> Metrics:
    """Probe and run one collector once with parameters, applicable or not; every target must be reachable."""
    from exporter import __version__
    from exporter.catalog import load
    from exporter.engine import Engine
    from exporter.snapshot import Snapshot

    catalog = load()
    settings = settings_for(targets, collectors={collector: params} if params else {})
    snapshot = Snapshot(catalog, __version__)
    engine = Engine(catalog, settings, snapshot)
    try:
        for runtime in engine.targets.values():
            assert engine.probe(runtime)
            engine.collect(runtime, engine.collectors[collector])
        return Metrics(snapshot.render().decode())
    finally:
        engine.close()
