"""Vacuum state, dead tuples and sizes of the largest and busiest tables; database sizes; wraparound ages."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, TypedDict, cast

from exporter.catalog import Collector, Param, Rows, SqlVariant
from exporter.collectors._helpers import MS, counter, gauge
from exporter.db import CollectError
from exporter.hooks import INCUMBENTS, STICKINESS, query_top, sticky_rank

if TYPE_CHECKING:
    from exporter.db import Session
    from exporter.hooks import RunContext

TABLE = ("datname", "schemaname", "relname")

TOP_N = Param(
    "top_n", 30,
    "Tables exported one by one, the largest first (pg_class.relpages of heap, TOAST and indexes: no "
    "relation lock); the rest are summed into one `relname=\"other\"` series per database.",
)
TOP_N_CHURN = Param(
    "top_n_churn", 10,
    "Also exported: the tables with the most rows updated and deleted since statistics were reset (where "
    "dead tuples come from), however small.",
)

_COUNTS = "s.vacuum_count, s.autovacuum_count, s.analyze_count, s.autoanalyze_count"
_TIMES_NULL = ("NULL::float8 AS total_vacuum_time, NULL::float8 AS total_autovacuum_time, "
               "NULL::float8 AS total_analyze_time, NULL::float8 AS total_autoanalyze_time")
_TIMES_18 = "s.total_vacuum_time, s.total_autovacuum_time, s.total_analyze_time, s.total_autoanalyze_time"


def _tables_sql(ins_since_vacuum: str, times: str) -> str:
    """Top tables by size and by churn (with incumbents favoured), plus one remainder row."""
    return f"""
WITH index_pages AS (
  SELECT x.indrelid, sum(ic.relpages)::bigint AS pages
  FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class ic ON ic.oid = x.indexrelid
  GROUP BY x.indrelid
), base AS MATERIALIZED (
  SELECT s.relid, s.schemaname::text AS schemaname, s.relname::text AS relname,
         s.n_live_tup, s.n_dead_tup, s.n_mod_since_analyze, {ins_since_vacuum},
         s.last_vacuum, s.last_autovacuum, s.last_analyze, s.last_autoanalyze, {_COUNTS}, {times},
         c.relpages::bigint + COALESCE(t.relpages, 0) + COALESCE(i.pages, 0) AS pages,
         s.n_tup_upd + s.n_tup_del AS churn
  FROM pg_catalog.pg_stat_user_tables s
  JOIN pg_catalog.pg_class c ON c.oid = s.relid
  LEFT JOIN pg_catalog.pg_class t ON t.oid = c.reltoastrelid
  LEFT JOIN index_pages i ON i.indrelid = s.relid
), ranked AS MATERIALIZED (
  SELECT b.*,
         {sticky_rank("b.relid", "b.pages")} <= %(top_n)s
         OR {sticky_rank("b.relid", "b.churn")} <= %(top_n_churn)s AS top
  FROM base b
)
SELECT relid::bigint AS relid, schemaname, relname, n_live_tup, n_dead_tup, n_mod_since_analyze, n_ins_since_vacuum,
       pg_catalog.date_part('epoch', last_vacuum) AS last_vacuum,
       pg_catalog.date_part('epoch', last_autovacuum) AS last_autovacuum,
       pg_catalog.date_part('epoch', last_analyze) AS last_analyze,
       pg_catalog.date_part('epoch', last_autoanalyze) AS last_autoanalyze,
       vacuum_count, autovacuum_count, analyze_count, autoanalyze_count,
       total_vacuum_time, total_autovacuum_time, total_analyze_time, total_autoanalyze_time
FROM ranked WHERE top
UNION ALL
SELECT NULL, '', 'other', COALESCE(sum(n_live_tup) FILTER (WHERE NOT top), 0)::bigint,
       COALESCE(sum(n_dead_tup) FILTER (WHERE NOT top), 0)::bigint,
       COALESCE(sum(n_mod_since_analyze) FILTER (WHERE NOT top), 0)::bigint,
       -- 0 when no table is left over, NULL (no sample) when this server has no such column
       COALESCE(sum(n_ins_since_vacuum) FILTER (WHERE NOT top), 0 * max(n_ins_since_vacuum))::bigint,
       NULL, NULL, NULL, NULL,
       COALESCE(sum(vacuum_count) FILTER (WHERE NOT top), 0)::bigint,
       COALESCE(sum(autovacuum_count) FILTER (WHERE NOT top), 0)::bigint,
       COALESCE(sum(analyze_count) FILTER (WHERE NOT top), 0)::bigint,
       COALESCE(sum(autoanalyze_count) FILTER (WHERE NOT top), 0)::bigint,
       COALESCE(sum(total_vacuum_time) FILTER (WHERE NOT top), 0 * max(total_vacuum_time)),
       COALESCE(sum(total_autovacuum_time) FILTER (WHERE NOT top), 0 * max(total_autovacuum_time)),
       COALESCE(sum(total_analyze_time) FILTER (WHERE NOT top), 0 * max(total_analyze_time)),
       COALESCE(sum(total_autoanalyze_time) FILTER (WHERE NOT top), 0 * max(total_autoanalyze_time))
FROM ranked"""


# These take an ACCESS SHARE lock per relation (released right after); lock_timeout bounds the wait.
_SIZES_SQL = """
SELECT r.relid::bigint AS relid, pg_catalog.pg_relation_size(r.relid) AS relation_size,
       pg_catalog.pg_total_relation_size(r.relid) AS total_relation_size
FROM pg_catalog.unnest(%(relids)s::oid[]) AS r(relid)"""


class Sizes(TypedDict):
    """One table's sizes, as _SIZES_SQL returns them."""

    relid: int
    relation_size: int | None
    total_relation_size: int | None


def _sizes(session: Session, relids: list[int]) -> dict[int, Sizes]:
    """Sizes of the given tables; one that cannot be measured now (lock, dropped) is left out."""
    if not relids:
        return {}
    locked = session.locked_tables(relids)
    wanted = [r for r in relids if r not in locked]

    def read(ids: list[int]) -> list[Sizes]:
        return cast(list[Sizes], session.query(_SIZES_SQL, {"relids": ids}))

    batch = session.attempt(partial(read, wanted))
    if isinstance(batch, CollectError):
        if batch.reason != "lock_timeout":
            return {}  # no sizes this run (the run's other series stand)
        # One relation's lock (taken by DDL after the pg_locks check) made the batch give up: go one by one.
        batch = []
        for relid in wanted:
            one = session.attempt(partial(read, [relid]))
            if not isinstance(one, CollectError):
                batch.extend(one)
    return {row["relid"]: row for row in batch if row["relation_size"] is not None}


def fetch_tables(session: Session, ctx: RunContext, sql: str | None) -> Rows:
    """Rank with last run's selection as incumbents, then add sizes for the chosen tables."""
    assert sql is not None
    rows = query_top(session, ctx, sql, {
        "top_n": max(0, int(ctx.params["top_n"])),
        "top_n_churn": max(0, int(ctx.params["top_n_churn"])),
    })
    sizes = _sizes(session, list(ctx.state[INCUMBENTS]))
    for row in rows:
        size = sizes.get(row["relid"])
        if size is not None:
            row["relation_size"] = size["relation_size"]
            row["total_relation_size"] = size["total_relation_size"]
    return rows


_OTHER = " The relname=\"other\" series sums the tables not exported one by one."

STAT_USER_TABLES = Collector(
    name="pg_stat_user_tables",
    family="vacuum",
    help="Dead and live tuples, vacuum and analyze history, and sizes of the largest and busiest user tables, from "
         "pg_stat_user_tables.",
    scope="database",
    interval=300.0,
    timeout=60.0,
    params=(TOP_N, TOP_N_CHURN),
    variants=(
        SqlVariant(min_version=120000, max_version=130000,
                   sql=_tables_sql("NULL::bigint AS n_ins_since_vacuum", _TIMES_NULL)),
        SqlVariant(min_version=130000, max_version=180000, sql=_tables_sql("s.n_ins_since_vacuum", _TIMES_NULL)),
        SqlVariant(min_version=180000, sql=_tables_sql("s.n_ins_since_vacuum", _TIMES_18)),
    ),
    fetch=fetch_tables,
    metrics=(
        gauge("pg_stat_user_tables_n_live_tup", "Estimated live rows." + _OTHER, "n_live_tup", TABLE),
        gauge("pg_stat_user_tables_n_dead_tup",
              "Estimated dead rows (removed by the next VACUUM)." + _OTHER, "n_dead_tup", TABLE),
        gauge("pg_stat_user_tables_n_mod_since_analyze", "Rows modified since the table was last analyzed.",
              "n_mod_since_analyze", TABLE),
        gauge("pg_stat_user_tables_n_ins_since_vacuum", "Rows inserted since the table was last vacuumed (13+).",
              "n_ins_since_vacuum", TABLE),
        gauge("pg_stat_user_tables_last_vacuum_timestamp_seconds",
              "Last manual VACUUM of the table (Unix time); absent if never.", "last_vacuum", TABLE, unit="seconds"),
        gauge("pg_stat_user_tables_last_autovacuum_timestamp_seconds",
              "Last autovacuum of the table (Unix time); absent if never.", "last_autovacuum", TABLE,
              unit="seconds"),
        gauge("pg_stat_user_tables_last_analyze_timestamp_seconds",
              "Last manual ANALYZE of the table (Unix time); absent if never.", "last_analyze", TABLE,
              unit="seconds"),
        gauge("pg_stat_user_tables_last_autoanalyze_timestamp_seconds",
              "Last autoanalyze of the table (Unix time); absent if never.", "last_autoanalyze", TABLE,
              unit="seconds"),
        counter("pg_stat_user_tables_vacuum_count_total", "Manual VACUUMs of the table.", "vacuum_count", TABLE),
        counter("pg_stat_user_tables_autovacuum_count_total", "Autovacuums of the table.", "autovacuum_count",
                TABLE),
        counter("pg_stat_user_tables_analyze_count_total", "Manual ANALYZEs of the table.", "analyze_count", TABLE),
        counter("pg_stat_user_tables_autoanalyze_count_total", "Autoanalyzes of the table.", "autoanalyze_count",
                TABLE),
        counter("pg_stat_user_tables_vacuum_time_seconds_total", "Time spent in manual VACUUMs of the table (18+).",
                "total_vacuum_time", TABLE, unit="seconds", scale=MS),
        counter("pg_stat_user_tables_autovacuum_time_seconds_total", "Time spent in autovacuums of the table (18+).",
                "total_autovacuum_time", TABLE, unit="seconds", scale=MS),
        counter("pg_stat_user_tables_analyze_time_seconds_total", "Time spent in manual ANALYZEs of the table (18+).",
                "total_analyze_time", TABLE, unit="seconds", scale=MS),
        counter("pg_stat_user_tables_autoanalyze_time_seconds_total",
                "Time spent in autoanalyzes of the table (18+).", "total_autoanalyze_time", TABLE, unit="seconds",
                scale=MS),
        gauge("pg_relation_size_bytes",
              "Size of the table's main data (pg_relation_size); absent while DDL holds or awaits its lock.",
              "relation_size", TABLE, unit="bytes"),
        gauge("pg_total_relation_size_bytes",
              "Size of the table with its indexes and TOAST data (pg_total_relation_size); absent while DDL holds "
              "or awaits a lock on it.", "total_relation_size", TABLE, unit="bytes"),
    ),
    notes=(
        "Tables exported one by one: the `top_n` largest by pg_class.relpages of heap + TOAST + indexes (no relation "
        "lock) and the `top_n_churn` with the most rows updated and deleted; an exported table stays until "
        f"another is {STICKINESS:g}x larger or busier. The `relname=\"other\"` row (schemaname=\"\") sums tuple "
        "counts and vacuum counts of the rest. Sizes take an ACCESS SHARE lock per table: tables with an ACCESS "
        "EXCLUSIVE lock held or requested in pg_locks are skipped for that run, and lock_timeout bounds any other "
        "wait; only the size series of that table goes missing."
    ),
)

DATABASE_SIZE = Collector(
    name="pg_database_size",
    family="vacuum",
    help="On-disk size of each database (pg_database_size: walks the database's files, so it runs rarely).",
    interval=300.0,
    timeout=60.0,
    variants=(
        SqlVariant(
            min_version=120000,
            # Without CONNECT on a database (and without pg_read_all_stats, which pg_monitor has) the
            # function raises: such a database yields no sample instead of failing the run.
            sql="""
SELECT d.datname,
       CASE WHEN pg_catalog.has_database_privilege(d.oid, 'CONNECT')
                 OR pg_catalog.pg_has_role('pg_read_all_stats', 'MEMBER')
            THEN pg_catalog.pg_database_size(d.oid) END AS size_bytes
FROM pg_catalog.pg_database d WHERE NOT d.datistemplate""",
        ),
    ),
    metrics=(gauge("pg_database_size_bytes", "On-disk size of the database.", "size_bytes", ("datname",),
                   unit="bytes"),),
)

DATABASE_WRAPAROUND = Collector(
    name="pg_database_wraparound",
    family="vacuum",
    help="Transaction ID and multixact ID age of each database (pg_database), including templates: the distance "
         "to an anti-wraparound vacuum and, beyond about 2 billion, to a shutdown.",
    interval=60.0,
    timeout=5.0,
    variants=(
        SqlVariant(
            min_version=120000,
            sql="""
SELECT d.datname, pg_catalog.age(d.datfrozenxid) AS xid_age, pg_catalog.mxid_age(d.datminmxid) AS mxid_age
FROM pg_catalog.pg_database d""",
        ),
    ),
    metrics=(
        gauge("pg_database_xid_age",
              "Age of the database's oldest unfrozen transaction ID, age(datfrozenxid); autovacuum forces a "
              "freeze at pg_settings_autovacuum_freeze_max_age.", "xid_age", ("datname",), unit="transactions"),
        gauge("pg_database_mxid_age",
              "Age of the database's oldest multixact ID, mxid_age(datminmxid); compare with "
              "pg_settings_autovacuum_multixact_freeze_max_age.", "mxid_age", ("datname",), unit="multixacts"),
    ),
)

WRAPAROUND_TOP_N = Param(
    "top_n", 5,
    "Tables exported one by one: the oldest by transaction ID age, and the oldest by multixact ID age.",
)

# Heap, materialized view and TOAST relations carry relfrozenxid; a TOAST table counts for its owner.
# Temporary tables are included: autovacuum cannot freeze them, only the session that owns them can.
_TABLE_AGES_SQL = """
WITH ages AS (
  SELECT COALESCE(o.oid, c.oid) AS oid, pg_catalog.age(c.relfrozenxid) AS xid_age,
         pg_catalog.mxid_age(c.relminmxid) AS mxid_age
  FROM pg_catalog.pg_class c
  LEFT JOIN pg_catalog.pg_class o ON c.relkind = 't' AND o.reltoastrelid = c.oid
  WHERE c.relkind IN ('r', 'm', 't') AND c.relfrozenxid <> '0'::xid
), per_table AS MATERIALIZED (
  SELECT a.oid, max(a.xid_age) AS xid_age, max(a.mxid_age) AS mxid_age,
         pg_catalog.row_number() OVER (ORDER BY max(a.xid_age) DESC, a.oid) AS xid_rank,
         pg_catalog.row_number() OVER (ORDER BY max(a.mxid_age) DESC, a.oid) AS mxid_rank
  FROM ages a GROUP BY a.oid
)
SELECT n.nspname::text AS schemaname, c.relname::text AS relname, p.xid_age AS table_xid_age,
       p.mxid_age AS table_mxid_age, NULL::int AS oldest_xid_age, NULL::int AS oldest_mxid_age
FROM per_table p
JOIN pg_catalog.pg_class c ON c.oid = p.oid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE p.xid_rank <= %(top_n)s OR p.mxid_rank <= %(top_n)s
UNION ALL
SELECT NULL, NULL, NULL, NULL, max(xid_age), max(mxid_age) FROM per_table"""

TABLE_WRAPAROUND = Collector(
    name="pg_table_wraparound",
    family="vacuum",
    help="The oldest tables by transaction ID and multixact ID age in each database (pg_class.relfrozenxid, "
         "relminmxid; TOAST counted with its table).",
    scope="database",
    interval=300.0,
    timeout=30.0,
    params=(WRAPAROUND_TOP_N,),
    variants=(SqlVariant(sql=_TABLE_AGES_SQL, min_version=120000),),
    metrics=(
        gauge("pg_database_oldest_table_xid_age",
              "Transaction ID age of the database's oldest table, age(relfrozenxid): what VACUUM must freeze "
              "before the database's age can go down.", "oldest_xid_age", ("datname",), unit="transactions"),
        gauge("pg_database_oldest_table_mxid_age", "Multixact ID age of the database's oldest table, "
              "mxid_age(relminmxid).", "oldest_mxid_age", ("datname",), unit="multixacts"),
        gauge("pg_table_xid_age", "Transaction ID age of one of the oldest tables (its TOAST table included).",
              "table_xid_age", TABLE, unit="transactions"),
        gauge("pg_table_mxid_age", "Multixact ID age of one of the oldest tables (its TOAST table included).",
              "table_mxid_age", TABLE, unit="multixacts"),
    ),
    notes=(
        "Includes system catalogs and other sessions' temporary tables (which autovacuum cannot freeze). "
        "Compare with `pg_settings_autovacuum_freeze_max_age`: autovacuum starts an anti-wraparound vacuum of a "
        "table whose age passes it; writes stop near 2^31 (about 2.1 billion)."
    ),
)

COLLECTORS = (STAT_USER_TABLES, DATABASE_SIZE, DATABASE_WRAPAROUND, TABLE_WRAPAROUND)
