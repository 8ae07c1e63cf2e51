"""What runs where: collectors with the user's overrides, whether one applies to a target, which SQL it runs.

Alerts, ``check`` and docs read these answers without importing the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg import sql

from exporter.catalog import Catalog, Collector, SkipReason
from exporter.db import Facts, Session, read_extensions

if TYPE_CHECKING:
    from exporter.config import Settings


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


def start_jitter(interval: float) -> float:
    """How far either way a run may start from its schedule: spreads many targets' runs over time."""
    return min(interval * 0.1, 5.0)


def applicable(effective: Iterable[Effective], is_pgbouncer: bool) -> list[Effective]:
    """Enabled collectors of the target's kind (version and role are checked at each run)."""
    kind = "pgbouncer" if is_pgbouncer else "postgres"
    return [e for e in effective if e.enabled and e.collector.target_kind == kind]


def not_applicable(collector: Collector, facts: Facts | None) -> SkipReason | None:
    """Why a collector of the target's kind cannot run on this server now; None when it can (or facts unknown)."""
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
    # Unknown preload libraries (a role without pg_read_all_settings): try, the run says "not_ready" if absent.
    if collector.preload and facts.preload_libraries is not None and collector.preload not in facts.preload_libraries:
        return "preload"
    return None


def choose_sql(
    collector: Collector, facts: Facts | None, session: Session
) -> tuple[str | None, SkipReason | None]:
    """The SQL variant for this server (or this database's extension version), or a skip reason.

    ``facts`` is None for PgBouncer, whose console has one dialect: the first variant.
    """
    if facts is None:
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
    if schema is None:
        return variant.sql, None
    return with_schema(variant.sql, schema, session), None


def with_schema(text: str, schema: str, session: Session) -> str:
    """``text`` with ``{ext_schema}`` replaced by the quoted schema the extension lives in."""
    composed = sql.SQL(text).format(ext_schema=sql.Identifier(schema))
    return composed.as_string(session.conn)
