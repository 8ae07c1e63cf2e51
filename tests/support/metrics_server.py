"""The HTTP server's side of tests: a snapshot to serve and plain requests with a hang-only timeout."""

from __future__ import annotations

import http.client

from exporter import __version__, catalog
from exporter.snapshot import Snapshot

HANG = 60.0  # upper bound that only catches a hang, never a timing claim


def make_snapshot() -> Snapshot:
    """A snapshot with one target that is up and has no collector data yet."""
    snapshot = Snapshot(catalog.load(), __version__)
    snapshot.add_target("db1", 'target="db1"')
    snapshot.set_up("db1", True)
    return snapshot


def get(port: int, path: str = "/metrics", method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, lower-cased headers and body of one request to 127.0.0.1:``port``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()
