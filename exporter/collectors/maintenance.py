"""Maintenance in progress: running VACUUM, ANALYZE and CREATE INDEX, and how busy the autovacuum workers are."""

from __future__ import annotations

from exporter.catalog import Collector, SqlVariant
from exporter.collectors._helpers import gauge

# One row per (table, phase, kind) in this database: two commands can run on one table at once (two plain
# CREATE INDEX), and summing keeps them one series. Relations are named through pg_class (no lock); one
# created by a transaction not yet committed is shown by its oid. Seconds are since the command's
# transaction started (pg_stat_activity of the same pid).
_KIND = """CASE WHEN a.backend_type = 'autovacuum worker'
                 THEN CASE WHEN a.query LIKE '%(to prevent wraparound)%' THEN 'wraparound' ELSE 'autovacuum' END
                 ELSE 'manual' END"""
_NAMES = """COALESCE(n.nspname::text, '') AS schemaname, COALESCE(c.relname::text, p.relid::text) AS relname"""
_JOINS = """LEFT JOIN pg_catalog.pg_class c ON c.oid = p.relid
LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = p.pid"""
_HERE = "p.datid = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database())"
_SECONDS = "max(pg_catalog.date_part('epoch', pg_catalog.statement_timestamp() - a.xact_start))"

_COLUMNS = ("vacuum_running", "heap_blks_total", "heap_blks_scanned", "heap_blks_vacuumed", "index_vacuum_count",
            "dead_tuples", "vacuum_seconds", "analyze_running", "sample_blks_total", "sample_blks_scanned",
            "analyze_seconds", "create_index_running", "blocks_total", "blocks_done", "tuples_total", "tuples_done",
            "create_index_seconds")


def _select(values: dict[str, str]) -> str:
    """The shared column list: ``values`` where this command has them, typed NULLs elsewhere."""
    return ",\n       ".join(f"{values.get(col, 'NULL::float8')} AS {col}" for col in _COLUMNS)


def _vacuum(dead_tuples: str) -> str:
    return f"""
SELECT 'vacuum' AS command, {_NAMES}, ''::text AS indexrelname, p.phase::text AS phase, {_KIND} AS kind,
       {_select({"vacuum_running": "count(*)", "heap_blks_total": "sum(p.heap_blks_total)",
                 "heap_blks_scanned": "sum(p.heap_blks_scanned)", "heap_blks_vacuumed": "sum(p.heap_blks_vacuumed)",
                 "index_vacuum_count": "sum(p.index_vacuum_count)", "dead_tuples": f"sum({dead_tuples})",
                 "vacuum_seconds": _SECONDS})}
FROM pg_catalog.pg_stat_progress_vacuum p
{_JOINS}
WHERE {_HERE}
GROUP BY 1, 2, 3, 4, 5, 6"""


_ANALYZE = f"""
SELECT 'analyze' AS command, {_NAMES}, ''::text AS indexrelname, p.phase::text AS phase, {_KIND} AS kind,
       {_select({"analyze_running": "count(*)", "sample_blks_total": "sum(p.sample_blks_total)",
                 "sample_blks_scanned": "sum(p.sample_blks_scanned)", "analyze_seconds": _SECONDS})}
FROM pg_catalog.pg_stat_progress_analyze p
{_JOINS}
WHERE {_HERE}
GROUP BY 1, 2, 3, 4, 5, 6"""

# The index is named once it exists (index_relid is 0 before); kind is the command (CREATE INDEX [CONCURRENTLY],
# REINDEX [CONCURRENTLY]).
_CREATE_INDEX = f"""
SELECT 'create_index' AS command, {_NAMES},
       COALESCE(ic.relname::text, CASE WHEN p.index_relid <> 0 THEN p.index_relid::text ELSE '' END) AS indexrelname,
       p.phase::text AS phase, p.command::text AS kind,
       {_select({"create_index_running": "count(*)", "blocks_total": "sum(p.blocks_total)",
                 "blocks_done": "sum(p.blocks_done)", "tuples_total": "sum(p.tuples_total)",
                 "tuples_done": "sum(p.tuples_done)", "create_index_seconds": _SECONDS})}
FROM pg_catalog.pg_stat_progress_create_index p
LEFT JOIN pg_catalog.pg_class ic ON ic.oid = p.index_relid
{_JOINS}
WHERE {_HERE}
GROUP BY 1, 2, 3, 4, 5, 6"""

# 17 renamed num_dead_tuples to num_dead_item_ids (the same count: dead item identifiers collected).
_PROGRESS_12 = _vacuum("p.num_dead_tuples") + "\nUNION ALL" + _CREATE_INDEX
_PROGRESS_13 = _vacuum("p.num_dead_tuples") + "\nUNION ALL" + _ANALYZE + "\nUNION ALL" + _CREATE_INDEX
_PROGRESS_17 = _vacuum("p.num_dead_item_ids") + "\nUNION ALL" + _ANALYZE + "\nUNION ALL" + _CREATE_INDEX

# Which databases have a command running: the progress views list every database's backends (datid is shown
# to every role), so one query here spares a connection to each database where nothing runs.
_RUNNING_IN = "SELECT DISTINCT p.datname::text AS datname FROM ({}) p WHERE p.datname IS NOT NULL"
_VIEWS_12 = ("pg_stat_progress_vacuum", "pg_stat_progress_create_index")
_VIEWS_13 = ("pg_stat_progress_vacuum", "pg_stat_progress_analyze", "pg_stat_progress_create_index")


def _running_in(views: tuple[str, ...]) -> str:
    return _RUNNING_IN.format(" UNION ALL ".join(f"SELECT datname FROM pg_catalog.{view}" for view in views))


TABLE = ("datname", "schemaname", "relname", "phase", "kind")
INDEX = ("datname", "schemaname", "relname", "indexrelname", "phase", "kind")
_WHILE = " Present only while one runs."

PROGRESS = Collector(
    name="pg_stat_progress",
    family="maintenance",
    help="VACUUM, ANALYZE and CREATE INDEX / REINDEX commands running now in each database, with their phase "
         "and progress (pg_stat_progress_vacuum, _analyze, _create_index).",
    scope="database",
    interval=30.0,
    timeout=5.0,
    variants=(
        SqlVariant(min_version=120000, max_version=130000, sql=_PROGRESS_12),
        SqlVariant(min_version=130000, max_version=170000, sql=_PROGRESS_13),
        SqlVariant(min_version=170000, sql=_PROGRESS_17),
    ),
    visit_only=(
        SqlVariant(min_version=120000, max_version=130000, sql=_running_in(_VIEWS_12)),
        SqlVariant(min_version=130000, sql=_running_in(_VIEWS_13)),
    ),
    metrics=(
        gauge("pg_stat_progress_vacuum_running",
              "VACUUMs running on the table in this phase; kind is manual, autovacuum or wraparound (an "
              "autovacuum to prevent wraparound)." + _WHILE, "vacuum_running", TABLE),
        gauge("pg_stat_progress_vacuum_heap_blks",
              "Heap blocks of the table when the VACUUM began." + _WHILE, "heap_blks_total", TABLE),
        gauge("pg_stat_progress_vacuum_heap_blks_scanned",
              "Heap blocks scanned so far; over pg_stat_progress_vacuum_heap_blks: the share of the heap scan "
              "done." + _WHILE,
              "heap_blks_scanned", TABLE),
        gauge("pg_stat_progress_vacuum_heap_blks_vacuumed", "Heap blocks vacuumed so far." + _WHILE,
              "heap_blks_vacuumed", TABLE),
        gauge("pg_stat_progress_vacuum_index_vacuum_count",
              "Index vacuum cycles completed (more than 1: maintenance_work_mem too small for the dead tuples)."
              + _WHILE, "index_vacuum_count", TABLE),
        gauge("pg_stat_progress_vacuum_dead_tuples",
              "Dead item identifiers collected since the last index vacuum cycle (num_dead_tuples; "
              "num_dead_item_ids from 17)." + _WHILE, "dead_tuples", TABLE),
        gauge("pg_stat_progress_vacuum_seconds", "How long the VACUUM's transaction has been running." + _WHILE,
              "vacuum_seconds", TABLE, unit="seconds"),
        gauge("pg_stat_progress_analyze_running", "ANALYZEs running on the table in this phase (13+)." + _WHILE,
              "analyze_running", TABLE),
        gauge("pg_stat_progress_analyze_sample_blks", "Heap blocks ANALYZE will sample (13+)." + _WHILE,
              "sample_blks_total", TABLE),
        gauge("pg_stat_progress_analyze_sample_blks_scanned", "Heap blocks sampled so far (13+)." + _WHILE,
              "sample_blks_scanned", TABLE),
        gauge("pg_stat_progress_analyze_seconds", "How long the ANALYZE's transaction has been running (13+)."
              + _WHILE, "analyze_seconds", TABLE, unit="seconds"),
        gauge("pg_stat_progress_create_index_running",
              "CREATE INDEX or REINDEX commands running on the table in this phase; kind is the command "
              "(CREATE INDEX CONCURRENTLY, REINDEX, ...); indexrelname is empty until the index exists." + _WHILE,
              "create_index_running", INDEX),
        gauge("pg_stat_progress_create_index_blocks", "Blocks to process in the current phase." + _WHILE,
              "blocks_total", INDEX),
        gauge("pg_stat_progress_create_index_blocks_done", "Blocks processed in the current phase." + _WHILE,
              "blocks_done", INDEX),
        gauge("pg_stat_progress_create_index_tuples", "Tuples to process in the current phase." + _WHILE,
              "tuples_total", INDEX),
        gauge("pg_stat_progress_create_index_tuples_done", "Tuples processed in the current phase." + _WHILE,
              "tuples_done", INDEX),
        gauge("pg_stat_progress_create_index_seconds", "How long the command's transaction has been running."
              + _WHILE, "create_index_seconds", INDEX, unit="seconds"),
    ),
    notes="Only commands in the databases the target visits are seen (each runs in one database); a database "
          "where none runs is not connected to (one query in the target's own database finds them). The commands "
          "come and go: their series exist only while they run, so alert on the autovacuum worker count or on "
          "durations, not on absence.",
)

# What each autovacuum worker is doing, from its query text ("autovacuum: VACUUM ANALYZE public.t (to
# prevent wraparound)"); every state is reported, 0 when no worker is in it, so sums and alerts always have
# series. The launcher is not a worker.
_WORKERS_SQL = """
WITH workers AS (
  SELECT CASE WHEN a.query LIKE '%(to prevent wraparound)%' THEN 'wraparound'
              WHEN a.query LIKE 'autovacuum: VACUUM%' THEN 'vacuum'
              WHEN a.query LIKE 'autovacuum: ANALYZE%' THEN 'analyze'
              ELSE 'other' END AS state
  FROM pg_catalog.pg_stat_activity a
  WHERE a.backend_type = 'autovacuum worker'
)
SELECT s.state, (SELECT count(*) FROM workers w WHERE w.state = s.state) AS workers
FROM (VALUES ('vacuum'), ('analyze'), ('wraparound'), ('other')) AS s(state)"""

AUTOVACUUM_WORKERS = Collector(
    name="pg_autovacuum_workers",
    family="maintenance",
    help="Autovacuum workers running now by what they do, to compare with autovacuum_max_workers.",
    interval=15.0,
    timeout=5.0,
    variants=(SqlVariant(min_version=120000, sql=_WORKERS_SQL),),
    metrics=(
        gauge("pg_autovacuum_workers",
              "Autovacuum workers by state: vacuum, analyze, wraparound (a vacuum to prevent wraparound) or other "
              "(e.g. BRIN summarization, or query text hidden from a role without pg_read_all_stats). All busy: "
              "sum by (target) (pg_autovacuum_workers) >= pg_settings_autovacuum_max_workers.", "workers",
              ("state",)),
    ),
)

COLLECTORS = (PROGRESS, AUTOVACUUM_WORKERS)
