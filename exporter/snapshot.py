"""The latest result per (target, collector, database), served to scrapes without touching PostgreSQL."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from exporter import catalog, compat
from exporter.catalog import Catalog, MetricSpec
from exporter.exposition import assemble, format_value, label_text


@dataclass(frozen=True)
class CollectorStatus:
    """What the self-metrics say about one collector on one target; replaced, never changed, on each run."""

    success: bool | None = None
    duration: float = 0.0
    last_success: float | None = None
    data_time: float | None = None
    series: int = 0
    skipped: str | None = None
    errors: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    runs: int = 0
    denied: frozenset[str] = frozenset()  # objects behind a ``denied`` skip


@dataclass
class _TargetRecord:
    """Liveness of one target, as the probe last saw it, and its collectors' records."""

    prefix: str
    up: bool | None = None
    down_reason: str | None = None
    collectors: dict[str, CollectorStatus] = field(default_factory=dict)
    is_pgbouncer: bool = False
    unavailable: dict[str, str] = field(default_factory=dict)  # database -> why the server refused it


class Snapshot:
    """Thread-safe store of pre-rendered sample lines plus the status behind the self-metrics.

    It is the only writer of collector status: the engine reports runs and skips, readers get immutable values.
    """

    def __init__(self, catalog: Catalog, version: str):
        self._catalog = catalog
        self._version = version
        self._lock = threading.Lock()
        # (target, collector) -> database ("" for server scope) -> metric name -> lines
        self._results: dict[tuple[str, str], dict[str, dict[str, bytes]]] = {}
        self._targets: dict[str, _TargetRecord] = {}
        self._data_body: bytes | None = None
        self._target_bodies: dict[str, bytes] = {}  # target -> its collected lines, for /probe
        self._shard = (0, 1, 0)  # index, count, configured targets polled here
        self._unlisted: set[str] = set()  # targets served by /probe only (registered by a probe, not configured)
        self._order = tuple(catalog.metrics())
        self._self_order = tuple(catalog.self_metrics)
        self._scrape_error = False  # postgres_exporter's pg_exporter_last_scrape_error (compat naming modes)
        self._reload: tuple[bool, float | None] | None = None  # (last load succeeded, time of the last success)

    def use_order(self, order: Iterable[MetricSpec], self_order: Iterable[MetricSpec] | None = None) -> None:
        """Serve these metric families (the naming mode's, exporter/compat.py) in this order."""
        with self._lock:
            self._order = tuple(order)
            if self_order is not None:
                self._self_order = tuple(self_order)
                self._scrape_error = compat.LAST_SCRAPE_ERROR_SPEC in self._self_order
            self._data_body = None
            self._target_bodies.clear()

    def add_target(self, name: str, prefix: str, is_pgbouncer: bool = False) -> None:
        """Register a target; its up series appears with the first probe."""
        with self._lock:
            self._targets[name] = _TargetRecord(prefix=prefix, is_pgbouncer=is_pgbouncer)

    def record_reload(self, success: bool, now: float | None = None) -> None:
        """The outcome of a configuration load (the start counts as one): the reload self-metrics."""
        now = time.time() if now is None else now
        with self._lock:
            last_success = self._reload[1] if self._reload is not None else None
            self._reload = (success, now if success else last_success)

    def remove_target(self, name: str) -> None:
        """Forget a target: its data and self-metrics leave the exposition at once."""
        with self._lock:
            self._targets.pop(name, None)
            self._unlisted.discard(name)
            for key in [k for k in self._results if k[0] == name]:
                del self._results[key]
            self._invalidate_locked(name)

    def forget_collector(self, target: str, collector: str) -> None:
        """Forget one collector on a target (its settings changed): data and status go until its next run."""
        with self._lock:
            record = self._targets.get(target)
            if record is not None:
                record.collectors.pop(collector, None)
            self._drop_locked(target, collector)

    def unlist(self, name: str) -> None:
        """Serve target ``name`` through /probe only, never in the whole exposition (call before adding it)."""
        with self._lock:
            self._unlisted.add(name)
            self._data_body = None

    def set_shard(self, index: int, count: int, targets: int) -> None:
        """Which shard this process is and how many configured targets it polls (pgvitals_shard_targets)."""
        with self._lock:
            self._shard = (index, count, targets)

    def has_target(self, name: str) -> bool:
        """Whether ``name`` is a registered target."""
        with self._lock:
            return name in self._targets

    def status(self, target: str, collector: str) -> CollectorStatus | None:
        """The status of a collector on a target (immutable); None before its first run or skip."""
        with self._lock:
            record = self._targets.get(target)
            return None if record is None else record.collectors.get(collector)

    def record_skip(self, target: str, collector: str, reason: str, counts_as_run: bool = False,
                    duration: float = 0.0) -> str | None:
        """The collector does not apply (``reason``): serve none of its lines; returns the previous reason.

        ``counts_as_run`` when the collector ran and found it does not apply (e.g. no database has the extension).
        """
        with self._lock:
            statuses = self._record_locked(target).collectors
            old = statuses.get(collector) or CollectorStatus()
            statuses[collector] = dataclasses.replace(
                old, skipped=reason, runs=old.runs + 1 if counts_as_run else old.runs,
                duration=duration if counts_as_run else old.duration, denied=frozenset(),
            )
            self._drop_locked(target, collector)
            return old.skipped

    def record_denied(self, target: str, collector: str, objects: frozenset[str]) -> bool:
        """The collector may not use ``objects``: skip it and serve the denial; True when that is news."""
        with self._lock:
            statuses = self._record_locked(target).collectors
            old = statuses.get(collector) or CollectorStatus()
            statuses[collector] = dataclasses.replace(old, skipped="denied", denied=objects)
            self._drop_locked(target, collector)
            return old.skipped != "denied" or old.denied != objects

    def record_databases(self, target: str, visited: Iterable[str], unavailable: Mapping[str, str]
                         ) -> dict[str, str | None]:
        """Which visited databases refused us (and why); returns the changes: a new reason, or None if recovered."""
        changes: dict[str, str | None] = {}
        with self._lock:
            known = self._record_locked(target).unavailable
            for dbname in visited:
                now = unavailable.get(dbname)
                if known.get(dbname) != now:
                    changes[dbname] = now
                    if now is None:
                        del known[dbname]
                    else:
                        known[dbname] = now
        return changes

    def forget_databases(self, target: str, keep: Iterable[str]) -> None:
        """Stop reporting refusals of databases no longer selected (dropped, or the role lost CONNECT)."""
        selected = set(keep)
        with self._lock:
            known = self._record_locked(target).unavailable
            for dbname in [d for d in known if d not in selected]:
                del known[dbname]

    def record_run(
        self, target: str, collector: str, *, duration: float, finished: float, series: int,
        failures: Iterable[str], results: dict[str, dict[str, bytes]], unavailable: Iterable[str] = (),
    ) -> None:
        """The outcome of one run: its lines (all of its databases at once) and the status behind them.

        ``failures`` are the reason words of the databases whose run failed; a failed run that produced
        no lines leaves nothing served: stale series are never served as if fresh. ``unavailable`` are
        the reasons of databases the server refused: counted as errors, but the run still succeeded on
        every database it could reach.
        """
        failed = list(failures)
        served = bool(results) or not failed
        with self._lock:
            statuses = self._record_locked(target).collectors
            old = statuses.get(collector) or CollectorStatus()
            errors = dict(old.errors)
            for reason in [*failed, *unavailable]:
                errors[reason] = errors.get(reason, 0) + 1
            statuses[collector] = dataclasses.replace(
                old, runs=old.runs + 1, duration=duration, skipped=None, errors=MappingProxyType(errors),
                denied=frozenset(),
                success=not failed, series=series, last_success=old.last_success if failed else finished,
                data_time=finished if served else None,
            )
            if results and target in self._targets:
                self._results[(target, collector)] = results
                self._invalidate_locked(target)
            else:
                self._drop_locked(target, collector)

    def set_up(self, target: str, up: bool, reason: str | None = None) -> None:
        """Record the outcome of the last connection attempt (``reason``: why it failed); a down target serves
        no stale data."""
        with self._lock:
            record = self._record_locked(target)
            record.up = up
            record.down_reason = None if up else reason
            if not up:
                record.unavailable.clear()  # unknown until the server answers again
                for key in [k for k in self._results if k[0] == target]:
                    del self._results[key]
                statuses = record.collectors
                for name, status in statuses.items():
                    statuses[name] = dataclasses.replace(status, data_time=None)
                self._invalidate_locked(target)

    def replace(self, target: str, collector: str, per_database: dict[str, dict[str, bytes]]) -> None:
        """Swap in the lines of one collector run (all of its databases at once), status untouched."""
        with self._lock:
            if per_database and target in self._targets:
                self._results[(target, collector)] = per_database
            else:
                self._results.pop((target, collector), None)
            self._invalidate_locked(target)

    def _record_locked(self, target: str) -> _TargetRecord:
        """The record of ``target``; a detached one for a target removed meanwhile (a late write goes nowhere)."""
        return self._targets.get(target) or _TargetRecord(prefix="")

    def _drop_locked(self, target: str, collector: str) -> None:
        if self._results.pop((target, collector), None) is not None:
            self._invalidate_locked(target)

    def _invalidate_locked(self, target: str) -> None:
        """Forget the cached bodies that hold ``target``'s lines (rebuilt at the next scrape)."""
        if target not in self._unlisted:
            self._data_body = None
        self._target_bodies.pop(target, None)

    def render(self, now: float | None = None) -> bytes:
        """The whole exposition: cached collector data plus freshly computed self-metrics."""
        now = time.time() if now is None else now
        with self._lock:
            if self._data_body is None:
                by_metric: dict[str, list[bytes]] = defaultdict(list)
                for (target, _collector), per_database in self._results.items():
                    if target in self._unlisted:
                        continue
                    for chunks in per_database.values():
                        for name, lines in chunks.items():
                            by_metric[name].append(lines)
                self._data_body = assemble(self._order, by_metric)
            data = self._data_body
            listed = (record for name, record in self._targets.items() if name not in self._unlisted)
            own = self._render_self(now, listed, whole=True)
        return data + own

    def render_target(self, target: str, now: float | None = None) -> bytes | None:
        """One target's exposition (its data and self-metrics) for /probe; None for an unknown target."""
        now = time.time() if now is None else now
        with self._lock:
            record = self._targets.get(target)
            if record is None:
                return None
            data = self._target_bodies.get(target)
            if data is None:
                by_metric: dict[str, list[bytes]] = defaultdict(list)
                for (owner, _collector), per_database in self._results.items():
                    if owner == target:
                        for chunks in per_database.values():
                            for name, lines in chunks.items():
                                by_metric[name].append(lines)
                data = self._target_bodies[target] = assemble(self._order, by_metric)
            own = self._render_self(now, (record,), whole=False)
        return data + own

    def _render_self(self, now: float, targets: Iterable[_TargetRecord], whole: bool) -> bytes:
        """The self-metrics of ``targets`` (and, when ``whole``, of the process); called under the lock, so every
        record is consistent."""
        lines: dict[str, list[bytes]] = defaultdict(list)

        def add(spec: MetricSpec, prefix: str, values: tuple[str, ...], value: float | int) -> None:
            own = label_text(zip(spec.labels, values, strict=True))
            labels = ",".join(part for part in (prefix, own) if part)
            braces = f"{{{labels}}}" if labels else ""
            lines[spec.name].append(f"{spec.name}{braces} {format_value(value)}\n".encode())

        add(catalog.BUILD_INFO, "", (self._version,), 1)
        if whole:
            index, count, polled = self._shard
            add(catalog.SHARD_TARGETS, "", (str(index), str(count)), polled)
            if self._reload is not None:  # a daemon: `once` and `check` load a configuration but never reload it
                success, last_success = self._reload
                add(catalog.CONFIG_RELOAD_SUCCESS, "", (), 1 if success else 0)
                if last_success is not None:
                    add(catalog.CONFIG_RELOAD_TIME, "", (), round(last_success, 3))
        for target in targets:
            prefix = target.prefix
            if target.up is not None:  # before the first probe we know nothing: no series rather than a false 0
                add(catalog.PGBOUNCER_UP if target.is_pgbouncer else catalog.PG_UP, prefix, (), 1 if target.up else 0)
            if target.down_reason is not None:
                spec = catalog.PGBOUNCER_UP_REASON if target.is_pgbouncer else catalog.PG_UP_REASON
                add(spec, prefix, (target.down_reason,), 1)
            for dbname, reason in target.unavailable.items():
                add(catalog.DATABASE_UNAVAILABLE, prefix, (dbname, reason), 1)
            for name, status in target.collectors.items():
                if status.skipped:
                    add(catalog.COLLECTOR_SKIPPED, prefix, (name, status.skipped), 1)
                    for obj in sorted(status.denied):
                        add(catalog.COLLECTOR_DENIED, prefix, (name, obj), 1)
                    continue
                if status.success is not None:
                    add(catalog.COLLECTOR_SUCCESS, prefix, (name,), 1 if status.success else 0)
                    add(catalog.COLLECTOR_DURATION, prefix, (name,), round(status.duration, 6))
                    add(catalog.COLLECTOR_SERIES, prefix, (name,), status.series)
                if status.last_success is not None:
                    add(catalog.COLLECTOR_LAST_SUCCESS, prefix, (name,), round(status.last_success, 3))
                if status.data_time is not None:
                    add(catalog.COLLECTOR_DATA_AGE, prefix, (name,), round(now - status.data_time, 3))
                for reason, count in status.errors.items():
                    add(catalog.COLLECTOR_ERRORS, prefix, (name, reason), count)
            if self._scrape_error and not target.is_pgbouncer and target.up is not None:
                failing = not target.up or any(
                    st.success is False and not st.skipped for st in target.collectors.values())
                add(compat.LAST_SCRAPE_ERROR_SPEC, prefix, (), 1 if failing else 0)
        return assemble(self._self_order, lines)
