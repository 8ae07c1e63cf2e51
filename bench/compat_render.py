"""Naming modes: what deriving postgres_exporter's names costs at collection time, and what it costs a scrape.

The real catalog's pg_stat_database, pg_locks and pg_statio_user_tables collectors render synthetic rows
(default 200 databases, 50 tables each) in native, postgres_exporter and both modes, side by side in one
run; then a snapshot holding each mode's lines for 10 targets serves scrapes. Ratios are to native.
Run: python bench/compat_render.py [--databases N] [--tables N] [--targets N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from exporter import __version__, compat
from exporter.catalog import Catalog, load
from exporter.collectors.locks import LOCK_MODES
from exporter.exposition import label_text, render_rows
from exporter.snapshot import Snapshot

COLLECTORS = ("pg_stat_database", "pg_locks", "pg_statio_user_tables")


def synthetic_rows(databases: int, tables: int) -> dict[str, list[dict[str, object]]]:
    """Rows shaped like each collector's SQL output."""
    stat_database = [
        {"datid": 16384 + d, "datname": f"db{d}", "numbackends": d % 9, "xact_commit": d * 1000,
         "xact_rollback": d, "blks_read": d * 50, "blks_hit": d * 5000, "tup_returned": d * 70,
         "tup_fetched": d * 60, "tup_inserted": d * 5, "tup_updated": d * 4, "tup_deleted": d, "conflicts": 0,
         "temp_files": d % 3, "temp_bytes": d * 8192, "deadlocks": 0, "checksum_failures": None,
         "blk_read_time": d * 1.5, "blk_write_time": d * 0.5, "stats_reset": 1.7e9, "session_time": d * 9.0,
         "active_time": d * 3.0, "idle_in_transaction_time": d * 0.1, "sessions": d, "sessions_abandoned": 0,
         "sessions_fatal": 0, "sessions_killed": 0}
        for d in range(databases)]
    locks = [{"datname": f"db{d}", "mode": mode, "granted": granted, "locks": (d + len(mode)) % 4}
             for d in range(databases) for mode in LOCK_MODES for granted in (True, False)]
    statio = [{"datname": f"db{d}", "schemaname": "public", "relname": f"t{t}", **{
        f"{part}_blks_{what}": d * t for part in ("heap", "idx", "toast", "tidx") for what in ("read", "hit")}}
        for d in range(databases) for t in range(tables)]
    return {"pg_stat_database": stat_database, "pg_locks": locks, "pg_statio_user_tables": statio}


def render(catalog: Catalog, naming: compat.Naming, name: str, rows: list[dict[str, object]],
           target: str = "main") -> dict[str, bytes]:
    """One collector run's rendering, as the engine does it in ``naming`` mode."""
    collector = catalog.by_name[name]
    chosen = compat.plan(collector, naming)
    prefix = label_text([("target", target)])
    chunks, _, _ = render_rows(chosen.native, rows, prefix, 10**7)
    if chosen.derived:
        derived, _, _ = compat.render_derived(chosen.derived, rows, prefix, "db:5432", 10**7)
        chunks.update(derived)
    return chunks


def best_of(runs: int, action: Callable[[], object]) -> float:
    """Median wall time of ``runs`` calls, in milliseconds."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    """Print collection-time and scrape-time figures per naming mode."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--databases", type=int, default=200)
    parser.add_argument("--tables", type=int, default=50)
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    catalog = load()
    rows = synthetic_rows(args.databases, args.tables)
    print(f"{args.databases} databases, {args.tables} tables each, {args.targets} targets; median of {args.runs}")
    print(f"{'mode':<18} {'series/target':>13} {'render ms':>10} {'x native':>9} {'scrape ms':>10} {'x native':>9} "
          f"{'body MB':>8}")
    base_render = base_scrape = 0.0
    for naming in compat.NAMINGS:
        per_collector = {name: render(catalog, naming, name, rows[name]) for name in COLLECTORS}
        series = sum(chunk.count(b"\n") for chunks in per_collector.values() for chunk in chunks.values())
        render_ms = best_of(args.runs, lambda n=naming: [render(catalog, n, c, rows[c]) for c in COLLECTORS])
        snapshot = Snapshot(catalog, __version__)
        snapshot.use_order(compat.exposition_order(catalog, naming), compat.self_order(catalog, naming))
        for t in range(args.targets):
            target = f"t{t}"
            snapshot.add_target(target, label_text([("target", target)]))
            snapshot.set_up(target, True)
            for name in COLLECTORS:
                chunks = render(catalog, naming, name, rows[name], target)
                snapshot.record_run(target, name, duration=0.01, finished=time.time(), series=series,
                                    failures=[], results={"": chunks})
        body = snapshot.render()  # the first scrape after a collection assembles the body once
        scrape_ms = best_of(args.runs, snapshot.render)
        if naming == "native":
            base_render, base_scrape = render_ms, scrape_ms
        print(f"{naming:<18} {series:>13} {render_ms:>10.1f} {render_ms / base_render:>9.2f} {scrape_ms:>10.2f} "
              f"{scrape_ms / base_scrape:>9.2f} {len(body) / 1e6:>8.1f}")


if __name__ == "__main__":
    main()
