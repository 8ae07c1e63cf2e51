"""The HTTP server against real sockets: HEAD, Accept-Encoding, limits, garbage, slowloris, many scrapers."""

from __future__ import annotations

import gzip
import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from exporter import __version__, catalog
from exporter.server import MAX_HEAD, MetricsServer, accepts_gzip
from exporter.snapshot import Snapshot
from tests.support.metrics_server import HANG, get, make_snapshot

READ_TIMEOUT = 2.0


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    srv = MetricsServer("127.0.0.1", 0, make_snapshot(), lambda: (True, "ready"), read_timeout=READ_TIMEOUT)
    srv.start()
    yield srv
    srv.stop()


def raw(port: int, payload: bytes, timeout: float = HANG) -> bytes:
    """Send bytes, read until the server closes, return everything it sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize(("header", "expected"), [
    (None, False), ("", False), ("gzip", True), ("GZIP", True), ("deflate, gzip;q=0.5", True),
    ("gzip;q=0", False), ("gzip; q=0.0", False), ("*", True), ("*;q=0", False), ("gzip;q=0, *", False),
    ("identity", False), ("br, *;q=0.1", True), ("x-gzip", True), ("gzipfoo", False), ("gzip;q=abc", False),
])
def test_accepts_gzip_follows_rfc_9110(header: str | None, expected: bool) -> None:
    assert accepts_gzip(header) is expected


def test_gzip_q0_gets_an_identity_body(server: MetricsServer) -> None:
    """Issue 14: 'gzip' as a substring was enough to compress, so gzip;q=0 (no gzip, please) got gzip."""
    status, headers, body = get(server.port, headers={"Accept-Encoding": "gzip;q=0"})
    assert status == 200
    assert "content-encoding" not in headers
    assert b"pgvitals_up" in body or b"pg_up" in body
    status, headers, zipped = get(server.port, headers={"Accept-Encoding": "gzip"})
    assert headers["content-encoding"] == "gzip"
    assert gzip.decompress(zipped).split(b"\n")[0] == body.split(b"\n")[0]


def test_head_answers_headers_without_a_body(server: MetricsServer) -> None:
    _, get_headers, body = get(server.port)
    status, headers, head_body = get(server.port, method="HEAD")
    assert status == 200
    assert head_body == b""
    assert headers["content-type"] == get_headers["content-type"]
    assert abs(int(headers["content-length"]) - len(body)) < 200  # process metrics move between the two
    for path in ("/healthz", "/readyz"):
        assert get(server.port, path, method="HEAD")[0] == 200


def test_keep_alive_serves_several_requests_on_one_connection(server: MetricsServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG)
    try:
        for path in ("/metrics", "/healthz", "/readyz", "/metrics"):
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.status == 200
            response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(("name", "payload", "expected"), [
    ("binary garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", 400),
    ("no version", b"GET /metrics\r\nHost: x\r\n\r\n", 400),
    ("lower-case method", b"get /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("no Host in HTTP/1.1", b"GET /metrics HTTP/1.1\r\n\r\n", 400),
    ("two Content-Length", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    ("header without colon", b"GET / HTTP/1.1\r\nHost: x\r\nnonsense\r\n\r\n", 400),
    ("long request line", b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("head over the limit", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (MAX_HEAD * 4) + b"\r\n\r\n", 431),
    ("too many headers", b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 150 + b"\r\n", 431),
    ("chunked body", b"POST /-/reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    ("huge body", b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", 413),
    ("POST /metrics", b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405),
    ("unknown path", b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
    ("absolute-form junk", b"GET http://evil/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
])
def test_garbage_and_oversized_requests_get_4xx_and_the_server_lives_on(
        server: MetricsServer, name: str, payload: bytes, expected: int) -> None:
    response = raw(server.port, payload)
    assert status_of(response) == expected, f"{name}: {response[:200]!r}"
    assert get(server.port, "/healthz")[0] == 200


def test_lifecycle_reload_is_forbidden_unless_enabled(server: MetricsServer) -> None:
    assert get(server.port, "/-/reload", method="POST")[0] == 403
    assert get(server.port, "/-/reload")[0] == 405
    calls: list[int] = []

    def reload() -> tuple[bool, str]:
        calls.append(1)
        return True, "reloaded"

    enabled = MetricsServer("127.0.0.1", 0, make_snapshot(), lambda: (True, "ready"), reload=reload)
    enabled.start()
    try:
        status, _, body = get(enabled.port, "/-/reload", method="POST")
        assert (status, body, calls) == (200, b"reloaded\n", [1])
    finally:
        enabled.stop()


def test_half_sent_connections_do_not_block_scrapes_and_are_closed(server: MetricsServer) -> None:
    """400 slowloris connections: threads stay bounded, a scrape answers, the server closes them all."""
    threads_before = threading.active_count()
    held = []
    try:
        for i in range(400):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=HANG)
            # Half a request; half of them keep trickling a byte, which must not extend the deadline.
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            held.append((i % 2 == 0, sock))
        status, _, body = get(server.port)
        assert status == 200 and body
        assert threading.active_count() <= threads_before + 8
        closed = 0
        deadline = time.monotonic() + HANG
        for trickle, sock in held:
            while time.monotonic() < deadline:
                try:
                    if trickle:
                        sock.sendall(b"a")
                    sock.settimeout(0.5 if trickle else HANG)
                    if sock.recv(1024) == b"":
                        closed += 1
                        break
                except TimeoutError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    closed += 1
                    break
        assert closed == len(held)
    finally:
        for _, sock in held:
            sock.close()
    assert get(server.port)[0] == 200


def test_many_concurrent_scrapers_see_no_failures(server: MetricsServer) -> None:
    failures: list[str] = []
    done = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + 3.0

    def scraper() -> None:
        nonlocal done
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG)
        while time.monotonic() < stop_at:
            try:
                conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
                response = conn.getresponse()
                response.read()
                with lock:
                    done += 1
                    if response.status != 200:
                        failures.append(str(response.status))
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG)
        conn.close()

    workers = [threading.Thread(target=scraper) for _ in range(50)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(HANG)
    assert failures == []
    assert done >= 50


def test_a_full_server_makes_room_by_closing_the_oldest_idle_connection() -> None:
    srv = MetricsServer("127.0.0.1", 0, make_snapshot(), lambda: (True, "ready"), max_connections=10)
    srv.start()
    try:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=HANG) for _ in range(10)]
        status, _, _ = get(srv.port, "/healthz")  # the eleventh connection is served
        assert status == 200
        idle[0].settimeout(HANG)
        assert idle[0].recv(1024) == b""  # the oldest waiting one was closed for it
        for sock in idle:
            sock.close()
    finally:
        srv.stop()


def test_http_1_0_keep_alive_is_honoured(server: MetricsServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = b""
        while not first.endswith(b"ok\n"):
            chunk = sock.recv(65536)
            assert chunk, f"closed after {first!r}"
            first += chunk
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    assert b"Connection: keep-alive" in first and first.endswith(b"ok\n")
    assert status_of(rest) == 200 and b"Connection: close" in rest


def test_a_kept_alive_connection_may_idle_past_the_read_timeout_between_scrapes(server: MetricsServer) -> None:
    """Prometheus reuses its connection every interval; only a started request head has the short deadline."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
        sock = conn.sock
        time.sleep(READ_TIMEOUT * 1.5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
        assert conn.sock is sock  # the same connection, not a silent reconnect
    finally:
        conn.close()


def two_target_snapshot() -> Snapshot:
    """Two targets with collected lines of the same metric, as the engine would record them."""
    snapshot = Snapshot(catalog.load(), __version__)
    spec = catalog.load().by_name["pg_stat_database"].metrics[0]
    for name in ("db1", "db2"):
        snapshot.add_target(name, f'target="{name}"')
        snapshot.set_up(name, True)
        lines = f'{spec.name}{{target="{name}",datname="postgres"}} 1\n'.encode()
        snapshot.record_run(name, "pg_stat_database", duration=0.01, finished=time.time(), series=1, failures=(),
                            results={"": {spec.name: lines}})
    return snapshot


def test_probe_serves_one_target_only_and_names_unknown_ones() -> None:
    srv = MetricsServer("127.0.0.1", 0, two_target_snapshot(), lambda: (True, "ready"), read_timeout=READ_TIMEOUT)
    srv.start()
    try:
        status, headers, body = get(srv.port, "/probe?target=db2")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        assert b'target="db2"' in body and b'target="db1"' not in body
        assert b'pg_up{target="db2"} 1' in body and b"pgvitals_build_info" in body
        assert b"process_" not in body  # the exporter's own process is /metrics' business
        # The whole exposition still has both, and a later run of db1 does not leak into db2's cached body.
        assert b'target="db1"' in get(srv.port)[2]
        srv.snapshot.set_up("db1", False)
        assert get(srv.port, "/probe?target=db2")[2].count(b'target="db1"') == 0
        assert b'pg_up{target="db1"} 0' in get(srv.port, "/probe?target=db1")[2]
        status, headers, zipped = get(srv.port, "/probe?target=db2", headers={"Accept-Encoding": "gzip"})
        assert status == 200 and b'target="db2"' in gzip.decompress(zipped)
        status, _, body = get(srv.port, "/probe?target=nope")
        assert status == 404 and b"unknown target 'nope'" in body
        status, _, body = get(srv.port, "/probe")
        assert status == 400 and b"/probe?target=NAME" in body
    finally:
        srv.stop()
