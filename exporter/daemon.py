"""Lifecycle: settings -> engine -> scheduled probes and collectors -> HTTP server."""

from __future__ import annotations

import logging
import random
import signal
import threading
from collections.abc import Mapping
from contextlib import suppress
from datetime import datetime, timedelta
from http import HTTPStatus

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler

from exporter import __version__, catalog, shards
from exporter.config import PgBouncerConfig, Settings, TargetConfig
from exporter.engine import Engine, Probe, TargetRuntime
from exporter.planner import Effective
from exporter.server import MetricsServer, probe_snapshot
from exporter.snapshot import Snapshot
from exporter.webconfig import WebConfig

log = logging.getLogger("pgvitals.daemon")


class Daemon:
    """Runs every collector of every target on its own interval and serves the snapshot.

    The daemon owns the set of targets: add_target() and remove_target() change it at run time (a
    reload, or targets discovered by Prometheus), from any thread.
    """

    def __init__(self, settings: Settings, web: WebConfig | None = None):
        self.settings = settings
        self.web = web
        self.catalog = catalog.load()
        self.snapshot = Snapshot(self.catalog, __version__)
        self.engine = Engine(self.catalog, settings, self.snapshot)
        workers = settings.workers or min(64, 4 + 2 * len(self.engine.targets))
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=workers)},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone="UTC",
        )
        self.server: MetricsServer | None = None
        self._ready_latched = False
        self._stopped = threading.Event()
        self._targets_lock = threading.RLock()  # one change of the target set at a time

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
            id=self._collector_job_id(runtime, eff), jitter=min(eff.interval * 0.1, 5.0),
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

    # -- readiness -----------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """Ready once every target's first collection has finished, or failed (the target could not be reached).

        An unreachable target does not hold readiness back: it is reported (pg_up 0), and a replica kept unready
        by one dead server would stall a StatefulSet's rolling update. Once ready, always ready.
        """
        pending, unreachable = [], []
        for runtime in self.engine.targets.values():
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
        """/probe?target=NAME: a configured target's series, or why this process has none."""
        status, body = probe_snapshot(self.snapshot, params)
        name = params.get("target", "")
        if status is not HTTPStatus.NOT_FOUND:
            return status, body
        shard = self.settings.shard
        configured = {cfg.name for cfg in (*self.settings.targets, *self.settings.pgbouncers)}
        if shard is not None and name in configured:
            return HTTPStatus.NOT_FOUND, (f"target {name!r} is polled by shard {shards.owner(name, shard.count)} of "
                                          f"{shard.count}, not by this one ({shard.index})\n").encode()
        return status, body

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving and collecting (returns at once)."""
        self.server = MetricsServer(self.settings.listen_host, self.settings.listen_port, self.snapshot, self.ready,
                                    web=self.web, probe=self.probe)
        self.server.start()
        self._schedule()
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
        """Start, then block until SIGINT or SIGTERM."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        done.wait()
        log.info("stopping")
        self.stop()
