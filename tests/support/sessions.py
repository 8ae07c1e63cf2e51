"""Superuser sessions a test holds open on a real server: lock holders, waiters, statements run and ended."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field

import psycopg

from exporter.localpg import wait_until
from tests.support.servers import Server


@dataclass
class Sessions:
    """Superuser sessions in one database; statements that block run in threads."""

    pg: Server
    dbname: str
    conns: dict[str, psycopg.Connection[tuple[object, ...]]] = field(default_factory=dict)
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)

    def open(self, name: str, application_name: str | None = None) -> psycopg.Connection[tuple[object, ...]]:
        conn = psycopg.connect(self.pg.dsn(self.dbname, monitor=False), application_name=application_name or name)
        conn.execute("SET statement_timeout = '60s'")  # nothing in a failed test waits forever
        conn.commit()
        self.conns[name] = conn
        return conn

    def start(self, name: str, sql: str) -> None:
        """Run ``sql`` on session ``name`` in a thread (it is expected to wait)."""
        def run() -> None:
            try:
                self.conns[name].execute(sql)
            except BaseException as exc:  # kept for the test to inspect
                self.errors[name] = exc

        thread = threading.Thread(target=run, daemon=True)
        self.threads[name] = thread
        thread.start()

    def join(self, name: str) -> None:
        self.threads.pop(name).join(timeout=60)

    def waiting(self) -> int:
        rows = self.pg.execute(
            f"SELECT count(*) AS n FROM pg_stat_activity WHERE datname = '{self.dbname}' AND wait_event_type = 'Lock'"
        )
        return int(rows[0]["n"])

    def close(self) -> None:
        for conn in self.conns.values():
            with suppress(Exception):
                conn.cancel()
        for conn in self.conns.values():
            with suppress(Exception):
                conn.close()
        for thread in self.threads.values():
            thread.join(timeout=10)


@contextmanager
def sessions(pg: Server, dbname: str) -> Iterator[Sessions]:
    """A group of sessions, all cancelled and closed at the end."""
    group = Sessions(pg, dbname)
    try:
        yield group
    finally:
        group.close()


class PendingExclusiveLock:
    """A reader holding a lock on ``table`` and, queued behind it, a session asking for ACCESS EXCLUSIVE."""

    def __init__(self, pg: Server, table: str, db: str):
        self.pg = pg
        self.table = table
        self.db = db
        self.reader = psycopg.connect(pg.dsn(db, monitor=False))
        self.ddl = psycopg.connect(pg.dsn(db, monitor=False))
        self.thread = threading.Thread(target=self._lock, daemon=True)

    def _lock(self) -> None:
        self.ddl.execute(f"LOCK TABLE {self.table} IN ACCESS EXCLUSIVE MODE")

    def waiting(self) -> bool:
        """True while the ACCESS EXCLUSIVE request is still queued."""
        return bool(self.pg.execute(
            "SELECT count(*) AS n FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND NOT granted "
            f"AND relation = '{self.table}'::regclass", self.db)[0]["n"])

    def __enter__(self) -> PendingExclusiveLock:
        self.reader.execute(f"SELECT 1 FROM {self.table} LIMIT 1")  # ACCESS SHARE, held until rollback
        self.thread.start()
        wait_until(self.waiting, timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.reader.rollback()
        self.thread.join(timeout=10)
        self.ddl.rollback()
        self.reader.close()
        self.ddl.close()


def run_in_session(pg: Server, dbname: str, *statements: str) -> None:
    """Run statements in one superuser session, then end it (its statistics are then reported)."""
    with psycopg.connect(pg.dsn(dbname, monitor=False), autocommit=True) as conn:
        conn.execute("SET max_parallel_workers_per_gather = 0")  # one process reads every block
        for sql in statements:
            conn.execute(sql.encode())


def run_in_background(cleanup: ExitStack, work: Callable[[threading.Event], None]) -> None:
    """Run ``work(stop)`` in a daemon thread until ``cleanup`` unwinds: then set ``stop`` and join it."""
    stop = threading.Event()
    worker = threading.Thread(target=work, args=(stop,), daemon=True)
    worker.start()
    cleanup.callback(worker.join, 10)
    cleanup.callback(stop.set)
