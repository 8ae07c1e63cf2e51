"""`pgvitals demo` as a user runs it: the exporter serves the throwaway PostgreSQL, the throwaway Prometheus
shows an alert of our generated rules firing, and Ctrl-C leaves no process and no temporary file behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.demo import find_prometheus
from exporter.localpg import wait_until

# Not `live`: the demo starts its own server from the machine's binaries, so the matrix need not repeat it
# on every major; it runs once, in the whole suite.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FIRE_TIMEOUT = 150.0  # the demo's lock chain starts after 3 s; its alert needs 5 s of waiting plus a 10 s `for`


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes (other than this one) that name ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.fixture
def demo_tmp() -> Iterator[Path]:
    """A private TMPDIR for the demo (short: socket paths; readable by the postgres OS user it may run as)."""
    path = Path(tempfile.mkdtemp(prefix="pgvd-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_demo_fires_an_alert_and_cleans_up_on_ctrl_c(demo_tmp: Path) -> None:
    if find_prometheus() is None:
        pytest.skip("prometheus is not installed (scripts/setup installs it)")
    output = demo_tmp.parent / f"{demo_tmp.name}.out"
    with output.open("w") as out:
        demo = subprocess.Popen([sys.executable, "-m", "exporter", "demo", "--port", "0"], cwd=ROOT,
                                env=dict(os.environ, TMPDIR=str(demo_tmp)), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        def urls() -> tuple[str, str] | None:
            assert demo.poll() is None, output.read_text()
            text = output.read_text()
            metrics = re.search(r"exporter at (http://\S+/metrics)", text)
            prometheus = re.search(r"Prometheus at (http://\S+)", text)
            return (metrics[1], prometheus[1]) if metrics and prometheus else None

        metrics_url, prometheus_url = wait_until(urls, timeout=120, interval=0.5)
        assert prometheus_url.startswith("http://127.0.0.1:")  # loopback only
        wait_until(lambda: 'pg_up{target="demo"} 1' in get(metrics_url), timeout=60, interval=0.5)

        def firing() -> list[dict[str, Any]]:
            alerts = json.loads(get(f"{prometheus_url}/api/v1/alerts"))["data"]["alerts"]
            return [a for a in alerts if a["state"] == "firing"]

        fired = wait_until(firing, timeout=FIRE_TIMEOUT, interval=1.0)
        assert "PostgresLockWaits" in {a["labels"]["alertname"] for a in fired}, fired
        rules = json.loads(get(f"{prometheus_url}/api/v1/rules"))["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {"PostgresLockWaits", "PgvitalsExporterDown"}
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            returncode = demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()
            raise
    log = output.read_text()
    output.unlink()
    assert returncode == 0, log
    assert "demo cleaned up" in log
    assert processes_mentioning(str(demo_tmp)) == []  # PostgreSQL and Prometheus ran from there
    assert list(demo_tmp.iterdir()) == [], log
