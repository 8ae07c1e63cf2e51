"""Database time of each collector, run through the engine, on one database with many tables.

Starts a throwaway PostgreSQL with bench/compare_postgres_exporter.py's tables (N tables, each with a
primary key and a TOAST table), then for each source tree (this one, and ``--baseline DIR``) runs every
collector that applies through one engine as its own pg_monitor role: a warm-up run, then one measured
run per collector, in a child process per round (rounds alternate between the trees). Reported per
collector: the median over the rounds of its statements' execution and planning time
(pg_stat_statements) per run, and per minute at its interval. The four collectors of the relations
pass run it with all four sections due, as the daemon does when their intervals coincide; the three
that reuse it cost nothing. Run: python bench/collector_cost.py [--tables 10000] [--rounds 3]
[--relations-interval 60s] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "bench-password"


def measure(port: int, role: str, relations_interval: str | None) -> dict[str, list[float]]:
    """Child: (ms per run, interval s) of each collector, read from pg_stat_statements (one round)."""
    import psycopg
    from compare_postgres_exporter import RELATION_COLLECTORS  # type: ignore[import-not-found]
    from psycopg.rows import dict_row

    from exporter import __version__
    from exporter.catalog import load as load_catalog
    from exporter.config import load_settings
    from exporter.engine import SERVED_AT, Engine
    from exporter.snapshot import Snapshot

    raw: dict[str, Any] = {"listen": "127.0.0.1:0", "targets": [
        {"name": "bench", "dsn": f"postgresql://{role}:{PASSWORD}@127.0.0.1:{port}/bench"}]}
    if relations_interval:
        raw["collectors"] = {name: {"interval": relations_interval, "timeout": "30s"} for name in RELATION_COLLECTORS}
    catalog = load_catalog()
    engine = Engine(catalog, load_settings(raw=raw, environ={}), Snapshot(catalog, __version__))
    admin = psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/bench", autocommit=True, row_factory=dict_row)

    def spent() -> float:
        row = admin.execute(
            "SELECT coalesce(sum(total_exec_time + total_plan_time), 0) AS ms FROM pg_stat_statements s "
            "JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = %s", [role]).fetchone()
        return float(row["ms"]) if row else 0.0

    try:
        runtime = engine.targets["bench"]
        assert engine.probe(runtime), "target down"
        collectors = engine.applicable(runtime)
        for eff in collectors:  # warm-up: connections open, catalogs cached, as in a running daemon
            engine.collect(runtime, eff)
        for state in runtime.state.values():  # an interval later: the pass is due again for all four
            if SERVED_AT in state:
                state[SERVED_AT] -= 3600
        for shared in runtime.passes.values():
            if "at" in shared:
                shared["at"] -= 3600
        result = {}
        for eff in collectors:
            before = spent()
            engine.collect(runtime, eff)
            result[eff.collector.name] = [spent() - before, eff.interval]
        return result
    finally:
        engine.close()
        admin.close()


Line = tuple[float | None, float | None, float]


def _rows(per_run: dict[str, float], intervals: dict[str, float]) -> dict[str, Line]:
    """(interval, ms per run, ms per minute) by line: the pass as one, those under 1 ms a minute together."""
    from compare_postgres_exporter import RELATION_COLLECTORS

    lines: dict[str, Line] = {}
    rest = 0.0
    for collector, ms in sorted(per_run.items(), key=lambda item: -item[1] * 60 / intervals[item[0]]):
        minute = ms * 60 / intervals[collector]
        if collector in RELATION_COLLECTORS:
            _, run, total = lines.get("the relations pass (4 collectors)", (None, 0.0, 0.0))
            lines["the relations pass (4 collectors)"] = (intervals[collector], (run or 0.0) + ms, total + minute)
        elif minute >= 1.0:
            lines[collector] = (intervals[collector], ms, minute)
        else:
            rest += minute
    lines["all other collectors together"] = (None, None, rest)
    return lines


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tables", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--relations-interval", help="interval of the per-relation collectors (e.g. 60s)")
    parser.add_argument("--baseline", type=Path, help="another pgvitals source tree to measure beside")
    parser.add_argument("--child", nargs=2, metavar=("PORT", "ROLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(int(args.child[0]), args.child[1], args.relations_interval)))
        return 0

    sys.path.insert(0, str(ROOT))  # this tree's exporter, not an installed one
    from compare_postgres_exporter import create_tables

    from exporter.localpg import LocalCluster

    trees = {"this tree": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    cluster = LocalCluster(name="cost", settings={"track_io_timing": "off"})
    try:
        cluster.init().start()
        create_tables(cluster, args.tables)
        roles = {name: f"pv_cost_{i}" for i, name in enumerate(trees)}
        for role in roles.values():
            cluster.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}' IN ROLE pg_monitor")
        runs: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
        intervals: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                # The child imports the exporter from its tree (and the bench helpers from this one).
                env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{ROOT / 'bench'}", PYTHONDONTWRITEBYTECODE="1")
                cmd = [sys.executable, str(ROOT / "bench" / "collector_cost.py"), "--child", str(cluster.port),
                       roles[name]]
                if args.relations_interval:
                    cmd += ["--relations-interval", args.relations_interval]
                done = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"measuring {name} failed:\n{done.stderr}")
                out = done.stdout
                for collector, (ms, interval) in json.loads(out).items():
                    runs[name].setdefault(collector, []).append(ms)
                    intervals[collector] = interval
        print(f"\n{args.tables} tables, PostgreSQL {cluster.major}, median of {args.rounds} rounds, "
              f"relations pass every {args.relations_interval or 'default'}\n")
        per_run = {name: {c: statistics.median(v) for c, v in found.items()} for name, found in runs.items()}
        rows = {name: _rows(found, intervals) for name, found in per_run.items()}
        header = " | ".join(f"{name}: per run | per minute" for name in trees)
        print(f"| collector | every | {header} |")
        print("|---|---|" + "---|---|" * len(trees))
        for label in rows["this tree"]:
            found = {n: rows[n].get(label, (None, 0.0, 0.0)) for n in trees}
            cells = " | ".join(f"{_ms(found[n][1])} | {found[n][2]:.1f} ms" for n in trees)
            every = rows["this tree"][label][0]
            print(f"| {label} | {f'{every:g} s' if every else ''} | {cells} |")
        totals = " | ".join(f" | {sum(r[2] for r in rows[n].values()):.1f} ms" for n in trees)
        print(f"| all | |{totals} |")
        return 0
    finally:
        cluster.destroy()


if __name__ == "__main__":
    sys.exit(main())
