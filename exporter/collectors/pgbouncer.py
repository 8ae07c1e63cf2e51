"""PgBouncer's admin console: pools (waiting clients, maxwait), traffic totals, databases and limits.

The console speaks only the simple query protocol and knows no transactions: the engine gives
pgbouncer targets an autocommit connection with a client-side cursor and no prepared statements.
Its SHOW commands gained and renamed columns over releases (1.18 from Debian, 1.23, 1.24), so
every value is read by column name: a column this PgBouncer lacks yields no sample, never a zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exporter.catalog import Collector, Rows, SqlVariant
from exporter.collectors._helpers import counter, gauge
from exporter.exposition import to_number

if TYPE_CHECKING:
    from exporter.db import Session
    from exporter.hooks import RunContext

US = 1e-6  # PgBouncer reports times in microseconds; we export seconds
POOL = ("database", "user")
DB = ("database",)


def _first_present(row: dict[str, Any], *columns: str) -> Any:
    """The value of the first column this PgBouncer version has (columns were renamed across releases)."""
    for column in columns:
        if column in row:
            return row[column]
    return None


def pool_rows(rows: Rows, _ctx: RunContext) -> Rows:
    """SHOW POOLS rows with the oldest client's wait in seconds (maxwait plus its microsecond part)."""
    for row in rows:
        seconds = to_number(row.get("maxwait"))
        micros = to_number(row.get("maxwait_us"))
        row["maxwait_seconds"] = None if seconds is None else seconds + (micros or 0) * US
    return rows


POOLS = Collector(
    name="pgbouncer_pools",
    family="pgbouncer",
    help="Client and server connections of each PgBouncer pool (database, user), from SHOW POOLS.",
    target_kind="pgbouncer",
    interval=15.0,
    timeout=5.0,
    variants=(SqlVariant(sql="SHOW POOLS"),),
    transform=pool_rows,
    metrics=(
        gauge("pgbouncer_pools_client_active_connections",
              "Client connections linked to a server connection or idle with no query waiting (cl_active).",
              "cl_active", POOL),
        gauge("pgbouncer_pools_client_waiting_connections",
              "Client connections that sent a query and wait for a server connection (cl_waiting); "
              "above zero for long means the pool is too small or the server too slow.",
              "cl_waiting", POOL),
        gauge("pgbouncer_pools_server_active_connections", "Server connections linked to a client (sv_active).",
              "sv_active", POOL),
        gauge("pgbouncer_pools_server_idle_connections",
              "Server connections unused and immediately usable (sv_idle).", "sv_idle", POOL),
        gauge("pgbouncer_pools_server_used_connections",
              "Server connections idle longer than server_check_delay, to be checked before reuse (sv_used).",
              "sv_used", POOL),
        gauge("pgbouncer_pools_server_tested_connections",
              "Server connections running server_reset_query or server_check_query (sv_tested).",
              "sv_tested", POOL),
        gauge("pgbouncer_pools_server_login_connections",
              "Server connections currently logging in (sv_login).", "sv_login", POOL),
        gauge("pgbouncer_pools_client_maxwait_seconds",
              "How long the oldest waiting client of the pool has waited (maxwait + maxwait_us); 0 when none waits.",
              "maxwait_seconds", POOL, unit="seconds"),
    ),
    notes="The admin console itself shows up as database `pgbouncer` (the exporter is one of its clients).",
)


STATS = Collector(
    name="pgbouncer_stats",
    family="pgbouncer",
    help="Traffic totals per PgBouncer database since PgBouncer started, from SHOW STATS.",
    target_kind="pgbouncer",
    interval=15.0,
    timeout=5.0,
    variants=(SqlVariant(sql="SHOW STATS"),),
    metrics=(
        counter("pgbouncer_stats_transactions_total", "SQL transactions pooled (total_xact_count).",
                "total_xact_count", DB),
        counter("pgbouncer_stats_queries_total", "SQL commands pooled (total_query_count).",
                "total_query_count", DB),
        counter("pgbouncer_stats_received_bytes_total", "Bytes of network traffic received from clients "
                "(total_received).", "total_received", DB, unit="bytes"),
        counter("pgbouncer_stats_sent_bytes_total", "Bytes of network traffic sent to clients (total_sent).",
                "total_sent", DB, unit="bytes"),
        counter("pgbouncer_stats_transaction_seconds_total",
                "Time server connections spent in transactions, idle in transaction included (total_xact_time); "
                "rate over rate of transactions is the mean transaction time.",
                "total_xact_time", DB, unit="seconds", scale=US),
        counter("pgbouncer_stats_query_seconds_total",
                "Time server connections spent executing queries (total_query_time).",
                "total_query_time", DB, unit="seconds", scale=US),
        counter("pgbouncer_stats_client_wait_seconds_total",
                "Time clients spent waiting for a server connection (total_wait_time; counted when the client "
                "gets its server).", "total_wait_time", DB, unit="seconds", scale=US),
        counter("pgbouncer_stats_server_assignments_total",
                "Times a server connection was assigned to a client (total_server_assignment_count, "
                "PgBouncer 1.23+).", "total_server_assignment_count", DB),
    ),
)


def database_rows(rows: Rows, _ctx: RunContext) -> Rows:
    """SHOW DATABASES rows labelled by the PgBouncer database name (``name``), not the server database."""
    for row in rows:
        row["server_database"] = row.get("database")
        row["database"] = row.get("name")
        row["reserve_pool_size"] = _first_present(row, "reserve_pool_size", "reserve_pool")  # renamed in 1.24
    return rows


DATABASES = Collector(
    name="pgbouncer_databases",
    family="pgbouncer",
    help="Pool sizes and server connections per PgBouncer database entry, from SHOW DATABASES.",
    target_kind="pgbouncer",
    interval=30.0,
    timeout=5.0,
    variants=(SqlVariant(sql="SHOW DATABASES"),),
    transform=database_rows,
    metrics=(
        gauge("pgbouncer_databases_pool_size", "Server connections allowed per (database, user) pool.",
              "pool_size", DB),
        gauge("pgbouncer_databases_reserve_pool_size",
              "Extra server connections allowed when clients wait longer than reserve_pool_timeout.",
              "reserve_pool_size", DB),
        gauge("pgbouncer_databases_max_connections",
              "Server connections allowed for the database over all users (max_db_connections; 0: no limit).",
              "max_connections", DB),
        gauge("pgbouncer_databases_current_connections", "Server connections open for the database.",
              "current_connections", DB),
        gauge("pgbouncer_databases_current_client_connections",
              "Client connections to the database (PgBouncer 1.24+).", "current_client_connections", DB),
        gauge("pgbouncer_databases_paused", "1 while the database is paused (PAUSE).", "paused", DB),
        gauge("pgbouncer_databases_disabled", "1 while the database rejects new clients (DISABLE).", "disabled",
              DB),
    ),
)


# SHOW CONFIG keys exported as limits: (key, metric suffix, help)
_CONFIG_KEYS: tuple[tuple[str, str, str], ...] = (
    ("max_client_conn", "max_client_connections",
     "Client connections PgBouncer accepts in total (max_client_conn); compare with pgbouncer_client_connections."),
    ("default_pool_size", "default_pool_size", "Server connections per (database, user) pool unless overridden."),
    ("reserve_pool_size", "reserve_pool_size", "Extra server connections a pool may open for waiting clients."),
    ("max_db_connections", "max_db_connections", "Server connections allowed per database (0: no limit)."),
    ("max_user_connections", "max_user_connections", "Server connections allowed per user (0: no limit)."),
)


def fetch_config(session: Session, _ctx: RunContext, _sql: str | None) -> Rows:
    """One row: the limits from SHOW CONFIG plus the client and server connection counts of SHOW LISTS."""
    row: dict[str, Any] = {}
    for item in session.query("SHOW CONFIG"):
        row[str(item.get("key"))] = item.get("value")
    # SHOW LISTS is a (list, items) table: used_clients are all client connections, logins included.
    for item in session.query("SHOW LISTS"):
        row[f"lists_{item.get('list')}"] = item.get("items")
    return [row]


CONFIG = Collector(
    name="pgbouncer_config",
    family="pgbouncer",
    help="PgBouncer's connection limits (SHOW CONFIG) and its connection totals (SHOW LISTS).",
    target_kind="pgbouncer",
    interval=60.0,
    timeout=5.0,
    fetch=fetch_config,
    metrics=(
        *(gauge(f"pgbouncer_config_{suffix}", help_, key) for key, suffix, help_ in _CONFIG_KEYS),
        gauge("pgbouncer_client_connections",
              "Client connections PgBouncer holds, waiting and logging-in ones included (SHOW LISTS used_clients).",
              "lists_used_clients"),
        gauge("pgbouncer_server_connections", "Server connections PgBouncer holds (SHOW LISTS used_servers).",
              "lists_used_servers"),
    ),
)

COLLECTORS = (POOLS, STATS, DATABASES, CONFIG)
