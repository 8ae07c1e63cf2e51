"""Run one collector on one target inside guarded transactions; rows become pre-rendered samples.

Nothing here raises into the scheduler: failures are classified, counted, logged once per change.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exporter import secrets
from exporter.catalog import Catalog, Collector
from exporter.config import PgBouncerConfig, Settings, TargetConfig
from exporter.db import (
    CollectError,
    ConnectOptions,
    Facts,
    Session,
    TargetConnections,
    TargetDown,
    classify,
    dsn_display,
    read_extensions,
    read_facts,
)
from exporter.exposition import label_text, render_rows
from exporter.hooks import RunContext
from exporter.snapshot import Snapshot

log = logging.getLogger("pgvitals.engine")


@dataclass(frozen=True)
class Effective:
    """A collector with the user's overrides applied."""

    collector: Collector
    enabled: bool
    interval: float
    timeout: float
    params: dict[str, Any]


def effective_collectors(catalog: Catalog, settings: Settings) -> list[Effective]:
    """Every catalog collector with interval, timeout, switches and parameters from the config."""
    out = []
    for collector in catalog.collectors:
        override = settings.collectors.get(collector.name)
        params = collector.param_defaults()
        enabled, interval, timeout = collector.enabled, collector.interval, collector.timeout
        if override is not None:
            enabled = enabled if override.enabled is None else override.enabled
            interval = override.interval or interval
            timeout = override.timeout or timeout
            params.update(override.model_extra or {})
        out.append(Effective(collector, enabled, interval, min(timeout, interval * 0.9), params))
    return out


def quote_ident(name: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


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
    last_errors: dict[str, str] = field(default_factory=dict)
    state: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
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


def read_secret(cfg: TargetConfig | PgBouncerConfig) -> str | None:
    """The password from password_file or password_env, registered for redaction."""
    import os

    password = None
    if cfg.password_file is not None:
        password = cfg.password_file.read_text(encoding="utf-8").rstrip("\r\n")
    elif cfg.password_env is not None:
        password = os.environ.get(cfg.password_env)
    secrets.register(password)
    return password


def build_runtime(cfg: TargetConfig | PgBouncerConfig, settings: Settings) -> TargetRuntime:
    """A runtime for one configured target."""
    is_pgbouncer = isinstance(cfg, PgBouncerConfig)
    from psycopg.conninfo import conninfo_to_dict

    dsn_password = conninfo_to_dict(cfg.dsn).get("password")
    secrets.register(str(dsn_password) if dsn_password else None)
    options = ConnectOptions(
        dsn=cfg.dsn, password=read_secret(cfg), application_name=settings.application_name,
        connect_timeout=settings.connect_timeout, pgbouncer=is_pgbouncer,
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


def not_applicable(collector: Collector, runtime: TargetRuntime) -> str | None:
    """Why the collector cannot run on this target now, as a fixed reason word; None when it can."""
    if collector.target_kind == "pgbouncer":
        return None if runtime.is_pgbouncer else "target_kind"
    if runtime.is_pgbouncer:
        return "target_kind"
    facts = runtime.facts
    if facts is None:
        return None
    if facts.version_num < collector.min_server_version:
        return "version"
    if collector.version_source == "server" and collector.variants and collector.variant_for(facts.version_num) is None:
        return "version"
    if collector.role == "primary" and facts.in_recovery:
        return "role"
    if collector.role == "standby" and not facts.in_recovery:
        return "role"
    if collector.preload and collector.preload not in facts.preload_libraries:
        return "preload"
    return None


class Engine:
    """Runs probes and collectors against targets and keeps the snapshot current."""

    def __init__(self, catalog: Catalog, settings: Settings, snapshot: Snapshot):
        self.catalog = catalog
        self.settings = settings
        self.snapshot = snapshot
        self.collectors = {e.collector.name: e for e in effective_collectors(catalog, settings)}
        self.targets: dict[str, TargetRuntime] = {}
        self.on_up: Callable[[TargetRuntime], None] | None = None
        configs: list[TargetConfig | PgBouncerConfig] = [*settings.targets, *settings.pgbouncers]
        for cfg in configs:
            runtime = build_runtime(cfg, settings)
            self.targets[cfg.name] = runtime
            snapshot.add_target(cfg.name, runtime.prefix, runtime.is_pgbouncer)

    def applicable(self, runtime: TargetRuntime) -> list[Effective]:
        """Enabled collectors of the target's kind (version and role are checked at each run)."""
        kind = "pgbouncer" if runtime.is_pgbouncer else "postgres"
        return [e for e in self.collectors.values() if e.enabled and e.collector.target_kind == kind]

    # -- probing -------------------------------------------------------------------------------

    def probe(self, runtime: TargetRuntime) -> bool:
        """Connect, refresh the server facts and record pg_up; True when the target is up."""
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
            return False
        was_up = runtime.up
        runtime.facts = facts
        runtime.last_errors.pop("probe/", None)
        runtime.up = True
        runtime.failures = 0
        self.snapshot.set_up(runtime.name, True)
        if was_up is not True:
            role = "" if facts is None else (" standby" if facts.in_recovery else " primary")
            version = "" if facts is None else f" PostgreSQL {facts.version}"
            log.info("target %s is up (%s%s%s, %.0f ms)", runtime.name, runtime.dsn_text, version, role,
                     (time.monotonic() - started) * 1000)
            if self.on_up is not None:
                self.on_up(runtime)
        return True

    def _mark_down(self, runtime: TargetRuntime, error: CollectError) -> None:
        runtime.failures += 1
        runtime.last_errors["probe/"] = f"{error.reason}: {error}"
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
        status = self.snapshot.status(runtime.name, collector.name)
        if not runtime.up:
            return  # the probe owns reconnection; its backoff keeps us from hammering a dead server
        reason = not_applicable(collector, runtime)
        if reason is not None:
            if status.skipped != reason:
                log.info("collector %s does not apply to %s (%s)", collector.name, runtime.name, reason)
            status.skipped = reason
            self.snapshot.drop(runtime.name, collector.name)
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
        status.runs += 1
        status.duration = time.monotonic() - started
        if not failed and skipped_everywhere and last_skip is not None:
            # The server, or every selected database (e.g. none has the extension), says it does not apply.
            status.skipped = last_skip
            self.snapshot.drop(runtime.name, collector.name)
            return
        status.skipped = None
        for dbname, error in failed:
            status.errors[error.reason] = status.errors.get(error.reason, 0) + 1
            self._log_change(runtime, collector.name, dbname, error)
        if not failed:
            self._log_change(runtime, collector.name, None, None)
        status.success = not failed
        status.series = series
        if results or not failed:
            status.last_success = finished if not failed else status.last_success
            status.data_time = finished
            self.snapshot.replace(runtime.name, collector.name, results)
        else:
            # A failed run leaves nothing: stale series are never served as if fresh.
            status.data_time = None
            self.snapshot.drop(runtime.name, collector.name)
        if any(isinstance(e, TargetDown) for _, e in failed):
            down = next(e for _, e in failed if isinstance(e, TargetDown))
            self._mark_down(runtime, down)

    def _run_one(
        self, runtime: TargetRuntime, eff: Effective, dbname: str | None
    ) -> tuple[dict[str, bytes], int, str | None]:
        """One guarded run in one database: (lines by metric, series, skip reason or None)."""
        collector = eff.collector
        wait = max(eff.timeout, 1.0)
        with runtime.conns.session(dbname, wait=wait) as session, \
                session.guarded(eff.timeout, self.settings.lock_timeout, writes=collector.writes):
            sql_text, skip = self._choose_sql(runtime, collector, session)
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

    def _choose_sql(
        self, runtime: TargetRuntime, collector: Collector, session: Session
    ) -> tuple[str | None, str | None]:
        """The SQL variant for this server (or this database's extension version), or a skip reason."""
        facts = runtime.facts
        if runtime.is_pgbouncer or facts is None:
            variant = collector.variants[0] if collector.variants else None
            return (variant.sql if variant else None), None
        schema = None
        version = facts.version_num
        if collector.extension is not None:
            installed = facts.extensions.get(session.dbname)
            if installed is None:
                installed = facts.extensions[session.dbname] = read_extensions(session)
            if collector.extension not in installed:
                return None, "extension"
            schema, ext_version = installed[collector.extension]
            if collector.version_source == collector.extension:
                version = ext_version
        if not collector.variants:
            return None, None
        variant = collector.variant_for(version)
        if variant is None:
            return None, "version"
        sql_text = variant.sql
        if schema is not None:
            sql_text = sql_text.replace("{ext_schema}", quote_ident(schema))
        return sql_text, None

    def _log_change(
        self, runtime: TargetRuntime, collector: str, dbname: str | None, error: CollectError | None
    ) -> None:
        key = f"{collector}/{dbname or ''}"
        if error is None:
            for stale in [k for k in runtime.last_errors if k.startswith(collector + "/")]:
                log.info("collector %s on %s recovered", collector, runtime.name)
                del runtime.last_errors[stale]
            return
        text = f"{error.reason}: {error}"
        if runtime.last_errors.get(key) != text:
            where = f" database {dbname}" if dbname else ""
            log.warning("collector %s on %s%s failed (%s)", collector, runtime.name, where, text)
            runtime.last_errors[key] = text

    def close(self) -> None:
        """Close every connection."""
        for runtime in self.targets.values():
            runtime.conns.close_all()
