"""Heavyweight locks: counts by mode (granted and waiting) and who blocks whom, bounded to counts and maxima."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from exporter.catalog import Collector, Rows, SqlVariant
from exporter.collectors._helpers import gauge

if TYPE_CHECKING:
    from exporter.hooks import RunContext

# The lock modes of the lock table; each gets a series (0 when none) per database so that graphs and
# alerts see a steady set. Any other mode (SIReadLock under SERIALIZABLE) appears when present.
LOCK_MODES = (
    "AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock",
    "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock",
)

# The databases that get zero series: those a session can connect to (as the engine's facts list them).
_DATABASES = """
  SELECT d.datname FROM pg_catalog.pg_database d WHERE d.datallowconn AND NOT d.datistemplate"""

# One pass over pg_locks. The database label is the locked object's database when it has one
# (relations, advisory locks, objects), else the database of the session holding or awaiting the lock
# (transaction ids, virtual xids, shared catalogs), else "" (prepared transactions, processes without
# a database). Our own backend's locks (taken to run this very query) are left out, and so are the
# exporter's other sessions' waits: they give up after lock_timeout and are an artefact of watching.
_LOCKS_SQL = f"""
WITH locks AS (
  SELECT COALESCE(d.datname, a.datname, '') AS datname, l.mode, l.granted
  FROM pg_catalog.pg_locks l
  LEFT JOIN pg_catalog.pg_database d ON d.oid = l.database
  LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
  WHERE l.pid IS DISTINCT FROM pg_catalog.pg_backend_pid()
    AND NOT (NOT l.granted
             AND COALESCE(a.application_name = pg_catalog.current_setting('application_name'), false))
), counts AS (
  SELECT datname, mode, granted, count(*) AS locks FROM locks GROUP BY datname, mode, granted
), grid AS (
  SELECT db.datname::text AS datname, m.mode, g.granted
  FROM ({_DATABASES}) db
  CROSS JOIN pg_catalog.unnest(ARRAY[{", ".join(f"'{m}'" for m in LOCK_MODES)}]::text[]) AS m(mode)
  CROSS JOIN (VALUES (true), (false)) AS g(granted)
)
SELECT datname, mode, granted, COALESCE(counts.locks, 0) AS locks
FROM grid FULL JOIN counts USING (datname, mode, granted)"""

LOCKS = Collector(
    name="pg_locks",
    family="locks",
    help="Heavyweight locks by database, mode and whether they are granted or waited for, from pg_locks.",
    interval=15.0,
    timeout=5.0,
    variants=(SqlVariant(sql=_LOCKS_SQL, min_version=120000),),
    metrics=(
        gauge("pg_locks",
              'Locks by database, mode and granted ("true": held, "false": waited for); 0 for the standard modes '
              "when none.",
              "locks", ("datname", "mode", "granted")),
    ),
    notes=(
        "`datname` is the locked object's database; for locks on no database object (transaction ids, "
        "virtual xids, shared catalogs) the database the holding or waiting session is connected to; "
        '"" when there is none (prepared transactions, background processes). The exporter\'s own query '
        "locks and the waits of its sessions (same application_name; they give up after lock_timeout) "
        "are not counted. `sum by (datname) (pg_locks{granted=\"false\"})` is what is stuck now."
    ),
)


def _waits_sql(waitstart: str) -> str:
    """Waiting sessions with their blockers, the blockers' databases, and every database for zeros."""
    # pg_blocking_pids() takes every lock-manager partition lock: it is called once per waiting
    # session only (the MATERIALIZED CTE keeps the planner from calling it again per reference).
    return f"""
WITH waiting AS MATERIALIZED (
  SELECT l.pid, {waitstart} AS waitstart
  FROM pg_catalog.pg_locks l
  WHERE NOT l.granted AND l.pid IS NOT NULL AND l.pid <> pg_catalog.pg_backend_pid()
  GROUP BY l.pid
), waiters AS MATERIALIZED (
  SELECT w.pid, a.datname::text AS datname,
         COALESCE(a.application_name = pg_catalog.current_setting('application_name'), false) AS ours,
         GREATEST(0, pg_catalog.date_part('epoch',
             pg_catalog.clock_timestamp() - COALESCE(w.waitstart, a.query_start))) AS wait_seconds,
         w.waitstart IS NOT NULL AS exact,
         pg_catalog.date_part('epoch', a.query_start) AS query_start,
         pg_catalog.pg_blocking_pids(w.pid) AS blocked_by
  FROM waiting w LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = w.pid
)
SELECT 'waiter' AS kind, pid, datname, ours, wait_seconds, exact, query_start, blocked_by FROM waiters
UNION ALL
SELECT 'blocker', a.pid, a.datname::text, NULL, NULL, NULL, NULL, NULL
FROM pg_catalog.pg_stat_activity a
WHERE a.pid IN (SELECT pg_catalog.unnest(blocked_by) FROM waiters)
UNION ALL
SELECT 'database', NULL, datname::text, NULL, NULL, NULL, NULL, NULL FROM ({_DATABASES}) db
UNION ALL
-- Taken before pg_locks was read: a wait not seen by this run began after this instant.
SELECT 'clock', NULL, NULL, NULL, NULL, NULL, pg_catalog.date_part('epoch', pg_catalog.statement_timestamp()), NULL"""


class WaitRow(TypedDict):
    """A row of the waits query: a waiting session, a blocker, a database to report, or the run's clock."""

    kind: Literal["waiter", "blocker", "database", "clock"]
    pid: int | None
    datname: str | None
    ours: bool | None
    wait_seconds: float | None
    exact: bool | None
    query_start: float | None  # for "clock": the instant before pg_locks was read
    blocked_by: list[int] | None


@dataclass
class DatabaseWaits:
    """What pg_lock_waits reports for one database."""

    waiting: int = 0
    wait_max: float = 0.0
    roots: int = 0


def bound_inexact_waits(rows: Sequence[WaitRow], state: dict[str, Any]) -> Sequence[WaitRow]:
    """Tighten waits the server gives no start for (12-13; the first instant of a wait on 14+).

    Such a wait is measured from its statement's start, but if the previous run saw no wait for
    that statement, the wait began after that run: measure from there. Still an upper bound,
    now off by at most one interval instead of by the statement's whole run time.
    """
    previous_run: float | None = state.get("run_started")
    known: dict[tuple[int, float], float] = state.get("wait_bounds", {})
    bounds: dict[tuple[int, float], float] = {}
    for row in rows:
        start = row["query_start"]
        if row["kind"] == "clock":
            state["run_started"] = start
        elif row["kind"] == "waiter" and not row["exact"] and start is not None and row["pid"] is not None:
            key = (row["pid"], start)
            bound = known.get(key, max(start, previous_run or start))
            bounds[key] = bound
            row["wait_seconds"] = max(0.0, float(row["wait_seconds"] or 0) - (bound - start))
    state["wait_bounds"] = bounds
    return rows


def lock_wait_summary(rows: Rows, ctx: RunContext) -> Rows:
    """The pg_lock_waits transform: bound inexact waits with what earlier runs saw, then summarize."""
    return blocking_summary(bound_inexact_waits(cast(list[WaitRow], rows), ctx.state), ctx)


def blocking_summary(rows: Sequence[WaitRow], _ctx: RunContext | None = None) -> Rows:
    """Per-database waiting sessions, oldest wait and roots, and the largest group stuck behind one root."""
    per_db: dict[str, DatabaseWaits] = {}

    def db(name: str) -> DatabaseWaits:
        return per_db.setdefault(name, DatabaseWaits())

    session_db: dict[int, str] = {}
    waiters: dict[int, tuple[str, bool, list[int]]] = {}
    for row in rows:
        pid = row["pid"]
        if row["kind"] == "database":
            db(row["datname"] or "")
        elif row["kind"] == "blocker" and pid is not None:
            session_db[pid] = row["datname"] or ""
        elif row["kind"] == "waiter" and pid is not None:
            name = row["datname"] or ""
            session_db[pid] = name
            # Duplicates (parallel workers) and the waiter itself (extension locks in a lock group) go.
            blockers = sorted({p for p in row["blocked_by"] or () if p != pid})
            waiters[pid] = (name, bool(row["ours"]), blockers)
            if not row["ours"]:
                stats = db(name)
                stats.waiting += 1
                stats.wait_max = max(stats.wait_max, float(row["wait_seconds"] or 0))

    # Edges run from a blocker to the sessions it blocks. A root blocks others and waits for nothing.
    # PID 0 stands for prepared transactions: roots in the database of the session they block.
    blocks: dict[tuple[int, str], list[int]] = defaultdict(list)
    for pid, (name, _ours, blockers) in waiters.items():
        for blocker in blockers:
            key = (blocker, name if blocker == 0 else "")
            blocks[key].append(pid)
    roots = [key for key in blocks if key[0] not in waiters]
    max_blocked = 0
    for blocker, where in roots:
        first_blocked = blocks[(blocker, where)][0]
        # A root that left pg_stat_activity since pg_locks was read counts where its victim is.
        root_db = where if blocker == 0 else session_db.get(blocker, waiters[first_blocked][0])
        db(root_db).roots += 1
        # Everyone who waits on this root, directly or behind another waiter, is stuck behind it.
        seen: set[int] = set()
        queue = deque(blocks[(blocker, where)])
        while queue:
            pid = queue.popleft()
            if pid in seen:
                continue
            seen.add(pid)
            queue.extend(blocks.get((pid, ""), ()))
        max_blocked = max(max_blocked, sum(1 for pid in seen if not waiters[pid][1]))

    out: Rows = [
        {"datname": name, "waiting": s.waiting, "wait_max": s.wait_max, "roots": s.roots}
        for name, s in sorted(per_db.items())
    ]
    out.append({"max_blocked": max_blocked})
    return out


_WAITSTART_14 = "min(l.waitstart)"
# pg_locks.waitstart arrived in 14: from the statement start, then bounded by bound_inexact_waits().
_WAITSTART_12 = "NULL::timestamptz"

LOCK_WAITS = Collector(
    name="pg_lock_waits",
    family="locks",
    help="Sessions waiting on locks, how long, and the blocking chains behind them (pg_blocking_pids).",
    interval=15.0,
    timeout=5.0,
    variants=(
        SqlVariant(sql=_waits_sql(_WAITSTART_12), min_version=120000, max_version=140000),
        SqlVariant(sql=_waits_sql(_WAITSTART_14), min_version=140000),
    ),
    transform=lock_wait_summary,
    metrics=(
        gauge("pg_lock_waiting_sessions", "Sessions waiting for a heavyweight lock, by their database (0: none).",
              "waiting", ("datname",)),
        gauge("pg_lock_wait_max_seconds",
              "Longest current lock wait in the database (0: nobody waits). Where the server records no wait "
              "start (PostgreSQL 12-13), an upper bound: from the later of the statement's start and the "
              "last collection that did not see the wait.",
              "wait_max", ("datname",), unit="seconds"),
        gauge("pg_lock_blocking_roots",
              "Sessions at the root of a blocking chain (blocking others, waiting for nobody), by their database.",
              "roots", ("datname",)),
        gauge("pg_lock_max_blocked_by_one_root",
              "Largest number of sessions stuck behind one root blocker, directly or behind other waiters.",
              "max_blocked"),
    ),
    notes=(
        "pg_blocking_pids() is called only for sessions that wait on a lock (it takes every lock-manager "
        "partition lock). Waiting sessions are counted in the database they are connected to; a root in "
        "the database its session is connected to. A prepared transaction that blocks shows as a root in "
        "the database of the session it blocks (several prepared transactions there count once). The "
        "exporter's own sessions (same application_name) never count as waiters; they still count as "
        "roots when they block someone, which is the truth. Sessions in a deadlock cycle, before the "
        "deadlock detector breaks it, wait but have no root."
    ),
)

COLLECTORS = (LOCKS, LOCK_WAITS)
