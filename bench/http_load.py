"""HTTP endpoint benchmark: the server of commit 9e73646 (thread per connection) vs today's, side by side.

Each server runs in its own process over the same synthetic snapshot; this process is the client, on loopback:
  1. 100 concurrent scrapers for 15 s, a new connection per scrape and keep-alive: failures, p50, p99;
  2. 400 half-sent requests (slowloris): server threads, a normal scrape's latency while they are held,
     and how long until the server has closed them;
  3. one large scrape (270,000 series, the scrape_path figure) over HTTP: median latency.
Run: python bench/http_load.py [--seconds 15] [--scrapers 100] [--slow 400]
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "9e73646"


def serve(kind: str, series: int, port_file: Path) -> None:
    """Child process: serve a synthetic snapshot with the old or the new server until killed."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from scrape_path import COLLECTOR, METRICS, synthetic_rows  # type: ignore[import-not-found]

    from exporter import __version__
    from exporter.catalog import validate
    from exporter.exposition import label_text, render_rows
    from exporter.snapshot import Snapshot

    targets = max(1, series // 2700)
    snapshot = Snapshot(validate([COLLECTOR]), __version__)
    rows = synthetic_rows(series // targets)
    for t in range(targets):
        name = f"t{t}"
        snapshot.add_target(name, label_text([("target", name)]))
        snapshot.set_up(name, True)
        chunks, _, _ = render_rows(METRICS, rows, label_text([("target", name)]), limit=10**7)
        snapshot.replace(name, "bench", {"": chunks})
    if kind == "old":
        source = subprocess.run(["git", "show", f"{OLD_COMMIT}:exporter/server.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        path = Path(tempfile.mkdtemp()) / "old_server.py"
        path.write_text(source, encoding="utf-8")
        spec = importlib.util.spec_from_file_location("old_server", path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        server = module.MetricsServer("127.0.0.1", 0, snapshot, lambda: (True, "ready"))
    else:
        from exporter.server import MetricsServer

        server = MetricsServer("127.0.0.1", 0, snapshot, lambda: (True, "ready"))
    server.start()
    port_file.write_text(str(server.port))
    threading.Event().wait()


class Child:
    """A server process of one kind."""

    def __init__(self, kind: str, series: int):
        self.port_file = Path(tempfile.mkdtemp()) / "port"
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--series", str(series),
                                         "--port-file", str(self.port_file)], cwd=ROOT)
        deadline = time.monotonic() + 120
        while not self.port_file.exists() or not self.port_file.read_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"{kind} server did not start")
            time.sleep(0.1)
        self.port = int(self.port_file.read_text())

    def threads(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        return -1

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def scrape(port: int, conn: http.client.HTTPConnection | None = None, timeout: float = 10.0) -> int:
    """One GET /metrics (gzip, like Prometheus); the status."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        if own:
            conn.close()


def load(port: int, scrapers: int, seconds: float, keep_alive: bool) -> dict[str, float]:
    """``scrapers`` threads scraping for ``seconds``: requests, failures, p50 and p99 latency."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        nonlocal failures
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10) if keep_alive else None
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                ok = scrape(port, conn) == 200
            except (OSError, http.client.HTTPException):
                ok = False
                if conn is not None:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            took = time.perf_counter() - started
            with lock:
                latencies.append(took)
                failures += not ok

    threads = [threading.Thread(target=worker) for _ in range(scrapers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return {"requests": len(latencies), "failures": failures, "p50": statistics.median(latencies) * 1000,
            "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000}


def slowloris(child: Child, count: int, wait: float) -> dict[str, float]:
    """Hold ``count`` half-sent requests; measure threads, a scrape meanwhile, and when the server closes them."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", child.port), timeout=5)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sock.setblocking(False)
        held.append(sock)
    opened = time.monotonic()
    time.sleep(1)
    threads = child.threads()
    started = time.perf_counter()
    try:
        scrape_ms = (time.perf_counter() - started) * 1000 if scrape(child.port, timeout=30) == 200 else -1.0
    except (OSError, http.client.HTTPException):
        scrape_ms = -1.0
    open_socks = set(held)
    all_closed_after = -1.0
    while open_socks and time.monotonic() - opened < wait:
        for sock in list(open_socks):
            try:
                if sock.recv(1024) == b"":
                    open_socks.discard(sock)
            except BlockingIOError:
                pass
            except OSError:
                open_socks.discard(sock)
        if not open_socks:
            all_closed_after = time.monotonic() - opened
        time.sleep(0.2)
    for sock in held:
        sock.close()
    return {"threads": threads, "scrape_ms": scrape_ms, "still_open": len(open_socks),
            "closed_after": all_closed_after}


def big_scrape(port: int, repeat: int) -> float:
    """Median ms of one uncompressed scrape of a large body (the pre-rendered path plus HTTP)."""
    times = []
    for _ in range(repeat):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        started = time.perf_counter()
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read()
        times.append(time.perf_counter() - started)
        conn.close()
        assert response.status == 200 and body
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", choices=("old", "new"))
    parser.add_argument("--port-file", type=Path)
    parser.add_argument("--series", type=int, default=2700)
    parser.add_argument("--big-series", type=int, default=270_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--scrapers", type=int, default=100)
    parser.add_argument("--slow", type=int, default=400)
    parser.add_argument("--slow-wait", type=float, default=40.0)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.series, args.port_file)
        return
    results: dict[str, dict[str, dict[str, float]]] = {}
    for kind in ("old", "new"):
        child = Child(kind, args.series)
        try:
            results[kind] = {
                "new connection": load(child.port, args.scrapers, args.seconds, keep_alive=False),
                "keep-alive": load(child.port, args.scrapers, args.seconds, keep_alive=True),
                "slowloris": slowloris(child, args.slow, args.slow_wait),
            }
        finally:
            child.close()
        child = Child(kind, args.big_series)
        try:
            results[kind]["big"] = {"ms": big_scrape(child.port, 7)}
        finally:
            child.close()
    print(f"{args.scrapers} scrapers x {args.seconds:g} s, {args.series:,}-series body, gzip; "
          f"{args.slow} half-sent requests; {os.cpu_count()} CPUs, loopback")
    print(f"{'':44}{'9e73646 (threads)':>22}{'this (asyncio)':>22}")
    for mode in ("new connection", "keep-alive"):
        for key, unit in (("requests", ""), ("failures", ""), ("p50", " ms"), ("p99", " ms")):
            old, new = results["old"][mode][key], results["new"][mode][key]
            print(f"{mode + ': ' + key:44}{old:>19,.1f}{unit:3}{new:>19,.1f}{unit:3}")
    labels = {"threads": "slowloris: server threads while held", "scrape_ms": "slowloris: a scrape meanwhile (ms)",
              "still_open": f"slowloris: still open after {args.slow_wait:g} s",
              "closed_after": "slowloris: all closed after (s; -1 never)"}
    for key, label in labels.items():
        print(f"{label:44}{results['old']['slowloris'][key]:>19,.1f}   {results['new']['slowloris'][key]:>19,.1f}")
    old_big, new_big = results["old"]["big"]["ms"], results["new"]["big"]["ms"]
    print(f"{f'one scrape of {args.big_series:,} series (ms)':44}{old_big:>19,.1f}   {new_big:>19,.1f}"
          f"   (new/old {new_big / old_big:.2f}x)")


if __name__ == "__main__":
    main()
