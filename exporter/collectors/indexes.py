"""Index usage: scans and sizes of the largest indexes plus a remainder, and indexes nothing has used."""

from __future__ import annotations

from typing import TYPE_CHECKING

from exporter.catalog import Collector, Param, Rows, SqlVariant
from exporter.collectors._helpers import counter, gauge
from exporter.collectors.cache import INDEX
from exporter.hooks import STICKINESS, query_top, sticky_order

if TYPE_CHECKING:
    from exporter.db import Session
    from exporter.hooks import RunContext

TOP_N = Param(
    "top_n", 50,
    "Indexes exported one by one, the largest first (pg_class.relpages, no relation lock); the rest are summed "
    "into one `indexrelname=\"other\"` series per database.",
)
UNUSED_TOP_N = Param(
    "unused_top_n", 10,
    "The largest unused indexes exported one by one in pg_index_unused_size_bytes.",
)

# Sizes are pg_class.relpages times the block size: kept by VACUUM, ANALYZE and CREATE INDEX, read without a
# relation lock (pg_relation_size would queue behind DDL). An index is unused when nothing scanned it since
# the statistics were reset and it enforces nothing: unique, primary key and exclusion indexes are needed
# even when never scanned.
def _indexes_sql(last_scan: str) -> str:
    size = "i.pages * pg_catalog.current_setting('block_size')::bigint"
    name = "(SELECT c.relname::text FROM pg_catalog.pg_class c WHERE c.oid = {0})"
    read, fetched = ("pg_catalog.pg_stat_get_tuples_returned(i.indexrelid)",
                     "pg_catalog.pg_stat_get_tuples_fetched(i.indexrelid)")
    return f"""
WITH idx AS MATERIALIZED (
  -- pg_stat_user_indexes' rows without its joins: an index is in its table's schema (it cannot be moved
  -- alone), so a plain index in a user schema is an index of a user table or materialized view.
  SELECT x.indexrelid, x.indrelid, n.nspname::text AS schemaname, ic.relpages::bigint AS pages,
         pg_catalog.pg_stat_get_numscans(x.indexrelid) AS idx_scan,
         NOT x.indisunique AND NOT x.indisprimary AND NOT x.indisexclusion AS optional
  FROM pg_catalog.pg_index x
  JOIN pg_catalog.pg_class ic ON ic.oid = x.indexrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = ic.relnamespace
  WHERE ic.relkind = 'i' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
), top AS (
  -- ORDER BY ... LIMIT keeps N rows in a heap instead of sorting them all.
  SELECT i.indexrelid FROM idx i ORDER BY {sticky_order("i.indexrelid", "i.pages")} LIMIT %(top_n)s
), unused AS (
  SELECT i.*, i.indexrelid IN (
           SELECT u.indexrelid FROM idx u WHERE u.idx_scan = 0 AND u.optional
           ORDER BY u.pages DESC, u.indexrelid LIMIT %(unused_top_n)s) AS top
  FROM idx i WHERE i.idx_scan = 0 AND i.optional
)
SELECT i.indexrelid::bigint AS relid, i.schemaname, {name.format("i.indrelid")} AS relname,
       {name.format("i.indexrelid")} AS indexrelname, i.idx_scan, {read} AS idx_tup_read,
       {fetched} AS idx_tup_fetch, pg_catalog.date_part('epoch', {last_scan}) AS last_scan, {size} AS size_bytes,
       NULL::bigint AS unused_size_bytes, NULL::bigint AS unused_bytes, NULL::bigint AS unused_count
FROM idx i WHERE i.indexrelid IN (SELECT indexrelid FROM top)
UNION ALL
SELECT NULL, '', 'other', 'other', COALESCE(sum(i.idx_scan), 0)::bigint, COALESCE(sum({read}), 0)::bigint,
       COALESCE(sum({fetched}), 0)::bigint, NULL, COALESCE(sum({size}), 0)::bigint, NULL, NULL, NULL
FROM idx i WHERE i.indexrelid NOT IN (SELECT indexrelid FROM top)
UNION ALL
-- relid NULL: these rows must not become the top-N incumbents.
SELECT NULL, i.schemaname, {name.format("i.indrelid")}, {name.format("i.indexrelid")}, NULL, NULL, NULL, NULL, NULL,
       {size}, NULL, NULL
FROM unused i WHERE i.top
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, COALESCE(sum({size}), 0)::bigint, count(*)
FROM unused i"""


def fetch_indexes(session: Session, ctx: RunContext, sql: str | None) -> Rows:
    """Run the ranking query with last run's top-N as incumbents, and remember this run's."""
    assert sql is not None
    return query_top(session, ctx, sql, {"top_n": max(0, int(ctx.params["top_n"])),
                                         "unused_top_n": max(0, int(ctx.params["unused_top_n"]))})


_BOUND = " Largest indexes only; the rest in indexrelname=\"other\" (relname=\"other\", schemaname=\"\")."

INDEX_USAGE = Collector(
    name="pg_stat_user_indexes",
    family="indexes",
    help="Scans and sizes of the largest user indexes plus a remainder, and the indexes nothing has scanned "
         "since the statistics were reset, from pg_stat_user_indexes.",
    scope="database",
    interval=300.0,
    timeout=30.0,
    params=(TOP_N, UNUSED_TOP_N),
    variants=(
        SqlVariant(min_version=120000, max_version=160000, sql=_indexes_sql("NULL::timestamptz")),
        SqlVariant(min_version=160000, sql=_indexes_sql("pg_catalog.pg_stat_get_lastscan(i.indexrelid)")),
    ),
    fetch=fetch_indexes,
    metrics=(
        counter("pg_stat_user_indexes_scans_total", "Index scans started on the index." + _BOUND, "idx_scan",
                INDEX),
        counter("pg_stat_user_indexes_tup_read_total", "Index entries returned by scans of the index." + _BOUND,
                "idx_tup_read", INDEX),
        counter("pg_stat_user_indexes_tup_fetch_total",
                "Live table rows fetched by simple index scans of the index." + _BOUND, "idx_tup_fetch", INDEX),
        gauge("pg_stat_user_indexes_last_scan_timestamp_seconds",
              "When the index was last scanned, Unix time (16+; absent if never since the statistics reset).",
              "last_scan", INDEX, unit="seconds"),
        gauge("pg_index_size_bytes",
              "Size of the index as of its last VACUUM, ANALYZE or CREATE INDEX (pg_class.relpages times the "
              "block size; no lock)." + _BOUND, "size_bytes", INDEX, unit="bytes"),
        gauge("pg_index_unused_size_bytes",
              "Size of one of the largest unused indexes: not unique, not a primary key or exclusion constraint, "
              "and never scanned since the statistics were reset.", "unused_size_bytes", INDEX, unit="bytes"),
        gauge("pg_index_unused_bytes",
              "Summed size of the database's unused indexes (not unique, primary or exclusion; zero scans since "
              "the statistics reset): space and write work that buys nothing.", "unused_bytes", ("datname",),
              unit="bytes"),
        gauge("pg_index_unused_indexes", "Number of unused indexes in the database (as pg_index_unused_bytes).",
              "unused_count", ("datname",)),
    ),
    notes=(
        "Top `top_n` indexes by pg_class.relpages (no relation lock is taken, so DDL never holds this up); an "
        f"index stays in the top until another is {STICKINESS:g}x its size. The `indexrelname=\"other\"` row sums "
        "the rest, so sums over a database are exact. \"Unused\" counts since the last statistics reset "
        "(`pg_stat_database_stats_reset_timestamp_seconds`) on this server only: an index used only on a "
        "standby, or only by a monthly report, looks unused here. Check both before dropping one."
    ),
)

COLLECTORS = (INDEX_USAGE,)
