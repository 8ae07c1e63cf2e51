"""The Prometheus exporter-toolkit web configuration: TLS, basic auth users, response headers.

Same file format as node_exporter's and postgres_exporter's ``--web.config.file``, so a fleet keeps one
file. Validation reports every problem at once, each with its key path; TLS certificates are re-read when
they change on disk; bcrypt verifications are cached so a scrape does not pay bcrypt's cost every time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from exporter.config import ConfigError

log = logging.getLogger("pgvitals.http")

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's tls.ClientAuthType names. RequestClientCert asks for a certificate nobody looks at: with OpenSSL it is
# the same as not asking. RequireAnyClientCert (a certificate required but not verified) has no OpenSSL mode.
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# The headers exporter-toolkit lets a web config set, with their allowed values (None: any value).
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_BCRYPT_HASH = re.compile(r"^\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}$")
_UNSUPPORTED = {
    "cert": "inline certificates are not supported; use cert_file",
    "key": "inline keys are not supported; use key_file",
    "client_ca": "inline CA certificates are not supported; use client_ca_file",
    "cipher_suites": "not supported (Go cipher names); OpenSSL's defaults for TLS 1.2 are used, remove the key",
    "curve_preferences": "not supported (Go curve names); remove the key",
}


class WebConfigError(ConfigError):
    """The web configuration file is invalid; ``source`` is its path."""

    def __init__(self, source: Path, problems: list[str]):
        super().__init__(problems)
        self.source = source


@dataclass(frozen=True)
class TlsServerConfig:
    """``tls_server_config``: paths already resolved against the web config's directory."""

    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"

    def files(self) -> tuple[Path, ...]:
        """The files whose change on disk means a new SSLContext."""
        return (self.cert_file, self.key_file) + ((self.client_ca_file,) if self.client_ca_file else ())

    def context(self) -> ssl.SSLContext:
        """A fresh server SSLContext from the files as they are now on disk."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        ctx.maximum_version = TLS_VERSIONS[self.max_version]
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            ctx.load_verify_locations(cafile=self.client_ca_file)
        ctx.verify_mode = CLIENT_AUTH[self.client_auth_type]
        return ctx


@dataclass(frozen=True)
class WebConfig:
    """A validated web configuration."""

    tls: TlsServerConfig | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def load_web_config(path: Path) -> WebConfig:
    """Read and validate a web config file; raise WebConfigError listing every problem with its key."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WebConfigError(path, [f"{path}: cannot read the file ({exc.strerror})"]) from None
    except yaml.YAMLError as exc:
        raise WebConfigError(path, [f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise WebConfigError(path, ["(top level): expected a mapping"])
    problems: list[str] = []
    for key in data:
        if key not in ("tls_server_config", "http_server_config", "basic_auth_users"):
            hint = " (rate limiting is not supported)" if key == "rate_limit" else ""
            problems.append(f"{key}: unknown key{hint}")
    tls = _tls(data.get("tls_server_config"), path.parent, problems)
    users = _users(data.get("basic_auth_users"), problems)
    headers = _headers(data.get("http_server_config"), problems)
    if problems:
        raise WebConfigError(path, problems)
    return WebConfig(tls=tls, users=users, headers=headers)


def _mapping(value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping")
        return {}
    return value


def _tls(raw: Any, base: Path, problems: list[str]) -> TlsServerConfig | None:
    section = _mapping(raw, "tls_server_config", problems)
    if not section:
        return None
    where = "tls_server_config"
    known = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "client_allowed_sans",
             "min_version", "max_version", "prefer_server_cipher_suites"}
    count = len(problems)
    for key in section:
        if key in _UNSUPPORTED:
            problems.append(f"{where}.{key}: {_UNSUPPORTED[key]}")
        elif key not in known:
            problems.append(f"{where}.{key}: unknown key")
    files: dict[str, Path | None] = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        value = section.get(key)
        if value is None or value == "":
            files[key] = None
            if key != "client_ca_file":
                problems.append(f"{where}.{key}: required when tls_server_config is given")
        elif not isinstance(value, str):
            problems.append(f"{where}.{key}: expected a file name")
            files[key] = None
        else:
            resolved = base / value  # relative names are relative to the web config file, as in exporter-toolkit
            files[key] = resolved
            if not os.access(resolved, os.R_OK):
                problems.append(f"{where}.{key}: cannot read {resolved}")
    auth = section.get("client_auth_type", "NoClientCert")
    if not isinstance(auth, str):
        problems.append(f"{where}.client_auth_type: expected one of {', '.join(CLIENT_AUTH)}")
        auth = "NoClientCert"
    if auth == "RequireAnyClientCert":
        problems.append(f"{where}.client_auth_type: RequireAnyClientCert (unverified certificates) is not "
                        "supported; use RequireAndVerifyClientCert with client_ca_file")
    elif auth not in CLIENT_AUTH:
        problems.append(f"{where}.client_auth_type: {auth!r} is not one of {', '.join(CLIENT_AUTH)}")
    elif CLIENT_AUTH[auth] != ssl.CERT_NONE and files.get("client_ca_file") is None and "client_ca_file" not in section:
        problems.append(f"{where}.client_ca_file: required with client_auth_type {auth}")
    elif CLIENT_AUTH[auth] == ssl.CERT_NONE and section.get("client_ca_file"):
        problems.append(f"{where}.client_auth_type: client_ca_file is given but {auth} does not verify "
                        "client certificates; use RequireAndVerifyClientCert")
    sans = section.get("client_allowed_sans") or []
    if not isinstance(sans, list) or not all(isinstance(s, str) for s in sans):
        problems.append(f"{where}.client_allowed_sans: expected a list of strings")
        sans = []
    elif sans and auth != "RequireAndVerifyClientCert":
        problems.append(f"{where}.client_allowed_sans: needs client_auth_type RequireAndVerifyClientCert")
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = section.get(key, default)
        versions[key] = value if isinstance(value, str) and value in TLS_VERSIONS else default
        if versions[key] != value:
            problems.append(f"{where}.{key}: {value!r} is not one of {', '.join(TLS_VERSIONS)}")
    if len(problems) > count:
        return None
    assert files["cert_file"] is not None and files["key_file"] is not None
    config = TlsServerConfig(
        cert_file=files["cert_file"], key_file=files["key_file"], client_auth_type=auth,
        client_ca_file=files["client_ca_file"], client_allowed_sans=tuple(sans),
        min_version=versions["min_version"], max_version=versions["max_version"],
    )
    if TLS_VERSIONS[config.min_version] > TLS_VERSIONS[config.max_version]:
        problems.append(f"{where}.min_version: {config.min_version} is above max_version {config.max_version}")
        return None
    try:
        config.context()
    except (ssl.SSLError, OSError, ValueError) as exc:
        # OpenSSL's reason (e.g. KEY_VALUES_MISMATCH), never the file's content.
        reason = getattr(exc, "reason", None) or type(exc).__name__
        problems.append(f"{where}.cert_file: cannot load the certificate, key and CA files ({reason})")
        return None
    return config


def _users(raw: Any, problems: list[str]) -> dict[str, bytes]:
    users = _mapping(raw, "basic_auth_users", problems)
    out = {}
    for user, hashed in users.items():
        where = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user:
            problems.append(f"{where}: a user name must be a non-empty string without ':'")
        elif not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
            # Never echo the value: it may be a plain password put there by mistake.
            problems.append(f"{where}: expected a bcrypt hash such as $2y$10$... "
                            "(htpasswd -nBC 10 \"\" | tr -d ':\\n')")
        else:
            out[user] = hashed.encode()
    return out


def _headers(raw: Any, problems: list[str]) -> dict[str, str]:
    section = _mapping(raw, "http_server_config", problems)
    for key in section:
        if key == "http2":
            if not isinstance(section[key], bool):
                problems.append("http_server_config.http2: expected true or false")
        elif key != "headers":
            problems.append(f"http_server_config.{key}: unknown key")
    headers = _mapping(section.get("headers"), "http_server_config.headers", problems)
    out = {}
    for name, value in headers.items():
        where = f"http_server_config.headers.{name}"
        if name not in HEADERS:
            problems.append(f"{where}: this header cannot be configured (allowed: {', '.join(HEADERS)})")
        elif not isinstance(value, str) or "\r" in value or "\n" in value:
            problems.append(f"{where}: expected a one-line string")
        elif (allowed := HEADERS[name]) is not None and value not in allowed:
            problems.append(f"{where}: {value!r} is not one of {', '.join(allowed)}")
        elif value:  # blank means unset, as in exporter-toolkit
            out[name] = value
    return out


class TlsContexts:
    """The current SSLContext, rebuilt when the certificate, key or CA file changes on disk."""

    CHECK_EVERY = 1.0  # seconds between stat() calls: handshakes stay cheap, rotation shows within a second

    def __init__(self, config: TlsServerConfig):
        self.config = config
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._context = config.context()
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in self.config.files():
            try:
                st = path.stat()
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append((0, 0, 0))
        return tuple(stamps)

    def current(self) -> ssl.SSLContext:
        """The context for a new connection; a changed file gives a new one, a broken one keeps the old."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.CHECK_EVERY:
                return self._context
            self._checked = now
            stamp = self._file_stamp()
            if stamp != self._stamp:
                try:
                    self._context = self.config.context()
                    self._stamp = stamp
                    log.info("TLS certificate files changed: serving the new certificate")
                except (ssl.SSLError, OSError, ValueError) as exc:
                    # Mid-rotation (new certificate, old key): keep serving the old pair, retry next check.
                    log.warning("TLS certificate files changed but cannot be loaded yet (%s); keeping the "
                                "previous certificate", getattr(exc, "reason", None) or type(exc).__name__)
            return self._context

    def allowed_peer(self, peercert: dict[str, Any] | None) -> bool:
        """Whether a verified client certificate carries one of ``client_allowed_sans`` (when configured)."""
        if not self.config.client_allowed_sans:
            return True
        sans = {value for _kind, value in (peercert or {}).get("subjectAltName", ())}
        return any(allowed in sans for allowed in self.config.client_allowed_sans)


class BasicAuth:
    """Checks ``Authorization: Basic`` against bcrypt hashes, remembering successful checks."""

    MAX_CACHED = 1024

    def __init__(self, users: dict[str, bytes]):
        self.users = users
        # Cache keys are HMACs under a per-process random key: the cache never holds a password or a value
        # that could be tested offline faster than bcrypt.
        self._key = secrets.token_bytes(32)
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()
        self._dummy = bcrypt.hashpw(b"pgvitals-no-such-user", bcrypt.gensalt(10))

    def _cache_key(self, user: str, password: bytes, hashed: bytes) -> bytes:
        message = user.encode() + b"\0" + hashed + b"\0" + password
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def cached(self, user: str, password: bytes) -> bool:
        """True when these credentials were verified before (cheap; no bcrypt)."""
        hashed = self.users.get(user)
        if hashed is None:
            return False
        with self._lock:
            return self._cache_key(user, password, hashed) in self._ok

    def verify(self, user: str, password: bytes) -> bool:
        """bcrypt check (slow by design); unknown users cost the same so that they cannot be told apart."""
        hashed = self.users.get(user)
        ok = _checkpw(password, hashed if hashed is not None else self._dummy) and hashed is not None
        if ok and hashed is not None:
            with self._lock:
                if len(self._ok) >= self.MAX_CACHED:
                    self._ok.clear()
                self._ok.add(self._cache_key(user, password, hashed))
        return ok


def _checkpw(password: bytes, hashed: bytes) -> bool:
    if len(password) > 72:  # bcrypt >= 5 refuses longer passwords instead of truncating them
        bcrypt.checkpw(b"x", hashed)  # same cost as a real check
        return False
    return bool(bcrypt.checkpw(password, hashed))
