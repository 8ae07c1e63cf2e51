"""pgvitals vs postgres_exporter on one database with 10,000 tables, side by side in one run.

Both exporters watch the same throwaway PostgreSQL (each with its own pg_monitor role, so that
pg_stat_statements can tell their database cost apart) and are scraped on the same 15 s schedule
for a measurement window. Reported: scrape latency, series, body size, resident memory, and the
query time each one cost the database per minute.

Needs the Debian package prometheus-postgres-exporter (its example queries.yaml is used, as the
brief's reference figures were). Run: python bench/compare_postgres_exporter.py [--tables 10000]
``--relations-interval 60`` runs pgvitals' per-relation collectors (those of the one pass) every minute;
``--baseline DIR`` adds a third exporter, pgvitals from another source tree (e.g. `git archive main
exporter | tar -x -C DIR`), with a role of its own, for a before/after in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from exporter.localpg import LocalCluster, free_port, wait_until

PE_BINARY = "/usr/bin/prometheus-postgres-exporter"
PE_QUERIES = "/usr/share/doc/prometheus-postgres-exporter/examples/queries.yaml"
PASSWORD = "bench-password"
RELATION_COLLECTORS = ("pg_stat_user_tables", "pg_statio_user_tables", "pg_statio_user_indexes", "pg_table_wraparound")


def create_tables(cluster: LocalCluster, count: int) -> None:
    """``count`` small tables with a primary key and a few rows each, in database ``bench``."""
    cluster.execute("CREATE DATABASE bench")
    for db in ("postgres", "bench"):
        cluster.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", db)
    batch = 500
    for start in range(0, count, batch):
        last = min(start + batch, count) - 1
        cluster.execute(
            f"DO $$ BEGIN FOR i IN {start}..{last} LOOP "
            "EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, v text)', i); "
            "EXECUTE format('INSERT INTO t_%s SELECT g, ''x'' FROM generate_series(1, 3) g', i); "
            "END LOOP; END $$",
            "bench",
        )
    cluster.execute("ANALYZE", "bench")


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(port: int) -> tuple[float, int, int]:
    """(seconds, bytes, series) of one GET /metrics."""
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=120) as response:
        body = response.read()
    took = time.perf_counter() - started
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return took, len(body), series


def db_time_ms(cluster: LocalCluster, role: str) -> float:
    """Total execution plus planning time of every statement the role ran (pg_stat_statements)."""
    rows = cluster.execute(
        "SELECT coalesce(sum(total_exec_time + total_plan_time), 0) AS ms FROM pg_stat_statements s "
        f"JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = '{role}'"
    )
    return float(rows[0]["ms"])


def pass_runs(cluster: LocalCluster, role: str) -> int:
    """How often the role ran pgvitals' relations pass (its one query answering every section)."""
    rows = cluster.execute(
        "SELECT coalesce(sum(calls), 0)::bigint AS n FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
        f"WHERE r.rolname = '{role}' AND s.query LIKE '%AS section%'"
    )
    return int(rows[0]["n"])


def top_statements(cluster: LocalCluster, role: str, limit: int = 6) -> list[dict[str, Any]]:
    """The role's costliest statements (pg_stat_statements): where its database time goes."""
    return cluster.execute(
        "SELECT s.calls, s.total_exec_time + s.total_plan_time AS ms, d.datname, "
        "left(regexp_replace(s.query, '\\s+', ' ', 'g'), 60) AS query FROM pg_stat_statements s "
        "JOIN pg_roles r ON r.oid = s.userid JOIN pg_database d ON d.oid = s.dbid "
        f"WHERE r.rolname = '{role}' ORDER BY ms DESC LIMIT {limit}"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tables", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=120.0, help="measurement window in seconds")
    parser.add_argument("--scrape-interval", type=float, default=15.0)
    parser.add_argument("--relations-interval", help="interval of the per-relation collectors (e.g. 60s)")
    parser.add_argument("--baseline", type=Path, help="another pgvitals source tree to run beside (before/after)")
    args = parser.parse_args()
    if not Path(PE_BINARY).exists():
        print("install prometheus-postgres-exporter (Debian) first", file=sys.stderr)
        return 1

    cluster = LocalCluster(name="bench", settings={"max_connections": 300, "track_io_timing": "off"})
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cluster.init().start()
        started = time.monotonic()
        create_tables(cluster, args.tables)
        print(f"created {args.tables} tables in {time.monotonic() - started:.0f}s", flush=True)
        roles = ("pe_bench", "pv_bench", "pv_base") if args.baseline else ("pe_bench", "pv_bench")
        for role in roles:
            cluster.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}' IN ROLE pg_monitor")

        pe_port, pv_port = free_port(), free_port()
        env = dict(os.environ, DATA_SOURCE_NAME=(
            f"postgresql://pe_bench:{PASSWORD}@127.0.0.1:{cluster.port}/bench?sslmode=disable"))
        procs.append(subprocess.Popen(
            [PE_BINARY, f"--web.listen-address=127.0.0.1:{pe_port}", f"--extend.query-path={PE_QUERIES}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        collectors = ""
        if args.relations_interval:
            collectors = "collectors:\n" + "".join(
                f"  {name}: {{interval: {args.relations_interval}, timeout: 30s}}\n" for name in RELATION_COLLECTORS)
        pv_ports = {"pv_bench": free_port(), "pv_base": free_port()}
        for role, source in (("pv_bench", None), ("pv_base", args.baseline)):
            if role not in roles:
                continue
            config = Path(tempfile.mkdtemp()) / "pgvitals.yaml"
            config.write_text(
                f"listen: 127.0.0.1:{pv_ports[role]}\n"
                f"targets:\n  - name: bench\n    dsn: postgresql://{role}:{PASSWORD}@127.0.0.1:{cluster.port}/bench\n"
                "log: {level: WARNING}\n" + collectors
            )
            # `python -m` looks in the working directory first: run a baseline from its own tree.
            child_env = dict(os.environ, PYTHONPATH=str(source), PYTHONDONTWRITEBYTECODE="1") if source else None
            procs.append(subprocess.Popen([sys.executable, "-m", "exporter", "run", "--config", str(config)],
                                          stdout=subprocess.DEVNULL, env=child_env, cwd=source))
        pv_port = pv_ports["pv_bench"]
        pe, pv = procs[0], procs[1]
        for role in roles[1:]:
            wait_until(lambda role=role: _ready(pv_ports[role]), timeout=300, interval=0.5)
        wait_until(lambda: _serves(pe_port), timeout=60, interval=0.5)
        scrape(pe_port)  # warm both up once
        scrape(pv_port)
        cluster.execute("SELECT pg_stat_statements_reset()")
        before = {r: db_time_ms(cluster, r) for r in roles}
        passes_before = {r: pass_runs(cluster, r) for r in roles[1:]}
        results: dict[str, list[tuple[float, int, int]]] = {"postgres_exporter": [], "pgvitals": []}
        window_start = time.monotonic()
        while time.monotonic() - window_start < args.window:
            tick = time.monotonic()
            results["postgres_exporter"].append(scrape(pe_port))
            results["pgvitals"].append(scrape(pv_port))
            time.sleep(max(0.0, args.scrape_interval - (time.monotonic() - tick)))
        minutes = (time.monotonic() - window_start) / 60
        cost = {r: (db_time_ms(cluster, r) - before[r]) / 1000 / minutes for r in before}
        passes = {r: (pass_runs(cluster, r) - passes_before[r]) / minutes for r in passes_before}
        memory = {"postgres_exporter": rss_mb(pe.pid), "pgvitals": rss_mb(pv.pid)}

        print(f"\n{args.tables} tables, PostgreSQL {cluster.major}, scraped every {args.scrape_interval:g}s "
              f"for {minutes:.1f} min, per-relation collectors every {args.relations_interval or 'default'}\n")
        print("| | postgres_exporter 0.11 (example queries) | pgvitals (defaults) | ratio |")
        print("|---|---|---|---|")
        pe_r, pv_r = results["postgres_exporter"], results["pgvitals"]
        rows = [
            ("scrape time, median", statistics.median(t for t, _, _ in pe_r), statistics.median(t for t, _, _ in pv_r),
             "{:.3f} s"),
            ("series", pe_r[-1][2], pv_r[-1][2], "{:,}"),
            ("body", pe_r[-1][1] / 1e6, pv_r[-1][1] / 1e6, "{:.1f} MB"),
            ("resident memory", memory["postgres_exporter"], memory["pgvitals"], "{:.0f} MB"),
            ("database query time per minute", cost["pe_bench"], cost["pv_bench"], "{:.2f} s"),
        ]
        if args.baseline:
            rows.append(("database query time per minute, baseline pgvitals", cost["pe_bench"], cost["pv_base"],
                         "{:.2f} s"))
        for label, a, b, fmt in rows:
            ratio = f"{a / b:.1f}x" if b else "n/a"
            print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
        print("\nrelations pass runs per minute: " + ", ".join(f"{r} {n:.2f}" for r, n in passes.items()))
        for role in roles:
            print(f"\n{role}'s costliest statements over the window (calls, ms per minute, ms per call):")
            for row in top_statements(cluster, role):
                calls, ms = int(row["calls"]), float(row["ms"])
                print(f"  {calls:6d} {ms / minutes:8.1f} {ms / calls:8.2f}  {row['datname']}: {row['query']}")
        return 0
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        cluster.destroy()


def _serves(port: int) -> bool:
    try:
        scrape(port)
        return True
    except OSError:
        return False


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
