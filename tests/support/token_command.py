"""A real password command for tests: counts its runs, prints a new token, writes a marker to stderr."""

from __future__ import annotations

import sys
from pathlib import Path

LEAK = "Stderr-Leak-Marker-7781"


def token_command(tmp_path: Path, *, exit_status: int = 0, sleep: float = 0.0) -> list[str]:
    """A command that counts its runs in ``runs``, prints a new token and writes a marker to stderr."""
    script = tmp_path / "token.py"
    script.write_text(
        "import pathlib, subprocess, sys, time\n"
        f"runs = pathlib.Path({str(tmp_path / 'runs')!r})\n"
        "count = len(runs.read_text().splitlines()) + 1 if runs.exists() else 1\n"
        "runs.write_text('run\\n' * count)\n"
        f"print({LEAK!r}, file=sys.stderr)\n"
        f"if {sleep!r}:\n"
        # A child that holds stdout open: the timeout must kill it too, not wait for it.
        f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep({sleep!r})'])\n"
        f"    time.sleep({sleep!r})\n"
        f"print(('Token-%d-' % count) + ({LEAK!r} if {exit_status!r} else ''))\n"
        f"sys.exit({exit_status!r})\n", encoding="utf-8")
    return [sys.executable, str(script)]


def runs(tmp_path: Path) -> int:
    path = tmp_path / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0
