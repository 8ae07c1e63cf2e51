"""Targets Prometheus names in ``/probe?target=HOST:PORT/DB&auth_module=NAME``: parsed, built, kept while probed."""

from __future__ import annotations

import fnmatch
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from psycopg.conninfo import make_conninfo

from exporter.config import AuthModule, DatabaseFilter, TargetConfig

DEFAULT_PORT = 5432
DEFAULT_DBNAME = "postgres"
# A DNS name or IPv4 address, or an IPv6 address in brackets; a database name without spaces or slashes.
_TARGET = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(?P<port>\d{1,5}))?"
                     r"(?:/(?P<dbname>[^/\s]{1,63}))?$")


@dataclass(frozen=True)
class Address:
    """Where a probed target is; ``name`` (HOST:PORT/DB, defaults filled in) is its ``target`` label."""

    host: str
    port: int
    dbname: str

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}/{self.dbname}"


def parse_target(text: str) -> Address:
    """``HOST[:PORT][/DB]`` (port 5432 and database postgres by default); ValueError says what is wrong."""
    match = _TARGET.match(text)
    if match is None:
        raise ValueError(f"target {text!r} is not HOST:PORT/DB (for example db1.example.org:5432/postgres)")
    port = int(match.group("port") or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ValueError(f"target {text!r}: port {port} is out of range")
    return Address(match.group("host"), port, match.group("dbname") or DEFAULT_DBNAME)


def allowed(address: Address, module: AuthModule) -> bool:
    """Whether the auth module may log in to ``address`` (its credentials go to whichever host a probe names)."""
    return any(fnmatch.fnmatchcase(address.name, pattern) for pattern in module.allowed_targets)


def target_config(address: Address, module: AuthModule) -> TargetConfig:
    """The target as if configured: the address, the auth module's login, options and labels."""
    dsn = make_conninfo(host=address.host.strip("[]"), port=str(address.port), dbname=address.dbname,
                        user=module.user, sslmode=module.sslmode, **module.options)
    # RDS IAM and its kind make a token for one host, port and user: the command is told which.
    fields = {"host": address.host.strip("[]"), "port": str(address.port), "dbname": address.dbname,
              "user": module.user}
    command = None
    if module.password_command is not None:
        command = [_fill(arg, fields) for arg in module.password_command]
    # Built, not validated: the name holds a '/' that configured names may not have, so the two never collide.
    return TargetConfig.model_construct(
        name=address.name, dsn=dsn, password_file=module.password_file, password_env=module.password_env,
        password_command=command, password_command_ttl=module.password_command_ttl,
        password_command_timeout=module.password_command_timeout,
        labels=dict(module.labels), databases=DatabaseFilter(), max_connections=module.max_connections,
    )


def _fill(arg: str, fields: dict[str, str]) -> str:
    """``arg`` with ``{host}``, ``{port}``, ``{dbname}`` and ``{user}`` replaced (other braces left as they are)."""
    for key, value in fields.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


@dataclass
class _Entry:
    auth_module: str
    last_probe: float


class Registry:
    """The dynamic targets and when each was last probed; at most ``limit`` of them."""

    def __init__(self, limit: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def auth_module(self, name: str) -> str | None:
        """The auth module target ``name`` was registered with; None if it is not a dynamic target."""
        with self._lock:
            entry = self._entries.get(name)
            return None if entry is None else entry.auth_module

    def touch(self, name: str, auth_module: str) -> str | None:
        """Note a probe of a known target; None if unknown, else the auth module it was registered with."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return None
            if entry.auth_module == auth_module:
                entry.last_probe = self._clock()
            return entry.auth_module

    def claim(self, name: str, auth_module: str) -> bool:
        """Reserve a place for a new target; False when the limit is reached (or it exists already)."""
        with self._lock:
            if name in self._entries or len(self._entries) >= self.limit:
                return False
            self._entries[name] = _Entry(auth_module, self._clock())
            return True

    def release(self, name: str) -> None:
        """Give a place back (its target could not be added)."""
        with self._lock:
            self._entries.pop(name, None)

    def expired(self) -> list[str]:
        """Take out and return the targets not probed for ``ttl`` seconds."""
        deadline = self._clock() - self.ttl
        with self._lock:
            names = [name for name, entry in self._entries.items() if entry.last_probe < deadline]
            for name in names:
                del self._entries[name]
        return names
