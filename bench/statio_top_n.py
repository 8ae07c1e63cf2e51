"""Cache-hit collectors on a database with many tables: our top-N + remainder vs full reads and sized ranking.

Starts a throwaway cluster, creates N small tables (default 10,000, each with a primary key and a few
rows, VACUUM ANALYZEd so relpages is set), then times side by side, as a pg_monitor-only role inside
a READ ONLY transaction: the per-relation pass that the pg_statio_user_tables / pg_statio_user_indexes
collectors read (exporter/collectors/relations.py) with only their section, and with all four, a full
read of each view (what an exporter without a bound reads), and the same top-N ranked by
pg_total_relation_size() (which takes a lock on every relation). Median of several runs.
Run: python bench/statio_top_n.py [--tables N] [--runs R] [--bindir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg

from exporter.collectors.relations import PREFIX, STATIO_INDEXES, STATIO_TABLES, VARIANTS
from exporter.localpg import LocalCluster

# The collector's settings for its transaction (see exporter/db.py: Session.guarded).
OUR_SETTINGS = "SET jit = off; SET max_parallel_workers_per_gather = 0"



def pass_params(sections: tuple[str, ...], top_n: int) -> dict[str, Any]:
    """Parameters of the relations pass with only ``sections`` on (no incumbents: a first run)."""
    params: dict[str, Any] = {"ut_top_n_churn": 10 if "pg_stat_user_tables" in sections else 0}
    for name, prefix in PREFIX.items():
        params.update({f"{prefix}_on": name in sections, f"{prefix}_top_n": top_n, f"{prefix}_incumbents": []})
    return params


_TOP_N_OVER_VIEW = """
WITH ranked AS MATERIALIZED (
  SELECT s.*, row_number() OVER (ORDER BY c.relpages DESC, s.relid) AS rank
  FROM pg_catalog.pg_statio_user_tables s JOIN pg_catalog.pg_class c ON c.oid = s.relid
)
SELECT relname, heap_blks_read, heap_blks_hit, idx_blks_read, idx_blks_hit FROM ranked WHERE rank <= %(top_n)s
UNION ALL
SELECT 'other', sum(heap_blks_read), sum(heap_blks_hit), sum(idx_blks_read), sum(idx_blks_hit)
FROM ranked WHERE rank > %(top_n)s"""

_SIZED_BY_LOCKING_FUNCTION = """
WITH ranked AS MATERIALIZED (
  SELECT s.*, row_number() OVER (ORDER BY pg_catalog.pg_total_relation_size(s.relid) DESC, s.relid) AS rank
  FROM pg_catalog.pg_statio_user_tables s
)
SELECT relname, heap_blks_read, heap_blks_hit FROM ranked WHERE rank <= %(top_n)s
UNION ALL
SELECT 'other', sum(heap_blks_read), sum(heap_blks_hit) FROM ranked WHERE rank > %(top_n)s"""


def create_tables(cluster: LocalCluster, dbname: str, count: int) -> None:
    """``count`` tables with a primary key and 20 rows each, then VACUUM ANALYZE."""
    cluster.execute(f"CREATE DATABASE {dbname}")
    batch = 500
    for start in range(0, count, batch):
        cluster.execute(
            f"""DO $$ BEGIN FOR i IN {start}..{min(start + batch, count) - 1} LOOP
              EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, v text)', i);
              EXECUTE format('INSERT INTO t_%s SELECT g, md5(g::text) FROM generate_series(1, 20) g', i);
            END LOOP; END $$""",
            dbname,
        )
    cluster.execute("VACUUM ANALYZE", dbname)


Case = tuple[str, str, "dict[str, Any] | None", str]


def timed(dsn: str, cases: list[Case], runs: int) -> list[tuple[float, int]]:
    """Median milliseconds and rows of each case; runs interleave so that noise hits every case alike."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in cases]
    samples: list[list[float]] = [[] for _ in cases]
    rows = [0] * len(cases)
    try:
        for conn, (_label, _sql, _params, settings) in zip(conns, cases, strict=True):
            if settings:
                conn.execute(settings)
        for run in range(runs + 1):  # the first round warms the catalog caches and is not counted
            for i, (conn, (_label, sql, params, _settings)) in enumerate(zip(conns, cases, strict=True)):
                with conn.transaction():
                    conn.execute("SET TRANSACTION READ ONLY")
                    started = time.perf_counter()
                    rows[i] = len(conn.execute(sql, params, prepare=False).fetchall())
                    if run:
                        samples[i].append((time.perf_counter() - started) * 1000)
    finally:
        for conn in conns:
            conn.close()
    return [(statistics.median(s), r) for s, r in zip(samples, rows, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--top-n", type=int, default=50)
    parser.add_argument("--bindir", type=Path, default=None)
    parser.add_argument("--dsn", help="measure on this database (already holding the tables) instead")
    args = parser.parse_args()

    cluster = None
    if args.dsn:
        monitor = args.dsn
    else:
        cluster = LocalCluster(bindir=args.bindir, name="bench-statio").init().start()
        print(f"PostgreSQL {cluster.version_num}, {args.tables} tables")
        started = time.monotonic()
        create_tables(cluster, "many", args.tables)
        print(f"setup {time.monotonic() - started:.0f} s")
        monitor = cluster.create_monitor_role("bench_mon", "bench-monitor-pw").rsplit("/", 1)[0] + "/many"
    try:
        pass_sql = next(v.sql for v in VARIANTS if v.min_version <= 150000 < v.max_version)
        tables, indexes = pass_params((STATIO_TABLES,), args.top_n), pass_params((STATIO_INDEXES,), args.top_n)
        every = pass_params(tuple(PREFIX), args.top_n)
        top = {"top_n": args.top_n}
        cases: list[Case] = [
            ("relations pass, statio tables section only (jit and parallel off)", pass_sql, tables, OUR_SETTINGS),
            ("the same SQL at server defaults", pass_sql, tables, ""),
            ("top N + other over the pg_statio_user_tables view", _TOP_N_OVER_VIEW, top, ""),
            ("full read: SELECT * FROM pg_statio_user_tables", "SELECT * FROM pg_catalog.pg_statio_user_tables",
             None, ""),
            ("top N by pg_total_relation_size (a lock per relation)", _SIZED_BY_LOCKING_FUNCTION, top, ""),
            ("relations pass, statio indexes section only (jit and parallel off)", pass_sql, indexes, OUR_SETTINGS),
            ("relations pass, all four sections (jit and parallel off)", pass_sql, every, OUR_SETTINGS),
            ("full read: SELECT * FROM pg_statio_user_indexes", "SELECT * FROM pg_catalog.pg_statio_user_indexes",
             None, ""),
        ]
        print("| what | median | rows |\n|---|---|---|")
        for (label, *_), (ms, rows) in zip(cases, timed(monitor, cases, args.runs), strict=True):
            print(f"| {label} | {ms:,.0f} ms | {rows:,} |")
    finally:
        if cluster is not None:
            cluster.destroy()


if __name__ == "__main__":
    main()
