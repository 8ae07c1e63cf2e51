"""Slow queries as they happen: the longest running query, transaction and idle transaction per database."""

from __future__ import annotations

from exporter.catalog import Collector, Param, SqlVariant
from exporter.collectors._helpers import gauge

DB = ("datname",)

# One pass over pg_stat_activity, joined onto every database a session can connect to so that a
# database with no such session reports 0 (the truth) rather than nothing. Only client backends count
# (no walsenders, autovacuum or parallel workers: a parallel query is counted once, by its leader).
# This very session and the exporter's other sessions (same application_name as ours: the engine sets
# it on every connection) are left out: watching must not show up as the thing watched.
# statement_timestamp() is one instant for every row; a session that started after it counts as 0.
_ACTIVITY_SQL = """
WITH sessions AS (
  SELECT a.datid, a.state,
    GREATEST(0, pg_catalog.date_part('epoch', pg_catalog.statement_timestamp() - a.query_start)) AS query_age,
    GREATEST(0, pg_catalog.date_part('epoch', pg_catalog.statement_timestamp() - a.xact_start)) AS xact_age,
    GREATEST(0, pg_catalog.date_part('epoch', pg_catalog.statement_timestamp() - a.state_change)) AS state_age
  FROM pg_catalog.pg_stat_activity a
  WHERE a.backend_type = 'client backend'
    AND a.pid <> pg_catalog.pg_backend_pid()
    AND a.application_name IS DISTINCT FROM pg_catalog.current_setting('application_name')
)
SELECT d.datname,
  COALESCE(max(s.query_age) FILTER (WHERE s.state = 'active'), 0) AS max_query_duration,
  COALESCE(max(s.xact_age), 0) AS max_tx_duration,
  COALESCE(max(s.state_age) FILTER (WHERE s.state IN ('idle in transaction', 'idle in transaction (aborted)')),
           0) AS max_idle_in_transaction,
  count(*) FILTER (WHERE s.state = 'active' AND s.query_age > %(slow_threshold_seconds)s::float8) AS slow_queries
FROM pg_catalog.pg_database d
LEFT JOIN sessions s ON s.datid = d.oid
WHERE d.datallowconn
GROUP BY d.datname"""

ACTIVITY = Collector(
    name="pg_stat_activity",
    family="slow_queries",
    help="The longest running query, open transaction and idle-in-transaction session per database, and a "
         "count of queries running longer than a threshold, from pg_stat_activity.",
    # Short interval: a query over the 5 s threshold should be seen while it still runs.
    interval=10.0,
    timeout=5.0,
    variants=(SqlVariant(sql=_ACTIVITY_SQL, min_version=120000),),
    params=(
        Param("slow_threshold_seconds", 5.0,
              "An active query running longer than this many seconds counts in pg_slow_queries."),
    ),
    notes="Every database that accepts connections (template1 included, template0 not) gets a series, 0 when "
          "no session qualifies. Only client backends count; the exporter's own sessions (same "
          "application_name as the exporter's connections) are left out. Needs pg_monitor (or "
          "pg_read_all_stats) to see other roles' sessions.",
    metrics=(
        gauge("pg_stat_activity_max_query_duration_seconds",
              "Age of the longest running active query in the database (0 when none is running).",
              "max_query_duration", DB, unit="seconds"),
        gauge("pg_stat_activity_max_tx_duration_seconds",
              "Age of the oldest open transaction in the database, active or idle (0 when none); old "
              "transactions hold back vacuum.", "max_tx_duration", DB, unit="seconds"),
        gauge("pg_stat_activity_max_idle_in_transaction_seconds",
              "Longest time a session of the database has been idle inside an open transaction (0 when none).",
              "max_idle_in_transaction", DB, unit="seconds"),
        gauge("pg_slow_queries",
              "Active queries running longer than slow_threshold_seconds (default 5 s) in the database.",
              "slow_queries", DB),
    ),
)

COLLECTORS = (ACTIVITY,)
