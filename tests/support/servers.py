"""Real PostgreSQL servers for tests: a cluster with a pg_monitor-only role, settings, throwaway databases."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from exporter.config import Settings, load_settings
from exporter.localpg import LocalCluster
from tests.support.pgbins import bindir_for, selected_major

MONITOR_ROLE = "pgvitals_mon"
MONITOR_PASSWORD = "Mon1tor-Secret-Zebra"


@dataclass
class Server:
    """A running test cluster with a pg_monitor-only login role."""

    cluster: LocalCluster
    monitor_dsn: str
    superuser_dsn: str

    @property
    def version_num(self) -> int:
        return self.cluster.version_num

    def execute(self, sql: str, dbname: str = "postgres") -> list[dict[str, Any]]:
        return self.cluster.execute(sql, dbname)

    def dsn(self, dbname: str = "postgres", monitor: bool = True) -> str:
        if monitor:
            return self.cluster.dsn(MONITOR_ROLE, MONITOR_PASSWORD, dbname)
        return self.cluster.dsn(dbname=dbname)


def start_server(name: str = "primary", settings: dict[str, Any] | None = None) -> Server:
    """Start a fresh cluster of the selected major with pg_stat_statements and a monitor role."""
    cluster = LocalCluster(bindir=bindir_for(selected_major()), name=name, settings=settings).init().start()
    cluster.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    monitor = cluster.create_monitor_role(MONITOR_ROLE, MONITOR_PASSWORD)
    return Server(cluster=cluster, monitor_dsn=monitor, superuser_dsn=cluster.dsn())


_database_numbers = itertools.count(1)


@contextmanager
def fresh_database(server: Server) -> Iterator[str]:
    """A database of its own on ``server``, dropped afterwards even while sessions are still connected."""
    suffix = re.sub("[^a-z0-9]", "", server.cluster.base.name[-6:].lower())
    name = f"t{next(_database_numbers)}_{suffix}"
    server.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        # FORCE ends leftover sessions of a failed test; PostgreSQL 12 has no FORCE (its tests close theirs).
        force = " WITH (FORCE)" if server.version_num >= 130000 else ""
        server.execute(f"DROP DATABASE IF EXISTS {name}{force}")


def settings_for(targets: list[dict[str, Any]], **extra: Any) -> Settings:
    """Settings for an in-process exporter on a free port."""
    raw: dict[str, Any] = {"listen": "127.0.0.1:0", "targets": targets}
    raw.update(extra)
    return load_settings(raw=raw, environ={})

