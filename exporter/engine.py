"""Run one collector on one target inside guarded transactions; rows become pre-rendered samples.

Nothing here raises into the scheduler: failures are classified, counted, logged once per change.
"""

from __future__ import annotations

import enum
import fnmatch
import logging
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from psycopg.conninfo import conninfo_to_dict

from exporter import planner, secrets
from exporter.catalog import Catalog
from exporter.config import PgBouncerConfig, Settings, TargetConfig
from exporter.db import (
    CollectError,
    ConnectOptions,
    Facts,
    TargetConnections,
    TargetDown,
    classify,
    dsn_display,
    read_facts,
)
from exporter.exposition import label_text, render_rows
from exporter.hooks import RunContext
from exporter.planner import Effective
from exporter.snapshot import Snapshot

log = logging.getLogger("pgvitals.engine")


class ErrorKey(NamedTuple):
    """Where the last error of a target was seen: a collector (None: the probe) in a database ("" for server)."""

    collector: str | None
    database: str = ""


#: The key of the probe's connection error in ``TargetRuntime.last_errors``.
PROBE = ErrorKey(None)


class Probe(enum.Enum):
    """What a probe found: the target is down, still up, or came up (first time or after an outage)."""

    DOWN = "down"
    UP = "up"
    CAME_UP = "came_up"

    def __bool__(self) -> bool:
        """True when the target answered (so ``if engine.probe(runtime):`` reads as "if it is up")."""
        return self is not Probe.DOWN


@dataclass
class TargetRuntime:
    """One monitored server (PostgreSQL or PgBouncer) and what the engine knows about it."""

    name: str
    is_pgbouncer: bool
    conns: TargetConnections
    prefix: str
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    facts: Facts | None = None
    up: bool | None = None
    failures: int = 0
    last_errors: dict[ErrorKey, str] = field(default_factory=dict)
    state: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    dsn_text: str = ""

    def databases(self) -> list[str]:
        """The databases per-database collectors visit, from the server's list and the filters."""
        if self.facts is None:
            return []
        return [
            db for db in self.facts.databases
            if any(fnmatch.fnmatchcase(db, p) for p in self.include)
            and not any(fnmatch.fnmatchcase(db, p) for p in self.exclude)
        ]


def build_runtime(cfg: TargetConfig | PgBouncerConfig, settings: Settings) -> TargetRuntime:
    """A runtime for one configured target."""
    is_pgbouncer = isinstance(cfg, PgBouncerConfig)
    dsn_password = conninfo_to_dict(cfg.dsn).get("password")
    secrets.register(str(dsn_password) if dsn_password else None)
    options = ConnectOptions(
        dsn=cfg.dsn, password=secrets.read_secret(cfg.password_file, cfg.password_env),
        application_name=settings.application_name, connect_timeout=settings.connect_timeout,
        pgbouncer=is_pgbouncer,
    )
    limit = 1 if is_pgbouncer else cfg.max_connections  # type: ignore[union-attr]
    prefix = label_text([("target", cfg.name), *sorted(cfg.labels.items())])
    runtime = TargetRuntime(
        name=cfg.name, is_pgbouncer=is_pgbouncer, conns=TargetConnections(options, limit), prefix=prefix,
        dsn_text=dsn_display(cfg.dsn),
    )
    if isinstance(cfg, TargetConfig):
        runtime.include = tuple(cfg.databases.include)
        runtime.exclude = tuple(cfg.databases.exclude)
    return runtime


class Engine:
    """Runs probes and collectors against targets and keeps the snapshot current."""

    def __init__(self, catalog: Catalog, settings: Settings, snapshot: Snapshot):
        self.catalog = catalog
        self.settings = settings
        self.snapshot = snapshot
        self.collectors = {e.collector.name: e for e in planner.effective_collectors(catalog, settings)}
        self.targets: dict[str, TargetRuntime] = {}
        configs: list[TargetConfig | PgBouncerConfig] = [*settings.targets, *settings.pgbouncers]
        for cfg in configs:
            runtime = build_runtime(cfg, settings)
            self.targets[cfg.name] = runtime
            snapshot.add_target(cfg.name, runtime.prefix, runtime.is_pgbouncer)

    def applicable(self, runtime: TargetRuntime) -> list[Effective]:
        """Enabled collectors of the target's kind (version and role are checked at each run)."""
        return planner.applicable(self.collectors.values(), runtime.is_pgbouncer)

    # -- probing -------------------------------------------------------------------------------

    def probe(self, runtime: TargetRuntime) -> Probe:
        """Connect, refresh the server facts and record pg_up; says whether the target is up or came up."""
        started = time.monotonic()
        try:
            with runtime.conns.session(wait=self.settings.connect_timeout + 5) as session:
                if runtime.is_pgbouncer:
                    session.query("SHOW VERSION")
                    facts = None
                else:
                    with session.guarded(self.settings.connect_timeout, self.settings.lock_timeout):
                        facts = read_facts(session)
        except Exception as exc:  # every failure means "down" for the probe
            error = classify(exc)
            self._mark_down(runtime, error)
            return Probe.DOWN
        was_up = runtime.up
        runtime.facts = facts
        runtime.last_errors.pop(PROBE, None)
        runtime.up = True
        runtime.failures = 0
        self.snapshot.set_up(runtime.name, True)
        if was_up is True:
            return Probe.UP
        role = "" if facts is None else (" standby" if facts.in_recovery else " primary")
        version = "" if facts is None else f" PostgreSQL {facts.version}"
        log.info("target %s is up (%s%s%s, %.0f ms)", runtime.name, runtime.dsn_text, version, role,
                 (time.monotonic() - started) * 1000)
        return Probe.CAME_UP

    def _mark_down(self, runtime: TargetRuntime, error: CollectError) -> None:
        runtime.failures += 1
        runtime.last_errors[PROBE] = f"{error.reason}: {error}"
        if runtime.up is not False:
            log.warning("target %s is down (%s): %s", runtime.name, runtime.dsn_text, error)
        runtime.up = False
        runtime.conns.close_all()
        self.snapshot.set_up(runtime.name, False)

    def backoff(self, runtime: TargetRuntime) -> float:
        """Seconds until the next probe: the probe interval when up, exponential backoff when down."""
        if runtime.up:
            return self.settings.probe_interval
        return float(min(self.settings.max_backoff, 2 ** min(runtime.failures - 1, 10)))

    # -- collecting ----------------------------------------------------------------------------

    def collect(self, runtime: TargetRuntime, eff: Effective) -> None:
        """Run one collector on one target (every selected database for per-database collectors)."""
        collector = eff.collector
        if not runtime.up:
            return  # the probe owns reconnection; its backoff keeps us from hammering a dead server
        reason = planner.not_applicable(collector, runtime.facts)
        if reason is not None:
            if self.snapshot.record_skip(runtime.name, collector.name, reason) != reason:
                log.info("collector %s does not apply to %s (%s)", collector.name, runtime.name, reason)
            return
        started = time.monotonic()
        databases: list[str | None] = (
            list(runtime.databases()) if collector.scope == "database" else [None]
        )
        results: dict[str, dict[str, bytes]] = {}
        failed: list[tuple[str | None, CollectError]] = []
        skipped_everywhere = True
        last_skip: str | None = None
        series = 0
        for dbname in databases:
            try:
                chunks, count, skip = self._run_one(runtime, eff, dbname)
            except Exception as exc:
                error = classify(exc)
                failed.append((dbname, error))
                if isinstance(error, TargetDown):
                    break
                continue
            if skip is None:
                skipped_everywhere = False
                results[dbname or ""] = chunks
                series += count
            else:
                last_skip = skip
        finished = time.time()
        duration = time.monotonic() - started
        if not failed and skipped_everywhere and last_skip is not None:
            # The server, or every selected database (e.g. none has the extension), says it does not apply.
            self.snapshot.record_skip(runtime.name, collector.name, last_skip, counts_as_run=True, duration=duration)
            return
        for dbname, error in failed:
            self._log_change(runtime, collector.name, dbname, error)
        if not failed:
            self._log_change(runtime, collector.name, None, None)
        self.snapshot.record_run(
            runtime.name, collector.name, duration=duration, finished=finished, series=series,
            failures=[error.reason for _, error in failed], results=results,
        )
        down = next((e for _, e in failed if isinstance(e, TargetDown)), None)
        if down is not None:
            self._mark_down(runtime, down)

    def _run_one(
        self, runtime: TargetRuntime, eff: Effective, dbname: str | None
    ) -> tuple[dict[str, bytes], int, str | None]:
        """One guarded run in one database: (lines by metric, series, skip reason or None)."""
        collector = eff.collector
        wait = max(eff.timeout, 1.0)
        with runtime.conns.session(dbname, wait=wait) as session, \
                session.guarded(eff.timeout, self.settings.lock_timeout, writes=collector.writes):
            facts = None if runtime.is_pgbouncer else runtime.facts
            sql_text, skip = planner.choose_sql(collector, facts, session)
            if skip is not None:
                return {}, 0, skip
            key = (collector.name, dbname or "")
            ctx = RunContext(
                target=runtime.name, database=dbname, facts=runtime.facts, params=eff.params,
                state=runtime.state.setdefault(key, {}), settings=self.settings, timeout=eff.timeout,
            )
            if collector.fetch is not None:
                rows = collector.fetch(session, ctx, sql_text)
            else:
                assert sql_text is not None
                rows = session.query(sql_text, eff.params if collector.params else None)
        if collector.transform is not None:
            rows = collector.transform(rows, ctx)
        if dbname is not None:
            for row in rows:
                row.setdefault("datname", dbname)
        chunks, count, truncated = render_rows(collector.metrics, rows, runtime.prefix, collector.max_series)
        if truncated:
            log.warning("collector %s on %s: more than %d series, the rest dropped", collector.name,
                        runtime.name, collector.max_series)
        return chunks, count, None

    def _log_change(
        self, runtime: TargetRuntime, collector: str, dbname: str | None, error: CollectError | None
    ) -> None:
        if error is None:
            for stale in [k for k in runtime.last_errors if k.collector == collector]:
                log.info("collector %s on %s recovered", collector, runtime.name)
                del runtime.last_errors[stale]
            return
        key = ErrorKey(collector, dbname or "")
        text = f"{error.reason}: {error}"
        if runtime.last_errors.get(key) != text:
            where = f" database {dbname}" if dbname else ""
            log.warning("collector %s on %s%s failed (%s)", collector, runtime.name, where, text)
            runtime.last_errors[key] = text

    def close(self) -> None:
        """Close every connection."""
        for runtime in self.targets.values():
            runtime.conns.close_all()
