"""Table and index I/O counters (shared-buffer hits and reads) for the largest relations, plus a remainder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from exporter.catalog import Collector, Param, Rows, SqlVariant
from exporter.collectors._helpers import counter
from exporter.hooks import STICKINESS, query_top, sticky_rank

if TYPE_CHECKING:
    from exporter.db import Session
    from exporter.hooks import RunContext

TOP_N = Param(
    "top_n", 50,
    "Relations exported one by one, the largest first (pg_class.relpages, no relation lock); the rest "
    "are summed into one `relname=\"other\"` series per database.",
)

# Size comes from pg_class.relpages (heap + TOAST + indexes), maintained by VACUUM/ANALYZE: reading it
# takes no relation lock, so this never queues behind DDL. Ranking and remainder are one pass.
# The counters are those of pg_statio_user_tables (same functions, relkinds and schema filter), computed
# here so that each index is visited once for its size and its counters. The view on 12 also multiplies
# the TOAST index counters by the number of the table's indexes (one GROUP BY over both joins); this
# does not.
_INDEX_BLOCKS = """
    sum(pg_catalog.pg_stat_get_blocks_fetched(x.indexrelid)
        - pg_catalog.pg_stat_get_blocks_hit(x.indexrelid))::bigint AS blks_read,
    sum(pg_catalog.pg_stat_get_blocks_hit(x.indexrelid))::bigint AS blks_hit"""

_TABLES_SQL = f"""
WITH ranked AS MATERIALIZED (
  SELECT c.oid AS relid, n.nspname AS schemaname, c.relname,
         pg_catalog.pg_stat_get_blocks_fetched(c.oid) - pg_catalog.pg_stat_get_blocks_hit(c.oid) AS heap_blks_read,
         pg_catalog.pg_stat_get_blocks_hit(c.oid) AS heap_blks_hit,
         i.blks_read AS idx_blks_read, i.blks_hit AS idx_blks_hit,
         pg_catalog.pg_stat_get_blocks_fetched(t.oid) - pg_catalog.pg_stat_get_blocks_hit(t.oid) AS toast_blks_read,
         pg_catalog.pg_stat_get_blocks_hit(t.oid) AS toast_blks_hit,
         ti.blks_read AS tidx_blks_read, ti.blks_hit AS tidx_blks_hit,
         {sticky_rank("c.oid", "c.relpages::bigint + COALESCE(t.relpages, 0) + COALESCE(i.pages, 0)")} AS rank
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_catalog.pg_class t ON t.oid = c.reltoastrelid
  LEFT JOIN LATERAL (
    SELECT sum(ic.relpages)::bigint AS pages, {_INDEX_BLOCKS}
    FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class ic ON ic.oid = x.indexrelid
    WHERE x.indrelid = c.oid) i ON true
  LEFT JOIN LATERAL (
    SELECT {_INDEX_BLOCKS} FROM pg_catalog.pg_index x WHERE x.indrelid = t.oid) ti ON true
  WHERE c.relkind IN ('r', 't', 'm')
    AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
)
SELECT relid::bigint AS relid, schemaname::text, relname::text, heap_blks_read, heap_blks_hit,
       idx_blks_read, idx_blks_hit, toast_blks_read, toast_blks_hit, tidx_blks_read, tidx_blks_hit
FROM ranked WHERE rank <= %(top_n)s
UNION ALL
SELECT NULL, '', 'other', COALESCE(sum(heap_blks_read), 0)::bigint, COALESCE(sum(heap_blks_hit), 0)::bigint,
       COALESCE(sum(idx_blks_read), 0)::bigint, COALESCE(sum(idx_blks_hit), 0)::bigint,
       COALESCE(sum(toast_blks_read), 0)::bigint, COALESCE(sum(toast_blks_hit), 0)::bigint,
       COALESCE(sum(tidx_blks_read), 0)::bigint, COALESCE(sum(tidx_blks_hit), 0)::bigint
FROM ranked WHERE rank > %(top_n)s"""

_INDEXES_SQL = f"""
WITH ranked AS MATERIALIZED (
  SELECT s.indexrelid, s.schemaname, s.relname, s.indexrelname, s.idx_blks_read, s.idx_blks_hit,
         {sticky_rank("s.indexrelid", "c.relpages::bigint")} AS rank
  FROM pg_catalog.pg_statio_user_indexes s
  JOIN pg_catalog.pg_class c ON c.oid = s.indexrelid
)
SELECT indexrelid::bigint AS relid, schemaname::text, relname::text, indexrelname::text, idx_blks_read,
       idx_blks_hit
FROM ranked WHERE rank <= %(top_n)s
UNION ALL
SELECT NULL, '', 'other', 'other', COALESCE(sum(idx_blks_read), 0)::bigint, COALESCE(sum(idx_blks_hit), 0)::bigint
FROM ranked WHERE rank > %(top_n)s"""


def fetch_top(session: Session, ctx: RunContext, sql: str | None) -> Rows:
    """Run the ranking query with last run's selection as incumbents, and remember this run's."""
    assert sql is not None
    return query_top(session, ctx, sql, {"top_n": max(0, int(ctx.params["top_n"]))})


TABLE = ("datname", "schemaname", "relname")
INDEX = ("datname", "schemaname", "relname", "indexrelname")

_BOUND = "Largest relations only; the rest in relname=\"other\" (schemaname=\"\")."

STATIO_TABLES = Collector(
    name="pg_statio_user_tables",
    family="cache_hit",
    help="Shared-buffer hits and reads per user table (heap, its indexes, TOAST), for the largest tables "
         "plus a remainder, from pg_statio_user_tables.",
    scope="database",
    interval=300.0,
    timeout=30.0,
    params=(TOP_N,),
    variants=(SqlVariant(sql=_TABLES_SQL, min_version=120000),),
    fetch=fetch_top,
    metrics=(
        counter("pg_statio_user_tables_heap_blks_read_total",
                "Table heap blocks read from outside shared buffers (OS cache or disk).", "heap_blks_read", TABLE),
        counter("pg_statio_user_tables_heap_blks_hit_total", "Table heap blocks found in shared buffers.",
                "heap_blks_hit", TABLE),
        counter("pg_statio_user_tables_idx_blks_read_total",
                "Blocks of the table's indexes read from outside shared buffers (absent: no index).",
                "idx_blks_read", TABLE),
        counter("pg_statio_user_tables_idx_blks_hit_total", "Blocks of the table's indexes found in shared buffers.",
                "idx_blks_hit", TABLE),
        counter("pg_statio_user_tables_toast_blks_read_total",
                "TOAST table blocks read from outside shared buffers (absent: no TOAST table).",
                "toast_blks_read", TABLE),
        counter("pg_statio_user_tables_toast_blks_hit_total", "TOAST table blocks found in shared buffers.",
                "toast_blks_hit", TABLE),
        counter("pg_statio_user_tables_tidx_blks_read_total",
                "TOAST index blocks read from outside shared buffers.", "tidx_blks_read", TABLE),
        counter("pg_statio_user_tables_tidx_blks_hit_total", "TOAST index blocks found in shared buffers.",
                "tidx_blks_hit", TABLE),
    ),
    notes=(
        "Top `top_n` tables by pg_class.relpages of heap + TOAST + indexes (kept current by VACUUM/ANALYZE; "
        "no relation lock is taken, so DDL never holds this up); a table stays in the top until another is "
        f"{STICKINESS:g}x its size. The `relname=\"other\"` row sums all the others, so sums over a "
        "database are exact. Cache hit ratio of a table: "
        "`rate(..._heap_blks_hit_total[5m]) / (rate(..._heap_blks_hit_total[5m]) + "
        "rate(..._heap_blks_read_total[5m]))`."
    ),
)

STATIO_INDEXES = Collector(
    name="pg_statio_user_indexes",
    family="cache_hit",
    help="Shared-buffer hits and reads per user index, for the largest indexes plus a remainder, from "
         "pg_statio_user_indexes.",
    scope="database",
    interval=300.0,
    timeout=30.0,
    params=(TOP_N,),
    variants=(SqlVariant(sql=_INDEXES_SQL, min_version=120000),),
    fetch=fetch_top,
    metrics=(
        counter("pg_statio_user_indexes_idx_blks_read_total",
                "Index blocks read from outside shared buffers. " + _BOUND, "idx_blks_read", INDEX),
        counter("pg_statio_user_indexes_idx_blks_hit_total",
                "Index blocks found in shared buffers. " + _BOUND, "idx_blks_hit", INDEX),
    ),
    notes=(
        "Top `top_n` indexes by pg_class.relpages (no relation lock), chosen independently of the tables; "
        "the rest are summed into `relname=\"other\", indexrelname=\"other\"`."
    ),
)

COLLECTORS = (STATIO_TABLES, STATIO_INDEXES)
