"""The endpoint over TLS with basic auth and client certificates, from an exporter-toolkit web config.

Certificates come from trustme, made per test; clients are Python's ssl/http.client and the curl binary.
"""

from __future__ import annotations

import base64
import http.client
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import trustme

from exporter.cli import main
from exporter.config import load_settings
from exporter.localpg import wait_until
from exporter.server import MetricsServer
from exporter.webconfig import BasicAuth, WebConfigError, load_web_config
from tests.support.metrics_server import HANG, get, make_snapshot
from tests.support.servers import Server, settings_for

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "prometheus", "scrape-Secret-42"
Serve = Callable[[Path], MetricsServer]


@dataclass
class Pki:
    """A CA, a server certificate for localhost and a client certificate, as files."""

    ca: trustme.CA
    dir: Path
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path

    def issue_server(self, cert_file: Path, key_file: Path) -> trustme.LeafCert:
        leaf = self.ca.issue_cert("localhost", "127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(cert_file))
        leaf.private_key_pem.write_to_path(str(key_file))
        return leaf

    def client_context(self, with_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if with_client_cert:
            ctx.load_cert_chain(str(self.client_cert_file))
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    pki = Pki(ca, tmp_path, ca_file, tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "client.pem")
    pki.issue_server(pki.cert_file, pki.key_file)
    ca.issue_cert("scraper@example.org", "prometheus.example.org").private_key_and_cert_chain_pem.write_to_path(
        str(pki.client_cert_file))
    return pki


def write_web_config(pki: Pki, extra_tls: str = "", users: bool = True, headers: str = "") -> Path:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    text = (f"tls_server_config:\n  cert_file: {pki.cert_file.name}\n  key_file: {pki.key_file.name}\n{extra_tls}"
            + (f"basic_auth_users:\n  {USER}: '{hashed}'\n" if users else "")
            + headers)
    path = pki.dir / "web.yml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def serve(pki: Pki) -> Iterator[Serve]:
    started: list[MetricsServer] = []

    def start(web_path: Path) -> MetricsServer:
        srv = MetricsServer("127.0.0.1", 0, make_snapshot(), lambda: (False, "not ready: db1: not reachable (h)"),
                            web=load_web_config(web_path))
        srv.start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def https_get(port: int, ctx: ssl.SSLContext, path: str = "/metrics",
              auth: tuple[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=HANG)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def served_certificate(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=HANG) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def curl(port: int, pki: Pki, *args: str, path: str = "/metrics") -> int:
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30",
                          "--cacert", str(pki.ca_file), *args, f"https://localhost:{port}{path}"],
                         capture_output=True, text=True, timeout=HANG)
    return int(out.stdout or 0)


def test_python_client_gets_401_without_credentials_and_200_with_them(pki: Pki, serve: Serve) -> None:
    srv = serve(write_web_config(pki, headers="http_server_config:\n  headers:\n"
                                              "    X-Content-Type-Options: nosniff\n"
                                              "    Strict-Transport-Security: max-age=31536000\n"))
    ctx = pki.client_context()
    status, headers, _ = https_get(srv.port, ctx)
    assert status == 401 and headers["www-authenticate"].startswith("Basic ")
    assert https_get(srv.port, ctx, auth=(USER, "wrong"))[0] == 401
    assert https_get(srv.port, ctx, auth=("nobody", PASSWORD))[0] == 401
    status, headers, body = https_get(srv.port, ctx, auth=(USER, PASSWORD))
    assert status == 200 and b"pgvitals_" in body
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["strict-transport-security"] == "max-age=31536000"
    # Liveness stays open; readiness answers its status to anyone but its details only with credentials.
    assert https_get(srv.port, ctx, "/healthz")[:3:2] == (200, b"ok\n")
    assert https_get(srv.port, ctx, "/readyz")[:3:2] == (503, b"not ready\n")
    assert b"db1" in https_get(srv.port, ctx, "/readyz", auth=(USER, PASSWORD))[2]
    # /probe is guarded like /metrics.
    assert https_get(srv.port, ctx, "/probe?target=db1")[0] == 401
    status, _, body = https_get(srv.port, ctx, "/probe?target=db1", auth=(USER, PASSWORD))
    assert status == 200 and b'pg_up{target="db1"} 1' in body
    # Plain HTTP on the TLS port is not served.
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=HANG)
        conn.request("GET", "/metrics")
        conn.getresponse().read()


def test_successful_credentials_are_cached_failures_are_not(pki: Pki, serve: Serve) -> None:
    srv = serve(write_web_config(pki))
    assert isinstance(srv.auth, BasicAuth)
    assert not srv.auth.cached(USER, PASSWORD.encode())
    assert https_get(srv.port, pki.client_context(), auth=(USER, "wrong"))[0] == 401
    assert not srv.auth.cached(USER, b"wrong")
    assert https_get(srv.port, pki.client_context(), auth=(USER, PASSWORD))[0] == 200
    assert srv.auth.cached(USER, PASSWORD.encode())
    assert not srv.auth.cached(USER, PASSWORD.encode() + b"x")
    assert PASSWORD.encode() not in b"".join(srv.auth._ok)


def test_curl_gets_401_without_credentials_and_200_with_them(pki: Pki, serve: Serve) -> None:
    srv = serve(write_web_config(pki))
    assert curl(srv.port, pki) == 401
    assert curl(srv.port, pki, "-u", f"{USER}:wrong") == 401
    assert curl(srv.port, pki, "-u", f"{USER}:{PASSWORD}") == 200
    assert curl(srv.port, pki, path="/healthz") == 200


def test_client_certificate_is_required_when_configured(pki: Pki, serve: Serve) -> None:
    srv = serve(write_web_config(pki, users=False, extra_tls=(
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca_file.name}\n")))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(srv.port, pki.client_context(), "/healthz")
    assert curl(srv.port, pki) == 0  # curl fails the handshake: no HTTP status at all
    # A certificate from another CA is refused too.
    stranger = trustme.CA().issue_cert("mallory@example.org")
    foreign = pki.dir / "foreign.pem"
    stranger.private_key_and_cert_chain_pem.write_to_path(str(foreign))
    assert curl(srv.port, pki, "--cert", str(foreign)) == 0
    assert https_get(srv.port, pki.client_context(with_client_cert=True))[0] == 200
    assert curl(srv.port, pki, "--cert", str(pki.client_cert_file)) == 200


def test_client_allowed_sans_restricts_verified_clients(pki: Pki, serve: Serve) -> None:
    srv = serve(write_web_config(pki, users=False, extra_tls=(
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca_file.name}\n"
        "  client_allowed_sans: [someone-else.example.org]\n")))
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        https_get(srv.port, pki.client_context(with_client_cert=True))
    allowed = serve(write_web_config(pki, users=False, extra_tls=(
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca_file.name}\n"
        "  client_allowed_sans: [prometheus.example.org]\n")))
    assert https_get(allowed.port, pki.client_context(with_client_cert=True))[0] == 200


def test_rotated_certificate_is_served_without_restart(pki: Pki, serve: Serve) -> None:
    srv = serve(write_web_config(pki))
    ctx = pki.client_context()
    first = served_certificate(srv.port, ctx)
    # Mid-rotation: a new certificate next to the old key cannot load; the old pair keeps serving.
    staged_cert, staged_key = pki.dir / "new.crt", pki.dir / "new.key"
    leaf = pki.issue_server(staged_cert, staged_key)
    os.replace(staged_cert, pki.cert_file)
    os.utime(pki.cert_file, ns=(1, 1))  # a different mtime even within the same clock tick
    assert srv.tls is not None
    checked_before = srv.tls._checked
    # Handshakes until one of them has looked at the files again (at most once a second).
    wait_until(lambda: served_certificate(srv.port, ctx) and srv.tls is not None
               and srv.tls._checked != checked_before, timeout=HANG, interval=0.2)
    assert served_certificate(srv.port, ctx) == first
    assert https_get(srv.port, ctx, auth=(USER, PASSWORD))[0] == 200
    os.replace(staged_key, pki.key_file)  # the rotation completes (cert-manager writes both)
    expected = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    wait_until(lambda: served_certificate(srv.port, ctx) == expected, timeout=HANG, interval=0.2)
    assert expected != first
    assert https_get(srv.port, ctx, auth=(USER, PASSWORD))[0] == 200


BAD_WEB_CONFIGS = [
    ("unknown keys", "tls_server_confg: {}\nrate_limit: {interval: 1s}\n",
     ["tls_server_confg: unknown key", "rate_limit: unknown key (rate limiting is not supported)"]),
    ("client auth type", "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                         "  client_auth_type: RequireAndVerify\n",
     ["tls_server_config.client_auth_type: 'RequireAndVerify' is not one of"]),
    ("wrong types", "tls_server_config:\n  cert_file: [a]\n  key_file: server.key\n  client_auth_type: [x]\n"
                    "  max_version: {v: 1}\nbasic_auth_users: [alice]\nhttp_server_config: yes\n",
     ["tls_server_config.cert_file: expected a file name", "tls_server_config.client_auth_type: expected one of",
      "tls_server_config.max_version: {'v': 1} is not one of", "basic_auth_users: expected a mapping",
      "http_server_config: expected a mapping"]),
    ("missing CA", "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                   "  client_auth_type: RequireAndVerifyClientCert\n",
     ["tls_server_config.client_ca_file: required with client_auth_type RequireAndVerifyClientCert"]),
    ("files", "tls_server_config:\n  cert_file: nope.crt\n  min_version: TLS14\n",
     ["tls_server_config.cert_file: cannot read", "tls_server_config.key_file: required",
      "tls_server_config.min_version: 'TLS14' is not one of TLS10, TLS11, TLS12, TLS13"]),
    ("key of another cert", "tls_server_config:\n  cert_file: server.crt\n  key_file: other.key\n",
     ["tls_server_config.cert_file: cannot load the certificate, key and CA files (KEY_VALUES_MISMATCH)"]),
    ("plain password", "basic_auth_users:\n  alice: hunter2-plain\n  '': x\n",
     ["basic_auth_users.alice: expected a bcrypt hash", "basic_auth_users.: a user name must be"]),
    ("headers", "http_server_config:\n  http2: maybe\n  headers:\n    X-Frame-Options: allow\n    Server: x\n",
     ["http_server_config.http2: expected true or false",
      "http_server_config.headers.X-Frame-Options: 'allow' is not one of deny, sameorigin",
      "http_server_config.headers.Server: this header cannot be configured"]),
    ("unsupported toolkit keys", "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                                 "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n"
                                 "  client_auth_type: RequireAnyClientCert\n",
     ["tls_server_config.cipher_suites: not supported", "tls_server_config.client_auth_type: RequireAnyClientCert"]),
]


@pytest.mark.parametrize(("name", "text", "expected"), BAD_WEB_CONFIGS, ids=[b[0] for b in BAD_WEB_CONFIGS])
def test_bad_web_config_exits_2_naming_every_key(pki: Pki, capsys: pytest.CaptureFixture[str],
                                                 name: str, text: str, expected: list[str]) -> None:
    pki.ca.issue_cert("other").private_key_pem.write_to_path(str(pki.dir / "other.key"))
    path = pki.dir / "bad-web.yml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(WebConfigError) as raised:
        load_web_config(path)
    for fragment in expected:
        assert any(fragment in problem for problem in raised.value.problems), (fragment, raised.value.problems)
    assert main(["run", "--dsn", "host=/nonexistent dbname=x", "--web.config.file", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration in {path}" in err
    for fragment in expected:
        assert fragment in err
    assert "hunter2" not in err


def test_bad_web_config_from_the_config_file_exits_2_in_a_subprocess(tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  alice: not-a-hash\n", encoding="utf-8")
    config = tmp_path / "pgvitals.yml"
    config.write_text(f"targets: [{{name: a, dsn: 'host=/nonexistent'}}]\nweb_config_file: {web}\n", encoding="utf-8")
    assert load_settings(config, environ={}).web_config_file == web
    proc = subprocess.run([sys.executable, "-m", "exporter", "run", "-c", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert "basic_auth_users.alice: expected a bcrypt hash" in proc.stderr
    assert "not-a-hash" not in proc.stderr


@pytest.mark.live
def test_daemon_serves_a_real_target_over_tls_with_auth(pg: Server, pki: Pki) -> None:
    from exporter.daemon import Daemon

    daemon = Daemon(settings_for([{"name": "main", "dsn": pg.monitor_dsn}]), web=load_web_config(
        write_web_config(pki, extra_tls=f"  client_auth_type: VerifyClientCertIfGiven\n"
                                        f"  client_ca_file: {pki.ca_file.name}\n")))
    daemon.start()
    try:
        assert daemon.server is not None
        port = daemon.server.port
        assert daemon.server.scheme == "https"
        assert https_get(port, pki.client_context())[0] == 401

        def pg_up() -> bytes | None:
            status, _, body = https_get(port, pki.client_context(with_client_cert=True), auth=(USER, PASSWORD))
            return body if status == 200 and b'pg_up{target="main"} 1' in body else None

        assert wait_until(pg_up, timeout=HANG)
    finally:
        daemon.stop()


def test_a_flood_of_wrong_passwords_does_not_hold_up_known_scrapers(tmp_path: Path) -> None:
    """bcrypt of unknown credentials runs in its own two threads; cached credentials skip it entirely."""
    web = tmp_path / "web.yml"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(12)).decode()  # a production-like cost
    web.write_text(f"basic_auth_users:\n  {USER}: '{hashed}'\n", encoding="utf-8")
    srv = MetricsServer("127.0.0.1", 0, make_snapshot(), lambda: (True, "ready"), web=load_web_config(web))
    srv.start()
    good = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(f"{USER}:guess".encode()).decode()}
    try:
        assert get(srv.port, headers=good)[0] == 200  # verified once, then remembered
        finished: list[int] = []

        def attacker() -> None:
            finished.append(get(srv.port, headers=bad)[0])

        attackers = [threading.Thread(target=attacker) for _ in range(24)]
        for thread in attackers:
            thread.start()
        wait_until(lambda: srv.auth is not None and srv._bcrypt_pool._work_queue.qsize() > 0, timeout=HANG)
        assert get(srv.port, headers=good)[0] == 200
        assert len(finished) < len(attackers)  # served while the wrong passwords were still queued
        for thread in attackers:
            thread.join(HANG)
        assert finished == [401] * len(attackers)
    finally:
        srv.stop()


def test_stalled_tls_handshakes_are_closed_and_do_not_block_scrapes(pki: Pki) -> None:
    srv = MetricsServer("127.0.0.1", 0, make_snapshot(), lambda: (True, "ready"), read_timeout=1.0,
                        web=load_web_config(write_web_config(pki)))
    srv.start()
    try:
        threads_before = threading.active_count()
        stalled = [socket.create_connection(("127.0.0.1", srv.port), timeout=HANG) for _ in range(100)]
        for sock in stalled[::2]:
            sock.sendall(b"\x16\x03\x01\x00")  # the first bytes of a ClientHello, then nothing
        assert https_get(srv.port, pki.client_context(), auth=(USER, PASSWORD))[0] == 200
        assert threading.active_count() <= threads_before + 8
        for sock in stalled:
            with suppress(ConnectionResetError):  # closed by the server either way
                assert sock.recv(1024) == b""
            sock.close()
    finally:
        srv.stop()
