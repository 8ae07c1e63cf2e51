"""Table and index I/O counters (shared-buffer hits and reads) for the largest relations, plus a remainder."""

from __future__ import annotations

from exporter.catalog import Collector, Param
from exporter.collectors import relations
from exporter.collectors._helpers import counter
from exporter.hooks import STICKINESS

TOP_N = Param(
    "top_n", 50,
    "Relations exported one by one, the largest first (pg_class.relpages, no relation lock); the rest "
    "are summed into one `relname=\"other\"` series per database.",
)

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
    variants=relations.VARIANTS,
    fetch=relations.fetch_pass,
    shared_pass=relations.PASS,
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
    variants=relations.VARIANTS,
    fetch=relations.fetch_pass,
    shared_pass=relations.PASS,
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
