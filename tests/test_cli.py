"""The command line, run as a process: options given on it win over the configuration file."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

from exporter.localpg import free_port

ROOT = Path(__file__).parent.parent


def test_run_honours_log_level_over_the_config(tmp_path: Path) -> None:
    """`run --log-level INFO` logs INFO lines though the config says WARNING (it used to keep WARNING)."""
    config = tmp_path / "pgvitals.yaml"
    # A target nobody listens on: the daemon still starts, and says so at INFO.
    config.write_text(
        "listen: 127.0.0.1:0\n"
        "connect_timeout: 1\n"
        "log:\n  level: WARNING\n"
        f"targets:\n  - name: nowhere\n    dsn: host=127.0.0.1 port={free_port()} dbname=postgres\n",
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", "run", "-c", str(config), "--log-level", "INFO"],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert process.stderr is not None
    stderr = process.stderr
    threading.Thread(target=lambda: [lines.put(line) for line in stderr], daemon=True).start()
    seen: list[str] = []
    try:
        while not any(" INFO pgvitals.daemon: pgvitals " in line and "serving http://" in line for line in seen):
            seen.append(lines.get(timeout=60))  # queue.Empty fails the test: the INFO line never came
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0, seen
