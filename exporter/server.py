"""HTTP endpoints: /metrics and /probe (the snapshot, never a query), /healthz and /readyz, over HTTP or TLS.

One asyncio loop owns every connection and reads request heads under a deadline, so idle or half-sent
connections cost a socket, not a thread; the work of a complete request (rendering, gzip, bcrypt) runs in a
small fixed pool. Thread count is bounded whatever the clients do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import logging
import resource
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import parse_qs

from prometheus_client import REGISTRY, generate_latest

from exporter.exposition import CONTENT_TYPE
from exporter.snapshot import Snapshot
from exporter.webconfig import BasicAuth, TlsContexts, WebConfig

log = logging.getLogger("pgvitals.http")

ReadyCheck = Callable[[], tuple[bool, str]]
ReloadHook = Callable[[], tuple[bool, str]]
#: Answers /probe from its query parameters: (status, body); the body is an exposition when the status is 200,
#: else a message for the caller.
ProbeHook = Callable[[Mapping[str, str]], tuple[HTTPStatus, bytes]]

MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD = 16 * 1024  # request line + headers
MAX_HEADERS = 100
MAX_BODY = 64 * 1024  # only POST /-/reload takes a body, and ignores it
WRITE_TIMEOUT = 60.0  # a client that stops reading a large body
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # liveness/readiness probes rarely carry credentials


def accepts_gzip(header: str | None) -> bool:
    """Whether an Accept-Encoding value allows gzip (RFC 9110: ``gzip;q=0`` forbids it, ``*`` allows it)."""
    if not header:
        return False
    gzip_q: float | None = None
    star_q: float | None = None
    for item in header.split(","):
        coding, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        coding = coding.strip().lower()
        if coding in ("gzip", "x-gzip"):
            gzip_q = q
        elif coding == "*":
            star_q = q
    if gzip_q is not None:
        return gzip_q > 0
    return star_q is not None and star_q > 0


class HttpError(Exception):
    """A request the server answers with an error status and then closes the connection."""

    def __init__(self, status: HTTPStatus):
        super().__init__(status.phrase)
        self.status = status


@dataclass
class Request:
    """A parsed request head."""

    method: str
    path: str
    version: str
    headers: dict[str, str]
    query: str = ""

    def params(self) -> dict[str, str]:
        """The query parameters, the first value of each (a repeated one is a client's mistake, not an attack)."""
        try:
            parsed = parse_qs(self.query, keep_blank_values=True, strict_parsing=False, max_num_fields=32)
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST) from None
        return {name: values[0] for name, values in parsed.items()}

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


def parse_head(head: bytes) -> Request:
    """Parse a request line and headers; raise HttpError for anything malformed or too large."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise HttpError(HTTPStatus.BAD_REQUEST) from None
    lines = text.split("\r\n")
    request_line = lines[0]
    if len(request_line) > MAX_REQUEST_LINE:
        raise HttpError(HTTPStatus.REQUEST_URI_TOO_LONG)
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[0].isupper() or not parts[1]:
        raise HttpError(HTTPStatus.BAD_REQUEST)
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED if version.startswith("HTTP/")
                        else HTTPStatus.BAD_REQUEST)
    headers: dict[str, str] = {}
    header_lines = [line for line in lines[1:] if line]
    if len(header_lines) > MAX_HEADERS:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t()<>@,;\\\"/[]?={}"):
            raise HttpError(HTTPStatus.BAD_REQUEST)
        key = name.lower()
        value = value.strip()
        # Repeated headers are joined (RFC 9110 5.3); a second Host or Content-Length is an attack.
        if key in headers:
            if key in ("host", "content-length", "authorization"):
                raise HttpError(HTTPStatus.BAD_REQUEST)
            headers[key] += ", " + value
        else:
            headers[key] = value
    if version == "HTTP/1.1" and "host" not in headers:
        raise HttpError(HTTPStatus.BAD_REQUEST)
    path, _, query = target.partition("?")
    if not path.startswith("/"):
        raise HttpError(HTTPStatus.BAD_REQUEST)
    return Request(method, path, version, headers, query)


def probe_snapshot(snapshot: Snapshot, params: Mapping[str, str]) -> tuple[HTTPStatus, bytes]:
    """/probe?target=NAME from the snapshot: the target's series, 400 without a name, 404 for an unknown one."""
    name = params.get("target", "")
    if not name:
        return HTTPStatus.BAD_REQUEST, b"give the target to probe: /probe?target=NAME\n"
    body = snapshot.render_target(name)
    if body is None:
        return HTTPStatus.NOT_FOUND, f"unknown target {name!r}: not in this exporter's configuration\n".encode()
    return HTTPStatus.OK, body


@dataclass
class Response:
    """What a route returns."""

    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class MetricsServer:
    """Serves the snapshot over HTTP(S) with bounded threads, deadlines and optional basic auth."""

    def __init__(self, host: str, port: int, snapshot: Snapshot, ready: ReadyCheck,
                 process_metrics: bool = True, web: WebConfig | None = None, reload: ReloadHook | None = None,
                 probe: ProbeHook | None = None, *, read_timeout: float = 10.0, idle_timeout: float = 60.0,
                 workers: int = 4, max_connections: int = 4096):
        self.snapshot = snapshot
        self.ready = ready
        self.process_metrics = process_metrics
        self.web = web or WebConfig()
        self.reload = reload
        self.probe = probe or self.probe_configured
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        # Stay below the descriptor limit: past it, accept() fails and asyncio stops accepting for a while.
        self.max_connections = min(max_connections, max(16, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64))
        self.tls = TlsContexts(self.web.tls) if self.web.tls else None
        self.auth = BasicAuth(self.web.users) if self.web.users else None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # Bound here, not in the loop: a port in use fails the start in the caller's thread.
        self._socket = socket.create_server((host, port), family=family, backlog=1024)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="http-worker")
        self._bcrypt_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="http-bcrypt")
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        # Connections still waiting for a request head, oldest first: evicted first when full.
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        self._connections: set[asyncio.StreamWriter] = set()

    def apply_web(self, web: WebConfig | None) -> None:
        """Serve new connections with another web config (a reload); open connections keep theirs."""
        web = web or WebConfig()
        tls = TlsContexts(web.tls) if web.tls else None
        auth = BasicAuth(web.users) if web.users else None
        self.web, self.tls, self.auth = web, tls, auth

    @property
    def port(self) -> int:
        """The bound port (useful when 0 was asked for)."""
        return int(self._socket.getsockname()[1])

    @property
    def scheme(self) -> str:
        """``https`` with a tls_server_config, else ``http``."""
        return "https" if self.tls else "http"

    def body(self) -> bytes:
        """What /metrics returns: collected data, self-metrics, then the process' own metrics."""
        body = self.snapshot.render()
        if self.process_metrics:
            body += generate_latest(REGISTRY)
        return body

    def probe_configured(self, params: Mapping[str, str]) -> tuple[HTTPStatus, bytes]:
        """/probe without dynamic targets: one registered target's series, from the snapshot."""
        return probe_snapshot(self.snapshot, params)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=self._socket, limit=MAX_HEAD)
        self._started.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for writer in list(self._connections):
                writer.close()
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    def stop(self) -> None:
        """Stop serving, close every connection and the socket."""
        if self._thread is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._bcrypt_pool.shutdown(wait=False, cancel_futures=True)
        self._socket.close()
        if not self._loop.is_running():
            self._loop.close()

    # -- connections ---------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.max_connections:
            if not self._waiting:
                writer.close()
                return
            oldest = next(iter(self._waiting))  # the longest-waiting idle connection makes room
            self._waiting.pop(oldest)
            oldest.close()
        self._connections.add(writer)
        tls = self.tls  # one config for the whole connection, even if a reload replaces it meanwhile
        try:
            if tls is not None:
                self._waiting[writer] = None
                await writer.start_tls(tls.current(), ssl_handshake_timeout=self.read_timeout)
                if not tls.allowed_peer(writer.get_extra_info("peercert")):
                    log.debug("client certificate SAN not in client_allowed_sans: closing")
                    return
            first = True
            while await self._one_request(reader, writer, first):
                first = False
        except (ConnectionError, ssl.SSLError, TimeoutError, OSError, asyncio.IncompleteReadError):
            pass  # the client went away, failed the handshake or was too slow: nothing to answer
        finally:
            self._waiting.pop(writer, None)
            self._connections.discard(writer)
            writer.close()
            with suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bool) -> bool:
        """Read, answer, and say whether the connection stays open for another request."""
        self._waiting[writer] = None
        try:
            start = b""
            if not first:
                # A kept-alive connection may idle until the next scrape (Prometheus reuses it: no new TLS
                # handshake every interval); the head deadline starts with its first byte.
                start = await asyncio.wait_for(reader.readexactly(1), self.idle_timeout)
            # One deadline for the whole head (not per read): a byte every few seconds does not extend it.
            head = start + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                await self._write(writer, self._error(HTTPStatus.BAD_REQUEST), head_only=False, keep=False)
            return False
        except asyncio.LimitOverrunError:
            await self._write(writer, self._error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE), False, False)
            return False
        finally:
            self._waiting.pop(writer, None)
        try:
            request = parse_head(head)
            await self._discard_body(reader, request)
        except HttpError as exc:
            await self._write(writer, self._error(exc.status), head_only=False, keep=False)
            return False
        authorized = await self._authorized(request)
        response = await self._loop.run_in_executor(self._pool, self._respond, request, authorized)
        keep = request.keep_alive
        await self._write(writer, response, head_only=request.method == "HEAD", keep=keep,
                          http10=request.version == "HTTP/1.0")
        return keep

    async def _discard_body(self, reader: asyncio.StreamReader, request: Request) -> None:
        if "transfer-encoding" in request.headers:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED)
        length_text = request.headers.get("content-length", "0")
        if not length_text.isdigit():
            raise HttpError(HTTPStatus.BAD_REQUEST)
        length = int(length_text)
        if length > MAX_BODY:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        if length:
            await asyncio.wait_for(reader.readexactly(length), self.read_timeout)

    async def _write(self, writer: asyncio.StreamWriter, response: Response, head_only: bool, keep: bool,
                     http10: bool = False) -> None:
        lines = [f"HTTP/1.1 {response.status.value} {response.status.phrase}",
                 f"Content-Type: {response.content_type}",
                 f"Content-Length: {len(response.body)}",
                 f"Date: {formatdate(usegmt=True)}"]
        lines += [f"{name}: {value}" for name, value in {**self.web.headers, **response.headers}.items()]
        if not keep:
            lines.append("Connection: close")
        elif http10:
            lines.append("Connection: keep-alive")  # HTTP/1.0 closes unless told otherwise
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if head_only:
            writer.write(head)
        elif len(response.body) < 65536:
            writer.write(head + response.body)  # one segment for small answers
        else:
            writer.write(head)
            writer.write(response.body)  # no copy of a large body just to prepend the head
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)

    # -- routes (run in the worker pool) -------------------------------------------------------

    @staticmethod
    def _error(status: HTTPStatus) -> Response:
        return Response(status, f"{status.value} {status.phrase}\n".encode())

    def _credentials(self, request: Request) -> tuple[str, bytes] | None:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
            return (user.decode("utf-8"), password) if sep else None
        except (binascii.Error, UnicodeDecodeError):
            return None

    async def _authorized(self, request: Request) -> bool:
        """Basic auth: remembered credentials at once, new ones through bcrypt in a pool of their own."""
        auth = self.auth  # as it is now: a reload may replace it meanwhile
        if auth is None or request.path == "/healthz":
            return True
        credentials = self._credentials(request)
        if credentials is None:
            return False
        if auth.cached(*credentials):
            return True
        # A flood of wrong passwords occupies these threads only: scrapes with known credentials go on.
        return await self._loop.run_in_executor(self._bcrypt_pool, auth.verify, *credentials)

    @staticmethod
    def _exposition(request: Request, body: bytes) -> Response:
        """An exposition body, gzipped when the client accepts it."""
        if accepts_gzip(request.headers.get("accept-encoding")):
            return Response(HTTPStatus.OK, gzip.compress(body, 1), CONTENT_TYPE,
                            {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        return Response(HTTPStatus.OK, body, CONTENT_TYPE, {"Vary": "Accept-Encoding"})

    def _respond(self, request: Request, authorized: bool) -> Response:
        """The response to a parsed request (in a pool thread: rendering and gzip are CPU work)."""
        try:
            return self._route(request, authorized)
        except HttpError as exc:
            return self._error(exc.status)
        except Exception:
            log.exception("error answering %s %s", request.method, request.path)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR)

    def _route(self, request: Request, authorized: bool) -> Response:
        path, method = request.path, request.method
        if path == "/-/reload":
            if method not in ("POST", "PUT"):
                return Response(HTTPStatus.METHOD_NOT_ALLOWED, b"use POST\n", headers={"Allow": "POST, PUT"})
        elif method not in ("GET", "HEAD"):
            return Response(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", headers={"Allow": "GET, HEAD"})
        if path == "/healthz":
            return Response(HTTPStatus.OK, b"ok\n")
        if path == "/readyz":
            ok, reason = self.ready()
            # Open for probes; the reason names targets and hosts, so only authorized callers see it.
            text = reason if authorized else ("ready" if ok else "not ready")
            return Response(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, (text + "\n").encode())
        if not authorized:
            return Response(HTTPStatus.UNAUTHORIZED, b"401 Unauthorized\n",
                            headers={"WWW-Authenticate": 'Basic realm="pgvitals", charset="UTF-8"'})
        if path == "/metrics":
            return self._exposition(request, self.body())
        if path == "/probe":
            status, body = self.probe(request.params())
            if status is not HTTPStatus.OK:
                return Response(status, body)
            return self._exposition(request, body)
        if path == "/-/reload":
            if self.reload is None:
                return Response(HTTPStatus.FORBIDDEN, b"Lifecycle API is not enabled.\n")
            ok, message = self.reload()
            return Response(HTTPStatus.OK if ok else HTTPStatus.INTERNAL_SERVER_ERROR, (message + "\n").encode())
        if path == "/":
            return Response(HTTPStatus.OK, b"<html><body><h1>pgvitals</h1><p><a href='/metrics'>metrics</a> "
                                           b"<a href='/readyz'>readyz</a></p>"
                                           b"<p>/probe?target=NAME: one target's series</p></body></html>\n",
                            "text/html; charset=utf-8")
        return self._error(HTTPStatus.NOT_FOUND)
