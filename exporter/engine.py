"""Run one collector on one target inside guarded transactions; rows become pre-rendered samples.

Nothing here raises into the scheduler: failures are classified, counted, logged once per change.
"""

from __future__ import annotations

import enum
import fnmatch
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from psycopg.conninfo import conninfo_to_dict

from exporter import compat, planner, secrets, shards
from exporter.catalog import Catalog, Collector
from exporter.config import PgBouncerConfig, Settings, TargetConfig
from exporter.db import (
    CollectError,
    ConnectOptions,
    DatabaseUnavailable,
    Denied,
    Facts,
    TargetConnections,
    TargetDown,
    classify,
    dsn_display,
    read_facts,
)
from exporter.exposition import label_text, render_rows
from exporter.hooks import Peer, RunContext
from exporter.planner import Effective
from exporter.snapshot import Snapshot

log = logging.getLogger("pgvitals.engine")

#: A collector of a shared pass reuses the pass another ran in the same database this recently, as a
#: share of its own interval (the tolerance its runs' start times have anyway) ...
PASS_REUSE = 0.1


def pass_reuse_window(interval: float) -> float:
    """... or within two start jitters (theirs and ours, either way) and the first run's second of spread.

    At 60 s the jitter (5 s) made two collectors of a pass start up to 11 s apart: with a window of 6 s
    about one pair in six read the database twice.
    """
    return max(PASS_REUSE * interval, 2 * planner.start_jitter(interval) + 1.0)
#: Collector state key: when the collector last got its rows in a database (its own pass or a reused one).
SERVED_AT = "served_at"


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
    server: str = ""  # host:port, postgres_exporter's ``server`` label on its legacy metrics
    # collector -> (objects it was refused at run time, monotonic time of the refusal): not asked again
    # until the probe's re-check lets the denial expire.
    run_denials: dict[str, tuple[frozenset[str], float]] = field(default_factory=dict)
    spec: TargetConfig | PgBouncerConfig | None = None  # what it was built from (a reload compares it)
    # Set once the target is removed: runs that start later do nothing, and removal waits for running ones.
    retired: bool = False
    _busy: int = field(default=0, repr=False, compare=False)
    _idle: threading.Condition = field(default_factory=threading.Condition, repr=False, compare=False)
    # (shared pass, database) -> what the pass last read (RunContext.shared), and a lock per key so that
    # collectors arriving together run the pass once.
    passes: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    pass_locks: dict[tuple[str, str], threading.Lock] = field(default_factory=dict)
    _pass_guard: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @contextmanager
    def working(self) -> Iterator[bool]:
        """Count a probe or run in progress; yields False (do nothing) once the target is retired."""
        with self._idle:
            if self.retired:
                active = False
            else:
                active = True
                self._busy += 1
        try:
            yield active
        finally:
            if active:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def retire(self, wait: float) -> bool:
        """Stop new probes and runs, wait up to ``wait`` seconds for running ones; True when none is left."""
        with self._idle:
            self.retired = True
            return self._idle.wait_for(lambda: self._busy == 0, wait)

    def pass_lock(self, key: tuple[str, str]) -> threading.Lock:
        """The lock of one shared pass in one database."""
        with self._pass_guard:
            return self.pass_locks.setdefault(key, threading.Lock())

    def denied(self, collector: Collector) -> frozenset[str]:
        """What ``collector`` needs and may not use here: refused at run time, or by the probe's privilege check."""
        checked = frozenset(self.facts.denied) & frozenset(collector.requires) if self.facts else frozenset()
        at_run, _since = self.run_denials.get(collector.name, (frozenset(), 0.0))
        return frozenset(_object_name(name) for name in checked) | at_run

    def databases(self) -> list[str]:
        """The databases per-database collectors visit, from the server's list and the filters."""
        if self.facts is None:
            return []
        return [
            db for db in self.facts.databases
            if any(fnmatch.fnmatchcase(db, p) for p in self.include)
            and not any(fnmatch.fnmatchcase(db, p) for p in self.exclude)
        ]


def sweep_order(databases: list[str], connected: list[str], keep: str = "") -> list[str]:
    """The databases in their order, rotated to start at the least recently used one still connected.

    ``connected``: databases with an idle connection, least recently used first; ``keep`` (the DSN's
    database, never closed first) does not choose the start. A sweep in a fixed order would miss every
    time once the databases outnumber the idle connections (it closes the very connection it needs
    next); starting where the previous sweep's connections begin, a sweep opens at most
    ``len(databases) - len(connected)`` connections. And a sweep that starts while another is running
    starts right behind it: with connection slots handed over in turn (FairSlots) the two then visit
    each database one after the other over the same connection.
    """
    listed = set(databases)
    start = next((db for db in connected if db in listed and db != keep), None)
    if start is None:
        return list(databases)
    i = databases.index(start)
    return databases[i:] + databases[:i]


def _object_name(required: str) -> str:
    """The label of a required object: ``pg_catalog.pg_ls_waldir()`` -> ``pg_ls_waldir``."""
    return required.split("(", 1)[0].rsplit(".", 1)[-1]


def build_runtime(cfg: TargetConfig | PgBouncerConfig, settings: Settings) -> TargetRuntime:
    """A runtime for one configured target."""
    is_pgbouncer = isinstance(cfg, PgBouncerConfig)
    dsn_password = conninfo_to_dict(cfg.dsn).get("password")
    secrets.register(str(dsn_password) if dsn_password else None)
    options = ConnectOptions(
        dsn=cfg.dsn,
        password=secrets.PasswordSource(cfg.password_file, cfg.password_env, cfg.password_command,
                                        ttl=cfg.password_command_ttl, timeout=cfg.password_command_timeout),
        application_name=settings.application_name, connect_timeout=settings.connect_timeout,
        pgbouncer=is_pgbouncer,
    )
    limit = 1 if is_pgbouncer else cfg.max_connections  # type: ignore[union-attr]
    idle = 1 if is_pgbouncer else cfg.idle_connections  # type: ignore[union-attr]
    prefix = label_text([("target", cfg.name), *sorted(cfg.labels.items())])
    runtime = TargetRuntime(
        name=cfg.name, is_pgbouncer=is_pgbouncer, conns=TargetConnections(options, limit, idle), prefix=prefix,
        dsn_text=dsn_display(cfg.dsn), server=_server_label(cfg.dsn), spec=cfg,
    )
    if isinstance(cfg, TargetConfig):
        runtime.include = tuple(cfg.databases.include)
        runtime.exclude = cfg.databases.excluded()
    return runtime


def _server_label(dsn: str) -> str:
    """``host:port`` as postgres_exporter labels a server (its first host; libpq's defaults when unset)."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "localhost").split(",")[0]
    port = str(params.get("port") or "5432").split(",")[0]
    return f"{host}:{port}"


def polled_configs(settings: Settings) -> list[TargetConfig | PgBouncerConfig]:
    """The configured targets this process polls: every one, or those whose name falls to its shard."""
    configs: list[TargetConfig | PgBouncerConfig] = [*settings.targets, *settings.pgbouncers]
    if settings.shard is None:
        return configs
    return [cfg for cfg in configs if shards.owner(cfg.name, settings.shard.count) == settings.shard.index]


class Engine:
    """Runs probes and collectors against targets and keeps the snapshot current."""

    def __init__(self, catalog: Catalog, settings: Settings, snapshot: Snapshot):
        self.catalog = catalog
        self.settings = settings
        self.snapshot = snapshot
        self.collectors: dict[str, Effective] = {}
        self.plans: dict[str, compat.Plan] = {}
        self.required: frozenset[str] = frozenset()
        self.targets: dict[str, TargetRuntime] = {}
        self.configure(settings)
        for cfg in polled_configs(settings):
            self.add_target(cfg)

    def configure(self, settings: Settings, catalog: Catalog | None = None) -> set[str]:
        """Take (new) settings and catalog; returns the collectors that changed (declaration, interval, timeout,
        switch, parameters or naming) or went."""
        catalog = self.catalog if catalog is None else catalog
        collectors = {e.collector.name: e for e in planner.effective_collectors(catalog, settings)}
        naming: compat.Naming = settings.metric_names
        table = compat.validate(catalog) if naming != "native" else ()
        # What each collector renders in this naming mode, decided once: a run only follows the plan.
        plans = {name: compat.plan(e.collector, naming, table) for name, e in collectors.items()}
        changed = {name for name, eff in collectors.items()
                   if self.collectors.get(name) != eff or self.plans.get(name) != plans[name]}
        changed |= set(self.collectors) - set(collectors)
        self.catalog, self.settings, self.naming = catalog, settings, naming
        self.collectors, self.plans = collectors, plans
        self.snapshot.use_order(compat.exposition_order(catalog, naming, table), compat.self_order(catalog, naming))
        shard = settings.shard
        self.snapshot.set_shard(shard.index if shard else 0, shard.count if shard else 1, len(polled_configs(settings)))
        # Every object an enabled collector requires: the probe asks the server about all of them at once.
        self.required = frozenset(name for e in collectors.values() if e.enabled for name in e.collector.requires)
        return changed

    def add_target(self, cfg: TargetConfig | PgBouncerConfig) -> TargetRuntime:
        """Build and register a runtime for ``cfg`` (not probed yet); the caller schedules it."""
        runtime = build_runtime(cfg, self.settings)
        self.snapshot.add_target(cfg.name, runtime.prefix, runtime.is_pgbouncer)
        # Copy on write: readers iterate over ``targets`` in other threads without a lock.
        self.targets = {**self.targets, cfg.name: runtime}
        return runtime

    def remove_target(self, name: str) -> TargetRuntime | None:
        """Stop using target ``name``: no new runs, running ones awaited, connections closed, series dropped."""
        runtime = self.targets.get(name)
        if runtime is None:
            return None
        self.targets = {key: value for key, value in self.targets.items() if key != name}
        runtime.conns.close()  # a run in progress fails fast at its next connection
        # Runs are bounded by their statement and connect timeouts; the wait only covers those.
        longest = max((e.timeout for e in self.applicable(runtime)), default=0.0)
        if not runtime.retire(wait=longest + self.settings.connect_timeout + 5):
            log.warning("target %s removed while a run was still going; its results will be dropped", name)
        runtime.conns.close()  # connections given back meanwhile
        self.snapshot.remove_target(name)
        return runtime

    def applicable(self, runtime: TargetRuntime) -> list[Effective]:
        """Enabled collectors of the target's kind (version and role are checked at each run)."""
        return planner.applicable(self.collectors.values(), runtime.is_pgbouncer)

    # -- probing -------------------------------------------------------------------------------

    def probe(self, runtime: TargetRuntime) -> Probe:
        """Connect, refresh the server facts and record pg_up; says whether the target is up or came up."""
        with runtime.working() as active:
            return self._probe(runtime) if active else Probe.DOWN

    def _probe(self, runtime: TargetRuntime) -> Probe:
        started = time.monotonic()
        try:
            with runtime.conns.session(wait=self.settings.connect_timeout + 5) as session:
                if runtime.is_pgbouncer:
                    session.query("SHOW VERSION")
                    facts = None
                else:
                    with session.guarded(self.settings.connect_timeout, self.settings.lock_timeout):
                        facts = read_facts(session, self.required)
        except Exception as exc:  # every failure means "down" for the probe
            error = classify(exc)
            if not runtime.retired:  # removed meanwhile: "down" would be a false alarm
                self._mark_down(runtime, error)
            return Probe.DOWN
        was_up = runtime.up
        runtime.facts = facts
        self._recheck_denials(runtime)
        kept = set(runtime.databases())
        self.snapshot.forget_databases(runtime.name, keep=list(kept))
        for key in [k for k in runtime.passes if k[1] and k[1] not in kept]:
            del runtime.passes[key]
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

    def _recheck_denials(self, runtime: TargetRuntime) -> None:
        """Let denials found at run time expire after the re-check interval, so they are tried once more."""
        expired = time.monotonic() - self.settings.denial_recheck_interval
        for name in [n for n, (_objects, since) in list(runtime.run_denials.items()) if since <= expired]:
            del runtime.run_denials[name]

    def _mark_down(self, runtime: TargetRuntime, error: CollectError) -> None:
        runtime.failures += 1
        text = f"{error.reason}: {error}"
        if runtime.up is not False or runtime.last_errors.get(PROBE) != text:
            log.warning("target %s is down (%s): %s", runtime.name, runtime.dsn_text, text)
        runtime.last_errors[PROBE] = text
        runtime.up = False
        runtime.conns.close_all()
        self.snapshot.set_up(runtime.name, False, error.reason)

    def backoff(self, runtime: TargetRuntime) -> float:
        """Seconds until the next probe: the probe interval when up, exponential backoff when down."""
        if runtime.up:
            return self.settings.probe_interval
        return float(min(self.settings.max_backoff, 2 ** min(runtime.failures - 1, 10)))

    # -- collecting ----------------------------------------------------------------------------

    def collect(self, runtime: TargetRuntime, eff: Effective) -> None:
        """Run one collector on one target (every selected database for per-database collectors)."""
        with runtime.working() as active:
            if active:
                self._collect(runtime, eff)

    def _collect(self, runtime: TargetRuntime, eff: Effective) -> None:
        collector = eff.collector
        if not runtime.up:
            return  # the probe owns reconnection; its backoff keeps us from hammering a dead server
        reason = planner.not_applicable(collector, runtime.facts)
        if reason is not None:
            if self.snapshot.record_skip(runtime.name, collector.name, reason) != reason:
                log.info("collector %s does not apply to %s (%s)", collector.name, runtime.name, reason)
            return
        denied = runtime.denied(collector)
        if denied:
            self._record_denied(runtime, collector, denied)
            return
        started = time.monotonic()
        databases: list[str | None] = (
            list(self._worth_visiting(runtime, eff, sweep_order(
                runtime.databases(), runtime.conns.idle_databases(), runtime.conns.default_dbname)))
            if collector.scope == "database" else [None]
        )
        results: dict[str, dict[str, bytes]] = {}
        failed: list[tuple[str | None, CollectError]] = []
        unavailable: dict[str, str] = {}
        skipped_everywhere = True
        last_skip: str | None = None
        series = 0
        for dbname in databases:
            try:
                chunks, count, skip = self._run_one(runtime, eff, dbname)
            except Exception as exc:
                error = classify(exc)
                if isinstance(error, Denied):
                    # Permanent until granted: remember it instead of failing (and logging an ERROR) each run.
                    objects = frozenset({error.object or collector.name})
                    runtime.run_denials[collector.name] = (objects, time.monotonic())
                    self._record_denied(runtime, collector, objects, str(error))
                    return
                if isinstance(error, DatabaseUnavailable) and dbname is not None:
                    unavailable[dbname] = error.reason  # that database's refusal, not the server's
                    continue
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
        if runtime.retired or self.collectors.get(collector.name) != eff:
            return  # removed, or reconfigured by a reload, while running: the new job's runs count
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
            failures=[error.reason for _, error in failed], results=results, unavailable=unavailable.values(),
        )
        if collector.scope == "database" and not any(isinstance(e, TargetDown) for _, e in failed):
            visited = [db for db in databases if db is not None]
            for dbname, now in self.snapshot.record_databases(runtime.name, visited, unavailable).items():
                if now is None:
                    log.info("database %s on %s is available again", dbname, runtime.name)
                else:
                    log.warning("database %s on %s refused the connection (%s); the other databases go on",
                                dbname, runtime.name, now)
        down = next((e for _, e in failed if isinstance(e, TargetDown)), None)
        if down is not None:
            self._mark_down(runtime, down)

    def _worth_visiting(self, runtime: TargetRuntime, eff: Effective, databases: list[str]) -> list[str]:
        """``databases`` less those the collector's ``visit_only`` query finds nothing to report in.

        When it cannot tell (the query failed), every database is visited: the sweep then reports what
        is wrong, database by database.
        """
        variant = eff.collector.visit_only_for(runtime.facts.version_num) if runtime.facts else None
        if variant is None:
            return databases
        try:
            with runtime.conns.session(None, wait=max(eff.timeout, 1.0)) as session, \
                    session.guarded(eff.timeout, self.settings.lock_timeout):
                named = {row["datname"] for row in session.query(variant.sql)}
        except Exception as exc:
            log.debug("collector %s on %s: visit_only query failed (%s); visiting every database",
                      eff.collector.name, runtime.name, classify(exc).reason)
            return databases
        return [db for db in databases if db in named]

    def _record_denied(self, runtime: TargetRuntime, collector: Collector, objects: frozenset[str],
                       detail: str = "") -> None:
        """Skip the collector as denied, saying so once per change (never per run)."""
        if self.snapshot.record_denied(runtime.name, collector.name, objects):
            why = f": {detail}" if detail else " (privilege check)"
            log.warning("collector %s on %s skipped: may not use %s%s; grant it to collect these metrics",
                        collector.name, runtime.name, ", ".join(sorted(objects)), why)

    def _run_one(
        self, runtime: TargetRuntime, eff: Effective, dbname: str | None
    ) -> tuple[dict[str, bytes], int, str | None]:
        """One guarded run in one database: (lines by metric, series, skip reason or None)."""
        collector = eff.collector
        if collector.shared_pass is None:
            return self._run_in_session(runtime, eff, dbname, {})
        key = (collector.shared_pass, dbname or "")
        with runtime.pass_lock(key):
            shared = runtime.passes.setdefault(key, {})
            at, sections = shared.get("at"), shared.get("sections", {})
            state = runtime.state.setdefault((collector.name, dbname or ""), {})
            served = state.get(SERVED_AT)
            # Reuse only a pass another collector ran since this one last got its rows, and only a recent one.
            if at is not None and (served is None or at > served) and collector.name in sections \
                    and time.monotonic() - at <= pass_reuse_window(eff.interval):
                state[SERVED_AT] = time.monotonic()
                return self._render(runtime, collector, dbname, sections[collector.name])
            try:
                return self._run_in_session(runtime, eff, dbname, shared)
            finally:
                state[SERVED_AT] = time.monotonic()

    def _peers(self, runtime: TargetRuntime, collector: Collector, dbname: str | None) -> dict[str, Peer]:
        """The enabled collectors of ``collector``'s shared pass, with their parameters and state in ``dbname``."""
        if collector.shared_pass is None:
            return {}
        peers = {}
        now = time.monotonic()
        for e in self.applicable(runtime):
            if e.collector.shared_pass == collector.shared_pass:
                state = runtime.state.setdefault((e.collector.name, dbname or ""), {})
                # Due: its next run may start within the reuse window. Generous on purpose: a section read
                # for nothing costs a little, a collector arriving to find its section missing a whole pass.
                served = state.get(SERVED_AT)
                due = served is None or now - served >= e.interval - 2 * pass_reuse_window(e.interval)
                peers[e.collector.name] = Peer(e.params, state, due)
        return peers

    def _run_in_session(
        self, runtime: TargetRuntime, eff: Effective, dbname: str | None, shared: dict[str, Any]
    ) -> tuple[dict[str, bytes], int, str | None]:
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
                collector=collector.name, peers=self._peers(runtime, collector, dbname), shared=shared,
            )
            if collector.fetch is not None:
                rows = collector.fetch(session, ctx, sql_text)
            else:
                assert sql_text is not None
                rows = session.query(sql_text, eff.params if collector.params else None)
        if collector.transform is not None:
            rows = collector.transform(rows, ctx)
        return self._render(runtime, collector, dbname, rows)

    def _render(
        self, runtime: TargetRuntime, collector: Collector, dbname: str | None, rows: list[dict[str, Any]]
    ) -> tuple[dict[str, bytes], int, str | None]:
        if dbname is not None:
            for row in rows:
                row.setdefault("datname", dbname)
        chosen = self.plans[collector.name]
        chunks, count, truncated = render_rows(chosen.native, rows, runtime.prefix, collector.max_series)
        if chosen.derived:
            derived, extra, cut = compat.render_derived(chosen.derived, rows, runtime.prefix, runtime.server,
                                                        collector.max_series - count)
            chunks.update(derived)
            count += extra
            truncated = truncated or cut
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
