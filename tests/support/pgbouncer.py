"""A real PgBouncer process in front of a test PostgreSQL server, for live tests.

Usage::

    from tests.support.pgbouncer import start_pgbouncer

    bouncer = start_pgbouncer(pg, pool_size=2)          # pg: tests.support.servers.Server
    try:
        psycopg.connect(bouncer.client_dsn("postgres"))  # an application client (role pgb_app)
        exporter_dsn = bouncer.admin_dsn                 # stats user on the admin console
        bouncer.show("POOLS")                            # list of dicts, for assertions
    finally:
        bouncer.stop()

or as a context manager: ``with running_pgbouncer(pg, pool_size=2) as bouncer: ...``.

The process runs in the foreground as the ``postgres`` OS user when we are root, with its
config, auth_file, log and Unix socket in a temporary directory, listening on a free port of
127.0.0.1. Clients authenticate with SCRAM. ``auth="file"`` lists the application users with
their passwords in the auth_file; ``auth="query"`` looks their SCRAM secrets up in the server's
pg_shadow through ``auth_user`` (the superuser, trusted on 127.0.0.1 by the test clusters) and
logs in to the server by SCRAM pass-through, as production setups without a user list do.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import psycopg
from psycopg.rows import dict_row

from exporter.localpg import free_port, server_os_user

PGBOUNCER_BIN = Path(os.environ.get("PGVITALS_PGBOUNCER", "/usr/sbin/pgbouncer"))
APP_USER = "pgb_app"
APP_PASSWORD = "App-Pool-Secret-1"
ADMIN_USER = "pgb_admin"
ADMIN_PASSWORD = "Admin-Console-Secret-2"
STATS_USER = "pgb_stats"
STATS_PASSWORD = "Stats-Console-Secret-3"

_ROLE = re.compile(r"^[a-z_][a-z0-9_]*$")


class PgBouncerError(RuntimeError):
    """PgBouncer could not be started."""


def pgbouncer_available() -> bool:
    """True when the pgbouncer binary is installed."""
    return PGBOUNCER_BIN.exists()


@functools.cache
def pgbouncer_version() -> tuple[int, int]:
    """(major, minor) of the installed pgbouncer, from ``pgbouncer --version``."""
    out = subprocess.run([str(PGBOUNCER_BIN), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    if not match:
        raise PgBouncerError(f"cannot read the pgbouncer version from {out!r}")
    return int(match.group(1)), int(match.group(2))


@dataclass
class PgBouncer:
    """A running PgBouncer: where it listens, who may log in, and how to stop it."""

    base: Path
    port: int
    process: subprocess.Popen[bytes]
    server_port: int
    pool_size: int
    users: dict[str, str] = field(default_factory=dict)  # application users -> passwords
    host: str = "127.0.0.1"

    @property
    def config_file(self) -> Path:
        """The pgbouncer.ini in use."""
        return self.base / "pgbouncer.ini"

    @property
    def log_file(self) -> Path:
        """PgBouncer's log."""
        return self.base / "pgbouncer.log"

    @property
    def admin_dsn(self) -> str:
        """The admin console as the read-only stats user (``stats_users``): what the exporter uses."""
        return self._dsn(STATS_USER, STATS_PASSWORD, "pgbouncer")

    @property
    def admin_dsn_without_password(self) -> str:
        """The admin console DSN for the stats user, the password given separately (``stats_password``)."""
        return f"postgresql://{STATS_USER}@{self.host}:{self.port}/pgbouncer"

    @property
    def stats_password(self) -> str:
        """The stats user's password."""
        return STATS_PASSWORD

    @property
    def superadmin_dsn(self) -> str:
        """The admin console as an ``admin_users`` member (PAUSE, RELOAD, SET ... allowed)."""
        return self._dsn(ADMIN_USER, ADMIN_PASSWORD, "pgbouncer")

    def client_dsn(self, dbname: str = "postgres", user: str = APP_USER) -> str:
        """A DSN for an application client of ``dbname`` through the pooler."""
        return self._dsn(user, self.users[user], dbname)

    def _dsn(self, user: str, password: str, dbname: str) -> str:
        return f"postgresql://{user}:{quote(password, safe='')}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def admin(self, superadmin: bool = False) -> psycopg.Connection[dict[str, Any]]:
        """A console connection the admin console accepts: autocommit, simple query protocol."""
        return psycopg.connect(self.superadmin_dsn if superadmin else self.admin_dsn, autocommit=True,
                               row_factory=dict_row, prepare_threshold=None, cursor_factory=psycopg.ClientCursor)

    def show(self, what: str) -> list[dict[str, Any]]:
        """Rows of ``SHOW <what>`` (POOLS, STATS, DATABASES, CONFIG, CLIENTS, ...)."""
        if not re.match(r"^[A-Za-z_]+$", what):
            raise ValueError(f"bad SHOW subject {what!r}")
        with self.admin() as conn, conn.cursor() as cur:
            cur.execute(f"SHOW {what}", prepare=False)
            return cur.fetchall()

    def command(self, sql: str) -> None:
        """Run an admin command (RELOAD, PAUSE db, RESUME db, SET key = value, ...) as an admin user."""
        with self.admin(superadmin=True) as conn, conn.cursor() as cur:
            cur.execute(sql.encode(), prepare=False)

    def release(self, dbname: str) -> None:
        """Close the pooled server connections to ``dbname`` (KILL, then RESUME so clients may come back).

        Idle server connections stay open in the pool: call this before dropping a database that
        PgBouncer has served (DROP DATABASE without FORCE, PostgreSQL 12, refuses while they exist).
        """
        if not re.match(r"^[A-Za-z0-9_]+$", dbname):
            raise ValueError(f"bad database name {dbname!r}")
        self.command(f"KILL {dbname}")
        self.command(f"RESUME {dbname}")

    def running(self) -> bool:
        """True while the process lives."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The end of PgBouncer's log, for failure messages."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the process at once (clients are disconnected) and remove its directory."""
        if self.running():
            # Immediate shutdown is SIGTERM up to 1.22 and SIGQUIT from 1.23 on (SIGTERM then waits for clients).
            self.process.send_signal(signal.SIGQUIT if pgbouncer_version() >= (1, 23) else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.base, ignore_errors=True)


def _quote_auth(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def ensure_role(server: Any, name: str, password: str) -> None:
    """Create or update a login role (no privileges beyond connecting) on the test server."""
    if not _ROLE.match(name):
        raise ValueError(f"bad role name {name!r}")
    escaped = password.replace("'", "''")
    exists = server.execute(f"SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '{name}'")
    verb = "ALTER" if exists else "CREATE"
    server.execute(f"{verb} ROLE {name} LOGIN PASSWORD '{escaped}'")


def start_pgbouncer(
    server: Any,
    pool_size: int = 2,
    *,
    pool_mode: Literal["session", "transaction", "statement"] = "session",
    auth: Literal["file", "query"] = "file",
    users: Mapping[str, str] | None = None,
    max_client_conn: int = 100,
    databases: Mapping[str, str] | None = None,
    settings: Mapping[str, str | int] | None = None,
    wait: float = 15.0,
) -> PgBouncer:
    """Start PgBouncer in front of ``server`` (a tests.support.servers.Server) and wait until it accepts logins.

    ``users`` (default: ``{"pgb_app": ...}``) are created as login roles on the server. Every database
    of the server is reachable through the ``*`` fallback entry; ``databases`` adds explicit entries
    (name -> connection options such as ``"dbname=postgres pool_size=5"``, host and port are added).
    ``settings`` adds or overrides keys of the ``[pgbouncer]`` section.
    """
    if not pgbouncer_available():
        raise PgBouncerError(f"pgbouncer is not installed at {PGBOUNCER_BIN}")
    users = dict(users or {APP_USER: APP_PASSWORD})
    for name, password in users.items():
        ensure_role(server, name, password)
    os_user = server_os_user()
    base = Path(tempfile.mkdtemp(prefix="pgvitals-pgbouncer-"))
    server_port = int(server.cluster.port)
    port = free_port()
    target = f"host=127.0.0.1 port={server_port}"

    auth_lines = [f"{_quote_auth(ADMIN_USER)} {_quote_auth(ADMIN_PASSWORD)}",
                  f"{_quote_auth(STATS_USER)} {_quote_auth(STATS_PASSWORD)}"]
    if auth == "file":
        auth_lines += [f"{_quote_auth(name)} {_quote_auth(password)}" for name, password in users.items()]
    (base / "userlist.txt").write_text("\n".join(auth_lines) + "\n")

    db_lines = [f"{name} = {target} {options}" for name, options in (databases or {}).items()]
    db_lines.append(f"* = {target}")
    config: dict[str, str | int] = {
        "listen_addr": "127.0.0.1",
        "listen_port": port,
        "unix_socket_dir": str(base),
        "auth_type": "scram-sha-256",
        "auth_file": str(base / "userlist.txt"),
        "admin_users": ADMIN_USER,
        "stats_users": STATS_USER,
        "pool_mode": pool_mode,
        "default_pool_size": pool_size,
        "max_client_conn": max_client_conn,
        "logfile": str(base / "pgbouncer.log"),
        "pidfile": str(base / "pgbouncer.pid"),
        "server_login_retry": 1,  # the default 15 s would make a test wait after a failed login
        "ignore_startup_parameters": "extra_float_digits,options",
    }
    if auth == "query":
        config["auth_user"] = "postgres"  # trusted on 127.0.0.1 by the test clusters' pg_hba.conf
        config["auth_query"] = "SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename=$1"
        if pgbouncer_version() >= (1, 20):
            config["auth_dbname"] = "postgres"  # before 1.20 the query runs in the client's database
    config.update(settings or {})
    ini = ["[databases]", *db_lines, "", "[pgbouncer]", *(f"{k} = {v}" for k, v in config.items()), ""]
    (base / "pgbouncer.ini").write_text("\n".join(ini))
    if os_user:
        for path in (base, *base.iterdir()):
            shutil.chown(path, os_user, os_user)
    (base / "userlist.txt").chmod(0o600)

    process = subprocess.Popen([str(PGBOUNCER_BIN), str(base / "pgbouncer.ini")], user=os_user, cwd=base,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bouncer = PgBouncer(base=base, port=port, process=process, server_port=server_port, pool_size=pool_size,
                        users=users)
    deadline = time.monotonic() + wait
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if not bouncer.running():
            tail = bouncer.log_tail()
            bouncer.stop()
            raise PgBouncerError(f"pgbouncer exited with code {process.returncode}:\n{tail}")
        try:
            bouncer.show("VERSION")
            return bouncer
        except psycopg.Error as exc:
            last_error = exc
            time.sleep(0.05)
    tail = bouncer.log_tail()
    bouncer.stop()
    raise PgBouncerError(f"pgbouncer did not accept logins within {wait:g}s ({last_error}):\n{tail}")


@contextmanager
def running_pgbouncer(server: Any, pool_size: int = 2, **options: Any) -> Iterator[PgBouncer]:
    """``start_pgbouncer`` as a context manager: stopped and removed on exit."""
    bouncer = start_pgbouncer(server, pool_size, **options)
    try:
        yield bouncer
    finally:
        with suppress(Exception):
            bouncer.stop()
