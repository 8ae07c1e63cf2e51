"""Client sessions by database, role and application, by application pool against its capacity, and what
every backend is waiting on."""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict, cast

from exporter.catalog import Collector, Rows, SqlVariant
from exporter.collectors._helpers import gauge

if TYPE_CHECKING:
    from exporter.config import PoolConfig
    from exporter.hooks import RunContext

UNMATCHED = "unmatched"
#: States every applicable pool reports, zero when no session is in them, so that a pool's series
#: exist (and alerts evaluate) before its first session and after its last one.
BASE_STATES = ("active", "idle", "idle in transaction", "idle in transaction (aborted)")

CONNECTIONS_MAX = Collector(
    name="pg_connections_max",
    family="connections",
    help="Connection slots ordinary roles can use: max_connections minus the reserved slots.",
    interval=60.0,
    timeout=5.0,
    variants=(
        SqlVariant(
            min_version=120000,
            # reserved_connections exists from 16 on; current_setting(name, true) is NULL before that.
            sql="""
SELECT pg_catalog.current_setting('max_connections')::int
     - pg_catalog.current_setting('superuser_reserved_connections')::int
     - COALESCE(pg_catalog.current_setting('reserved_connections', true)::int, 0) AS connections_max""",
        ),
    ),
    metrics=(
        gauge("pg_connections_max",
              "Connection slots available to ordinary roles: max_connections minus superuser_reserved_connections "
              "minus reserved_connections (16+). Utilization: sum(pg_connections) / pg_connections_max.",
              "connections_max"),
    ),
)


@dataclass(frozen=True)
class PoolMatcher:
    """A configured pool compiled for matching: every criterion given must hold (glob, glob, CIDR)."""

    name: str
    capacity: int
    application_name: str | None
    usename: str | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None

    @classmethod
    def from_config(cls, pool: PoolConfig) -> PoolMatcher:
        """Compile one `pools:` entry."""
        network = ipaddress.ip_network(pool.client_addr, strict=False) if pool.client_addr else None
        return cls(pool.name, pool.capacity, pool.application_name, pool.usename, network)

    def matches(self, application_name: str | None, usename: str | None, client_addr: str | None) -> bool:
        """True when the session satisfies every criterion this pool declares."""
        if self.application_name is not None and not fnmatch.fnmatchcase(application_name or "",
                                                                         self.application_name):
            return False
        if self.usename is not None and not fnmatch.fnmatchcase(usename or "", self.usename):
            return False
        if self.network is not None:
            address = parse_address(client_addr)
            # Unix-socket sessions (and addresses hidden from a role without pg_monitor) have no address.
            if address is None or address.version != self.network.version or address not in self.network:
                return False
        return True


def parse_address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address from pg_stat_activity.client_addr; IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes IPv4."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def pools_for(target: str, pools: Sequence[PoolConfig]) -> list[PoolMatcher]:
    """The pools that apply to ``target``, in config order (the order decides which pool wins)."""
    return [PoolMatcher.from_config(p) for p in pools if p.targets is None or target in p.targets]


def assign_pool(matchers: Sequence[PoolMatcher], application_name: str | None, usename: str | None,
                client_addr: str | None) -> str:
    """The first pool (in config order) whose criteria the session meets, else ``unmatched``."""
    for matcher in matchers:
        if matcher.matches(application_name, usename, client_addr):
            return matcher.name
    return UNMATCHED


class SessionGroup(TypedDict):
    """Backends that share type, database, role, application_name, address, state and wait (one row of the scan)."""

    backend_type: str
    datname: str | None
    usename: str | None
    application_name: str | None
    client_addr: str | None
    state: str
    wait_event_type: str | None
    wait_event: str | None
    connections: int


CLIENT_BACKEND = "client backend"
#: The wait labels of a backend that waits for nothing: running on CPU (or in a wait PostgreSQL does not name).
NOT_WAITING = "none"


#: pg_connections cuts application_name to this many characters: a label, not a free-text field.
APPLICATION_NAME_LABEL_LENGTH = 64


def connection_counts(groups: Sequence[SessionGroup]) -> Rows:
    """Session counts by database, role, application_name (shortened) and state, for pg_connections."""
    counts: dict[tuple[str | None, str | None, str | None, str], int] = {}
    for group in groups:
        if group["backend_type"] != CLIENT_BACKEND:
            continue
        application = group["application_name"]
        if application is not None:
            application = application[:APPLICATION_NAME_LABEL_LENGTH]
        key = (group["datname"], group["usename"], application, group["state"])
        counts[key] = counts.get(key, 0) + int(group["connections"])
    return [
        {"datname": datname, "usename": usename, "application_name": application, "state": state,
         "connections": count}
        for (datname, usename, application, state), count in counts.items()
    ]


def pool_counts(groups: Sequence[SessionGroup], matchers: Sequence[PoolMatcher]) -> Rows:
    """Per-pool counts by state, zero-filled, plus one capacity row per applicable pool."""
    counts: dict[tuple[str, str], int] = {}
    for name in [*(m.name for m in matchers), UNMATCHED]:
        for state in BASE_STATES:
            counts[(name, state)] = 0
    for group in groups:
        if group["backend_type"] != CLIENT_BACKEND:
            continue
        pool = assign_pool(matchers, group["application_name"], group["usename"], group["client_addr"])
        key = (pool, group["state"])
        counts[key] = counts.get(key, 0) + int(group["connections"])
    out: list[dict[str, Any]] = [
        {"pool": pool, "state": state, "pool_connections": value} for (pool, state), value in counts.items()
    ]
    # A pool declared twice under one name would duplicate its capacity series: the first one counts.
    capacities: dict[str, int] = {}
    for matcher in matchers:
        capacities.setdefault(matcher.name, matcher.capacity)
    out.extend({"pool": name, "capacity": capacity} for name, capacity in capacities.items())
    return out


def wait_event_counts(groups: Sequence[SessionGroup]) -> Rows:
    """Backends by type, database, state and what they wait on (``none``: not waiting), for pg_wait_event_sessions."""
    counts: dict[tuple[str, str | None, str, str, str], int] = {}
    for group in groups:
        key = (group["backend_type"], group["datname"], group["wait_event_type"] or NOT_WAITING,
               group["wait_event"] or NOT_WAITING, group["state"])
        counts[key] = counts.get(key, 0) + int(group["connections"])
    return [
        {"backend_type": backend_type, "datname": datname, "wait_event_type": wait_type, "wait_event": event,
         "state": state, "wait_sessions": count}
        for (backend_type, datname, wait_type, event, state), count in counts.items()
    ]


def count_sessions(rows: Rows, ctx: RunContext) -> Rows:
    """One scan of pg_stat_activity, counted three ways: by database/role/application/state, by pool, by wait."""
    groups = cast(list[SessionGroup], rows)
    return [*connection_counts(groups), *pool_counts(groups, pools_for(ctx.target, ctx.settings.pools)),
            *wait_event_counts(groups)]


CONNECTIONS = Collector(
    name="pg_connections",
    family="connections",
    help="Client sessions from pg_stat_activity: by database, role, application and state, and by the "
         "application pools declared under `pools:` with each pool's capacity; and every backend by what it "
         "waits on.",
    interval=15.0,
    timeout=5.0,
    variants=(
        SqlVariant(
            min_version=120000,
            # Grouped server-side: hundreds of sessions become a few rows. Every count comes from this one
            # scan, so they always add up; pool matching happens in Python (globs and CIDR ranges from the
            # config never reach the SQL). Background processes have no state: '' rather than 'unknown',
            # which says a client backend's state is hidden from this role.
            sql="""
SELECT a.backend_type, a.datname, a.usename, a.application_name, pg_catalog.host(a.client_addr) AS client_addr,
       COALESCE(a.state, CASE WHEN a.backend_type = 'client backend' THEN 'unknown' ELSE '' END) AS state,
       a.wait_event_type, a.wait_event, count(*) AS connections
FROM pg_catalog.pg_stat_activity a
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8""",
        ),
    ),
    transform=count_sessions,
    metrics=(
        gauge("pg_connections",
              "Client sessions by database, role, application_name (first 64 characters) and state.",
              "connections", ("datname", "usename", "application_name", "state")),
        gauge("pg_pool_connections",
              "Client sessions of each application pool declared under `pools:` by state (first matching pool "
              "wins, in config order); sessions matching no pool count under pool=\"unmatched\". "
              "Compare sum by (pool) with pg_pool_capacity.",
              "pool_connections", ("pool", "state")),
        gauge("pg_wait_event_sessions",
              "Backends by type, database, state and what they are waiting on (wait_event_type and wait_event "
              "of pg_stat_activity; \"none\" when not waiting: on CPU, or in a wait PostgreSQL does not "
              "name). Client backends carry backend_type=\"client backend\".",
              "wait_sessions", ("backend_type", "datname", "wait_event_type", "wait_event", "state")),
        gauge("pg_pool_capacity",
              "Declared capacity of the application pool (e.g. SQLAlchemy pool_size + max_overflow, "
              "SQLx max_connections).",
              "capacity", ("pool",)),
    ),
    notes="Pool matching: every criterion a pool gives must hold: `application_name` and `usename` are "
          "case-sensitive shell globs, `client_addr` a CIDR range (Unix-socket sessions have no address "
          "and never match a range). The exporter's own sessions are real connections: they count under "
          "the pool their application_name (default `pgvitals`) matches, usually `unmatched`. Needs "
          "pg_monitor (pg_read_all_stats): without it other roles' state and client_addr are hidden, so "
          "their sessions show as state=\"unknown\" and never match a CIDR pool. Pools listing `targets` "
          "apply only to those targets. Without `pools:` every session counts under pool=\"unmatched\". "
          "Wait events are sampled at this collector's interval: a gauge of who waits on what at that "
          "instant, summed over sessions (never one series per session; an idle client waits on "
          "Client/ClientRead). Background processes (checkpointer, walwriter, autovacuum, walsenders, "
          "parallel workers) have datname=\"\" where they belong to no database, and state=\"\".",
)

COLLECTORS = (CONNECTIONS_MAX, CONNECTIONS)
