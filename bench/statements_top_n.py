"""pg_stat_statements with thousands of statements: our top N + remainder vs reads with query text.

Starts a throwaway cluster (pg_stat_statements.max = 10000), runs N distinct statements (default 5,000,
each `SELECT cI FROM wT` over wide tables, so every one is its own entry), then times side by side, as
a pg_monitor-only role: the pg_stat_statements collector's whole run in steady state (engine run: read
without text, top-N bookkeeping, rendering), the same query alone, a top-100 read with query text
(ORDER BY ... LIMIT over the view, as exporters commonly do) and a full read of the view. Median of
several runs. Run: python bench/statements_top_n.py [--statements N] [--runs R] [--text-bytes B] [--bindir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg

from exporter import __version__
from exporter.catalog import load
from exporter.config import load_settings
from exporter.engine import Engine
from exporter.localpg import LocalCluster
from exporter.snapshot import Snapshot

COLUMNS = 1000  # per table (PostgreSQL allows 1600)

TOP_WITH_TEXT = """
SELECT userid, dbid, queryid, query, calls, total_exec_time, rows, shared_blks_hit, shared_blks_read
FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 100"""

FULL_READ = "SELECT * FROM pg_stat_statements"


def make_statements(cluster: LocalCluster, count: int, text_bytes: int = 0) -> None:
    """``count`` distinct statements: one per column of ceil(count / COLUMNS) wide tables.

    ``text_bytes`` pads each statement's text with a comment (ORM statements are often kilobytes long);
    pg_stat_statements keeps the text as first seen, comment included, and the queryid ignores it.
    """
    padding = f" /* {'x' * max(0, text_bytes - 6)} */" if text_bytes else ""
    tables = -(-count // COLUMNS)
    cols = ", ".join(f"g AS c{i}" for i in range(COLUMNS))
    with cluster.connect() as conn:
        for t in range(tables):
            conn.execute(f"CREATE TABLE w{t} AS SELECT {cols} FROM generate_series(1, 10) g".encode())
        for n in range(count):
            conn.execute(f"SELECT c{n % COLUMNS} FROM w{n // COLUMNS}{padding}".encode())


def interleaved_medians(funcs: dict[str, Any], runs: int) -> dict[str, float]:
    """Median milliseconds of each function, the functions taking turns so that machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(runs):
        for name, func in funcs.items():
            started = time.perf_counter()
            func()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--statements", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--text-bytes", type=int, default=0, help="pad each statement's text to about this size")
    parser.add_argument("--bindir", type=Path, default=None)
    args = parser.parse_args()
    cluster = LocalCluster(bindir=args.bindir, name="bench-stmt",
                           settings={"pg_stat_statements.max": 10000}).init().start()
    try:
        cluster.execute("CREATE EXTENSION pg_stat_statements")
        dsn = cluster.create_monitor_role("bench_mon", "bench-mon-pw")
        make_statements(cluster, args.statements, args.text_bytes)
        entries = cluster.execute("SELECT count(*) AS n FROM pg_stat_statements")[0]["n"]
        catalog = load()
        snapshot = Snapshot(catalog, __version__)
        settings = load_settings(raw={"listen": "127.0.0.1:0", "targets": [{"name": "bench", "dsn": dsn}]},
                                 environ={})
        engine = Engine(catalog, settings, snapshot)
        runtime = engine.targets["bench"]
        assert engine.probe(runtime)
        eff = engine.collectors["pg_stat_statements"]
        engine.collect(runtime, eff)  # first run: no memory yet
        status = snapshot.status("bench", "pg_stat_statements")
        assert status.success, "collector failed"
        sql = eff.collector.variant_for(runtime.facts.extensions["postgres"]["pg_stat_statements"][1]).sql
        sql = sql.replace("{ext_schema}", '"public"')
        params = {"candidates": 200, "tracked_dbid": [], "tracked_userid": [], "tracked_queryid": []}
        with psycopg.connect(dsn, autocommit=True) as conn:
            result = interleaved_medians({
                "ours": lambda: engine.collect(runtime, eff),
                "query": lambda: conn.execute(sql, params, prepare=False).fetchall(),
                "top_text": lambda: conn.execute(TOP_WITH_TEXT, prepare=False).fetchall(),
                "full": lambda: conn.execute(FULL_READ, prepare=False).fetchall(),
            }, args.runs)
        series = status.series
        engine.close()
        base = result["top_text"]
        print(f"PostgreSQL {cluster.version_num}, {entries} entries in pg_stat_statements, texts padded to "
              f"{args.text_bytes} bytes, "
              f"median of {args.runs} interleaved runs")
        for name, what in (
            ("ours", f"pgvitals collector run (query, top-N bookkeeping, rendering {series} series)"),
            ("query", "its query alone (no text; 2N candidates, per-database totals)"),
            ("top_text", "top 100 by time with query text (ORDER BY ... LIMIT over the view)"),
            ("full", "full read of the view (every entry, with text)"),
        ):
            print(f"| {what} | {result[name]:.1f} ms | {result[name] / base:.2f} |")
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
