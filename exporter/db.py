"""The one PostgreSQL access layer: guarded connections, bounded per target, and server facts."""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from exporter.secrets import PasswordSource, SecretError, redact

Row = dict[str, Any]
T = TypeVar("T")
log = logging.getLogger(__name__)


class CollectError(Exception):
    """A classified failure of one collection; ``reason`` is a short fixed word used as a label."""

    def __init__(self, reason: str, message: str):
        super().__init__(redact(message))
        self.reason = reason


class TargetDown(CollectError):
    """The server could not be reached, refused our login, or has no slot left: ``reason`` says which."""

    def __init__(self, message: str, reason: str = "connection"):
        super().__init__(reason, message)


class DatabaseUnavailable(CollectError):
    """The server answered but refused a connection to one database: that database's error, not the server's."""


class Denied(CollectError):
    """The role may not use an object (or the platform does not support it): a fact to remember, not a failure."""

    def __init__(self, reason: str, message: str, obj: str):
        super().__init__(reason, message)
        self.object = obj


# What the server says when it refuses a connection, by reason (libpq reports no SQLSTATE for these).
_REFUSALS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("too_many_connections", re.compile(r"too many (connections|clients)|remaining connection slots are reserved")),
    ("auth", re.compile(r"authentication failed|no pg_hba\.conf entry|pg_hba\.conf rejects|role \".*\" does not exist"
                        r"|password authentication|SSL authentication|certificate authentication")),
    ("database_unavailable", re.compile(r"permission denied for database|database \".*\" does not exist"
                                        r"|not currently accepting connections")),
)


def connect_failure(exc: psycopg.Error, whole_server: bool) -> CollectError:
    """Why a connection attempt failed, as the error that the caller's scope calls for.

    Refused by a server that answered (``FATAL``), a connection to one database is that database's
    error; a connection the server never answered, or to the server's default database, is the server's.
    """
    text = str(exc)
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    answered = "FATAL:" in text
    reason = next((word for word, pattern in _REFUSALS if answered and pattern.search(text)), "connection")
    if answered and reason == "connection":
        reason = "refused"
    if whole_server:
        return TargetDown(first_line, reason)
    if answered:
        return DatabaseUnavailable("too_many_connections" if reason == "too_many_connections"
                                   else "database_unavailable", first_line)
    return TargetDown(first_line, reason)


_DENIED_OBJECT = re.compile(r"(?:permission denied for (?:function|view|table|relation|schema|sequence) "
                            r"\"?([\w.]+)\"?)|(?:\b(\w+)\(\))")


def classify(exc: BaseException) -> CollectError:
    """Turn a driver exception into a CollectError with a stable reason word and a redacted message."""
    if isinstance(exc, CollectError):
        return exc
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, pgerrors.LockNotAvailable):
        return CollectError("lock_timeout", f"gave up waiting for a lock: {first_line}")
    if isinstance(exc, pgerrors.QueryCanceled):
        return CollectError("timeout", f"cancelled by statement_timeout: {first_line}")
    if isinstance(exc, pgerrors.InsufficientPrivilege | pgerrors.FeatureNotSupported):
        # A privilege a managed service withholds, or a function it does not support (Aurora): permanent.
        match = _DENIED_OBJECT.search(first_line)
        obj = (match.group(1) or match.group(2)) if match else ""
        reason = "permission" if isinstance(exc, pgerrors.InsufficientPrivilege) else "not_supported"
        return Denied(reason, first_line, obj.rsplit(".", 1)[-1])
    if isinstance(exc, pgerrors.UndefinedTable | pgerrors.UndefinedColumn | pgerrors.UndefinedFunction):
        return CollectError("missing_object", first_line)
    if isinstance(exc, pgerrors.ObjectNotInPrerequisiteState):
        return CollectError("not_ready", first_line)  # e.g. pg_stat_statements not preloaded
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError):
        return TargetDown(first_line)
    if isinstance(exc, psycopg.Error):
        return CollectError("query", first_line)
    return CollectError("internal", f"{type(exc).__name__}: {first_line}")


def dsn_display(dsn: str) -> str:
    """A loggable description of a DSN: host, port and database, never credentials."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "<invalid dsn>"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or params.get('user') or ''}"


@dataclass(frozen=True)
class ConnectOptions:
    """What every connection of a target is opened with."""

    dsn: str
    password: PasswordSource | None  # asked at each connection: a rotated password is used at the next one
    application_name: str
    connect_timeout: float
    pgbouncer: bool = False

    def conninfo(self, dbname: str | None = None) -> str:
        """The libpq conninfo for ``dbname`` (the DSN's own database when None); raises SecretError."""
        extra: dict[str, Any] = {
            "application_name": self.application_name,
            "connect_timeout": max(1, round(self.connect_timeout)),
        }
        if not self.pgbouncer:
            # Dead peers must not hang a worker forever: let TCP notice within about a minute.
            extra.update(keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
        password = self.password.get() if self.password is not None else None
        if password is not None:
            extra["password"] = password
        if dbname is not None:
            extra["dbname"] = dbname
        return make_conninfo(self.dsn, **extra)


class Session:
    """One open connection, used for one collector run at a time."""

    def __init__(self, conn: psycopg.Connection[Row], dbname: str, pgbouncer: bool):
        self.conn = conn
        self.dbname = dbname
        self.pgbouncer = pgbouncer

    @contextmanager
    def guarded(self, timeout: float, lock_timeout: float, writes: bool = False) -> Iterator[Session]:
        """A read-only transaction (unless ``writes``) whose statements give up server-side after ``timeout``.

        ``lock_timeout`` keeps a monitoring query from ever queuing behind DDL: it gives up
        instead of joining the lock queue (and blocking everyone queued after it).
        ``writes`` (declared by the heartbeat writer only) makes it a read-write transaction that
        commits when the block succeeds, with ``synchronous_commit = local``: with synchronous
        replication and its standby gone a commit would otherwise wait forever, a wait that
        ``statement_timeout`` does not cover.
        """
        if self.pgbouncer:
            # The admin console knows no transactions nor settings: a client-side watchdog is all
            # that stops a hung or frozen PgBouncer from holding this worker forever.
            with self._watchdog(timeout):
                yield self
            return
        statement_ms = max(1, int(timeout * 1000))
        lock_ms = max(1, int(min(lock_timeout, timeout) * 1000))
        # One round trip; values are integers we computed, never user text. JIT compilation costs
        # more than our catalog queries themselves (~130 ms on 10,000 tables), and parallel workers
        # would take slots from the application: both off for monitoring.
        mode = "READ WRITE" if writes else "READ ONLY"
        commit_mode = "; SET LOCAL synchronous_commit = local" if writes else ""
        self.conn.execute(
            f"BEGIN TRANSACTION {mode}; SET LOCAL statement_timeout = {statement_ms}; "
            f"SET LOCAL lock_timeout = {lock_ms}; SET LOCAL idle_in_transaction_session_timeout = "
            f"{statement_ms + 5000}; SET LOCAL jit = off; SET LOCAL max_parallel_workers_per_gather = 0"
            f"{commit_mode}"
        )
        committed = False
        try:
            yield self
            if writes:
                self.conn.execute("COMMIT")
                committed = True
        finally:
            # A read-only run wrote nothing: end it, failed or not, before the next run.
            if not committed and not self.conn.closed \
                    and self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self.conn.execute("ROLLBACK")

    @contextmanager
    def _watchdog(self, timeout: float) -> Iterator[None]:
        """Shut the socket down if the block takes longer than ``timeout`` (the read then fails)."""
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            # shutdown() wakes the blocked read without closing the descriptor psycopg uses.
            with suppress(OSError), socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        except psycopg.Error as exc:
            if fired.is_set():
                raise CollectError("timeout", f"no answer within {timeout:g}s, connection dropped") from exc
            raise
        finally:
            timer.cancel()

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        """Run one statement and return its rows as dicts."""
        with self.conn.cursor() as cur:
            cur.execute(sql, params, prepare=False)
            if cur.description is None:
                return []
            return cur.fetchall()

    @contextmanager
    def savepoint(self, name: str = "pgvitals") -> Iterator[None]:
        """Run a block in a savepoint that is always rolled back: it undoes SET LOCAL and releases its locks."""
        self.query(f"SAVEPOINT {name}")
        try:
            yield
        finally:
            self.query(f"ROLLBACK TO SAVEPOINT {name}")

    def attempt(self, work: Callable[[], T]) -> T | CollectError:
        """``work()`` in a savepoint; a database error comes back classified instead of failing the run.

        A lost connection still raises (as TargetDown): nothing after it could run.
        """
        try:
            with self.savepoint():
                return work()
        except TargetDown:
            raise
        except Exception as exc:  # one object's failure (lock_timeout, timeout, dropped meanwhile) is not the run's
            error = classify(exc)
            if isinstance(error, TargetDown):
                raise error from exc
            return error

    def locked_tables(self, relids: Collection[int]) -> set[int]:
        """The tables of ``relids`` with an ACCESS EXCLUSIVE lock held or requested on them, their TOAST or an index."""
        if not relids:
            return set()
        return {int(row["relid"]) for row in self.query(LOCKED_TABLES_SQL, {"relids": list(relids)})}


#: Tables (given by oid) with an ACCESS EXCLUSIVE lock held or requested on them, their TOAST table or one
#: of their indexes: reading such a table, its size or an index of it would queue behind the DDL.
LOCKED_TABLES_SQL = """
SELECT DISTINCT COALESCE(x.indrelid, owner.oid, l.relation)::bigint AS relid
FROM pg_catalog.pg_locks l
LEFT JOIN pg_catalog.pg_index x ON x.indexrelid = l.relation
LEFT JOIN pg_catalog.pg_class owner ON owner.reltoastrelid = l.relation
WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock'
  AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database())
  AND COALESCE(x.indrelid, owner.oid, l.relation) = ANY(%(relids)s::oid[])"""


class FairSlots:
    """A counting semaphore that serves waiters in arrival order.

    threading.Semaphore lets a thread that releases and asks again take the slot before a waiter wakes:
    a sweep over many databases would then keep its slot from one database to the next while another
    sweep's waiter times out. Here a released slot is handed to the longest waiter.
    """

    def __init__(self, count: int):
        self._free = count
        self._lock = threading.Lock()
        self._waiters: deque[threading.Event] = deque()

    def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting at most ``timeout`` seconds; False when none came."""
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            granted = threading.Event()
            self._waiters.append(granted)
        if granted.wait(max(0.0, timeout)):
            return True
        with self._lock:
            if granted.is_set():  # handed over just as the wait ended
                return True
            self._waiters.remove(granted)
            return False

    def release(self) -> None:
        """Give the slot to the longest waiter, or back to the pool."""
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._free += 1


class TargetConnections:
    """A bounded set of connections to one server, reused per database.

    At most ``limit`` are busy at once; at most ``idle`` are kept open between runs (beyond that the
    least recently used database's is closed, the DSN's database last), and never more than
    ``max(limit, idle)`` are open (to make room for a new one, the most recently used idle one is closed:
    in a sweep's cycle it is the one needed last). Runs in databases other than the DSN's (per-database
    sweeps) may hold at most ``limit - 1`` of the busy slots: one stays free for the server-level collectors.
    A run that finds its database's connections all busy waits up to ``SHARE_WAIT`` for one rather than
    open another that could not be kept idle: that one, or another database's, would be closed again.
    """

    #: How long a run waits for a busy connection of its database before opening one more (seconds).
    #: Monitoring runs take milliseconds; a new backend costs the server a fork, an authentication and,
    #: for its first queries, cold caches (a 10,000-table pass: 90 ms on a new backend, 70 on a used one).
    SHARE_WAIT = 2.0

    def __init__(self, options: ConnectOptions, limit: int, idle: int | None = None):
        self.options = options
        self.limit = limit
        self.idle_limit = limit if idle is None else max(1, idle)
        self._slots = FairSlots(limit)
        self._sweep_slots = FairSlots(max(1, limit - 1))
        self._idle: OrderedDict[str, list[psycopg.Connection[Row]]] = OrderedDict()
        self._busy: Counter[str] = Counter()  # connections lent out, per database
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)  # a connection came back (or was discarded)
        self._open = 0
        self._idle_count = 0
        self._closed = False
        self.default_dbname = str(conninfo_to_dict(options.dsn).get("dbname") or "")
        self.opened = 0  # connections ever opened: what reconnect churn the server sees

    def _key(self, dbname: str | None) -> str:
        return dbname or self.default_dbname

    def idle_databases(self) -> list[str]:
        """Databases with a connection open and idle now, least recently used first."""
        with self._lock:
            return [key for key, pool in self._idle.items() if pool]

    @contextmanager
    def session(self, dbname: str | None = None, wait: float = 30.0) -> Iterator[Session]:
        """Borrow a connection to ``dbname`` (default: the DSN's database) for one run."""
        sweep = self._key(dbname) != self.default_dbname and self.limit > 1
        deadline = time.monotonic() + wait
        if sweep and not self._sweep_slots.acquire(timeout=wait):
            raise CollectError("busy", f"no connection free within {wait:g}s (max_connections={self.limit}, "
                                       "one kept for server-level collectors)")
        try:
            if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise CollectError("busy", f"no connection free within {wait:g}s (max_connections={self.limit})")
            conn = None
            try:
                conn = self._take(dbname, deadline)
                session = Session(conn, self._key(dbname), self.options.pgbouncer)
                yield session
            except BaseException as exc:
                if conn is not None and (conn.closed or conn.broken or not isinstance(exc, psycopg.Error)):
                    self._discard(dbname, conn)
                    conn = None
                raise
            finally:
                if conn is not None:
                    self._give_back(dbname, conn)
                self._slots.release()
        finally:
            if sweep:
                self._sweep_slots.release()

    def _take(self, dbname: str | None, deadline: float) -> psycopg.Connection[Row]:
        key = self._key(dbname)
        share_until = min(deadline, time.monotonic() + self.SHARE_WAIT)
        with self._lock:
            while True:
                if self._closed:
                    raise TargetDown("the target was removed", reason="removed")
                pool = self._idle.get(key)
                while pool:
                    conn = pool.pop()
                    self._idle_count -= 1
                    if not conn.closed and not conn.broken:
                        self._idle.move_to_end(key)
                        self._busy[key] += 1
                        return conn
                    self._open -= 1
                # Another run of this database will give its connection back within milliseconds; one more
                # connection that could not be kept idle would be opened now and closed again soon.
                left = share_until - time.monotonic()
                if not self._busy[key] or self._open < self.idle_limit or left <= 0:
                    break
                self._returned.wait(left)
            # Keep the total open connections within bounds. Close the most recently used idle one: sweeps
            # visit the databases in a cycle, and the least recently used is the one the sweep needs next
            # (closing it would make every later visit of the cycle reconnect too).
            while self._open >= max(self.limit, self.idle_limit) and self._close_lru_locked(newest=True):
                pass
            self._open += 1
            self._busy[key] += 1
            self.opened += 1
            log.debug("connecting to database %s (%d open, idle: %s)", key, self._open,
                      ", ".join(f"{k} x{len(v)}" for k, v in self._idle.items() if v) or "none")
        try:
            return self._connect(dbname)
        except BaseException:
            with self._lock:
                self._open -= 1
                self._busy[key] -= 1
                self._returned.notify_all()
            raise

    def _connect(self, dbname: str | None) -> psycopg.Connection[Row]:
        try:
            conninfo = self.options.conninfo(dbname)
        except SecretError as exc:
            raise TargetDown(str(exc), reason="secret") from None
        try:
            if self.options.pgbouncer:
                conn = psycopg.Connection.connect(
                    conninfo, autocommit=True, row_factory=dict_row,
                    prepare_threshold=None, cursor_factory=psycopg.ClientCursor,
                )
            else:
                conn = psycopg.Connection.connect(conninfo, autocommit=True, row_factory=dict_row,
                                                  prepare_threshold=None)
        except psycopg.Error as exc:
            whole_server = dbname is None or dbname == self.default_dbname
            error = connect_failure(exc, whole_server)
            if error.reason == "auth" and self.options.password is not None:
                self.options.password.invalidate()  # an expired token: ask the command again next time
            raise error from None
        return conn

    def _close_lru_locked(self, newest: bool = False) -> bool:
        """Close the idle connection of the least (``newest``: most) recently used database, the DSN's last."""
        for key in [k for k, pool in self._idle.items() if not pool]:
            del self._idle[key]
        keys = [k for k in self._idle if k != self.default_dbname] or list(self._idle)
        if not keys:
            return False
        pool = self._idle[keys[-1] if newest else keys[0]]
        conn = pool.pop(0)
        if not pool:
            del self._idle[keys[-1] if newest else keys[0]]
        self._idle_count -= 1
        self._open -= 1
        conn.close()
        return True

    def _give_back(self, dbname: str | None, conn: psycopg.Connection[Row]) -> None:
        key = self._key(dbname)
        with self._lock:
            self._busy[key] -= 1
            self._returned.notify_all()
            if self._closed:  # a run that finished after close(): its connection is not kept
                self._open -= 1
                conn.close()
                return
            self._idle.setdefault(key, []).append(conn)
            self._idle.move_to_end(key)
            self._idle_count += 1
            while self._idle_count > self.idle_limit and self._close_lru_locked():
                pass

    def _discard(self, dbname: str | None, conn: psycopg.Connection[Row]) -> None:
        with self._lock:
            self._open -= 1
            self._busy[self._key(dbname)] -= 1
            self._returned.notify_all()
        with suppress(Exception):  # closing a broken connection may raise; it is gone either way
            conn.close()

    def close_all(self) -> None:
        """Close every idle connection (the target went down, or the daemon stops)."""
        with self._lock:
            pools = list(self._idle.values())
            self._idle.clear()
            self._idle_count = 0
            for pool in pools:
                for conn in pool:
                    self._open -= 1
                    conn.close()

    def close(self) -> None:
        """Close every idle connection for good: no new session opens, a borrowed one is closed when given back."""
        with self._lock:
            self._closed = True
            self._returned.notify_all()  # a run waiting for a busy connection gives up now
        self.close_all()


@dataclass
class Facts:
    """What we know about a server, refreshed by the probe; collectors are planned against it."""

    version_num: int
    version: str
    in_recovery: bool
    is_superuser: bool
    roles: frozenset[str]
    databases: tuple[str, ...]
    preload_libraries: frozenset[str] | None  # None: the role may not read shared_preload_libraries
    # dbname -> {extension name: (schema, version as major*100+minor)}
    extensions: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)
    # Objects collectors require (``Collector.requires``) that the role may not use.
    denied: frozenset[str] = frozenset()


FACTS_SQL = """
SELECT pg_catalog.current_setting('server_version_num')::int AS version_num,
       pg_catalog.current_setting('server_version') AS version,
       pg_catalog.pg_is_in_recovery() AS in_recovery,
       r.rolsuper AS is_superuser,
       ARRAY(SELECT b.rolname FROM pg_catalog.pg_roles b
             WHERE b.rolname IN ('pg_monitor', 'pg_read_all_stats', 'pg_read_all_settings',
                                 'pg_stat_scan_tables', 'pg_read_all_data')
               AND pg_catalog.pg_has_role(r.oid, b.oid, 'USAGE')) AS roles,
       -- Reading it needs pg_read_all_settings (pg_monitor has it): a role without it must still probe.
       CASE WHEN r.rolsuper OR pg_catalog.pg_has_role(r.oid, 'pg_read_all_settings', 'USAGE')
            THEN pg_catalog.current_setting('shared_preload_libraries') END AS preload
FROM pg_catalog.pg_roles r WHERE r.rolname = current_user
"""

# Only databases the role may connect to: a managed service's own (rdsadmin, cloudsqladmin...) would
# refuse every attempt, and each refusal is a FATAL line in the server log.
DATABASES_SQL = """
SELECT datname FROM pg_catalog.pg_database
WHERE datallowconn AND NOT datistemplate AND pg_catalog.has_database_privilege(datname, 'CONNECT')
ORDER BY datname
"""

# Which of the objects collectors require the role may use, asked without causing an ERROR: a name
# that does not resolve is NULL (not denied: the collector's own version checks cover it).
PRIVILEGES_SQL = """
SELECT o.name,
       CASE WHEN o.name LIKE '%%(%%)'
            THEN pg_catalog.has_function_privilege(pg_catalog.to_regprocedure(o.name), 'EXECUTE')
            ELSE pg_catalog.has_table_privilege(pg_catalog.to_regclass(o.name), 'SELECT') END AS allowed
FROM pg_catalog.unnest(%(names)s::text[]) AS o(name)
WHERE CASE WHEN o.name LIKE '%%(%%)' THEN pg_catalog.to_regprocedure(o.name) IS NOT NULL
           ELSE pg_catalog.to_regclass(o.name) IS NOT NULL END
"""

EXTENSIONS_SQL = """
SELECT e.extname, n.nspname, e.extversion
FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
"""


def extension_version_number(text: str) -> int:
    """``1.10`` -> 110, ``1.7`` -> 107, ``1.4.1`` -> 104: comparable extension versions (patch level ignored)."""
    major, _, rest = text.partition(".")
    # Only the leading digits of the minor: "4.1" (a patch level) or "0beta" (a pre-release) add nothing.
    minor = "".join(itertools.takewhile(str.isdigit, rest)) or "0"
    return int(major) * 100 + int(minor)


def read_facts(session: Session, required: Collection[str] = ()) -> Facts:
    """Read version, role, privileges, databases, the DSN database's extensions and which of ``required`` we lack."""
    row = session.query(FACTS_SQL)[0]
    preload = None if row["preload"] is None else frozenset(
        p.strip() for p in row["preload"].split(",") if p.strip())
    databases = tuple(r["datname"] for r in session.query(DATABASES_SQL))
    facts = Facts(
        version_num=row["version_num"], version=row["version"], in_recovery=row["in_recovery"],
        is_superuser=row["is_superuser"], roles=frozenset(row["roles"]), databases=databases,
        preload_libraries=preload,
    )
    facts.extensions[session.dbname] = read_extensions(session)
    if required:
        rows = session.query(PRIVILEGES_SQL, {"names": sorted(required)})
        facts.denied = frozenset(r["name"] for r in rows if not r["allowed"])
    return facts


def read_extensions(session: Session) -> dict[str, tuple[str, int]]:
    """Extensions installed in the session's database: name -> (schema, version number)."""
    return {
        r["extname"]: (r["nspname"], extension_version_number(r["extversion"]))
        for r in session.query(EXTENSIONS_SQL)
    }
