"""Cost of the bloat, vacuum and wraparound collectors on one database with 10,000 tables.

Starts a throwaway PostgreSQL, creates 10,000 tables (primary key, three more columns, 20 rows each,
analyzed: 20,000 relations with statistics), then runs each collector through the engine as the
exporter would: first run on a new connection (cold catalog caches), then the median of warm runs on
the kept connection. Reference reads (the whole of pg_stat_user_tables, of pg_stats) run in the same
way, so the figures can be read as ratios on this noisy shared machine.

The bloat estimate skips relations under `min_size_bytes` (1 MiB); the tables here are tiny, so it is
also run with `min_size_bytes: 0`, which makes it estimate all 20,000 relations: the worst case of a
database whose 10,000 tables are all large.

Run: python bench/bloat_10k.py [--tables 10000] [--runs 5] [--pgbin /usr/lib/postgresql/15/bin]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from exporter import __version__
from exporter.catalog import load
from exporter.config import load_settings
from exporter.engine import Engine
from exporter.localpg import LocalCluster
from exporter.snapshot import Snapshot

MONITOR = ("bench_mon", "bench-mon-password")


def create_tables(cluster: LocalCluster, count: int) -> None:
    """``count`` analyzed tables with a primary key in database ``bench``; pgstattuple installed."""
    cluster.execute("CREATE DATABASE bench")
    cluster.execute("CREATE EXTENSION pgstattuple", "bench")
    batch = 500
    for start in range(0, count, batch):
        last = min(start + batch, count) - 1
        cluster.execute(
            f"DO $$ BEGIN FOR i IN {start}..{last} LOOP "
            "EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, a int, b text, c timestamptz)', i); "
            "EXECUTE format('INSERT INTO t_%s SELECT g, g %% 7, ''row '' || g, now() "
            "FROM generate_series(1, 20) g', i); "
            "END LOOP; END $$",
            "bench",
        )
    cluster.execute("ANALYZE", "bench")


def time_collector(dsn: str, collector: str, runs: int, params: dict[str, Any] | None = None) -> tuple[float, float]:
    """(first run, median of the next ``runs``) in seconds of one collector on database ``bench``."""
    overrides = {collector: {"timeout": 600, "interval": 3600, **(params or {})}}
    settings = load_settings(raw={
        "listen": "127.0.0.1:0", "collectors": overrides,
        "targets": [{"name": "bench", "dsn": dsn, "databases": {"include": ["bench"]}, "max_connections": 1}],
    }, environ={})
    catalog = load()
    snapshot = Snapshot(catalog, __version__)
    engine = Engine(catalog, settings, snapshot)
    try:
        runtime = engine.targets["bench"]
        assert engine.probe(runtime), "target down"
        eff = engine.collectors[collector]
        times = []
        for _ in range(runs + 1):
            engine.collect(runtime, eff)
            status = snapshot.status("bench", collector)
            assert status.success, f"{collector} failed: {runtime.last_errors}"
            times.append(status.duration)
        return times[0], statistics.median(times[1:])
    finally:
        engine.close()


def time_sql(cluster: LocalCluster, sql: str, runs: int) -> tuple[float, float]:
    """(first run, median of the next ``runs``) of one statement on a new superuser connection to ``bench``."""
    with cluster.connect("bench") as conn:
        times = []
        for _ in range(runs + 1):
            started = time.perf_counter()
            conn.execute(sql).fetchall()
            times.append(time.perf_counter() - started)
    return times[0], statistics.median(times[1:])


def main() -> None:
    """Build the database, time everything, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pgbin", type=Path, default=None)
    args = parser.parse_args()

    cluster = LocalCluster(bindir=args.pgbin, name="bloatbench").init().start()
    try:
        started = time.perf_counter()
        create_tables(cluster, args.tables)
        print(f"created {args.tables} tables in {time.perf_counter() - started:.0f} s on PostgreSQL "
              f"{cluster.major}", file=sys.stderr)
        mon_dsn = cluster.create_monitor_role(*MONITOR).replace("/postgres", "/bench")
        su_dsn = cluster.dsn(dbname="bench")
        rows: list[tuple[str, str, tuple[float, float]]] = []

        def add(label: str, role: str, result: tuple[float, float]) -> None:
            rows.append((label, role, result))
            print(f"{label} [{role}]: first {result[0] * 1000:.0f} ms, then {result[1] * 1000:.0f} ms",
                  file=sys.stderr)

        add("reference: SELECT * FROM pg_stat_user_tables", "superuser",
            time_sql(cluster, "SELECT * FROM pg_catalog.pg_stat_user_tables", args.runs))
        add("reference: SELECT * FROM pg_stats", "superuser",
            time_sql(cluster, "SELECT * FROM pg_catalog.pg_stats", args.runs))
        add("pg_bloat_estimate (min_size_bytes 1 MiB: what this database gets)", "superuser",
            time_collector(su_dsn, "pg_bloat_estimate", args.runs))
        add("pg_bloat_estimate, min_size_bytes 0 (all 20,000 relations estimated)", "superuser",
            time_collector(su_dsn, "pg_bloat_estimate", args.runs, {"min_size_bytes": 0}))
        add("pg_bloat_estimate, min_size_bytes 0", "pg_monitor only",
            time_collector(mon_dsn, "pg_bloat_estimate", args.runs, {"min_size_bytes": 0}))
        add("pg_bloat_measured, min_size_bytes 0 (5 tables + 5 indexes read)", "pg_monitor only",
            time_collector(mon_dsn, "pg_bloat_measured", args.runs, {"min_size_bytes": 0}))
        add("pg_stat_user_tables (top 30 + 10 busiest, sizes)", "pg_monitor only",
            time_collector(mon_dsn, "pg_stat_user_tables", args.runs))
        add("pg_table_wraparound", "pg_monitor only", time_collector(mon_dsn, "pg_table_wraparound", args.runs))
        add("pg_database_size (all databases)", "pg_monitor only",
            time_collector(mon_dsn, "pg_database_size", args.runs))

        reference = rows[0][2][1]
        print(f"\nPostgreSQL {cluster.major}, {args.tables} tables ({2 * args.tables} relations with the primary "
              f"keys), first run on a new connection, then median of {args.runs} runs on the same connection:\n")
        print("| what | role | first run | then | then / pg_stat_user_tables read |")
        print("|---|---|---|---|---|")
        for label, role, (first, then) in rows:
            print(f"| {label} | {role} | {first * 1000:,.0f} ms | {then * 1000:,.0f} ms | {then / reference:.1f}x |")
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
