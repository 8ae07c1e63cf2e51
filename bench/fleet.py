"""Fleet scale: the cost of one more server (100 targets from one process) and of one more database (1,000).

``--mode targets``: ``--clusters`` throwaway PostgreSQL clusters, each listed ``--per-cluster`` times as
targets of their own (every target keeps its own connections and schedules), default intervals.
``--mode databases``: one cluster with ``--databases`` databases, one target, optional ``--idle``
(the target's ``idle_connections``).

The exporter runs in a child process (this file with ``--child``) that records when each collector run
started and ended; the parent scrapes ``/metrics`` every 15 s like Prometheus and samples the child's
CPU time and memory from /proc. Reported: CPU (% of one core), RSS, scrape time, the share of runs that
started within 10 % of their interval after the previous one, the worst
``pgvitals_collector_data_age_seconds`` / interval, and in databases mode the per-database collectors'
run (cycle) time and the sessions the server counted (``pg_stat_database.sessions``, 14+).

Run: nice python bench/fleet.py --mode targets --window 300
     nice python bench/fleet.py --mode databases --databases 1000 --window 180 [--idle 1001]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from exporter.localpg import LocalCluster, free_port, wait_until

PASSWORD = "bench-password"
SCRAPE_INTERVAL = 15.0
AGE_LINE = re.compile(rb'^pgvitals_collector_data_age_seconds\{([^}]*)\} (\S+)', re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')


# -- the exporter child ------------------------------------------------------------------------------

def child(config: Path, records: Path) -> int:
    """Run the daemon with every collector run's (target, collector, start, end) recorded; dump them at exit."""
    from exporter.config import load_settings
    from exporter.daemon import Daemon

    daemon = Daemon(load_settings(path=config))
    runs: list[tuple[str, str, float, float]] = []
    collect = daemon.engine.collect

    def timed(runtime: Any, eff: Any) -> None:
        started = time.time()
        try:
            collect(runtime, eff)
        finally:
            runs.append((runtime.name, eff.collector.name, started, time.time()))

    daemon.engine.collect = timed  # type: ignore[method-assign]  # before start(): the jobs bind it
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    daemon.start()
    done.wait()
    opened = {name: rt.conns.opened for name, rt in daemon.engine.targets.items()}
    daemon.stop()
    records.write_text(json.dumps({"runs": runs, "opened": opened}))
    return 0


# -- measuring ---------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int, key: str = "VmRSS") -> float:
    """VmRSS (or VmHWM, the peak) of a process in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(port: int) -> tuple[float, bytes]:
    """(seconds, body) of one GET /metrics."""
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        body = response.read()
    return time.perf_counter() - started, body


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def intervals(config: Path) -> dict[str, tuple[float, str]]:
    """Collector -> (interval, scope) as the exporter plans them with this configuration."""
    from exporter import catalog, planner
    from exporter.config import load_settings

    settings = load_settings(path=config)
    return {e.collector.name: (e.interval, e.collector.scope)
            for e in planner.effective_collectors(catalog.load(), settings) if e.enabled}


def worst_age(body: bytes, plan: dict[str, tuple[float, str]]) -> tuple[float, str]:
    """The largest data age / interval in one scrape, and which collector it is."""
    worst, who = 0.0, ""
    for labels_text, value in AGE_LINE.findall(body):
        labels = dict(LABEL.findall(labels_text.decode()))
        name = labels.get("collector", "")
        if name in plan:
            ratio = float(value) / plan[name][0]
            if ratio > worst:
                worst, who = ratio, f"{name} on {labels.get('target')}"
    return worst, who


def punctuality(runs: list[list[Any]], plan: dict[str, tuple[float, str]], since: float,
                until: float) -> tuple[int, int, float]:
    """(runs on time, runs judged, worst start gap / interval): runs started in [since, until] after a previous one."""
    by_key: dict[tuple[str, str], list[float]] = defaultdict(list)
    for target, name, started, _ended in runs:
        by_key[(target, name)].append(started)
    on_time = judged = 0
    worst = 0.0
    for (_target, name), starts in by_key.items():
        interval = plan[name][0]
        starts.sort()
        for previous, current in itertools.pairwise(starts):
            if since <= current <= until:
                judged += 1
                gap = (current - previous) / interval
                worst = max(worst, gap)
                on_time += gap <= 1.1
    return on_time, judged, worst


def sessions(cluster: LocalCluster, pattern: str) -> int:
    """Sessions the server counted in the databases whose names match ``pattern`` (LIKE)."""
    rows = cluster.execute("SELECT coalesce(sum(sessions), 0)::bigint AS n FROM pg_stat_database "
                           f"WHERE datname LIKE '{pattern}'")
    return int(rows[0]["n"])


# -- set-ups -----------------------------------------------------------------------------------------

def start_clusters(count: int, settings: dict[str, Any]) -> list[LocalCluster]:
    clusters = []
    for i in range(count):
        cluster = LocalCluster(name=f"fleet{i}", settings=settings).init().start()
        cluster.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        cluster.execute(f"CREATE ROLE fleet LOGIN PASSWORD '{PASSWORD}' IN ROLE pg_monitor")
        clusters.append(cluster)
    return clusters


def create_databases(cluster: LocalCluster, count: int) -> None:
    """``count`` empty databases db_0000... (file copies of template1: fsync is off on the bench cluster)."""
    strategy = " STRATEGY FILE_COPY" if cluster.major >= 15 else ""
    for i in range(count):
        cluster.execute(f"CREATE DATABASE db_{i:04d}{strategy}")


def write_config(path: Path, port: int, targets: list[dict[str, Any]]) -> None:
    lines = [f"listen: 127.0.0.1:{port}", "log: {level: WARNING}", "targets:"]
    for target in targets:
        lines.append(f"  - {json.dumps(target)}")
    path.write_text("\n".join(lines) + "\n")


# -- the run -----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("targets", "databases"), default="targets")
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--per-cluster", type=int, default=10)
    parser.add_argument("--databases", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=None, help="idle_connections of the target (databases mode)")
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--window", type=float, default=180.0)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "RECORDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child[0]), Path(args.child[1]))

    work = Path(tempfile.mkdtemp(prefix="pgvitals-fleet-"))
    config, records, log = work / "config.yaml", work / "records.json", work / "exporter.log"
    port = free_port()
    clusters: list[LocalCluster] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        if args.mode == "targets":
            clusters = start_clusters(args.clusters, {})
            targets = [{"name": f"c{i}-t{j}", "dsn": f"postgresql://fleet:{PASSWORD}@127.0.0.1:{c.port}/postgres"}
                       for i, c in enumerate(clusters) for j in range(args.per_cluster)]
        else:
            clusters = start_clusters(1, {"max_connections": max(100, (args.idle or 0) + 50), "fsync": "off",
                                          "full_page_writes": "off", "synchronous_commit": "off"})
            create_databases(clusters[0], args.databases)
            target: dict[str, Any] = {"name": "many",
                                      "dsn": f"postgresql://fleet:{PASSWORD}@127.0.0.1:{clusters[0].port}/postgres"}
            if args.idle is not None:
                target["idle_connections"] = args.idle
            targets = [target]
        print(f"set up {len(clusters)} cluster(s) in {time.monotonic() - started:.0f}s", flush=True)
        write_config(config, port, targets)
        plan = intervals(config)
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, __file__, "--child", str(config), str(records)],
                                    stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: ready(port), timeout=600, interval=1.0)
        time.sleep(args.warmup)

        window_start = time.time()
        cpu_before = cpu_seconds(proc.pid)
        sessions_before = sessions(clusters[0], "db\\_%") if args.mode == "databases" else 0
        scrapes: list[float] = []
        ages: list[tuple[float, str]] = []
        series = body_size = 0
        while time.time() - window_start < args.window:
            tick = time.monotonic()
            took, body = scrape(port)
            scrapes.append(took)
            ages.append(worst_age(body, plan))
            series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
            body_size = len(body)
            time.sleep(max(0.0, SCRAPE_INTERVAL - (time.monotonic() - tick)))
        window_end = time.time()
        minutes = (window_end - window_start) / 60
        cpu = (cpu_seconds(proc.pid) - cpu_before) / (window_end - window_start) * 100
        rss, peak = memory_mb(proc.pid), memory_mb(proc.pid, "VmHWM")
        sessions_after = sessions(clusters[0], "db\\_%") if args.mode == "databases" else 0
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        proc = None
        data = json.loads(records.read_text())
        runs = data["runs"]
        on_time, judged, worst_gap = punctuality(runs, plan, window_start, window_end)
        worst = max(ages, default=(0.0, ""))

        print(f"\nmode {args.mode}: {len(targets)} target(s), PostgreSQL {clusters[0].major}, "
              f"window {minutes:.1f} min after {args.warmup:.0f}s warm-up\n")
        print("| what | figure |")
        print("|---|---|")
        print(f"| exporter CPU, % of one core | {cpu:.1f} % |")
        print(f"| resident memory at the end (peak) | {rss:.0f} MB ({peak:.0f} MB) |")
        print(f"| scrape time, median (max), {len(scrapes)} scrapes | {statistics.median(scrapes) * 1000:.0f} ms "
              f"({max(scrapes) * 1000:.0f} ms) |")
        print(f"| series, body | {series:,}, {body_size / 1e6:.1f} MB |")
        share = on_time / judged * 100 if judged else float("nan")
        print(f"| runs started within 10 % of their interval | {on_time:,} / {judged:,} ({share:.2f} %) |")
        print(f"| worst start gap / interval | {worst_gap:.2f} |")
        print(f"| worst data age / interval (scrapes) | {worst[0]:.2f} ({worst[1]}) |")
        if args.mode == "databases":
            per_db = {n for n, (_i, scope) in plan.items() if scope == "database"}
            n = args.databases
            opened = sessions_after - sessions_before
            print(f"| sessions opened to the {n:,} databases per minute (pg_stat_database.sessions) | "
                  f"{opened / minutes:,.0f} ({opened / minutes / n:.2f} per database) |")
            total = sum(data["opened"].values())
            print(f"| sessions the exporter opened in all (its own count, whole run) | {total:,} |")
            due = sum(60 / plan[name][0] for name in per_db) * n
            print(f"| per-database runs due per minute (database x collector) | {due:,.0f} |")
            # Cycle times over the whole run (warm-up included): the long intervals run once or twice.
            print("\n| per-database collector | interval | runs (whole run) | cycle time median | max |")
            print("|---|---|---|---|---|")
            for name in sorted(per_db, key=lambda x: plan[x][0]):
                took = [end - start for _t, c, start, end in runs if c == name]
                if took:
                    print(f"| {name} | {plan[name][0]:g} s | {len(took)} | {statistics.median(took):.1f} s | "
                          f"{max(took):.1f} s |")
                else:
                    print(f"| {name} | {plan[name][0]:g} s | 0 | | |")
        print(f"\nlogs and records in {work}")
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        for cluster in clusters:
            cluster.destroy()


if __name__ == "__main__":
    sys.exit(main())
