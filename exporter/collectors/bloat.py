"""Table and btree index bloat: a statistical estimate from the catalog, and measured figures from pgstattuple."""

from __future__ import annotations

import math
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from psycopg import sql as pgsql

from exporter.catalog import Collector, Param, Rows, SqlVariant
from exporter.collectors._helpers import gauge
from exporter.db import CollectError

if TYPE_CHECKING:
    from exporter.db import Session
    from exporter.hooks import RunContext

TABLE = ("datname", "schemaname", "relname", "method")
INDEX = ("datname", "schemaname", "relname", "indexrelname", "method")

#: An estimate this far below zero (share of the relation's pages) means the model does not fit the
#: relation (statistics older than the data, more btree deduplication than n_distinct suggests): it is
#: reported as "model_mismatch" instead of as a number. Smaller negative figures are noise around zero
#: and read as 0.
MISMATCH_BELOW = -0.2

TOP_N = Param(
    "top_n", 20,
    "Tables and (separately) indexes exported one by one, most bloat bytes first; the rest are summed "
    "into one `relname=\"other\"` series per database.",
)
MIN_SIZE = Param(
    "min_size_bytes", 1048576,
    "Relations smaller than this (pg_class.relpages) are not estimated: one page of error is a large "
    "share of a tiny relation, and its bloat costs nothing.",
)

# --------------------------------------------------------------------------------------------------
# The statistical estimate.
#
# For each table and btree index: the size its live rows would take if freshly packed at the
# relation's fillfactor, from row counts (pg_class.reltuples) and per-column average widths and null
# fractions (pg_stats); bloat is the allocated size (pg_class.relpages) minus that. Everything read is
# catalog data: no relation lock, no scan of a user relation. relpages and reltuples are written
# together by VACUUM and ANALYZE, so the pair is consistent even when it is not recent.
#
# Tuple layout modelled: heap tuple header 23 bytes plus a null bitmap when a column has NULLs,
# aligned to 8; index tuple header 8 bytes (16 with a null bitmap); column data with alignment
# padding (two passes of a running offset converge for ordinary layouts); short varlena values
# (under 127 bytes, 1-byte header) unaligned; TOASTed values count as the pointer they leave in the
# row, because that is what pg_stats.avg_width measures; 4-byte line pointer per tuple; page header
# 24 bytes, btree special space 16 bytes. TOAST tables are not estimated (they have no statistics).
_ESTIMATE_SQL = """
WITH const AS (
  SELECT pg_catalog.current_setting('block_size')::float8 AS bs,
         pg_catalog.current_setting('server_version_num')::int >= 130000 AS has_dedup
), rels AS MATERIALIZED (
  SELECT c.oid, n.nspname::text AS nspname, c.relname::text AS relname,
         CASE WHEN c.relkind = 'i' THEN 'index' ELSE 'table' END AS kind,
         c.relpages::float8 AS relpages, c.reltuples::float8 AS reltuples, c.relnatts::float8 AS relnatts,
         c.reloptions, i.indkey, i.indclass, i.indrelid, i.indisunique, i.indnatts, i.indnkeyatts,
         t.relname::text AS tablename, GREATEST(t.reltuples, 0)::float8 AS table_reltuples,
         COALESCE((SELECT pg_catalog.substr(o, 12)::float8 FROM pg_catalog.unnest(c.reloptions) AS o
                   WHERE pg_catalog.left(o, 11) = 'fillfactor='),
                  CASE WHEN c.relkind = 'i' THEN 90 ELSE 100 END) AS fillfactor,
         CASE
           WHEN c.relkind = 'i' AND (am.amname <> 'btree' OR NOT i.indisvalid) THEN 'unsupported'
           -- relpages and reltuples are 0 until the first VACUUM or ANALYZE (14+: reltuples -1)
           WHEN c.reltuples < 0 OR (c.relpages = 0 AND c.relkind <> 'i' AND COALESCE(
                  pg_catalog.pg_stat_get_last_vacuum_time(c.oid), pg_catalog.pg_stat_get_last_autovacuum_time(c.oid),
                  pg_catalog.pg_stat_get_last_analyze_time(c.oid),
                  pg_catalog.pg_stat_get_last_autoanalyze_time(c.oid)) IS NULL) THEN 'not_analyzed'
           WHEN c.relpages * (SELECT bs FROM const) < %(min_size_bytes)s THEN 'too_small'
         END AS early_status
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid
  LEFT JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
  LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam
  WHERE c.relpersistence <> 't' AND n.nspname <> 'pg_toast'
    AND (c.relkind IN ('r', 'm') OR (c.relkind = 'i' AND t.relkind IN ('r', 'm')))
), candidates AS MATERIALIZED (
  -- The relations to estimate, and whether this role may read any of their table's columns: pg_stats
  -- shows nothing for the others, so they are not looked up. Column grants are rare: the cheap
  -- table-level check first, the per-column one only where some column carries an ACL.
  SELECT r.*,
         pg_catalog.has_table_privilege(COALESCE(r.indrelid, r.oid), 'SELECT')
         OR (COALESCE(r.indrelid, r.oid) IN (SELECT a.attrelid FROM pg_catalog.pg_attribute a
                                             WHERE a.attacl IS NOT NULL)
             AND pg_catalog.has_any_column_privilege(COALESCE(r.indrelid, r.oid), 'SELECT')) AS readable
  FROM rels r WHERE r.early_status IS NULL
), stat_keys AS (
  -- Whose statistics are needed: a table's own; an index's table's, and for an index on expressions
  -- the index's own (statistics of index expressions are filed under the index's name).
  SELECT r.nspname, CASE WHEN r.kind = 'index' THEN r.tablename ELSE r.relname END AS relname
  FROM candidates r WHERE r.readable
  UNION
  SELECT r.nspname, r.relname FROM candidates r WHERE r.readable AND r.kind = 'index' AND 0 = ANY (r.indkey::int2[])
), stats AS MATERIALIZED (
  -- One look-up per relation (OFFSET 0 keeps it a parameterized scan of the view): pg_stats otherwise
  -- checks column privileges on every column of every table before joining.
  SELECT k.nspname, k.relname, s.attname, s.null_frac, s.avg_width, s.n_distinct
  FROM stat_keys k
  CROSS JOIN LATERAL (
    SELECT v.attname::text AS attname, v.null_frac::float8 AS null_frac, v.avg_width::float8 AS avg_width,
           v.n_distinct::float8 AS n_distinct
    FROM pg_catalog.pg_stats v
    WHERE v.schemaname = k.nspname::name AND v.tablename = k.relname::name AND NOT v.inherited
    OFFSET 0) AS s
), cols AS (
  SELECT r.oid, a.attnum, s.null_frac, s.avg_width,
         (1 - COALESCE(s.null_frac, 0)) * COALESCE(s.avg_width, 0) AS width,
         1 - COALESCE(s.null_frac, 0) AS present,
         CASE WHEN a.attlen = -1 AND a.attstorage <> 'p' AND COALESCE(s.avg_width, 0) < 127 THEN 1
              WHEN a.attalign = 'd' THEN 8 WHEN a.attalign = 'i' THEN 4 WHEN a.attalign = 's' THEN 2
              ELSE 1 END AS align,
         a.attlen < 0 OR s.null_frac > 0 AS variable,
         -- distinct values of an index key column, NULL counting as one more (for deduplication)
         CASE WHEN r.kind = 'index' AND a.attnum <= r.indnkeyatts THEN
           CASE WHEN s.n_distinct >= 0 THEN s.n_distinct ELSE -s.n_distinct * r.table_reltuples END
           + CASE WHEN s.null_frac > 0 THEN 1 ELSE 0 END END AS key_distinct
  FROM candidates r
  JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_catalog.pg_attribute ta
    ON r.kind = 'index' AND ta.attrelid = r.indrelid AND ta.attnum = r.indkey[a.attnum - 1]
   AND r.indkey[a.attnum - 1] <> 0
  LEFT JOIN stats s
    ON s.nspname = r.nspname
   AND s.relname = CASE WHEN ta.attname IS NOT NULL THEN r.tablename ELSE r.relname END
   AND s.attname = COALESCE(ta.attname, a.attname)::text
  WHERE r.readable
), pass1 AS (
  SELECT c.*, COALESCE(sum(c.width) OVER w, 0) AS offset1
  FROM cols c WINDOW w AS (PARTITION BY c.oid ORDER BY c.attnum ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
), pass2 AS (
  SELECT p.*, COALESCE(sum(p.width + p.present * pg_catalog.mod(
           (p.align - pg_catalog.mod(ceil(p.offset1)::int, p.align)), p.align)) OVER w, 0) AS offset2,
         -- the last column always present at a fixed, 8-aligned size: it fixes the tuple's length modulo 8
         max(p.attnum) FILTER (WHERE p.align = 8 AND NOT p.variable) OVER (PARTITION BY p.oid) AS last_fixed8
  FROM pass1 p WINDOW w AS (PARTITION BY p.oid ORDER BY p.attnum ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
), tuples AS (
  SELECT p.oid, count(*) AS ncols, count(p.avg_width) AS nstats,
         sum(p.width + p.present * pg_catalog.mod(
           (p.align - pg_catalog.mod(ceil(p.offset2)::int, p.align)), p.align)) AS data_width,
         COALESCE(bool_or(p.null_frac > 0), false) AS has_nulls,
         COALESCE(bool_or(p.variable AND p.attnum > COALESCE(p.last_fixed8, 0)), false) AS variable,
         exp(sum(ln(GREATEST(p.key_distinct, 1)))) AS key_distinct
  FROM pass2 p GROUP BY p.oid
), sized AS (
  SELECT r.*, COALESCE(t.ncols, 0) AS ncols, COALESCE(t.nstats, 0) AS nstats, t.key_distinct,
         -- the tuple's header (aligned) and data; MAXALIGN of a fixed size, plus 3.5 bytes on average
         -- when the length after the last fixed 8-aligned column varies from row to row
         (CASE WHEN r.kind = 'table'
               THEN 8 * ceil((23 + CASE WHEN t.has_nulls THEN ceil(r.relnatts / 8) ELSE 0 END) / 8)
               ELSE CASE WHEN t.has_nulls THEN 16 ELSE 8 END END
          + COALESCE(t.data_width, 0)) AS unaligned,
         COALESCE(t.variable, false) AS variable,
         -- 13+: a non-unique btree of key columns whose operator classes allow it stores duplicates
         -- once, followed by a list of 6-byte heap pointers (deduplication)
         r.kind = 'index' AND (SELECT has_dedup FROM const) AND NOT r.indisunique AND r.indnkeyatts = r.indnatts
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.unnest(r.reloptions) AS o
                           WHERE pg_catalog.lower(o) IN ('deduplicate_items=off', 'deduplicate_items=false',
                                                         'deduplicate_items=0', 'deduplicate_items=no'))
           AND NOT EXISTS (
             SELECT 1 FROM pg_catalog.unnest(r.indclass::oid[]) AS k(opclass)
             JOIN pg_catalog.pg_opclass oc ON oc.oid = k.opclass
             WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_amproc p
                               WHERE p.amprocfamily = oc.opcfamily AND p.amproclefttype = oc.opcintype
                                 AND p.amprocnum = 4)) AS dedup
  FROM candidates r LEFT JOIN tuples t ON t.oid = r.oid
), slots AS (
  SELECT s.*,
         CASE WHEN s.variable THEN s.unaligned + 3.5 ELSE 8 * ceil(s.unaligned / 8) END + 4 AS slot_bytes,
         -- rows per distinct key, and heap pointers per posting list (CREATE INDEX caps a posting
         -- list at a tenth of a page)
         CASE WHEN s.dedup AND s.key_distinct > 0
              THEN GREATEST(s.reltuples / LEAST(s.key_distinct, GREATEST(s.reltuples, 1)), 1) END AS dups,
         GREATEST(floor(((floor((SELECT bs FROM const) / 10 / 8) * 8 - 4) - 8 * ceil(s.unaligned / 8)) / 6), 1)
           AS posting_tids
  FROM sized s
), per_row AS (
  SELECT s.*,
         CASE WHEN s.dups > 1 THEN LEAST(s.slot_bytes,
                ceil(s.dups / s.posting_tids)
                * (8 * ceil((8 * ceil(s.unaligned / 8) + 6 * s.dups / ceil(s.dups / s.posting_tids)) / 8) + 4)
                / s.dups)
              ELSE s.slot_bytes END AS row_bytes
  FROM slots s
), estimated AS (
  SELECT p.*,
         CASE WHEN p.kind = 'table'
           -- inserts leave (100 - fillfactor)%% of a heap page free; at most MaxHeapTuplesPerPage fit
           THEN ceil(p.reltuples / GREATEST(1, LEAST(floor(((SELECT bs FROM const) - 24) / 28),
                      floor(((SELECT bs FROM const) * p.fillfactor / 100 - 24) / p.row_bytes))))
           -- leaf pages filled to the fillfactor, one level of internal pages (fan-out is in the
           -- hundreds), the metapage
           ELSE ceil(p.reltuples * p.row_bytes / (((SELECT bs FROM const) - 40) * p.fillfactor / 100)) * 1.005 + 1
         END AS expected_pages
  FROM per_row p
), judged AS (
  SELECT e.oid, e.kind, e.nspname, e.relname, e.tablename, e.relpages,
         GREATEST(e.relpages - e.expected_pages, 0) * (SELECT bs FROM const) AS bloat_bytes,
         e.relpages * (SELECT bs FROM const) AS size_bytes,
         CASE WHEN NOT e.readable THEN 'no_privilege'
              WHEN e.nstats < e.ncols THEN
                -- pg_stats shows a column only to roles that may SELECT it, nothing under active row security
                CASE WHEN pg_catalog.has_table_privilege(COALESCE(e.indrelid, e.oid), 'SELECT')
                          AND NOT pg_catalog.row_security_active(COALESCE(e.indrelid, e.oid))
                     THEN 'not_analyzed' ELSE 'no_privilege' END
              WHEN e.relpages - e.expected_pages < %(mismatch_below)s * e.relpages THEN 'model_mismatch'
              ELSE 'estimated' END AS status
  FROM estimated e
), ranked AS MATERIALIZED (
  SELECT j.*, pg_catalog.row_number() OVER (PARTITION BY j.kind ORDER BY j.bloat_bytes DESC, j.relpages DESC, j.oid)
           AS rank
  FROM judged j WHERE j.status = 'estimated'
)
SELECT kind, nspname AS schemaname, CASE WHEN kind = 'index' THEN tablename ELSE relname END AS relname,
       CASE WHEN kind = 'index' THEN relname END AS indexrelname, bloat_bytes, bloat_bytes / size_bytes AS bloat_ratio,
       NULL::text AS status, NULL::bigint AS relations
FROM ranked WHERE rank <= %(top_n)s
UNION ALL
SELECT kind, '', 'other', CASE WHEN kind = 'index' THEN 'other' END, sum(bloat_bytes),
       sum(bloat_bytes) / NULLIF(sum(size_bytes), 0), NULL, NULL
FROM ranked WHERE rank > %(top_n)s GROUP BY kind
UNION ALL
SELECT kind, NULL, NULL, NULL, NULL, NULL, status, count(*)
FROM (SELECT kind, early_status AS status FROM rels WHERE early_status IS NOT NULL
      UNION ALL SELECT kind, status FROM judged) AS s
GROUP BY kind, status"""


def fetch_estimate(session: Session, ctx: RunContext, sql: str | None) -> Rows:
    """Run the estimate and spread its rows over the table, index and relation-count metrics."""
    assert sql is not None
    params = {
        "top_n": max(0, int(ctx.params["top_n"])),
        "min_size_bytes": max(0, int(ctx.params["min_size_bytes"])),
        "mismatch_below": MISMATCH_BELOW,
    }
    out: Rows = []
    for row in session.query(sql, params):
        kind = row.pop("kind")
        if row["status"] is not None:
            out.append({"kind": kind, "status": row["status"], "relations": row["relations"]})
            continue
        prefix = "table" if kind == "table" else "index"
        out.append({
            "schemaname": row["schemaname"], "relname": row["relname"], "indexrelname": row["indexrelname"],
            "method": "estimate", f"{prefix}_bloat_bytes": row["bloat_bytes"],
            f"{prefix}_bloat_ratio": row["bloat_ratio"],
        })
    return out


ESTIMATE = Collector(
    name="pg_bloat_estimate",
    family="bloat",
    help="Estimated bloat of tables and btree indexes from catalog statistics (pg_class, pg_stats): no relation "
         "is read or locked.",
    scope="database",
    interval=900.0,
    timeout=120.0,
    params=(TOP_N, MIN_SIZE),
    variants=(SqlVariant(sql=_ESTIMATE_SQL, min_version=120000),),
    fetch=fetch_estimate,
    metrics=(
        gauge("pg_table_bloat_bytes",
              "Estimated bytes of the table beyond what its live rows need at its fillfactor (method=\"estimate\").",
              "table_bloat_bytes", TABLE, unit="bytes"),
        gauge("pg_table_bloat_ratio",
              "Estimated share of the table's size that is bloat, 0 to 1 (method=\"estimate\").",
              "table_bloat_ratio", TABLE, unit="ratio"),
        gauge("pg_index_bloat_bytes",
              "Estimated bytes of the btree index beyond a fresh build at its fillfactor (method=\"estimate\").",
              "index_bloat_bytes", INDEX, unit="bytes"),
        gauge("pg_index_bloat_ratio",
              "Estimated share of the btree index's size that is bloat, 0 to 1 (method=\"estimate\").",
              "index_bloat_ratio", INDEX, unit="ratio"),
        gauge("pg_bloat_estimate_relations",
              "Relations by whether the estimate could be made: estimated, too_small, not_analyzed (never "
              "analyzed nor vacuumed), no_privilege (pg_stats hides the columns from this role), model_mismatch "
              "(far below zero: statistics older than the data), unsupported (not a valid btree index).",
              "relations", ("datname", "kind", "status")),
    ),
    notes=(
        "Bloat is the allocated size (pg_class.relpages) minus the size the live rows (pg_class.reltuples) "
        "would take freshly packed at the fillfactor, from pg_stats average widths and null fractions. "
        "Figures are as recent as the last VACUUM/ANALYZE of each relation. A role with only pg_monitor sees "
        "no pg_stats rows for tables it cannot SELECT: those count as `no_privilege` (grant SELECT, or rely "
        "on `pg_bloat_measured`). Btree deduplication (13+: non-unique indexes whose operator classes allow "
        "it) is modelled from n_distinct. An estimate below -20% is reported as `model_mismatch`, one between "
        "-20% and 0 as 0. The `top_n` most bloated tables and indexes are exported one by one, the rest "
        "summed in `relname=\"other\"` (schemaname=\"\")."
    ),
)


# --------------------------------------------------------------------------------------------------
# Measured bloat: pgstattuple_approx (tables) and pgstatindex (btree indexes) read the relation.
#
# They take an ACCESS SHARE lock on the relation, so they would queue behind pending DDL. Guards: the
# largest relations only, on their own slow schedule; a relation with an ACCESS EXCLUSIVE lock held or
# requested in pg_locks is skipped; each measurement runs in a savepoint with its own statement_timeout
# (and the engine's lock_timeout), so one relation giving up or failing leaves the others measured,
# and rolling back to the savepoint releases its lock at once.

RELATIONS = Param(
    "relations", 5,
    "Tables and (separately) btree indexes measured per run: those the estimate cannot cover for this role "
    "(no SELECT privilege, never analyzed) first, then the largest.",
)
RELATION_TIMEOUT = Param(
    "relation_timeout_seconds", 10.0,
    "statement_timeout of one measurement: the longest that DDL arriving meanwhile waits behind it.",
)
MAX_SCAN = Param(
    "max_scan_bytes", 2147483648,
    "Relations whose measurement would read more than this are skipped (tables: pages not all-visible; "
    "indexes: the whole index).",
)
MIN_MEASURE_SIZE = Param("min_size_bytes", 1048576, "Relations smaller than this are not measured.")
CHECK_LOCKS = Param(
    "check_locks", True,
    "Skip relations with an ACCESS EXCLUSIVE lock held or requested in pg_locks before measuring them "
    "(lock_timeout is the guard that remains when off).",
)

# Candidates from pg_class only (no lock). "estimable": the estimate can cover the relation for this
# role (it may SELECT the table and the table has been analyzed); those come after the others.
_CANDIDATES_SQL = """
WITH const AS (
  SELECT pg_catalog.current_setting('block_size')::float8 AS bs
), rels AS (
  SELECT c.oid, c.relkind, n.nspname::text AS schemaname,
         CASE WHEN c.relkind = 'i' THEN t.relname ELSE c.relname END::text AS relname,
         CASE WHEN c.relkind = 'i' THEN c.relname END::text AS indexrelname,
         CASE WHEN c.relkind = 'i' THEN 'index' ELSE 'table' END AS kind,
         COALESCE(i.indrelid, c.oid) AS heap_oid, c.relpages,
         COALESCE((SELECT pg_catalog.substr(o, 12)::float8 FROM pg_catalog.unnest(c.reloptions) AS o
                   WHERE pg_catalog.left(o, 11) = 'fillfactor='),
                  CASE WHEN c.relkind = 'i' THEN 90 ELSE 100 END) AS fillfactor,
         (CASE WHEN c.relkind = 'i' THEN c.relpages ELSE GREATEST(c.relpages - c.relallvisible, 0) END)
           * (SELECT bs FROM const) AS scan_bytes,
         pg_catalog.has_table_privilege(COALESCE(i.indrelid, c.oid), 'SELECT')
           AND COALESCE(pg_catalog.pg_stat_get_last_analyze_time(COALESCE(i.indrelid, c.oid)),
                        pg_catalog.pg_stat_get_last_autoanalyze_time(COALESCE(i.indrelid, c.oid))) IS NOT NULL
           AS estimable
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid
  LEFT JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
  LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam
  WHERE c.relpersistence <> 't' AND n.nspname <> 'pg_toast'
    AND (c.relkind IN ('r', 'm')
         OR (c.relkind = 'i' AND am.amname = 'btree' AND i.indisvalid AND i.indisready AND t.relkind IN ('r', 'm')))
    AND c.relpages * (SELECT bs FROM const) >= %(min_size_bytes)s
), ranked AS (
  SELECT r.*, pg_catalog.row_number() OVER (PARTITION BY r.kind ORDER BY r.estimable, r.relpages DESC, r.oid)
           AS rank
  FROM rels r WHERE r.scan_bytes <= %(max_scan_bytes)s
)
SELECT oid, kind, schemaname, relname, indexrelname, heap_oid, fillfactor, NULL::bigint AS too_large
FROM ranked WHERE rank <= %(relations)s
UNION ALL
SELECT NULL, kind, NULL, NULL, NULL, NULL, NULL, count(*) FROM rels WHERE scan_bytes > %(max_scan_bytes)s
GROUP BY kind"""


class Candidate(TypedDict):
    """A row of _CANDIDATES_SQL: a relation to measure (``oid`` set) or a count of those too large to."""

    oid: int | None
    kind: Literal["table", "index"]
    schemaname: str | None
    relname: str | None
    indexrelname: str | None
    heap_oid: int | None
    fillfactor: float | None
    too_large: int | None


class TableMeasure(TypedDict):
    """The columns of pgstattuple_approx that the bloat figures use."""

    table_len: int | None
    approx_free_space: int | None
    dead_tuple_len: int | None


class IndexMeasure(TypedDict):
    """The columns of pgstatindex that the bloat figures use."""

    index_size: int | None
    avg_leaf_density: float | None
    leaf_pages: int | None
    internal_pages: int | None


def table_bloat(measure: TableMeasure, fillfactor: float) -> tuple[float, float] | None:
    """(bytes, ratio) from pgstattuple_approx: free space and dead tuples beyond the fillfactor's reserve."""
    size = float(measure["table_len"] or 0)
    if size <= 0:
        return None
    waste = float(measure["approx_free_space"] or 0) + float(measure["dead_tuple_len"] or 0)
    bloat = max(0.0, waste - size * (100 - fillfactor) / 100)
    return bloat, bloat / size


def index_bloat(measure: IndexMeasure, fillfactor: float, block_size: int) -> tuple[float, float] | None:
    """(bytes, ratio) from pgstatindex: the index size beyond its live leaf data repacked at the fillfactor."""
    size = float(measure["index_size"] or 0)
    density = measure["avg_leaf_density"]
    if size <= 0 or density is None or math.isnan(float(density)):
        return None
    leaf_pages = float(measure["leaf_pages"] or 0)
    expected_pages = leaf_pages * float(density) / fillfactor + float(measure["internal_pages"] or 0) + 1
    bloat = max(0.0, size - expected_pages * block_size)
    return bloat, bloat / size


def _measure(session: Session, query: pgsql.Composed, oid: int, timeout_ms: int) -> dict[str, Any] | None:
    """One pgstattuple call under its own statement_timeout (SET LOCAL: the savepoint's rollback undoes it)."""
    session.query("SELECT pg_catalog.set_config('statement_timeout', %(ms)s, true)", {"ms": str(timeout_ms)})
    rows = session.query(query.as_string(session.conn), {"oid": oid})
    return rows[0] if rows else None


def fetch_measured(session: Session, ctx: RunContext, _sql: str | None) -> Rows:
    """Measure the chosen relations one by one, each guarded; count what was skipped and why."""
    started = time.monotonic()
    params = ctx.params
    candidates = cast(list[Candidate], session.query(_CANDIDATES_SQL, {
        "relations": max(0, int(params["relations"])),
        "min_size_bytes": max(0, int(params["min_size_bytes"])),
        "max_scan_bytes": max(0, int(params["max_scan_bytes"])),
    }))
    schema = ctx.extension_schema(session.dbname, "pgstattuple")
    block_size = int(session.query("SELECT pg_catalog.current_setting('block_size')::int AS bs")[0]["bs"])
    approx = pgsql.SQL("SELECT * FROM {}.pgstattuple_approx(%(oid)s::oid::regclass)").format(schema)
    statindex = pgsql.SQL("SELECT * FROM {}.pgstatindex(%(oid)s::oid::regclass)").format(schema)
    relation_timeout = float(params["relation_timeout_seconds"])
    budget = ctx.timeout * 0.8  # stop starting measurements well before the run's own timeout
    skipped: dict[tuple[str, str], int] = {}
    out: Rows = []

    def skip(kind: str, reason: str, count: int = 1) -> None:
        skipped[(kind, reason)] = skipped.get((kind, reason), 0) + count

    for cand in candidates:
        kind = cand["kind"]
        if cand["oid"] is None:
            skip(kind, "too_large", int(cand["too_large"] or 0))
            continue
        remaining = budget - (time.monotonic() - started)
        if remaining <= 0.05:
            skip(kind, "budget")
            continue
        heap_oid, fillfactor = cand["heap_oid"], cand["fillfactor"]
        assert heap_oid is not None and fillfactor is not None  # set on every row that names a relation
        # DDL on a table may rebuild its indexes: a lock on the table (or an index of it) skips both.
        if params["check_locks"] and session.locked_tables([heap_oid]):
            skip(kind, "lock_conflict")
            continue
        timeout_ms = max(1, int(min(relation_timeout, remaining) * 1000))
        query = approx if kind == "table" else statindex

        result = session.attempt(partial(_measure, session, query, cand["oid"], timeout_ms))
        if isinstance(result, CollectError):
            skip(kind, result.reason)
            continue
        if result is None:
            skip(kind, "missing_object")
            continue
        if kind == "table":
            figures, method = table_bloat(cast(TableMeasure, result), fillfactor), "pgstattuple_approx"
        else:
            figures, method = index_bloat(cast(IndexMeasure, result), fillfactor, block_size), "pgstatindex"
        if figures is None:
            skip(kind, "empty")
            continue
        out.append({
            "schemaname": cand["schemaname"], "relname": cand["relname"], "indexrelname": cand["indexrelname"],
            "method": method, f"{kind}_bloat_bytes": figures[0], f"{kind}_bloat_ratio": figures[1],
        })
    for kind in ("table", "index"):
        for reason in ("lock_conflict",):  # always present, so that alerts on it see a steady series
            skipped.setdefault((kind, reason), 0)
    out.extend({"kind": kind, "reason": reason, "skipped": count} for (kind, reason), count in sorted(skipped.items()))
    return out


MEASURED = Collector(
    name="pg_bloat_measured",
    family="bloat",
    help="Measured bloat of the largest tables (pgstattuple_approx) and btree indexes (pgstatindex): reads the "
         "relations, so it runs rarely and on few of them, and never waits behind DDL.",
    scope="database",
    extension="pgstattuple",
    interval=3600.0,
    timeout=120.0,
    params=(RELATIONS, RELATION_TIMEOUT, MAX_SCAN, MIN_MEASURE_SIZE, CHECK_LOCKS),
    variants=(SqlVariant(sql=_CANDIDATES_SQL, min_version=120000),),
    fetch=fetch_measured,
    metrics=(
        gauge("pg_table_bloat_measured_bytes",
              "Measured free space plus dead tuples of the table beyond its fillfactor's reserve "
              "(method=\"pgstattuple_approx\").",
              "table_bloat_bytes", TABLE, unit="bytes"),
        gauge("pg_table_bloat_measured_ratio", "Measured share of the table's size that is bloat, 0 to 1.",
              "table_bloat_ratio", TABLE, unit="ratio"),
        gauge("pg_index_bloat_measured_bytes",
              "Measured bytes of the btree index beyond its live leaf data repacked at its fillfactor "
              "(method=\"pgstatindex\").",
              "index_bloat_bytes", INDEX, unit="bytes"),
        gauge("pg_index_bloat_measured_ratio", "Measured share of the btree index's size that is bloat, 0 to 1.",
              "index_bloat_ratio", INDEX, unit="ratio"),
        gauge("pg_bloat_measured_skipped_relations",
              "Relations not measured in the last run, by reason: lock_conflict (ACCESS EXCLUSIVE lock held or "
              "requested), lock_timeout, timeout, budget (run time used up), permission, missing_object (dropped "
              "meanwhile), too_large (would read more than max_scan_bytes; never chosen).",
              "skipped", ("datname", "kind", "reason")),
    ),
    notes=(
        "Needs the `pgstattuple` extension in each database (`CREATE EXTENSION pgstattuple`); its functions "
        "are executable by pg_monitor (through pg_stat_scan_tables) on every table. Where it is missing the "
        "collector is skipped with reason `extension`. pgstattuple_approx reads the pages not marked all-visible "
        "and the free space map for the others; pgstatindex reads the whole index. Each measurement holds an "
        "ACCESS SHARE lock for at most `relation_timeout_seconds`."
    ),
)

COLLECTORS = (ESTIMATE, MEASURED)
