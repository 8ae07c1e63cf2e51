"""YAML and environment into validated settings; every problem reported at once with its YAML path."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_PORT = 9839  # postgres_exporter owns 9187; 9839 is free in Prometheus' port list
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``500ms``, ``30s``, ``5m``, ``1h``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError("expected a duration such as 30s, 5m or a number of seconds")
    if seconds <= 0:
        raise ValueError("must be a positive duration")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _parse_pending(value: Any) -> float:
    """Like parse_duration, but 0 is allowed: an alert with ``for: 0`` fires at its first evaluation."""
    if value in (0, "0", "0s") and not isinstance(value, bool):
        return 0.0
    return parse_duration(value)


PendingDuration = Annotated[float, BeforeValidator(_parse_pending)]


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one ``path: message`` line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseFilter(_Strict):
    """Which databases per-database collectors visit (shell globs)."""

    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)


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

    return frozenset({"target"} | {label for spec in catalog.load().metrics() for label in spec.labels})


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


class TargetConfig(_Strict):
    """One PostgreSQL server to monitor."""

    name: Name
    dsn: Dsn
    password_file: Path | None = None
    password_env: str | None = None
    databases: DatabaseFilter = Field(default_factory=DatabaseFilter)
    labels: ConstLabels = Field(default_factory=dict)
    max_connections: int = Field(default=2, ge=1, le=20)


class PgBouncerConfig(_Strict):
    """One PgBouncer admin console to monitor."""

    name: Name
    dsn: Dsn
    password_file: Path | None = None
    password_env: str | None = None
    labels: ConstLabels = Field(default_factory=dict)


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
    """Per-collector switches; extra keys are the collector's declared parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)

    enabled: bool | None = None  # None: the collector's default (tuning a disabled one does not enable it)
    interval: Duration | None = None
    timeout: Duration | None = None


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
    """A session or wait older than ``seconds``."""

    for_: PendingDuration = Field(default=60.0, alias="for")
    seconds: Duration = 300.0


class LockWaitAlert(DurationAlert):
    """The oldest lock wait in a database."""

    seconds: Duration = 30.0


class DeadlockAlert(_AlertRule):
    """Deadlocks within the rate window (fires above this count)."""

    for_: PendingDuration = Field(default=0.0, alias="for")
    count: int = Field(default=0, ge=0)


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


class CollectorFailingAlert(_AlertRule):
    """A collector whose last run failed."""

    for_: PendingDuration = Field(default=600.0, alias="for")


class CollectorStaleAlert(_AlertRule):
    """A collector whose data is older than ``intervals`` times its own interval."""

    for_: PendingDuration = Field(default=120.0, alias="for")
    intervals: float = Field(default=3.0, ge=1.5)


class AlertsConfig(_Strict):
    """Thresholds and pending durations of the generated Prometheus alert rules."""

    job: str = Field(default="pgvitals", min_length=1)  # the Prometheus job scraping pgvitals
    rate_window: Duration = 300.0
    runbook_url: str = Field(default="docs/runbooks.md", min_length=1)
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
    deadlocks: DeadlockAlert = Field(default_factory=DeadlockAlert)
    slow_statements: SlowStatementsAlert = Field(default_factory=SlowStatementsAlert)
    cache_hit: CacheHitAlert = Field(default_factory=CacheHitAlert)
    bloat: BloatAlert = Field(default_factory=BloatAlert)
    wraparound: WraparoundAlert = Field(default_factory=WraparoundAlert)
    collector_failing: CollectorFailingAlert = Field(default_factory=CollectorFailingAlert)
    collector_stale: CollectorStaleAlert = Field(default_factory=CollectorStaleAlert)


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
    application_name: str = Field(default="pgvitals", max_length=63)
    workers: int = Field(default=0, ge=0, le=256)  # 0: sized from the number of targets
    log: LogConfig = Field(default_factory=LogConfig)
    web_config_file: Path | None = None  # exporter-toolkit web config: TLS, basic auth (exporter/webconfig.py)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)

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


def _yaml_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "missing"
    if kind == "extra_forbidden":
        return "unknown key"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file ({exc.strerror})"]) from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError([f"{path}: not valid YAML at {where}: {getattr(exc, 'problem', exc)}"]) from None


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for variable, path in ENV_OVERRIDES.items():
        if variable in environ:
            node = data
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = environ[variable]
    dsn = environ.get("PGVITALS_DSN") or environ.get("DATA_SOURCE_NAME")
    if dsn and not data.get("targets"):
        # postgres_exporter users: DATA_SOURCE_NAME alone is a one-target configuration.
        data["targets"] = [{"name": environ.get("PGVITALS_TARGET_NAME", "default"), "dsn": dsn}]


def load_settings(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    raw: Mapping[str, Any] | None = None,
) -> Settings:
    """Read, override from the environment and validate; raise ConfigError with every problem."""
    environ = os.environ if environ is None else environ
    if raw is not None:
        data: Any = dict(raw)
    elif path is not None:
        data = _read_yaml(path)
    else:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of settings"])
    _apply_env(data, environ)
    problems: list[str] = []
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems.extend(f"{_yaml_path(e['loc'])}: {_describe(e)}" for e in exc.errors())
    problems.extend(_semantic_problems(data, environ))
    if problems or settings is None:
        raise ConfigError(sorted(set(problems), key=problems.index))
    return settings


def _semantic_problems(data: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Cross-field checks, done on the raw data so they report alongside type errors."""
    from exporter import catalog as catalog_module

    problems: list[str] = []
    for section in ("targets", "pgbouncers", "pools"):
        items = data.get(section)
        if not isinstance(items, list):
            if section == "targets" and not items and not data.get("pgbouncers"):
                problems.append("targets: at least one target (or pgbouncer) is needed")
            continue
        seen: dict[str, int] = {}
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            name = item.get("name")
            if isinstance(name, str):
                if name in seen:
                    problems.append(f"{section}[{index}].name: duplicate of {section}[{seen[name]}] ({name!r})")
                seen.setdefault(name, index)
            if section != "pools":
                problems.extend(_secret_problems(f"{section}[{index}]", item, environ))
        if section == "targets" and not items and not data.get("pgbouncers"):
            problems.append("targets: at least one target (or pgbouncer) is needed")
    pools = data.get("pools")
    if isinstance(pools, list):
        for index, pool in enumerate(pools):
            if isinstance(pool, dict) and not any(pool.get(k) for k in ("application_name", "usename", "client_addr")):
                problems.append(f"pools[{index}]: give application_name, usename or client_addr to match sessions")
    collectors = data.get("collectors")
    if isinstance(collectors, dict):
        known = catalog_module.load().by_name
        for name, override in collectors.items():
            where = f"collectors.{name}"
            if name not in known:
                problems.append(f"{where}: unknown collector (known: {', '.join(sorted(known))})")
                continue
            if isinstance(override, dict):
                problems.extend(_override_problems(where, known[name], override))
    return problems


def _secret_problems(where: str, item: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    problems = []
    password_file = item.get("password_file")
    if isinstance(password_file, str):
        try:
            Path(password_file).read_text(encoding="utf-8")
        except OSError as exc:
            problems.append(f"{where}.password_file: cannot read {password_file} ({exc.strerror})")
    password_env = item.get("password_env")
    if isinstance(password_env, str) and password_env not in environ:
        problems.append(f"{where}.password_env: environment variable {password_env} is not set")
    return problems


def _override_problems(where: str, collector: Any, override: Mapping[str, Any]) -> list[str]:
    problems = []
    declared = collector.param_defaults()
    for key, value in override.items():
        if key in ("enabled", "interval", "timeout"):
            continue
        if key not in declared:
            problems.append(f"{where}.{key}: unknown key (parameters: {', '.join(sorted(declared)) or 'none'})")
            continue
        expected = type(declared[key])
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            problems.append(f"{where}.{key}: expected {expected.__name__}, got {type(value).__name__}")
        elif isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            problems.append(f"{where}.{key}: must not be negative")
    try:
        interval = parse_duration(override.get("interval", collector.interval))
        timeout = parse_duration(override.get("timeout", collector.timeout))
    except ValueError:
        return problems  # the type error is reported by the schema
    if timeout >= interval:
        problems.append(f"{where}.timeout: {timeout:g}s must be shorter than the interval ({interval:g}s)")
    return problems
