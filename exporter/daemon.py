"""Lifecycle: settings -> engine -> scheduled probes and collectors -> HTTP server."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from datetime import datetime, timedelta
from http import HTTPStatus

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler

from exporter import __version__, planner, shards
from exporter import dynamic as dynamic_targets
from exporter.catalog import Catalog
from exporter.config import ConfigError, PgBouncerConfig, Settings, TargetConfig
from exporter.custom import build_catalog
from exporter.engine import Engine, Probe, TargetRuntime, polled_configs
from exporter.planner import Effective
from exporter.secrets import redact
from exporter.server import MetricsServer, probe_snapshot
from exporter.snapshot import Snapshot
from exporter.webconfig import WebConfig

log = logging.getLogger("pgvitals.daemon")

#: The executor of per-database collectors (see Daemon.__init__).
SWEEPS = "sweeps"
DEFAULT_WORKERS = 64  # threads per scheduler pool at most (server-level runs; per-database sweeps)

#: First /probe requests of new targets that may wait for the connection attempt at the same time (the HTTP
#: server has 4 workers: at least 2 stay free for /metrics and the probes of known targets).
FIRST_PROBE_WAITERS = 2

#: Reads the configuration and the web configuration again; raises ConfigError (with ``source``) if invalid.
ConfigSource = Callable[[], tuple[Settings, WebConfig | None]]


def _connection_settings(settings: Settings) -> tuple[object, ...]:
    """The global settings every connection is opened with: a change restarts every target."""
    return settings.application_name, settings.connect_timeout


class Daemon:
    """Runs every collector of every target on its own interval and serves the snapshot.

    The daemon owns the set of targets: add_target() and remove_target() change it at run time (a
    reload, or targets discovered by Prometheus), from any thread.
    """

    def __init__(self, settings: Settings, web: WebConfig | None = None, catalog: Catalog | None = None,
                 source: ConfigSource | None = None, lifecycle: bool = False):
        """``source`` re-reads the configuration on reload (SIGHUP; POST /-/reload too with ``lifecycle``)."""
        self.settings = settings
        self.web = web
        self.source = source
        self.lifecycle = lifecycle
        # The built-ins plus the user's declarations, passed on to snapshot and engine (never a global).
        self.catalog = build_catalog(settings) if catalog is None else catalog
        self._catalog_from_settings = catalog is None  # a reload builds it again from the new settings
        self.snapshot = Snapshot(self.catalog, __version__)
        self.engine = Engine(self.catalog, settings, self.snapshot)
        # A pool starts a thread only when a run finds none idle, so a generous cap costs nothing until runs
        # overlap, and targets added later (reload, /probe) are not held to a size chosen at start.
        workers = settings.workers or DEFAULT_WORKERS
        self.scheduler = BackgroundScheduler(
            # Per-database collectors hold a worker for a whole sweep (minutes over 1,000 databases): they get
            # workers of their own, so that server-level collectors never wait behind them.
            executors={"default": ThreadPoolExecutor(max_workers=workers),
                       SWEEPS: ThreadPoolExecutor(max_workers=workers)},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone="UTC",
        )
        self.server: MetricsServer | None = None
        self._ready_latched = False
        self._stopped = threading.Event()
        self._targets_lock = threading.RLock()  # one change of the target set at a time
        self.dynamic = dynamic_targets.Registry(settings.max_dynamic_targets, settings.dynamic_target_ttl)
        # First probes that wait for a connection attempt hold an HTTP worker each: never all of them.
        self._first_probe_waits = threading.BoundedSemaphore(FIRST_PROBE_WAITERS)
        self._reload_lock = threading.Lock()

    # -- scheduling ----------------------------------------------------------------------------

    def _collector_job_id(self, runtime: TargetRuntime, eff: Effective) -> str:
        return f"collect:{runtime.name}:{eff.collector.name}"

    def _schedule(self) -> None:
        for runtime in self.engine.targets.values():
            self._schedule_target(runtime)

    def _schedule_target(self, runtime: TargetRuntime) -> None:
        """Add the probe job of a target (first run now) and its collector jobs (first run once it is up)."""
        # An interval job (not a chain of one-shot jobs): APScheduler removes a finished one-shot
        # job by id, which could race with the next one being added under the same id.
        self.scheduler.add_job(
            self._probe, "interval", seconds=self.settings.probe_interval, args=(runtime,),
            id=f"probe:{runtime.name}", next_run_time=datetime.now().astimezone(), misfire_grace_time=None,
        )
        for eff in self.engine.applicable(runtime):
            self._schedule_collector(runtime, eff)

    def _schedule_collector(self, runtime: TargetRuntime, eff: Effective) -> None:
        """Add a collector job; it first runs when the probe sees the target up, so until then far in the future."""
        first = datetime.now().astimezone() + timedelta(days=3650)
        if runtime.up:
            first = datetime.now().astimezone() + timedelta(seconds=random.uniform(0, 1.0))
        self.scheduler.add_job(
            self.engine.collect, "interval", seconds=eff.interval, args=(runtime, eff),
            id=self._collector_job_id(runtime, eff), jitter=planner.start_jitter(eff.interval),
            executor=SWEEPS if eff.collector.scope == "database" else "default",
            next_run_time=first, misfire_grace_time=max(1, int(eff.interval)),
        )

    def _unschedule(self, runtime: TargetRuntime, collector: str | None = None) -> None:
        """Remove the jobs of a target (every one, or those of one collector)."""
        for job in self.scheduler.get_jobs():
            if job.args and job.args[0] is runtime and (
                    collector is None or (len(job.args) > 1 and job.args[1].collector.name == collector)):
                with suppress(JobLookupError):  # it ended meanwhile
                    job.remove()

    # -- the target set --------------------------------------------------------------------------

    def add_target(self, spec: TargetConfig | PgBouncerConfig) -> None:
        """Start monitoring ``spec``: it is probed at once and collected on its own schedules once up.

        Raises ValueError when a target of that name exists (remove it first to change it).
        """
        with self._targets_lock:
            if spec.name in self.engine.targets:
                raise ValueError(f"a target named {spec.name!r} exists already")
            runtime = self.engine.add_target(spec)
            self._schedule_target(runtime)
        log.info("target %s added (%s)", spec.name, runtime.dsn_text)

    def remove_target(self, name: str) -> bool:
        """Stop monitoring target ``name``: its jobs end, its connections close, its series leave the snapshot.

        Blocks until a probe or run in progress on it is over (bounded by its timeouts). False if unknown.
        """
        with self._targets_lock:
            runtime = self.engine.targets.get(name)
            if runtime is None:
                return False
            self._unschedule(runtime)
            self.engine.remove_target(name)
        log.info("target %s removed", name)
        return True

    def target_names(self) -> list[str]:
        """The names of the targets monitored now."""
        return list(self.engine.targets)

    def _probe(self, runtime: TargetRuntime) -> None:
        try:
            if self.engine.probe(runtime) is Probe.CAME_UP:
                self._target_up(runtime)
        finally:
            if not runtime.up and not runtime.retired and not self._stopped.is_set():
                # Down: retry on the backoff schedule instead of the probe interval.
                delay = self.engine.backoff(runtime)
                with suppress(JobLookupError, SchedulerNotRunningError):  # the daemon is stopping
                    self.scheduler.modify_job(
                        f"probe:{runtime.name}", next_run_time=datetime.now().astimezone() + timedelta(seconds=delay)
                    )

    def _target_up(self, runtime: TargetRuntime) -> None:
        """A target came up (first time or after an outage): collect everything soon, spread over a second."""
        if runtime.retired:
            return  # removed meanwhile; a target of the same name may own these job ids now
        now = datetime.now().astimezone()
        for eff in self.engine.applicable(runtime):
            with suppress(JobLookupError, SchedulerNotRunningError):  # the daemon is stopping
                self.scheduler.modify_job(self._collector_job_id(runtime, eff),
                                          next_run_time=now + timedelta(seconds=random.uniform(0, 1.0)))

    # -- reload --------------------------------------------------------------------------------

    def reload(self) -> tuple[bool, str]:
        """Re-read the configuration and web config and apply what changed; an invalid one changes nothing.

        Unchanged targets and collectors keep their data and schedules; added ones start, removed ones stop
        and their series go, changed ones restart. Returns (success, a message for the caller).
        """
        if self.source is None:
            return False, "no configuration file to reload"
        with self._reload_lock:
            try:
                settings, web = self.source()
                catalog = build_catalog(settings) if self._catalog_from_settings else self.catalog
                summary = self._apply(settings, web, catalog)
            except ConfigError as error:
                where = getattr(error, "source", None)
                log.error("reload failed, the running configuration stays in force: invalid configuration%s",
                          f" in {where}" if where else "")
                for problem in error.problems:
                    log.error("  %s", redact(problem))
                self.snapshot.record_reload(False)
                return False, "invalid configuration, not applied:\n" + "\n".join(redact(p) for p in error.problems)
            except Exception as exc:  # whatever went wrong, the running configuration stays
                log.exception("reload failed, the running configuration stays in force")
                self.snapshot.record_reload(False)
                return False, redact(f"reload failed: {type(exc).__name__}: {exc}")
            self.snapshot.record_reload(True)
        log.info("configuration reloaded: %s", summary)
        return True, f"configuration reloaded: {summary}"

    def _apply(self, new: Settings, web: WebConfig | None, catalog: Catalog) -> str:
        """Move from the running settings to ``new``, touching only what differs; returns a summary."""
        old = self.settings
        for key in ("listen", "workers", "log"):
            if getattr(new, key) != getattr(old, key):
                log.warning("reload: %s changed; it takes effect at the next restart", key)
        specs = {cfg.name: cfg for cfg in polled_configs(new)}
        restart_all = _connection_settings(new) != _connection_settings(old)
        with self._targets_lock:
            # First, as it is the one step that may still fail (nothing has changed then).
            changed = self.engine.configure(new, catalog)
            self.settings, self.catalog = new, catalog
            current = dict(self.engine.targets)
            dynamic = {name: self.dynamic.auth_module(name) for name in current if name in self.dynamic}
            gone = [name for name, runtime in current.items() if name not in dynamic
                    and (restart_all or name not in specs or runtime.spec != specs[name])]
            # A discovered target whose auth module changed or went is dropped: its next /probe registers it again.
            dropped = [name for name, module in dynamic.items() if restart_all or module is None
                       or new.auth_modules.get(module) != old.auth_modules.get(module)]
            for name in [*gone, *dropped]:
                self.dynamic.release(name)
                self.remove_target(name)
            for name, runtime in self.engine.targets.items():  # the kept ones
                if new.probe_interval != old.probe_interval:
                    with suppress(JobLookupError):
                        self.scheduler.reschedule_job(f"probe:{name}", trigger="interval",
                                                      seconds=new.probe_interval)
                for collector in changed:
                    self._unschedule(runtime, collector)
                    self.snapshot.forget_collector(name, collector)
                for eff in self.engine.applicable(runtime):
                    if eff.collector.name in changed:
                        self._schedule_collector(runtime, eff)
            added = [spec for name, spec in specs.items() if name not in self.engine.targets]
            for spec in added:
                self.add_target(spec)
            self.dynamic.limit, self.dynamic.ttl = new.max_dynamic_targets, new.dynamic_target_ttl
            self._schedule_expiry()
        old_web = self.web
        if web != old_web:
            self.web = web
            if self.server is not None:
                self.server.apply_web(web)
        kept = len(current) - len(gone) - len(dropped)
        restarted = len([name for name in gone if name in specs])
        return (f"{kept} target(s) kept, {len(gone) - restarted} removed, {len(added) - restarted} added, "
                f"{restarted} restarted, {len(changed)} collector(s) changed"
                f"{f', {len(dropped)} discovered target(s) dropped' if dropped else ''}"
                f"{', web config changed' if web != old_web else ''}")

    def _schedule_expiry(self) -> None:
        """The job that drops discovered targets nobody probes any more (only with auth_modules)."""
        if self.settings.auth_modules:
            every = min(max(self.settings.dynamic_target_ttl / 4, 0.5), 30.0)
            self.scheduler.add_job(self._drop_expired, "interval", seconds=every, id="dynamic-expiry",
                                   replace_existing=True)
        else:
            with suppress(JobLookupError):
                self.scheduler.remove_job("dynamic-expiry")

    # -- readiness -----------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """Ready once every target's first collection has finished, or failed (the target could not be reached).

        An unreachable target does not hold readiness back: it is reported (pg_up 0), and a replica kept unready
        by one dead server would stall a StatefulSet's rolling update. Once ready, always ready.
        """
        pending, unreachable = [], []
        for runtime in self.engine.targets.values():
            if runtime.name in self.dynamic:
                continue  # readiness is about the configured targets
            if runtime.up is None:
                pending.append(f"{runtime.name}: not probed yet")
            elif not runtime.up:
                unreachable.append(f"{runtime.name}: not reachable ({runtime.dsn_text})")
            elif not self._ready_latched and (waiting := [
                eff.collector.name for eff in self.engine.applicable(runtime)
                if (status := self.snapshot.status(runtime.name, eff.collector.name)) is None
                or (status.runs == 0 and not status.skipped)
            ]):
                pending.append(f"{runtime.name}: first collection running ({', '.join(waiting[:5])}...)")
        if pending and not self._ready_latched:
            return False, "not ready: " + "; ".join(pending + unreachable)
        self._ready_latched = True
        return True, "; ".join(["ready", *unreachable])

    # -- /probe -------------------------------------------------------------------------------

    def probe(self, params: Mapping[str, str]) -> tuple[HTTPStatus, bytes]:
        """/probe?target=NAME: a configured target's series, or why this process has none;
        /probe?target=HOST:PORT/DB&auth_module=NAME: a target Prometheus discovered, polled while it is probed."""
        if "auth_module" in params:
            return self._probe_dynamic(params.get("target", ""), params["auth_module"])
        status, body = probe_snapshot(self.snapshot, params)
        name = params.get("target", "")
        if status is not HTTPStatus.NOT_FOUND:
            return status, body
        shard = self.settings.shard
        configured = {cfg.name for cfg in (*self.settings.targets, *self.settings.pgbouncers)}
        if shard is not None and name in configured:
            return HTTPStatus.NOT_FOUND, (f"target {name!r} is polled by shard {shards.owner(name, shard.count)} of "
                                          f"{shard.count}, not by this one ({shard.index})\n").encode()
        if self.settings.auth_modules:
            body = body.rstrip(b"\n") + b" (add &auth_module=NAME to probe a server that is not)\n"
        return status, body

    def _probe_dynamic(self, target: str, module_name: str) -> tuple[HTTPStatus, bytes]:
        """Register the target at its first probe (answering once its first connection attempt ended, within a
        bound), then serve what is known; each probe keeps it for another dynamic_target_ttl."""
        module = self.settings.auth_modules.get(module_name)
        if module is None:
            known = ", ".join(sorted(self.settings.auth_modules)) or "none configured"
            return HTTPStatus.BAD_REQUEST, f"unknown auth_module {module_name!r} (auth_modules: {known})\n".encode()
        try:
            address = dynamic_targets.parse_target(target)
        except ValueError as exc:
            return HTTPStatus.BAD_REQUEST, f"{exc}\n".encode()
        if not dynamic_targets.allowed(address, module):
            return HTTPStatus.FORBIDDEN, (f"target {address.name!r} is not in auth_modules.{module_name}"
                                          ".allowed_targets\n").encode()
        name = address.name
        registered_with = self.dynamic.touch(name, module_name)
        if registered_with is not None and registered_with != module_name:
            return HTTPStatus.BAD_REQUEST, (f"target {name!r} is probed with auth_module {registered_with!r} "
                                            f"already\n").encode()
        if registered_with is None:
            if not self.dynamic.claim(name, module_name):
                return HTTPStatus.TOO_MANY_REQUESTS, (f"max_dynamic_targets ({self.dynamic.limit}) reached: "
                                                      f"{name!r} is not polled\n").encode()
            self.snapshot.unlist(name)  # served by /probe only: /metrics stays what is configured
            try:
                self.add_target(dynamic_targets.target_config(address, module))
            except ValueError:  # still being removed after its TTL ran out
                self.dynamic.release(name)
                return HTTPStatus.SERVICE_UNAVAILABLE, f"target {name!r} is being dropped; probe again\n".encode()
            log.info("target %s registered by /probe (auth_module %s)", name, module_name)
            self._await_first_attempt(name)
        body = self.snapshot.render_target(name)
        return (HTTPStatus.OK, body) if body is not None else (HTTPStatus.SERVICE_UNAVAILABLE, b"being dropped\n")

    def _await_first_attempt(self, name: str) -> None:
        """Wait, at most a connect timeout and a second, for the first connection attempt of a new target.

        Only FIRST_PROBE_WAITERS probes wait at once: when Prometheus discovers many servers together, the others
        answer at once with what is known (no pg_up yet), and /metrics is never queued behind them.
        """
        if not self._first_probe_waits.acquire(blocking=False):
            return
        try:
            deadline = time.monotonic() + self.settings.connect_timeout + 1.0
            while time.monotonic() < deadline:
                runtime = self.engine.targets.get(name)
                if runtime is None or runtime.up is not None:
                    return
                time.sleep(0.02)
        finally:
            self._first_probe_waits.release()

    def _drop_expired(self) -> None:
        """Remove the dynamic targets nobody probed for dynamic_target_ttl, with their connections."""
        for name in self.dynamic.expired():
            self.remove_target(name)
            log.info("target %s dropped: not probed for %gs", name, self.settings.dynamic_target_ttl)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving and collecting (returns at once)."""
        self.server = MetricsServer(self.settings.listen_host, self.settings.listen_port, self.snapshot, self.ready,
                                    web=self.web, probe=self.probe, reload=self.reload if self.lifecycle else None)
        self.server.start()
        self.snapshot.record_reload(True)
        self._schedule()
        self._schedule_expiry()
        self.scheduler.start()
        log.info("pgvitals %s serving %s://%s:%d/metrics for %d target(s)", __version__, self.server.scheme,
                 self.settings.listen_host, self.server.port, len(self.engine.targets))

    def stop(self) -> None:
        """Stop collecting and serving, close connections."""
        self._stopped.set()
        self.scheduler.shutdown(wait=False)
        if self.server is not None:
            self.server.stop()
        self.engine.close()

    def run_forever(self) -> None:
        """Start, then block until SIGINT or SIGTERM; SIGHUP reloads the configuration."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        # Not in the handler itself: a reload waits for runs of removed targets, the main thread must not.
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self.reload, name="reload",
                                                                  daemon=True).start())
        self.start()
        # Wake up now and then: a signal the kernel gives another thread only marks the handler pending,
        # and a main thread blocked in an untimed wait would never run it (SIGTERM lost about 1 time in 8).
        while not done.wait(timeout=0.5):
            pass
        log.info("stopping")
        self.stop()
