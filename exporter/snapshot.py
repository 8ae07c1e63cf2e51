"""The latest result per (target, collector, database), served to scrapes without touching PostgreSQL."""

from __future__ import annotations

import gzip
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from exporter.catalog import Catalog
from exporter.exposition import assemble, format_value, label_text


@dataclass
class CollectorStatus:
    """What the self-metrics say about one collector on one target."""

    success: bool | None = None
    duration: float = 0.0
    last_success: float | None = None
    data_time: float | None = None
    series: int = 0
    skipped: str | None = None
    errors: dict[str, int] = field(default_factory=dict)
    runs: int = 0


@dataclass
class TargetStatus:
    """Liveness of one target, as the probe last saw it."""

    prefix: str
    up: bool | None = None
    collectors: dict[str, CollectorStatus] = field(default_factory=dict)
    is_pgbouncer: bool = False


class Snapshot:
    """Thread-safe store of pre-rendered sample lines plus the status behind the self-metrics."""

    def __init__(self, catalog: Catalog, version: str):
        self._catalog = catalog
        self._version = version
        self._lock = threading.Lock()
        # (target, collector) -> database ("" for server scope) -> metric name -> lines
        self._results: dict[tuple[str, str], dict[str, dict[str, bytes]]] = {}
        self._targets: dict[str, TargetStatus] = {}
        self._data_body: bytes | None = None
        self._order = tuple(catalog.metrics())
        self._self_order = tuple(catalog.self_metrics)

    def add_target(self, name: str, prefix: str, is_pgbouncer: bool = False) -> None:
        """Register a target; its up series appears with the first probe."""
        with self._lock:
            self._targets[name] = TargetStatus(prefix=prefix, is_pgbouncer=is_pgbouncer)

    def status(self, target: str, collector: str) -> CollectorStatus:
        """The mutable status record of a collector on a target (created on first use)."""
        with self._lock:
            return self._targets[target].collectors.setdefault(collector, CollectorStatus())

    def target(self, name: str) -> TargetStatus:
        """The status record of a target."""
        return self._targets[name]

    def targets(self) -> dict[str, TargetStatus]:
        """All targets' status records."""
        return self._targets

    def set_up(self, target: str, up: bool) -> None:
        """Record the outcome of the last connection attempt; a down target serves no stale data."""
        with self._lock:
            self._targets[target].up = up
            if not up:
                for key in [k for k in self._results if k[0] == target]:
                    del self._results[key]
                for status in self._targets[target].collectors.values():
                    status.data_time = None
                self._data_body = None

    def replace(self, target: str, collector: str, per_database: dict[str, dict[str, bytes]]) -> None:
        """Swap in the lines of one collector run (all of its databases at once)."""
        with self._lock:
            if per_database:
                self._results[(target, collector)] = per_database
            else:
                self._results.pop((target, collector), None)
            self._data_body = None

    def drop(self, target: str, collector: str) -> None:
        """Stop serving a collector's lines (it failed or no longer applies)."""
        with self._lock:
            if self._results.pop((target, collector), None) is not None:
                self._data_body = None

    def render(self, now: float | None = None) -> bytes:
        """The whole exposition: cached collector data plus freshly computed self-metrics."""
        now = time.time() if now is None else now
        with self._lock:
            if self._data_body is None:
                by_metric: dict[str, list[bytes]] = defaultdict(list)
                for per_database in self._results.values():
                    for chunks in per_database.values():
                        for name, lines in chunks.items():
                            by_metric[name].append(lines)
                self._data_body = assemble(self._order, by_metric)
            data = self._data_body
            own = self._render_self(now)
        return data + own

    def _render_self(self, now: float) -> bytes:
        lines: dict[str, list[bytes]] = defaultdict(list)

        def add(name: str, prefix: str, extra: str, value: float | int) -> None:
            labels = ",".join(part for part in (prefix, extra) if part)
            lines[name].append(f"{name}{{{labels}}} {format_value(value)}\n".encode())

        add("pgvitals_build_info", "", label_text([("version", self._version)]), 1)
        # Collector threads update these records while we read them: iterate over snapshots
        # (list() of a dict view is taken without releasing the GIL).
        for target in list(self._targets.values()):
            prefix = target.prefix
            if target.up is not None:  # before the first probe we know nothing: no series rather than a false 0
                add("pgbouncer_up" if target.is_pgbouncer else "pg_up", prefix, "", 1 if target.up else 0)
            for name, status in list(target.collectors.items()):
                coll = label_text([("collector", name)])
                if status.skipped:
                    add("pgvitals_collector_skipped", prefix, f'{coll},reason="{status.skipped}"', 1)
                    continue
                if status.success is not None:
                    add("pgvitals_collector_success", prefix, coll, 1 if status.success else 0)
                    add("pgvitals_collector_duration_seconds", prefix, coll, round(status.duration, 6))
                    add("pgvitals_collector_series", prefix, coll, status.series)
                if status.last_success is not None:
                    add("pgvitals_collector_last_success_timestamp_seconds", prefix, coll,
                        round(status.last_success, 3))
                if status.data_time is not None:
                    add("pgvitals_collector_data_age_seconds", prefix, coll, round(now - status.data_time, 3))
                for reason, count in list(status.errors.items()):
                    add("pgvitals_collector_errors_total", prefix, f'{coll},reason="{reason}"', count)
        return assemble(self._self_order, lines)


def gzip_body(body: bytes) -> bytes:
    """Compress a body for clients that accept gzip (Prometheus does)."""
    return gzip.compress(body, compresslevel=1)
