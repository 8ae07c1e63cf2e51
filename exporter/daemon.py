"""Lifecycle: settings -> engine -> scheduled probes and collectors -> HTTP server."""

from __future__ import annotations

import logging
import random
import signal
import threading
from contextlib import suppress
from datetime import datetime, timedelta

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler

from exporter import __version__, catalog
from exporter.config import Settings
from exporter.engine import Engine, Probe, TargetRuntime
from exporter.planner import Effective
from exporter.server import MetricsServer
from exporter.snapshot import Snapshot
from exporter.webconfig import WebConfig

log = logging.getLogger("pgvitals.daemon")

#: The executor of per-database collectors (see Daemon.__init__).
SWEEPS = "sweeps"


class Daemon:
    """Runs every collector of every target on its own interval and serves the snapshot."""

    def __init__(self, settings: Settings, web: WebConfig | None = None):
        self.settings = settings
        self.web = web
        self.catalog = catalog.load()
        self.snapshot = Snapshot(self.catalog, __version__)
        self.engine = Engine(self.catalog, settings, self.snapshot)
        workers = settings.workers or min(64, 4 + 2 * len(self.engine.targets))
        # Per-database collectors hold a worker for a whole sweep (minutes over 1,000 databases): they get
        # workers of their own, so that server-level collectors never wait behind them.
        sweepers = sum(1 for runtime in self.engine.targets.values() for eff in self.engine.applicable(runtime)
                       if eff.collector.scope == "database")
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=workers),
                       SWEEPS: ThreadPoolExecutor(max_workers=min(64, max(1, sweepers)))},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone="UTC",
        )
        self.server: MetricsServer | None = None
        self._ready_latched = False
        self._stopped = threading.Event()

    # -- scheduling ----------------------------------------------------------------------------

    def _collector_job_id(self, runtime: TargetRuntime, eff: Effective) -> str:
        return f"collect:{runtime.name}:{eff.collector.name}"

    def _schedule(self) -> None:
        now = datetime.now().astimezone()
        for runtime in self.engine.targets.values():
            # An interval job (not a chain of one-shot jobs): APScheduler removes a finished one-shot
            # job by id, which could race with the next one being added under the same id.
            self.scheduler.add_job(
                self._probe, "interval", seconds=self.settings.probe_interval, args=(runtime,),
                id=f"probe:{runtime.name}", next_run_time=now, misfire_grace_time=None,
            )
            for eff in self.engine.applicable(runtime):
                # First run is triggered when the probe sees the target up; until then far in the future.
                self.scheduler.add_job(
                    self.engine.collect, "interval", seconds=eff.interval, args=(runtime, eff),
                    id=self._collector_job_id(runtime, eff), jitter=min(eff.interval * 0.1, 5.0),
                    executor=SWEEPS if eff.collector.scope == "database" else "default",
                    next_run_time=now + timedelta(days=3650), misfire_grace_time=max(1, int(eff.interval)),
                )

    def _probe(self, runtime: TargetRuntime) -> None:
        try:
            if self.engine.probe(runtime) is Probe.CAME_UP:
                self._target_up(runtime)
        finally:
            if not runtime.up and not self._stopped.is_set():
                # Down: retry on the backoff schedule instead of the probe interval.
                delay = self.engine.backoff(runtime)
                with suppress(JobLookupError, SchedulerNotRunningError):  # the daemon is stopping
                    self.scheduler.modify_job(
                        f"probe:{runtime.name}", next_run_time=datetime.now().astimezone() + timedelta(seconds=delay)
                    )

    def _target_up(self, runtime: TargetRuntime) -> None:
        """A target came up (first time or after an outage): collect everything soon, spread over a second."""
        now = datetime.now().astimezone()
        for eff in self.engine.applicable(runtime):
            with suppress(JobLookupError, SchedulerNotRunningError):  # the daemon is stopping
                self.scheduler.modify_job(self._collector_job_id(runtime, eff),
                                          next_run_time=now + timedelta(seconds=random.uniform(0, 1.0)))

    # -- readiness -----------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """Ready once every target has completed one collection of each collector that applies."""
        if self._ready_latched:
            return True, "ready"
        pending = []
        for runtime in self.engine.targets.values():
            if runtime.up is None:
                pending.append(f"{runtime.name}: not probed yet")
                continue
            if not runtime.up:
                pending.append(f"{runtime.name}: not reachable ({runtime.dsn_text})")
                continue
            waiting = [
                eff.collector.name for eff in self.engine.applicable(runtime)
                if (status := self.snapshot.status(runtime.name, eff.collector.name)) is None
                or (status.runs == 0 and not status.skipped)
            ]
            if waiting:
                pending.append(f"{runtime.name}: first collection running ({', '.join(waiting[:5])}...)")
        if pending:
            return False, "not ready: " + "; ".join(pending)
        self._ready_latched = True
        return True, "ready"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving and collecting (returns at once)."""
        self.server = MetricsServer(self.settings.listen_host, self.settings.listen_port, self.snapshot, self.ready,
                                    web=self.web)
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
