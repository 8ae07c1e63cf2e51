"""The declaration model: collectors, their SQL variants and the metrics they yield.

Every reader (engine, exposition, docs, dashboards, alert rules, tests) goes through
the one validated catalog built here, so a metric name exists in exactly one place.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import pkgutil
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from exporter.db import Session
    from exporter.hooks import RunContext

MetricKind = Literal["counter", "gauge", "info"]
Scope = Literal["server", "database"]
Role = Literal["any", "primary", "standby"]
TargetKind = Literal["postgres", "pgbouncer"]
#: Why a collector does not run on a target; the ``reason`` of ``pgvitals_collector_skipped``.
SkipReason = Literal["version", "role", "extension", "preload", "denied"]
SKIP_REASONS: tuple[SkipReason, ...] = get_args(SkipReason)

Row = dict[str, Any]
Rows = list[Row]
#: Custom fetch: runs inside the guarded transaction, returns rows (used where one SQL is not enough).
FetchHook = Callable[["Session", "RunContext", str | None], Rows]
#: Post-processing of fetched rows (top-N selection, pool matching, ...).
TransformHook = Callable[[Rows, "RunContext"], Rows]

#: The version space a variant range is expressed in: PostgreSQL's server_version_num.
PG_MIN_SUPPORTED = 120000
PG_MAX_SUPPORTED = 190000  # exclusive: 18.x is the newest major we test
VERSION_INFINITY = 10**9

_METRIC_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_LABEL_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
# What Prometheus itself accepts: postgres_exporter's queries files may use it (our own names are stricter).
_COMPAT_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_COMPAT_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
RESERVED_LABELS = ("target",)


class CatalogError(ValueError):
    """A declaration breaks a catalog rule; raised when the catalog loads."""


@dataclass(frozen=True)
class MetricSpec:
    """One metric a collector yields: name, type, help and where its value and labels come from."""

    name: str
    kind: MetricKind
    help: str
    value: str | None = None  # result column holding the value; None for info metrics (value 1)
    labels: tuple[str, ...] = ()  # result columns that become labels (``target`` is added by the engine)
    unit: str = ""  # documentation: seconds, bytes, ratio, ...
    scale: float = 1.0  # multiply the column by this (milliseconds to seconds: 0.001)
    per_target: bool = True  # False only for process-wide self-metrics (no target label)

    @property
    def exposition_type(self) -> str:
        """The TYPE word in the Prometheus text format."""
        return "gauge" if self.kind == "info" else self.kind


@dataclass(frozen=True)
class SqlVariant:
    """The SQL for one version range ``[min_version, max_version)`` of the collector's version source."""

    sql: str
    min_version: int = 0
    max_version: int = VERSION_INFINITY

    def covers(self, version: int) -> bool:
        """True when this variant is the one to run on ``version``."""
        return self.min_version <= version < self.max_version


@dataclass(frozen=True)
class Param:
    """A user-tunable collector parameter, passed to SQL as a named parameter."""

    name: str
    default: int | float | bool | str
    help: str


@dataclass(frozen=True)
class Collector:
    """A query family member: what to run, where, how often, and the metrics it yields."""

    name: str
    family: str
    help: str
    metrics: tuple[MetricSpec, ...]
    variants: tuple[SqlVariant, ...] = ()
    interval: float = 30.0
    timeout: float = 5.0
    scope: Scope = "server"
    role: Role = "any"
    extension: str | None = None  # must be installed in the database the query runs in
    version_source: str = "server"  # "server", or an extension name whose installed version decides
    min_server_version: int = 0  # below this the collector does not apply (no variant needed)
    preload: str | None = None  # library that must be in shared_preload_libraries
    target_kind: TargetKind = "postgres"
    params: tuple[Param, ...] = ()
    fetch: FetchHook | None = None
    transform: TransformHook | None = None
    max_series: int = 20000  # hard safety bound per run; top-N collectors stay far below it
    enabled: bool = True
    # The only exception to read-only: a write transaction that commits (heartbeat). Such a collector
    # must be off by default and primary-only; the engine gives it the same server-side timeouts.
    writes: bool = False
    notes: str = ""  # extra documentation for docs/metrics.md
    # Functions (``pg_catalog.pg_ls_waldir()``) and views the role must be allowed to use: checked with
    # has_function_privilege/has_table_privilege at each probe, so a denial never becomes an ERROR in the
    # server log. Keep such an object in a collector of its own, so its denial takes nothing else along.
    requires: tuple[str, ...] = ()
    # Collectors naming the same pass read one database in one query (their shared variants and fetch
    # hook answer all of them); one that runs within 10 % of its interval after another's pass reuses it.
    shared_pass: str | None = None
    # Per-database collectors whose rows exist only while something happens (a VACUUM running): SQL run
    # first in the target's own database, naming (column ``datname``) the databases with something to
    # report. Only those are visited; the others have no rows now and cost no connection.
    visit_only: tuple[SqlVariant, ...] = ()
    # Where a user declared it ("" for a built-in): the config path, or the queries file and namespace.
    origin: str = ""
    # Metric names follow postgres_exporter's queries.yaml rule (namespace_column, counters without _total).
    compat_names: bool = False

    @property
    def custom(self) -> bool:
        """True for a collector the user declared (config or queries file), not one we ship."""
        return bool(self.origin)

    def variant_for(self, version: int) -> SqlVariant | None:
        """The SQL variant for ``version``, or None when no variant covers it."""
        for variant in self.variants:
            if variant.covers(version):
                return variant
        return None

    def visit_only_for(self, version: int) -> SqlVariant | None:
        """The ``visit_only`` SQL for ``version``, or None (visit every selected database)."""
        return next((v for v in self.visit_only if v.covers(version)), None)

    def param_defaults(self) -> dict[str, Any]:
        """Parameter names mapped to their declared defaults."""
        return {p.name: p.default for p in self.params}


@dataclass(frozen=True)
class ShadowedMetric:
    """A custom metric left out because a built-in metric already exports that name (the built-in wins)."""

    name: str
    collector: str  # the custom collector that declared it
    origin: str  # where it was declared
    owner: str  # the built-in collector exporting the name


@dataclass(frozen=True)
class Catalog:
    """The validated set of collectors and every metric they (and the exporter itself) yield.

    A value, passed to whoever reads it: :meth:`builtin` is what we ship; the daemon's catalog adds the
    user's declarations to it (exporter.custom).
    """

    collectors: tuple[Collector, ...]
    self_metrics: tuple[MetricSpec, ...]
    by_name: Mapping[str, Collector] = field(default_factory=dict)
    metric_owner: Mapping[str, str] = field(default_factory=dict)
    shadowed: tuple[ShadowedMetric, ...] = ()  # custom metrics skipped for a built-in of the same name

    @classmethod
    def builtin(cls) -> Catalog:
        """The catalog of the collectors we ship (no user declarations); validated once, immutable."""
        return _builtin()

    def with_custom(self, collectors: Sequence[Collector], shadowed: Sequence[ShadowedMetric] = ()) -> Catalog:
        """This catalog plus user-declared collectors, validated together; CatalogError on a broken rule."""
        built = validate([*self.collectors, *collectors], self.self_metrics)
        return Catalog(built.collectors, built.self_metrics, built.by_name, built.metric_owner,
                       (*self.shadowed, *shadowed))

    def custom_collectors(self) -> tuple[Collector, ...]:
        """The user-declared collectors, in declaration order."""
        return tuple(c for c in self.collectors if c.custom)

    def metrics(self) -> Iterable[MetricSpec]:
        """Every metric spec: the collectors' first, then the exporter's own."""
        for collector in self.collectors:
            yield from collector.metrics
        yield from self.self_metrics

    def metric(self, name: str) -> MetricSpec:
        """The spec of metric ``name``; KeyError if we do not export it."""
        for spec in self.metrics():
            if spec.name == name:
                return spec
        raise KeyError(name)

    def metric_names(self) -> frozenset[str]:
        """All metric names the exporter can expose."""
        return frozenset(spec.name for spec in self.metrics())


def _self_metric(name: str, kind: MetricKind, help_: str, labels: tuple[str, ...], unit: str = "") -> MetricSpec:
    return MetricSpec(name=name, kind=kind, help=help_, labels=labels, unit=unit)


#: Metrics the engine itself yields about targets and collectors (the snapshot renders them from these).
PG_UP = _self_metric("pg_up", "gauge", "1 when the last connection attempt to the PostgreSQL target succeeded, "
                     "0 when it failed; absent before the first.", ())
PGBOUNCER_UP = _self_metric("pgbouncer_up", "gauge", "1 when the last connection to the PgBouncer admin console "
                            "succeeded, 0 when it failed; absent before the first.", ())
PG_UP_REASON = _self_metric(
    "pg_up_reason", "gauge", "1 with the reason the last connection attempt failed (connection: unreachable, auth: "
    "login refused, too_many_connections: no slot left, refused: another refusal, secret: password_file or "
    "password_command failed); absent while pg_up is 1.",
    ("reason",))
PGBOUNCER_UP_REASON = _self_metric(
    "pgbouncer_up_reason", "gauge", "1 with the reason the last connection to the PgBouncer console failed "
    "(as pg_up_reason); absent while pgbouncer_up is 1.", ("reason",))
DATABASE_UNAVAILABLE = _self_metric(
    "pgvitals_database_unavailable", "gauge",
    "1 for a selected database the server refused to let us connect to at the last attempt (reason: "
    "database_unavailable (pg_hba, privilege, dropped meanwhile) or too_many_connections); the server stays up.",
    ("datname", "reason"))
COLLECTOR_DENIED = _self_metric(
    "pgvitals_collector_denied", "gauge",
    "1 for an object (function or view) the collector needs that the role may not use or the platform does not "
    "support; the collector is skipped until the privilege is granted (checked again at the next re-check).",
    ("collector", "object"))
COLLECTOR_SUCCESS = _self_metric(
    "pgvitals_collector_success",
    "gauge",
    "1 when the collector's last run succeeded on every database it could reach, 0 when it failed (a database "
    "the server refused is pgvitals_database_unavailable, a denied object pgvitals_collector_denied).",
    ("collector",),
)
COLLECTOR_DURATION = _self_metric(
    "pgvitals_collector_duration_seconds",
    "gauge",
    "Wall time of the collector's last run.",
    ("collector",),
    "seconds",
)
COLLECTOR_LAST_SUCCESS = _self_metric(
    "pgvitals_collector_last_success_timestamp_seconds",
    "gauge",
    "Unix time of the collector's last successful run; time() minus this is the age of its data.",
    ("collector",),
    "seconds",
)
COLLECTOR_ERRORS = _self_metric(
    "pgvitals_collector_errors_total",
    "counter",
    "Failed runs of the collector (per database run for per-database collectors).",
    ("collector", "reason"),
)
COLLECTOR_SERIES = _self_metric(
    "pgvitals_collector_series",
    "gauge",
    "Series the collector's last successful run produced.",
    ("collector",),
)
COLLECTOR_SKIPPED = _self_metric(
    "pgvitals_collector_skipped",
    "gauge",
    f"1 when the collector does not apply to the target (reason: {', '.join(SKIP_REASONS)}).",
    ("collector", "reason"),
)
COLLECTOR_DATA_AGE = _self_metric(
    "pgvitals_collector_data_age_seconds",
    "gauge",
    "Seconds since the data served for this collector was collected.",
    ("collector",),
    "seconds",
)
SHARD_TARGETS = MetricSpec(
    name="pgvitals_shard_targets", kind="gauge",
    help="Configured targets (PostgreSQL and PgBouncer) this process polls as shard `shard` of `shards` "
         "(shard 0 of 1 when the configuration has no shard:).",
    labels=("shard", "shards"), per_target=False)
BUILD_INFO = MetricSpec(name="pgvitals_build_info", kind="info", help="pgvitals build information (value 1).",
                        labels=("version",), per_target=False)
CONFIG_RELOAD_SUCCESS = MetricSpec(
    name="pgvitals_config_last_reload_successful", kind="gauge", labels=(), per_target=False,
    help="1 when the last configuration (re)load succeeded, 0 when the last reload was invalid and the previous "
    "configuration stays in force.")
CONFIG_RELOAD_TIME = MetricSpec(
    name="pgvitals_config_last_reload_success_timestamp_seconds", kind="gauge", labels=(), per_target=False,
    unit="seconds", help="Unix time of the last successful configuration load (the start, or a reload).")
SELF_METRICS: tuple[MetricSpec, ...] = (
    PG_UP, PGBOUNCER_UP, PG_UP_REASON, PGBOUNCER_UP_REASON, DATABASE_UNAVAILABLE, COLLECTOR_DENIED,
    COLLECTOR_SUCCESS, COLLECTOR_DURATION, COLLECTOR_LAST_SUCCESS, COLLECTOR_ERRORS,
    COLLECTOR_SERIES, COLLECTOR_SKIPPED, COLLECTOR_DATA_AGE, SHARD_TARGETS, BUILD_INFO,
    CONFIG_RELOAD_SUCCESS, CONFIG_RELOAD_TIME,
)


def validate(collectors: Sequence[Collector], self_metrics: Sequence[MetricSpec] = SELF_METRICS) -> Catalog:
    """Check every catalog rule and return the catalog; raise CatalogError listing all violations."""
    problems: list[str] = []
    names: dict[str, str] = {}
    owners: dict[str, str] = {spec.name: "pgvitals" for spec in self_metrics}
    passes: dict[str, tuple[SqlVariant, ...]] = {}
    for collector in collectors:
        where = f"collector {collector.name!r}"
        if collector.name in names:
            problems.append(f"{where}: duplicate collector name")
        names[collector.name] = collector.name
        if collector.timeout >= collector.interval:
            problems.append(f"{where}: timeout {collector.timeout}s must be below interval {collector.interval}s")
        if not collector.variants and collector.fetch is None:
            problems.append(f"{where}: needs SQL variants or a fetch hook")
        problems.extend(_overlaps(collector))
        if collector.visit_only:
            if collector.scope != "database":
                problems.append(f"{where}: visit_only applies to per-database collectors only")
            problems.extend(f"{where}: visit_only: {problem}" for problem in variant_problems(collector.visit_only))
        if collector.shared_pass is not None:
            # Whichever collector of the pass runs it answers for all: one query, one hook.
            if collector.fetch is None:
                problems.append(f"{where}: a shared pass needs the fetch hook that answers all its collectors")
            if passes.setdefault(collector.shared_pass, collector.variants) != collector.variants:
                problems.append(f"{where}: shares pass {collector.shared_pass!r} with other SQL variants")
        if collector.writes and (collector.enabled or collector.role != "primary"):
            problems.append(f"{where}: a collector that writes must be disabled by default and primary-only")
        for spec in collector.metrics:
            problems.extend(_check_metric(spec, where, compat=collector.compat_names))
            if spec.name in owners:
                problems.append(f"{where}: metric {spec.name} already declared by {owners[spec.name]}")
            owners[spec.name] = collector.name
    for spec in self_metrics:
        problems.extend(_check_metric(spec, "self metrics"))
    if problems:
        raise CatalogError("invalid catalog:\n  " + "\n  ".join(problems))
    return Catalog(
        collectors=tuple(collectors),
        self_metrics=tuple(self_metrics),
        by_name={c.name: c for c in collectors},
        metric_owner=owners,
    )


def _check_metric(spec: MetricSpec, where: str, compat: bool = False) -> list[str]:
    return [f"{where}: {problem}" for problem in metric_problems(spec, compat)]


def metric_problems(spec: MetricSpec, compat: bool = False) -> list[str]:
    """What breaks the metric rules; ``compat`` names (postgres_exporter's) may be counters without ``_total``."""
    problems = []
    name_rule, label_rule = (_COMPAT_NAME, _COMPAT_LABEL) if compat else (_METRIC_NAME, _LABEL_NAME)
    if not name_rule.match(spec.name):
        problems.append(f"bad metric name {spec.name!r}")
    if compat:
        pass  # postgres_exporter's names are kept as they are: its users' queries and dashboards expect them
    elif spec.kind == "counter" and not spec.name.endswith("_total"):
        problems.append(f"counter {spec.name} must end in _total")
    elif spec.kind != "counter" and spec.name.endswith("_total"):
        problems.append(f"{spec.name} ends in _total but is a {spec.kind}")
    if spec.kind == "info" and spec.value is not None:
        problems.append(f"info metric {spec.name} takes no value column")
    if not spec.help.strip():
        problems.append(f"metric {spec.name} has no help text")
    for label in spec.labels:
        if not label_rule.match(label) or label in RESERVED_LABELS or label.startswith("__"):
            problems.append(f"metric {spec.name} has bad or reserved label {label!r}")
    if len(set(spec.labels)) != len(spec.labels):
        problems.append(f"metric {spec.name} repeats a label")
    return problems


def _overlaps(collector: Collector) -> list[str]:
    return [f"collector {collector.name!r}: {problem}" for problem in variant_problems(collector.variants)]


def variant_problems(variants: Sequence[SqlVariant]) -> list[str]:
    """Overlapping or empty version ranges among ``variants``."""
    ordered = sorted(variants, key=lambda v: v.min_version)
    problems = []
    for earlier, later in itertools.pairwise(ordered):
        if later.min_version < earlier.max_version:
            problems.append(
                f"variants [{earlier.min_version}, {earlier.max_version}) and "
                f"[{later.min_version}, {later.max_version}) overlap"
            )
    for variant in variants:
        if variant.min_version >= variant.max_version:
            problems.append(f"empty version range [{variant.min_version}, {variant.max_version})")
    return problems


def discover(package: str = "exporter.collectors") -> list[Collector]:
    """Import every module of the collectors package and gather their ``COLLECTORS`` tuples."""
    found: list[Collector] = []
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package}.{info.name}")
        found.extend(getattr(module, "COLLECTORS", ()))
    return found


@functools.cache
def _builtin() -> Catalog:
    # Cached because the built-in declarations are code: they cannot change while the process runs.
    return validate(discover())


def load() -> Catalog:
    """The built-in catalog (same as ``Catalog.builtin()``); the running exporter's catalog is passed around."""
    return Catalog.builtin()
