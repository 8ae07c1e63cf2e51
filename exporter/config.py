"""YAML and environment into validated settings; every problem reported at once with its YAML path."""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from exporter.durations import parse_duration

DEFAULT_PORT = 9839  # postgres_exporter owns 9187; 9839 is free in Prometheus' port list
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"

Duration = Annotated[float, BeforeValidator(parse_duration)]


def _parse_pending(value: Any) -> float:
    """A duration where 0 is allowed: an alert with ``for: 0`` fires at its first evaluation."""
    return parse_duration(value, allow_zero=True)


PendingDuration = Annotated[float, BeforeValidator(_parse_pending)]


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one ``path: message`` line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: The databases a managed service keeps for itself; a monitoring role may never connect to them.
MANAGED_SYSTEM_DATABASES = (
    "rdsadmin",  # Amazon RDS and Aurora
    "cloudsqladmin",  # Google Cloud SQL
    "alloydbadmin", "alloydbmetadata",  # Google AlloyDB
    "azure_maintenance", "azure_sys",  # Azure Database for PostgreSQL
)


class DatabaseFilter(_Strict):
    """Which databases per-database collectors visit (shell globs)."""

    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    # False re-includes the managed services' own databases (left out by default: see MANAGED_SYSTEM_DATABASES).
    exclude_managed_system: bool = True

    def excluded(self) -> tuple[str, ...]:
        """The exclusion globs in force, the managed services' databases included unless re-included."""
        return (*self.exclude, *(MANAGED_SYSTEM_DATABASES if self.exclude_managed_system else ()))


def _check_dsn(value: str) -> str:
    try:
        conninfo_to_dict(value)
    except Exception:
        # libpq's message may echo the DSN, password included: say only where the problem is.
        raise ValueError("not a valid PostgreSQL connection string or URI") from None
    return value


def reserved_label_names() -> frozenset[str]:
    """Label names pgvitals sets itself: ``target`` and every label of every metric in the catalog."""
    from exporter import catalog

    return frozenset({"target"} | {label for spec in catalog.Catalog.builtin().metrics() for label in spec.labels})


def _check_labels(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if not re.match(r"^[a-z_][a-z0-9_]*$", key) or key.startswith("__"):
            raise ValueError(f"label name {key!r} is not a valid Prometheus label name")
        if key in reserved_label_names():
            raise ValueError(f"label name {key!r} is set by pgvitals itself")
    return value


Dsn = Annotated[str, AfterValidator(_check_dsn)]
ConstLabels = Annotated[dict[str, str], AfterValidator(_check_labels)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]+$", max_length=120)]


class PasswordSourceConfig(_Strict):
    """Where a login's password comes from: a file, an environment variable or a command (or libpq's passfile)."""

    password_file: Path | None = None  # read at each new connection: a rotated file needs no restart
    password_env: str | None = None
    # argv (no shell) whose stdout is the password or token (RDS IAM, Entra ID, GCP), kept for the TTL.
    password_command: list[str] | None = Field(default=None, min_length=1)
    password_command_ttl: Duration = 600.0
    password_command_timeout: Duration = 10.0

    @field_validator("password_command", mode="before")
    @classmethod
    def _argv(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError("expected a list of arguments such as [aws, rds, generate-db-auth-token, ...] "
                             "(no shell runs it)")
        return value


class Endpoint(PasswordSourceConfig):
    """What targets and PgBouncers share: a name, a connection string, where its password is, constant labels."""

    name: Name
    dsn: Dsn
    labels: ConstLabels = Field(default_factory=dict)


class TargetConfig(Endpoint):
    """One PostgreSQL server to monitor."""

    databases: DatabaseFilter = Field(default_factory=DatabaseFilter)
    max_connections: int = Field(default=2, ge=1, le=20)
    # Sessions kept open between runs (None: max_connections). More means fewer reconnects to the
    # databases per-database collectors visit, at the price of server connection slots.
    idle_connections: int | None = Field(default=None, ge=1, le=10_000)


class PgBouncerConfig(Endpoint):
    """One PgBouncer admin console to monitor."""


def _not_unmatched(value: str) -> str:
    if value == "unmatched":
        raise ValueError("'unmatched' is reserved for sessions that match no pool")
    return value


class PoolConfig(_Strict):
    """An application's connection pool, recognized by its sessions, with its capacity."""

    name: Annotated[Name, AfterValidator(_not_unmatched)]
    capacity: int = Field(ge=1)
    application_name: str | None = None  # glob
    usename: str | None = None  # glob
    client_addr: str | None = None  # CIDR
    targets: list[str] | None = None  # default: every target

    @field_validator("client_addr")
    @classmethod
    def _cidr(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError("expected an address range in CIDR form such as 10.0.0.0/8") from None
        return value


class CollectorOverride(BaseModel):
    """Per-collector switches as the engine reads them; extra keys are the collector's declared parameters.

    The YAML is validated first by the model :func:`collector_settings_model` generates from the catalog.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    enabled: bool | None = None  # None: the collector's default (tuning a disabled one does not enable it)
    interval: Duration | None = None
    timeout: Duration | None = None


class CollectorSettings(_Strict):
    """The switches every collector takes; generated subclasses add the collector's declared parameters."""

    enabled: bool | None = None
    interval: Duration | None = None
    timeout: Duration | None = None


@functools.cache
def collector_settings_model(name: str) -> type[CollectorSettings]:
    """A model of ``collectors.<name>``: the common switches plus one typed field per declared ``Param``."""
    from exporter import catalog

    fields: dict[str, Any] = {}
    for param in catalog.Catalog.builtin().by_name[name].params:
        kind: Any = type(param.default)
        minimum = 0 if kind in (int, float) else None  # counts, sizes and seconds: never negative
        # Strict: YAML already gives typed values, and `top_n: true` or `query_text: 1` is a mistake.
        # A parameter named like a BaseModel attribute (`schema`) gets another field name, its YAML key as alias.
        field_name = f"{param.name}_" if hasattr(CollectorSettings, param.name) else param.name
        fields[field_name] = (kind | None, Field(default=None, alias=param.name, strict=True, ge=minimum,
                                                 description=param.help))
    return create_model(f"{name}_settings", __base__=CollectorSettings, __doc__=f"collectors.{name}", **fields)


@functools.cache
def collectors_section_model() -> type[BaseModel]:
    """A model of the ``collectors:`` section: one optional entry per catalog collector, nothing else."""
    from exporter import catalog

    builtin = catalog.Catalog.builtin().by_name
    fields: dict[str, Any] = {name: (collector_settings_model(name) | None, None) for name in builtin}
    return create_model("collectors_section", __base__=_Strict, __doc__="collectors", **fields)


_NATIVE_NAME = r"^[a-z_][a-z0-9_]*$"
#: The top of the version space custom variants may name (catalog.VERSION_INFINITY; config imports no catalog).
_NO_UPPER_VERSION = 10**9


class CustomMetricConfig(_Strict):
    """One metric of a custom collector: as a built-in declaration (exporter.catalog.MetricSpec)."""

    name: str = Field(pattern=_NATIVE_NAME, max_length=200)
    kind: Literal["counter", "gauge", "info"] = "gauge"
    value: str | None = None  # the result column holding the value; none for an info metric
    labels: list[str] = Field(default_factory=list)  # result columns that become labels
    help: str = Field(min_length=1)
    unit: str = ""
    scale: float = 1.0

    @model_validator(mode="after")
    def _value_column(self) -> CustomMetricConfig:
        if self.kind == "info" and self.value is not None:
            raise ValueError("an info metric takes no value column (its value is 1, its content the labels)")
        if self.kind != "info" and not self.value:
            raise ValueError(f"a {self.kind} needs `value`: the result column holding its value")
        return self


class CustomVariantConfig(_Strict):
    """The SQL for one server version range ``[min_version, max_version)`` (server_version_num, e.g. 150000)."""

    sql: str = Field(min_length=1)
    min_version: int = Field(default=0, ge=0)
    max_version: int = Field(default=_NO_UPPER_VERSION, gt=0)


class CustomCollectorConfig(_Strict):
    """A collector declared in the configuration, with the fields of a built-in declaration."""

    name: str = Field(pattern=_NATIVE_NAME, max_length=120)
    help: str = ""
    sql: str | None = Field(default=None, min_length=1)  # one SQL for every version
    variants: list[CustomVariantConfig] = Field(default_factory=list)  # or SQL per version range
    scope: Literal["server", "database"] = "server"
    role: Literal["any", "primary", "standby"] = "any"
    interval: Duration = 30.0
    timeout: Duration = 5.0
    max_series: int = Field(default=1000, ge=1, le=100_000)
    enabled: bool = True
    metrics: list[CustomMetricConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _sql_and_timing(self) -> CustomCollectorConfig:
        if (self.sql is None) == (not self.variants):
            raise ValueError("give either `sql` or `variants` (SQL per version range), not both, not neither")
        if self.timeout >= self.interval:
            raise ValueError(f"timeout ({self.timeout:g}s) must be shorter than the interval ({self.interval:g}s)")
        return self


class QueriesFileConfig(_Strict):
    """A postgres_exporter queries.yaml file, with how often and how long its queries may run."""

    path: Path
    interval: Duration = 30.0  # a query's cache_seconds, when longer, is its interval
    timeout: Duration = 5.0
    max_series: int = Field(default=10_000, ge=1, le=100_000)

    @model_validator(mode="after")
    def _timing(self) -> QueriesFileConfig:
        if self.timeout >= self.interval:
            raise ValueError(f"timeout ({self.timeout:g}s) must be shorter than the interval ({self.interval:g}s)")
        return self


def _file_entry(value: Any) -> Any:
    """A bare path is the short form of ``{path: ...}``."""
    return {"path": value} if isinstance(value, str) else value


QueriesFile = Annotated[QueriesFileConfig, BeforeValidator(_file_entry)]


class LogConfig(_Strict):
    """Logging switches."""

    level: str = Field(default="INFO", pattern=r"^(?i:debug|info|warning|error)$")
    format: str = Field(default="text", pattern=r"^(text|json)$")


def _ratio(default: float) -> Any:
    return Field(default=default, gt=0, le=1)


class _AlertRule(_Strict):
    """Switch and pending duration shared by every alert rule."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    enabled: bool = True
    for_: PendingDuration = Field(default=300.0, alias="for")


class _TwoLevels(_AlertRule):
    """A warning and a critical level of the same measure; warning must be the lower."""

    warning: float
    critical: float

    @model_validator(mode="after")
    def _ordered(self) -> _TwoLevels:
        warning, critical = self.warning, self.critical
        if warning >= critical:
            raise ValueError(f"warning ({warning:g}) must be below critical ({critical:g})")
        return self


class DownAlert(_AlertRule):
    """An exporter, PostgreSQL or PgBouncer that cannot be reached."""

    for_: PendingDuration = Field(default=60.0, alias="for")


class ConnectionsAlert(_TwoLevels):
    """Client sessions as a fraction of the usable max_connections (reserved slots excluded)."""

    warning: float = _ratio(0.8)
    critical: float = _ratio(0.95)


class PoolAlert(_AlertRule):
    """An application pool's sessions as a fraction of its declared capacity."""

    utilization: float = _ratio(0.9)


class PgBouncerWaitingAlert(_AlertRule):
    """Clients queued in PgBouncer for a server connection (fires above this count)."""

    for_: PendingDuration = Field(default=60.0, alias="for")
    clients: int = Field(default=0, ge=0)


class ReplicationLagAlert(_TwoLevels):
    """Standby replay lag in seconds; critical at the 5-minute RPO our users plan for."""

    for_: PendingDuration = Field(default=120.0, alias="for")
    warning: Duration = 60.0
    critical: Duration = 300.0


class BytesAlert(_AlertRule):
    """A byte distance or size above a limit."""

    bytes: int = Field(default=1 << 30, ge=0)


class SlotRetainedAlert(_AlertRule):
    """WAL a replication slot holds back from recycling."""

    bytes: int = Field(default=5 << 30, ge=0)


class SlotInactiveAlert(_AlertRule):
    """A replication slot nobody consumes (it retains WAL until the disk fills)."""

    for_: PendingDuration = Field(default=900.0, alias="for")


class DurationAlert(_AlertRule):
    """A session, wait or silence longer than ``seconds``."""

    for_: PendingDuration = Field(default=60.0, alias="for")
    seconds: Duration = 300.0


class LockWaitAlert(DurationAlert):
    """The oldest lock wait in a database."""

    seconds: Duration = 30.0


class EventCountAlert(_AlertRule):
    """Events (deadlocks, errors) within the rate window: fires above ``count``."""

    for_: PendingDuration = Field(default=0.0, alias="for")
    count: int = Field(default=0, ge=0)


class SubscriptionErrorsAlert(EventCountAlert):
    """A subscription's apply and sync errors; a publisher restart costs one or two, a conflict loops."""

    for_: PendingDuration = Field(default=300.0, alias="for")
    count: int = Field(default=2, ge=0)


class SubscriptionSilentAlert(DurationAlert):
    """No message from the publisher for ``seconds``; a healthy one sends keepalives every ~30 s."""

    seconds: Duration = 120.0


class SlowStatementsAlert(_AlertRule):
    """Mean execution time of a pg_stat_statements entry over the rate window."""

    mean_seconds: Duration = 5.0


class CacheHitAlert(_AlertRule):
    """Buffer cache hit ratio of a database, only under real traffic."""

    for_: PendingDuration = Field(default=900.0, alias="for")
    ratio: float = _ratio(0.99)
    min_blocks_per_second: float = Field(default=100.0, ge=0)


class BloatAlert(_AlertRule):
    """Estimated table bloat on a table large enough to matter."""

    for_: PendingDuration = Field(default=1800.0, alias="for")
    ratio: float = _ratio(0.5)
    min_table_bytes: int = Field(default=1 << 30, ge=0)


class WraparoundAlert(_TwoLevels):
    """Transaction and multixact ID age as a fraction of the 2^31 wraparound horizon."""

    warning: float = _ratio(0.5)
    critical: float = _ratio(0.75)


class SequenceAlert(_TwoLevels):
    """Share of a sequence's usable range handed out (only sequences above the collector's floor are seen)."""

    warning: float = _ratio(0.8)
    critical: float = _ratio(0.95)


class RestartAlert(_AlertRule):
    """A server (postmaster) start seen within the last ``within``."""

    for_: PendingDuration = Field(default=0.0, alias="for")
    within: Duration = 600.0


class UnusedIndexesAlert(_AlertRule):
    """Unused indexes of a database above ``bytes``; long `for`: right after a stats reset nothing is scanned."""

    for_: PendingDuration = Field(default=3600.0, alias="for")
    bytes: int = Field(default=1 << 30, ge=0)


class AutovacuumWorkersAlert(_AlertRule):
    """Every autovacuum worker busy (tables queue for vacuum) for ``for``."""

    for_: PendingDuration = Field(default=1800.0, alias="for")


class CollectorFailingAlert(_AlertRule):
    """A collector whose last run failed."""

    for_: PendingDuration = Field(default=600.0, alias="for")


class NoticeAlert(_AlertRule):
    """An ``info`` notice: something to fix when convenient, never a page."""

    for_: PendingDuration = Field(default=900.0, alias="for")


class ReloadFailedAlert(_AlertRule):
    """The last configuration reload was invalid: the exporter still runs on the previous configuration."""

    for_: PendingDuration = Field(default=600.0, alias="for")


class CollectorStaleAlert(_AlertRule):
    """A collector whose data is older than ``intervals`` times its own interval."""

    for_: PendingDuration = Field(default=120.0, alias="for")
    intervals: float = Field(default=3.0, ge=1.5)


class AlertsConfig(_Strict):
    """Thresholds and pending durations of the generated Prometheus alert rules."""

    job: str = Field(default="pgvitals", min_length=1)  # the Prometheus job scraping pgvitals
    rate_window: Duration = 300.0
    runbook_base_url: str | None = None  # where docs/ is published; None: links relative to the repository
    runbook_url: None = Field(default=None, exclude=True)  # replaced by runbook_base_url: say so when given
    labels: ConstLabels = Field(default_factory=dict)
    exporter_down: DownAlert = Field(default_factory=DownAlert)
    postgres_down: DownAlert = Field(default_factory=DownAlert)
    pgbouncer_down: DownAlert = Field(default_factory=DownAlert)
    connections: ConnectionsAlert = Field(default_factory=ConnectionsAlert)
    pool_utilization: PoolAlert = Field(default_factory=PoolAlert)
    pgbouncer_waiting: PgBouncerWaitingAlert = Field(default_factory=PgBouncerWaitingAlert)
    replication_lag: ReplicationLagAlert = Field(default_factory=ReplicationLagAlert)
    replication_lag_bytes: BytesAlert = Field(default_factory=BytesAlert)
    slot_inactive: SlotInactiveAlert = Field(default_factory=SlotInactiveAlert)
    slot_retained: SlotRetainedAlert = Field(default_factory=SlotRetainedAlert)
    archiving: _AlertRule = Field(default_factory=_AlertRule)
    long_query: DurationAlert = Field(default_factory=DurationAlert)
    idle_in_transaction: DurationAlert = Field(default_factory=DurationAlert)
    lock_wait: LockWaitAlert = Field(default_factory=LockWaitAlert)
    deadlocks: EventCountAlert = Field(default_factory=EventCountAlert)
    slow_statements: SlowStatementsAlert = Field(default_factory=SlowStatementsAlert)
    cache_hit: CacheHitAlert = Field(default_factory=CacheHitAlert)
    bloat: BloatAlert = Field(default_factory=BloatAlert)
    wraparound: WraparoundAlert = Field(default_factory=WraparoundAlert)
    restart: RestartAlert = Field(default_factory=RestartAlert)
    sequences: SequenceAlert = Field(default_factory=SequenceAlert)
    unused_indexes: UnusedIndexesAlert = Field(default_factory=UnusedIndexesAlert)
    autovacuum_workers: AutovacuumWorkersAlert = Field(default_factory=AutovacuumWorkersAlert)
    subscription_stopped: _AlertRule = Field(default_factory=_AlertRule)
    subscription_errors: SubscriptionErrorsAlert = Field(default_factory=SubscriptionErrorsAlert)
    subscription_silent: SubscriptionSilentAlert = Field(default_factory=SubscriptionSilentAlert)
    collector_failing: CollectorFailingAlert = Field(default_factory=CollectorFailingAlert)
    collector_stale: CollectorStaleAlert = Field(default_factory=CollectorStaleAlert)
    collector_denied: NoticeAlert = Field(default_factory=NoticeAlert)
    database_unavailable: NoticeAlert = Field(default_factory=NoticeAlert)
    config_reload: ReloadFailedAlert = Field(default_factory=ReloadFailedAlert)


    @field_validator("runbook_base_url")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("expected an absolute http:// or https:// URL (a notification has no base to "
                                 "resolve a relative link against)")
            if parts.fragment:
                raise ValueError("give the URL without a #fragment (each alert adds its own anchor), or end it "
                                 "with # to name the runbook page itself")
        return value

    @field_validator("runbook_url", mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> None:
        raise ValueError("replaced by runbook_base_url: the URL where docs/ is published "
                         "(each rule links to <base>/runbooks.md#<alert>)")


#: DSN keywords a probed target or an auth module's own fields give: not accepted among an auth module's options.
AUTH_MODULE_OWN_KEYWORDS = frozenset({"host", "hostaddr", "port", "dbname", "user", "password", "passfile",
                                      "sslmode"})
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


class AuthModule(PasswordSourceConfig):
    """How to log in to a server Prometheus names in ``/probe?target=HOST:PORT/DB&auth_module=NAME``.

    ``password_command`` arguments may hold ``{host}``, ``{port}``, ``{dbname}`` and ``{user}``: a token such
    as RDS IAM's is made for one server, so each probed target runs the command with its own address.
    """

    user: str = Field(min_length=1)
    sslmode: str = "prefer"
    options: dict[str, str] = Field(default_factory=dict)  # more libpq keywords (sslrootcert, options, ...)
    # Shell globs of the HOST:PORT/DB a probe may name (the credentials go to whatever host is named).
    allowed_targets: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    max_connections: int = Field(default=2, ge=1, le=20)
    labels: ConstLabels = Field(default_factory=dict)

    @field_validator("sslmode")
    @classmethod
    def _sslmode(cls, value: str) -> str:
        if value not in SSLMODES:
            raise ValueError(f"expected one of {', '.join(SSLMODES)}")
        return value

    @field_validator("options")
    @classmethod
    def _options(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key in AUTH_MODULE_OWN_KEYWORDS:
                raise ValueError(f"{key!r} is not an option here: the probed target gives host, port and dbname, "
                                 "the auth module user, password source and sslmode")
        try:
            conninfo_to_dict(make_conninfo(**value))  # libpq rejects an unknown keyword
        except Exception:
            raise ValueError("not valid libpq connection keywords") from None
        return value


class ShardConfig(_Strict):
    """Which share of the configured targets this process polls (exporter/shards.py)."""

    index: int = Field(ge=0)  # `hostname` in the YAML: the StatefulSet pod ordinal, resolved when loading
    count: int = Field(ge=1, le=1000)

    @model_validator(mode="after")
    def _below_count(self) -> ShardConfig:
        if self.index >= self.count:
            raise ValueError(f"index {self.index} must be below count {self.count} (shards are 0..count-1)")
        return self


class Settings(_Strict):
    """The whole validated configuration."""

    listen: str = DEFAULT_LISTEN
    targets: list[TargetConfig] = Field(default_factory=list)
    pgbouncers: list[PgBouncerConfig] = Field(default_factory=list)
    pools: list[PoolConfig] = Field(default_factory=list)
    collectors: dict[str, CollectorOverride] = Field(default_factory=dict)
    connect_timeout: Duration = 5.0
    lock_timeout: Duration = 0.1
    probe_interval: Duration = 15.0
    max_backoff: Duration = 60.0
    # How long an object found denied while running (a "not supported" a privilege check cannot foresee)
    # is left alone before one more try; privilege checks themselves run at every probe at no cost.
    denial_recheck_interval: Duration = 3600.0
    application_name: str = Field(default="pgvitals", max_length=63)
    workers: int = Field(default=0, ge=0, le=256)  # threads per scheduler pool at most; 0: 64
    log: LogConfig = Field(default_factory=LogConfig)
    web_config_file: Path | None = None  # exporter-toolkit web config: TLS, basic auth (exporter/webconfig.py)
    shard: ShardConfig | None = None  # None: this process polls every configured target
    auth_modules: dict[Name, AuthModule] = Field(default_factory=dict)  # for /probe of unconfigured targets
    dynamic_target_ttl: Duration = 600.0  # a target registered by /probe is dropped this long after its last probe
    max_dynamic_targets: int = Field(default=100, ge=0, le=10_000)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    # Which metric names /metrics serves: ours, postgres_exporter's and pgbouncer_exporter's (exporter/compat.py),
    # or both (a name both use is served once).
    metric_names: Literal["native", "postgres_exporter", "both"] = "native"
    queries_files: list[QueriesFile] = Field(default_factory=list)  # postgres_exporter's queries.yaml format
    custom_collectors: list[CustomCollectorConfig] = Field(default_factory=list)
    strict_custom: bool = False  # a custom metric named like a built-in one: error instead of skip + warning

    @field_validator("collectors", mode="before")
    @classmethod
    def _declared_collectors(cls, value: Any) -> Any:
        """Check names, switches and parameters against the catalog (errors keep their YAML path)."""
        section = collectors_section_model().model_validate(value)
        given = ((name, entry) for name, entry in section if entry is not None)
        return {name: entry.model_dump(exclude_unset=True, by_alias=True) for name, entry in given}

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("expected HOST:PORT, for example 0.0.0.0:9839")
        return value

    @property
    def listen_host(self) -> str:
        """The address part of ``listen`` (brackets of IPv6 removed)."""
        return self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"

    @property
    def listen_port(self) -> int:
        """The port part of ``listen``."""
        return int(self.listen.rpartition(":")[2])


# Environment variables that override the common keys (after the file is read).
ENV_OVERRIDES: Mapping[str, tuple[str, ...]] = {
    "PGVITALS_LISTEN": ("listen",),
    "PGVITALS_LOG_LEVEL": ("log", "level"),
    "PGVITALS_LOG_FORMAT": ("log", "format"),
    "PGVITALS_CONNECT_TIMEOUT": ("connect_timeout",),
    "PGVITALS_LOCK_TIMEOUT": ("lock_timeout",),
    "PGVITALS_APPLICATION_NAME": ("application_name",),
}


Loc = tuple[int | str, ...]
#: One problem: where (a path into the YAML document) and what.
Problem = tuple[Loc, str]


def _yaml_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _unknown_key(loc: Loc) -> str:
    """Say what is known where a key is unknown: collectors and their parameters are many and easy to misspell."""
    from exporter import catalog

    if len(loc) == 2 and loc[0] == "collectors":
        return f"unknown collector (known: {', '.join(sorted(catalog.Catalog.builtin().by_name))})"
    if len(loc) == 3 and loc[0] == "collectors" and str(loc[1]) in catalog.Catalog.builtin().by_name:
        declared = catalog.Catalog.builtin().by_name[str(loc[1])].param_defaults()
        return f"unknown key (parameters: {', '.join(sorted(declared)) or 'none'})"
    return "unknown key"


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "missing"
    if kind == "extra_forbidden":
        return _unknown_key(error["loc"])
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def node_lines(node: yaml.Node | None) -> dict[Loc, int]:
    """The 1-based line of every path in a composed YAML document (a mapping key's line for its value)."""
    lines: dict[Loc, int] = {}

    def walk(current: yaml.Node, loc: Loc, line: int, seen: frozenset[int]) -> None:
        lines[loc] = line
        if id(current) in seen:
            return  # an alias back into its own ancestor: YAML allows it, and it has no new lines
        inside = seen | {id(current)}
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode):
                    walk(value, (*loc, key.value), key.start_mark.line + 1, inside)
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                walk(item, (*loc, index), item.start_mark.line + 1, inside)

    if node is not None:
        walk(node, (), node.start_mark.line + 1, frozenset())
    return lines


def _read_yaml(path: Path) -> tuple[Any, dict[Loc, int]]:
    """The document and the line of each of its paths."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file ({exc.strerror})"]) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()  # kept, for the lines of the paths errors name
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError([f"{path}: not valid YAML at {where}: {getattr(exc, 'problem', exc)}"]) from None
    finally:
        loader.dispose()
    return data or {}, node_lines(node)


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> list[Loc]:
    """Apply the environment overrides; return the paths whose values no longer come from the file."""
    overridden: list[Loc] = []
    for variable, path in ENV_OVERRIDES.items():
        if variable in environ:
            node = data
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = environ[variable]
            overridden.append(path)
    dsn = environ.get("PGVITALS_DSN") or environ.get("DATA_SOURCE_NAME")
    if dsn and not data.get("targets"):
        # postgres_exporter users: DATA_SOURCE_NAME alone is a one-target configuration.
        data["targets"] = [{"name": environ.get("PGVITALS_TARGET_NAME", "default"), "dsn": dsn}]
        overridden.append(("targets",))
    return overridden


def _line(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    """The line of ``loc`` in the file, or of its nearest ancestor there (a missing key: its mapping's)."""
    for length in range(len(loc), 0, -1):
        if (line := lines.get(loc[:length])) is not None:
            return line
    return None


def _report(problems: list[Problem], lines: Mapping[Loc, int]) -> list[str]:
    """``path (line N): message`` lines in file order, each once; problems without a line last."""
    located = [(_line(loc, lines), loc, message) for loc, message in problems]
    located.sort(key=lambda item: float("inf") if item[0] is None else item[0])
    texts = [f"{_yaml_path(loc)}{'' if line is None else f' (line {line})'}: {message}"
             for line, loc, message in located]
    return sorted(set(texts), key=texts.index)


def _resolve_shard_index(data: dict[str, Any], environ: Mapping[str, str]) -> list[Problem]:
    """``shard.index: hostname``: the StatefulSet pod ordinal at the end of the hostname (``pgvitals-2`` -> 2)."""
    from exporter.shards import hostname_ordinal

    shard = data.get("shard")
    if not isinstance(shard, dict) or shard.get("index") != "hostname":
        return []
    hostname = environ.get("HOSTNAME") or socket.gethostname()
    ordinal = hostname_ordinal(hostname)
    if ordinal is None:
        del data["shard"]  # reported here, not once more as "not an integer"
        return [(("shard", "index"), f"the hostname {hostname!r} ends in no -N ordinal (StatefulSet pods are "
                                     "named NAME-0, NAME-1, ...): give the index as a number")]
    data["shard"] = {**shard, "index": ordinal}
    return []


def load_settings(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    raw: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read, override from the environment and the command line (``overrides``, top-level keys) and validate;
    raise ConfigError with every problem."""
    environ = os.environ if environ is None else environ
    lines: dict[Loc, int] = {}
    if raw is not None:
        data: Any = dict(raw)
    elif path is not None:
        data, lines = _read_yaml(path)
    else:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of settings"])
    replaced_paths = _apply_env(data, environ)
    for key, value in (overrides or {}).items():
        data[key] = value
        replaced_paths.append((key,))
    for replaced in replaced_paths:
        lines = {loc: line for loc, line in lines.items() if loc[:len(replaced)] != replaced}
    problems: list[Problem] = _resolve_shard_index(data, environ)
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems.extend((tuple(e["loc"]), _describe(e)) for e in exc.errors())
    problems.extend(_semantic_problems(data, environ))
    if settings is not None:
        problems.extend(_sequence_floor_problems(settings))
    if settings is not None and not problems:
        from exporter import custom  # imports this module: only here, once the settings are valid

        settings = _files_beside(settings, path)
        problems.extend(custom.declaration_problems(settings))
    if problems or settings is None:
        raise ConfigError(_report(problems, lines))
    return settings


def _files_beside(settings: Settings, config_path: Path | None) -> Settings:
    """Relative queries file paths are read beside the configuration file, wherever pgvitals starts."""
    if config_path is None or all(entry.path.is_absolute() for entry in settings.queries_files):
        return settings
    base = config_path.resolve().parent
    files = [entry if entry.path.is_absolute() else entry.model_copy(update={"path": base / entry.path})
             for entry in settings.queries_files]
    return settings.model_copy(update={"queries_files": files})


def _semantic_problems(data: Mapping[str, Any], environ: Mapping[str, str]) -> list[Problem]:
    """Cross-field checks, done on the raw data so they report alongside type errors."""
    from exporter import catalog as catalog_module

    problems: list[Problem] = []
    if not data.get("targets") and not data.get("pgbouncers") and not data.get("auth_modules"):
        problems.append((("targets",), "at least one target (or pgbouncer, or auth module for /probe) is needed"))
    for section in ("targets", "pgbouncers", "pools"):
        items = data.get(section)
        if not isinstance(items, list):
            continue
        seen: dict[str, int] = {}
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            name = item.get("name")
            if isinstance(name, str):
                if name in seen:
                    problems.append(((section, index, "name"), f"duplicate of {section}[{seen[name]}] ({name!r})"))
                seen.setdefault(name, index)
            if section != "pools":
                problems.extend(_secret_problems((section, index), item, environ))
            elif not any(item.get(k) for k in ("application_name", "usename", "client_addr")):
                problems.append(((section, index), "give application_name, usename or client_addr to match sessions"))
    modules = data.get("auth_modules")
    if isinstance(modules, dict):
        for module_name, module in modules.items():
            if isinstance(module, dict):
                problems.extend(_secret_problems(("auth_modules", module_name), module, environ))
    collectors = data.get("collectors")
    if isinstance(collectors, dict):
        known = catalog_module.Catalog.builtin().by_name
        for name, override in collectors.items():
            if name in known and isinstance(override, dict):
                problems.extend(_timeout_problems(("collectors", name), known[name], override))
    return problems


def _sequence_floor_problems(settings: Settings) -> list[Problem]:
    """A sequence alert below the collector's floor would never see the sequences between the two."""
    from exporter import catalog as catalog_module

    rule = settings.alerts.sequences
    override = settings.collectors.get("pg_sequences")
    declared = catalog_module.Catalog.builtin().by_name["pg_sequences"].param_defaults()["floor"]
    floor = float(((override.model_extra if override is not None else None) or {}).get("floor", declared))
    if rule.enabled and rule.warning < floor:
        return [(("alerts", "sequences", "warning"),
                 f"{rule.warning:g} is below collectors.pg_sequences.floor ({floor:g}): sequences under the floor "
                 "are not exported, so the alert would not see them (lower the floor or raise the threshold)")]
    return []


def _secret_problems(where: Loc, item: Mapping[str, Any], environ: Mapping[str, str]) -> list[Problem]:
    problems: list[Problem] = []
    command = item.get("password_command")
    if command is not None:
        others = [key for key in ("password_file", "password_env") if item.get(key) is not None]
        if others:
            problems.append(((*where, "password_command"), f"give either password_command or {others[0]}"))
        if isinstance(command, list) and command and isinstance(command[0], str) and not _runnable(command[0]):
            problems.append(((*where, "password_command", 0), f"command not found: {command[0]}"))
    else:
        problems.extend(((*where, key), "only used with password_command")
                        for key in ("password_command_ttl", "password_command_timeout") if key in item)
    password_file = item.get("password_file")
    if isinstance(password_file, str):
        try:
            Path(password_file).read_text(encoding="utf-8")
        except OSError as exc:
            problems.append(((*where, "password_file"), f"cannot read {password_file} ({exc.strerror})"))
    password_env = item.get("password_env")
    if isinstance(password_env, str) and password_env not in environ:
        problems.append(((*where, "password_env"), f"environment variable {password_env} is not set"))
    return problems


def _runnable(program: str) -> bool:
    """Whether ``program`` (a path, or a name looked up in PATH) is an executable file."""
    if os.sep in program:
        return os.path.isfile(program) and os.access(program, os.X_OK)
    return shutil.which(program) is not None


def _timeout_problems(where: Loc, collector: Any, override: Mapping[str, Any]) -> list[Problem]:
    """The timeout must stay below the interval, either of them possibly the collector's default."""
    try:
        interval = parse_duration(override.get("interval", collector.interval))
        timeout = parse_duration(override.get("timeout", collector.timeout))
    except ValueError:
        return []  # the type error is reported by the schema
    if timeout >= interval:
        return [((*where, "timeout"), f"{timeout:g}s must be shorter than the interval ({interval:g}s)")]
    return []
