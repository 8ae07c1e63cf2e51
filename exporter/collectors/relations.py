"""One pass over a database's relations for the per-relation collectors (vacuum state, cache hit, wraparound).

pg_stat_user_tables, pg_statio_user_tables, pg_statio_user_indexes and pg_table_wraparound all read
pg_class and the per-relation statistics entries. Read separately, each run paid again for what costs:
looking every relation's statistics entry up in shared memory (the first call per relation in a
transaction; later calls hit the transaction's cache) and the views' own joins and GROUP BYs. Here one
query reads pg_class, pg_index and the statistics once and answers every section (the collectors keep
their own names, parameters, top-N choices and metrics); the engine lets the other collectors of the
pass reuse its result when they run within 10 % of their interval of it (see ``Collector.shared_pass``).
What is left costs per relation, so the query does as little per relation as it can: top N by
``ORDER BY ... LIMIT`` (no window sorting every row), remainders as sums over the rows where they
already are (no per-table join or grouping of index counters), names looked up for exported rows only
(docs/benchmarks.md, "Per-relation families in one pass").
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, TypedDict, cast

from exporter.catalog import Rows, SqlVariant
from exporter.db import CollectError
from exporter.hooks import INCUMBENTS, sticky_order

if TYPE_CHECKING:
    from exporter.db import Session
    from exporter.hooks import RunContext

#: The name collectors give in ``shared_pass`` to read their rows from this pass.
PASS = "relations"

STAT_TABLES, STATIO_TABLES, STATIO_INDEXES, WRAPAROUND = (
    "pg_stat_user_tables", "pg_statio_user_tables", "pg_statio_user_indexes", "pg_table_wraparound")
#: Section (collector) -> prefix of its SQL parameters.
PREFIX = {STAT_TABLES: "ut", STATIO_TABLES: "st", STATIO_INDEXES: "si", WRAPAROUND: "wa"}

_FETCHED_MINUS_HIT = "pg_catalog.pg_stat_get_blocks_fetched({0}) - pg_catalog.pg_stat_get_blocks_hit({0})"
_HIT = "pg_catalog.pg_stat_get_blocks_hit({0})"


def _sum(expr: str, where: str = "") -> str:
    """``COALESCE(sum(expr), 0)::bigint``, over the rows matching ``where`` if given."""
    flt = f" FILTER (WHERE {where})" if where else ""
    return f"COALESCE(sum({expr}){flt}, 0)::bigint"


def _sum_or_null(expr: str, where: str) -> str:
    """A sum that is 0 when no row is left over and NULL (no sample) when the server lacks the column."""
    return f"COALESCE(sum({expr}) FILTER (WHERE {where}), 0 * max({expr}))"


def pass_sql(ins_since_vacuum: bool, with_partitioned: bool, vacuum_times: bool) -> str:
    """The one query: a JSON array of rows per section, each as its collector exported it before."""
    ins = "pg_catalog.pg_stat_get_ins_since_vacuum({0})" if ins_since_vacuum else "NULL::bigint"
    times = {
        name: (f"pg_catalog.pg_stat_get_total_{name}_time({{0}})" if vacuum_times else "NULL::float8")
        for name in ("vacuum", "autovacuum", "analyze", "autoanalyze")
    }
    counts = ("vacuum", "autovacuum", "analyze", "autoanalyze")
    stat_kinds = "('r', 'm', 'p')" if with_partitioned else "('r', 'm')"
    epoch = "pg_catalog.date_part('epoch', pg_catalog.pg_stat_get_last_{0}_time(relid)) AS last_{0}"
    top_columns = ",\n         ".join([
        "pg_catalog.pg_stat_get_live_tuples(relid) AS n_live_tup",
        "pg_catalog.pg_stat_get_dead_tuples(relid) AS n_dead_tup",
        "pg_catalog.pg_stat_get_mod_since_analyze(relid) AS n_mod_since_analyze",
        f"{ins.format('relid')} AS n_ins_since_vacuum",
        *[epoch.format(name) for name in counts],
        *[f"pg_catalog.pg_stat_get_{name}_count(relid) AS {name}_count" for name in counts],
        *[f"{times[name].format('relid')} AS total_{name}_time" for name in counts],
    ])
    other_columns = ",\n         ".join([
        f"{_sum('pg_catalog.pg_stat_get_live_tuples(relid)', 'NOT top')} AS n_live_tup",
        f"{_sum('pg_catalog.pg_stat_get_dead_tuples(relid)', 'NOT top')} AS n_dead_tup",
        f"{_sum('pg_catalog.pg_stat_get_mod_since_analyze(relid)', 'NOT top')} AS n_mod_since_analyze",
        f"{_sum_or_null(ins.format('relid'), 'NOT top')}::bigint AS n_ins_since_vacuum",
        *[f"NULL AS last_{name}" for name in counts],
        *[f"{_sum(f'pg_catalog.pg_stat_get_{name}_count(relid)', 'NOT top')} AS {name}_count" for name in counts],
        *[f"{_sum_or_null(times[name].format('relid'), 'NOT top')} AS total_{name}_time" for name in counts],
    ])
    heap_toast = [
        ("heap_blks_read", _FETCHED_MINUS_HIT.format("s.relid")), ("heap_blks_hit", _HIT.format("s.relid")),
        ("toast_blks_read", _FETCHED_MINUS_HIT.format("s.toastid")), ("toast_blks_hit", _HIT.format("s.toastid")),
    ]
    heap_toast_sums = ", ".join(f"{_sum(expr)} AS {name}" for name, expr in heap_toast)
    index_sums = f"{_sum(_FETCHED_MINUS_HIT.format('x.indexrelid'))}, {_sum(_HIT.format('x.indexrelid'))}"
    order = ("heap_blks_read", "heap_blks_hit", "idx_blks_read", "idx_blks_hit",
             "toast_blks_read", "toast_blks_hit", "tidx_blks_read", "tidx_blks_hit")
    statio_top = ", ".join(f"{dict(heap_toast).get(name, name)} AS {name}" for name in order)
    user_tables = f"r.user_table AND r.relkind IN {stat_kinds}"
    statio_tables = "r.user_table AND r.relkind IN ('r', 'm')"
    churn = "pg_catalog.pg_stat_get_tuples_updated(r.relid) + pg_catalog.pg_stat_get_tuples_deleted(r.relid)"
    return f"""
WITH ns AS MATERIALIZED (
  -- user_schema: a schema the pg_stat*_user_* views keep (tested once per schema, not per relation).
  SELECT n.oid, n.nspname::text AS nspname,
         n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast' AS user_schema
  FROM pg_catalog.pg_namespace n
), idx AS MATERIALIZED (
  -- Every index with its table (or TOAST table) and size; statistics are read only where summed or exported.
  -- An index is in its table's schema (it cannot be moved alone), so user_index (a plain index in a user
  -- schema) is an index of a user table or materialized view: pg_statio_user_indexes' rows.
  SELECT x.indexrelid, x.indrelid, ic.relpages AS pages, n.nspname, n.user_schema,
         n.user_schema AND ic.relkind = 'i' AS user_index
  FROM pg_catalog.pg_index x
  JOIN pg_catalog.pg_class ic ON ic.oid = x.indexrelid
  JOIN ns n ON n.oid = ic.relnamespace
), rel AS MATERIALIZED (
  -- Tables, materialized views (and partitioned tables); the size of user tables includes their TOAST table
  -- and indexes (only user tables are ranked by size).
  SELECT c.oid AS relid, n.nspname AS schemaname, c.relname, c.relkind, n.user_schema AS user_table,
         c.relpages::bigint + COALESCE(t.relpages, 0) + COALESCE(i.pages, 0) AS pages,
         NULLIF(c.reltoastrelid, 0) AS toastid, c.relfrozenxid,
         GREATEST(pg_catalog.age(c.relfrozenxid), pg_catalog.age(t.relfrozenxid)) AS xid_age,
         GREATEST(pg_catalog.mxid_age(c.relminmxid), pg_catalog.mxid_age(t.relminmxid)) AS mxid_age
  FROM pg_catalog.pg_class c
  JOIN ns n ON n.oid = c.relnamespace
  LEFT JOIN (SELECT t.oid, t.relpages, t.relfrozenxid, t.relminmxid FROM pg_catalog.pg_class t WHERE t.relkind = 't') t
    ON t.oid = c.reltoastrelid
  -- Index sizes only rank tables: not read when only the wraparound section runs.
  LEFT JOIN (SELECT indrelid, sum(pages) AS pages FROM idx WHERE (%(ut_on)s OR %(st_on)s) AND user_schema
             GROUP BY indrelid) i ON i.indrelid = c.oid
  WHERE c.relkind IN ('r', 'm', 'p')
), ut_top AS (
  -- Top N by size and by churn: ORDER BY ... LIMIT keeps N rows in a heap instead of sorting them all.
  (SELECT r.relid FROM rel r WHERE %(ut_on)s AND {user_tables}
   ORDER BY {sticky_order("r.relid", "r.pages", "ut_incumbents")} LIMIT %(ut_top_n)s)
  UNION ALL
  (SELECT r.relid FROM rel r WHERE %(ut_on)s AND {user_tables}
   ORDER BY {sticky_order("r.relid", churn, "ut_incumbents")} LIMIT %(ut_top_n_churn)s)
), ut AS MATERIALIZED (
  SELECT r.relid, r.relid IN (SELECT relid FROM ut_top) AS top FROM rel r WHERE %(ut_on)s AND {user_tables}
), st_top AS (
  SELECT r.relid FROM rel r WHERE %(st_on)s AND {statio_tables}
  ORDER BY {sticky_order("r.relid", "r.pages", "st_incumbents")} LIMIT %(st_top_n)s
), si_top AS (
  SELECT x.indexrelid, x.indrelid, x.nspname FROM idx x WHERE %(si_on)s AND x.user_index
  ORDER BY {sticky_order("x.indexrelid", "x.pages::bigint", "si_incumbents")} LIMIT %(si_top_n)s
), wa AS (
  -- Every schema: system catalogs and other sessions' temporary tables need freezing too.
  SELECT r.relid, r.schemaname, r.relname, r.xid_age, r.mxid_age
  FROM rel r WHERE %(wa_on)s AND r.relkind IN ('r', 'm') AND r.relfrozenxid <> '0'::xid
)
SELECT '{STAT_TABLES}' AS section, (SELECT pg_catalog.json_agg(s) FROM (
  SELECT relid::bigint AS relid, schemaname, relname::text AS relname,
         {top_columns}
  FROM rel WHERE %(ut_on)s AND relid IN (SELECT relid FROM ut_top)
  UNION ALL
  SELECT NULL, '', 'other',
         {other_columns}
  FROM ut WHERE %(ut_on)s) s) AS rows
UNION ALL
SELECT '{STATIO_TABLES}', (SELECT pg_catalog.json_agg(s) FROM (
  SELECT s.relid::bigint AS relid, s.schemaname, s.relname::text AS relname, {statio_top}
  FROM rel s
  -- The exported tables' index counters: a few lookups through pg_index's index on indrelid (NULL sums, no
  -- sample, for a table without indexes or TOAST table).
  LEFT JOIN LATERAL (SELECT sum({_FETCHED_MINUS_HIT.format("x.indexrelid")})::bigint AS idx_blks_read,
                            sum({_HIT.format("x.indexrelid")})::bigint AS idx_blks_hit
                     FROM pg_catalog.pg_index x WHERE x.indrelid = s.relid) i ON true
  LEFT JOIN LATERAL (SELECT sum({_FETCHED_MINUS_HIT.format("x.indexrelid")})::bigint AS tidx_blks_read,
                            sum({_HIT.format("x.indexrelid")})::bigint AS tidx_blks_hit
                     FROM pg_catalog.pg_index x WHERE x.indrelid = s.toastid) ti ON true
  WHERE %(st_on)s AND s.relid IN (SELECT relid FROM st_top)
  UNION ALL
  -- The rest: heap and TOAST of the other tables; their indexes (user_index: a user table's) and TOAST indexes.
  SELECT NULL, '', 'other', h.heap_blks_read, h.heap_blks_hit, i.*, h.toast_blks_read, h.toast_blks_hit, ti.*
  FROM (SELECT {heap_toast_sums} FROM rel s
        WHERE %(st_on)s AND s.user_table AND s.relkind IN ('r', 'm') AND s.relid NOT IN (SELECT relid FROM st_top)) h,
       (SELECT {index_sums} FROM idx x
        WHERE %(st_on)s AND x.user_index AND x.indrelid NOT IN (SELECT relid FROM st_top)) i,
       (SELECT {index_sums} FROM idx x
        WHERE %(st_on)s AND x.indrelid IN (SELECT r.toastid FROM rel r WHERE {statio_tables}
                                           AND r.relid NOT IN (SELECT relid FROM st_top))) ti) s)
UNION ALL
SELECT '{STATIO_INDEXES}', (SELECT pg_catalog.json_agg(s) FROM (
  SELECT x.indexrelid::bigint AS relid, x.nspname AS schemaname,
         (SELECT c.relname::text FROM pg_catalog.pg_class c WHERE c.oid = x.indrelid) AS relname,
         (SELECT c.relname::text FROM pg_catalog.pg_class c WHERE c.oid = x.indexrelid) AS indexrelname,
         {_FETCHED_MINUS_HIT.format("x.indexrelid")} AS idx_blks_read, {_HIT.format("x.indexrelid")} AS idx_blks_hit
  FROM si_top x
  UNION ALL
  SELECT NULL, '', 'other', 'other', {index_sums}
  FROM idx x WHERE %(si_on)s AND x.user_index AND x.indexrelid NOT IN (SELECT indexrelid FROM si_top)) s)
UNION ALL
SELECT '{WRAPAROUND}', (SELECT pg_catalog.json_agg(s) FROM (
  SELECT schemaname, relname::text AS relname, xid_age AS table_xid_age, mxid_age AS table_mxid_age,
         NULL::int AS oldest_xid_age, NULL::int AS oldest_mxid_age
  FROM wa WHERE relid IN ((SELECT relid FROM wa ORDER BY xid_age DESC, relid LIMIT %(wa_top_n)s)
                          UNION ALL (SELECT relid FROM wa ORDER BY mxid_age DESC, relid LIMIT %(wa_top_n)s))
  UNION ALL
  SELECT NULL, NULL, NULL, NULL, max(xid_age), max(mxid_age) FROM wa WHERE %(wa_on)s) s)"""


#: The same variants for every collector of the pass (they share one query).
VARIANTS = (
    SqlVariant(min_version=120000, max_version=130000, sql=pass_sql(False, False, False)),
    SqlVariant(min_version=130000, max_version=140000, sql=pass_sql(True, False, False)),
    SqlVariant(min_version=140000, max_version=180000, sql=pass_sql(True, True, False)),
    SqlVariant(min_version=180000, sql=pass_sql(True, True, True)),
)


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


def add_sizes(session: Session, rows: Rows, relids: list[int]) -> None:
    """Add pg_relation_size and pg_total_relation_size to the rows of the tables exported one by one."""
    sizes = _sizes(session, relids)
    for row in rows:
        size = sizes.get(row["relid"]) if row["relid"] is not None else None
        if size is not None:
            row["relation_size"] = size["relation_size"]
            row["total_relation_size"] = size["total_relation_size"]


def fetch_pass(session: Session, ctx: RunContext, sql: str | None) -> Rows:
    """Run the pass for this collector and the others of it due soon; keep their sections, return ours."""
    assert sql is not None
    wanted = {name: peer for name, peer in ctx.peers.items() if name == ctx.collector or peer.due}
    params: dict[str, Any] = {}
    for name, prefix in PREFIX.items():
        peer = wanted.get(name)
        params[f"{prefix}_on"] = peer is not None
        params[f"{prefix}_top_n"] = max(0, int(peer.params.get("top_n", 0))) if peer else 0
        params[f"{prefix}_incumbents"] = list(peer.state.get(INCUMBENTS, ())) if peer else []
    stat_tables = wanted.get(STAT_TABLES)
    params["ut_top_n_churn"] = max(0, int(stat_tables.params.get("top_n_churn", 0))) if stat_tables else 0
    sections: dict[str, Rows] = {
        r["section"]: list(r["rows"] or []) for r in session.query(sql, params) if r["section"] in wanted
    }
    for name, peer in wanted.items():
        if name != WRAPAROUND:  # sticky top-N sections: this run's choice is next run's incumbents
            peer.state[INCUMBENTS] = [row["relid"] for row in sections.get(name, []) if row["relid"] is not None]
    if stat_tables is not None:
        add_sizes(session, sections.get(STAT_TABLES, []), list(stat_tables.state[INCUMBENTS]))
    ctx.shared_result(sections)
    return sections.get(ctx.collector, [])
