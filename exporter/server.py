"""HTTP endpoints: /metrics (the snapshot, never a query), /healthz and /readyz."""

from __future__ import annotations

import gzip
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import REGISTRY, generate_latest

from exporter.exposition import CONTENT_TYPE
from exporter.snapshot import Snapshot

log = logging.getLogger("pgvitals.http")

ReadyCheck = Callable[[], tuple[bool, str]]


class MetricsServer:
    """A small threaded HTTP server over a snapshot."""

    def __init__(self, host: str, port: int, snapshot: Snapshot, ready: ReadyCheck,
                 process_metrics: bool = True):
        self.snapshot = snapshot
        self.ready = ready
        self.process_metrics = process_metrics
        handler = self._handler_class()
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when 0 was asked for)."""
        return int(self.httpd.server_address[1])

    def body(self) -> bytes:
        """What /metrics returns: collected data, self-metrics, then the process' own metrics."""
        body = self.snapshot.render()
        if self.process_metrics:
            body += generate_latest(REGISTRY)
        return body

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = server.body()
                    gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
                    self._send(200, gzip.compress(body, 1) if gzipped else body, CONTENT_TYPE,
                               encoding="gzip" if gzipped else None)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok, reason = server.ready()
                    self._send(200 if ok else 503, (reason + "\n").encode())
                elif path == "/":
                    self._send(200, b"<html><body><h1>pgvitals</h1><p><a href='/metrics'>metrics</a> "
                                    b"<a href='/readyz'>readyz</a></p></body></html>\n",
                               "text/html; charset=utf-8")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                      encoding: str | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if encoding:
                    self.send_header("Content-Encoding", encoding)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("%s %s", self.address_string(), format % args)

        return Handler

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
