"""What pgvitals writes into a restricted server's log: an old commit and this checkout, side by side in one run.

Two identical throwaway servers are set up the way a managed service looks to a monitoring role: a
database whose CONNECT is revoked (RDS' rdsadmin), one pg_hba.conf rejects, and pg_ls_waldir() and
pg_ls_archive_statusdir() revoked from pg_monitor. One exporter per server, each a real `pgvitals run`
process at the default intervals, for the same window. Reported per exporter: ERROR lines its sessions
caused, FATAL lines (refused connections: nobody else connects to these servers), how often pg_up read
0 when scraped every second, and both error counts scaled to a day.

Run: python bench/restricted_server_log.py [--base REV] [--minutes 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from exporter.localpg import LocalCluster, free_port, wait_until

PASSWORD = "bench-password"
ROOT = Path(__file__).resolve().parent.parent


def restricted_server(name: str) -> LocalCluster:
    """A server with a monitoring role that a managed service would give: pg_monitor minus some functions."""
    cluster = LocalCluster(name=name).init().start()
    cluster.create_monitor_role("mon", PASSWORD)
    for db in ("app", "locked_db", "hba_db"):
        cluster.execute(f"CREATE DATABASE {db}")
    cluster.execute("REVOKE CONNECT ON DATABASE locked_db FROM PUBLIC")
    for function in ("pg_ls_waldir()", "pg_ls_archive_statusdir()"):
        cluster.execute(f"REVOKE EXECUTE ON FUNCTION pg_catalog.{function} FROM pg_monitor")
    hba = cluster.data / "pg_hba.conf"
    hba.write_text("host hba_db all 127.0.0.1/32 reject\n" + hba.read_text())
    cluster.execute("SELECT pg_catalog.pg_reload_conf()")
    return cluster


def start_exporter(source: Path, cluster: LocalCluster, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """`pgvitals run` from ``source`` (a checkout) against ``cluster`` on ``port``."""
    config = workdir / f"{source.name}.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\ntargets:\n  - name: managed\n"
                      f"    dsn: \"{cluster.dsn('mon', PASSWORD)}\"\n")
    env = {**os.environ, "PYTHONPATH": str(source)}
    return subprocess.Popen([sys.executable, "-m", "exporter", "run", "--config", str(config)], cwd=source, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pg_up(port: int) -> float | None:
    """The value of pg_up{target="managed"}, or None when absent or unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    except OSError:
        return None
    for line in body.splitlines():
        if line.startswith('pg_up{target="managed"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def log_counts(cluster: LocalCluster) -> tuple[int, int]:
    """(ERROR lines from pgvitals' sessions, FATAL lines) in the server log."""
    lines = Path(cluster.log_file).read_text(errors="replace").splitlines()
    errors = sum(1 for line in lines if "ERROR:" in line and " pgvitals " in line)
    fatals = sum(1 for line in lines if "FATAL:" in line)
    return errors, fatals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1", help="the commit to compare with (default: HEAD~1)")
    parser.add_argument("--minutes", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgvitals-bench-") as tmp:
        work = Path(tmp)
        base = work / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        clusters, processes = [], []
        try:
            runs = {}
            for label, source in (("base " + args.base, base), ("this checkout", ROOT)):
                cluster = restricted_server(label.split()[0])
                clusters.append(cluster)
                port = free_port()
                processes.append(start_exporter(source, cluster, port, work))
                runs[label] = (cluster, port, log_counts(cluster))
            for _, port, _ in runs.values():
                wait_until(lambda p=port: pg_up(p) is not None, timeout=60)  # type: ignore[misc]
            samples: dict[str, list[float | None]] = {label: [] for label in runs}
            deadline = time.monotonic() + args.minutes * 60
            while time.monotonic() < deadline:
                for label, (_, port, _) in runs.items():
                    samples[label].append(pg_up(port))
                time.sleep(1)
            per_day = 24 * 60 / args.minutes
            print(f"{args.minutes:g} minutes at the default intervals, side by side:\n")
            print("| exporter | ERROR lines | FATAL lines | ERROR / day | FATAL / day | pg_up 0 or absent |")
            print("|---|---|---|---|---|---|")
            for label, (cluster, _, (errors0, fatals0)) in runs.items():
                errors, fatals = log_counts(cluster)
                errors, fatals = errors - errors0, fatals - fatals0
                down = sum(1 for v in samples[label] if v != 1)
                print(f"| {label} | {errors} | {fatals} | {errors * per_day:,.0f} | {fatals * per_day:,.0f} | "
                      f"{down} of {len(samples[label])} samples |")
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=30)
            for cluster in clusters:
                cluster.destroy()
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False,
                           capture_output=True)


if __name__ == "__main__":
    main()
