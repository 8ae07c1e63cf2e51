"""Locks on a real server, read by a pg_monitor-only role: counts, blocking chains, waits, deadlocks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from exporter.collectors.locks import blocking_summary, bound_inexact_waits
from exporter.localpg import wait_until
from tests.support.exporters import Runner, collect_once
from tests.support.scrape import Metrics
from tests.support.servers import Server
from tests.support.sessions import Sessions, sessions

pytestmark = [pytest.mark.live, pytest.mark.family("locks")]

LOCK_COLLECTORS = ["pg_locks", "pg_lock_waits"]


@contextmanager
def chain_of_three(pg: Server, dbname: str, exporter_waiter: bool = True) -> Iterator[Sessions]:
    """A holds t1; B holds t2 and waits for t1; C waits for t1; D waits for t2 (behind B).

    With ``exporter_waiter`` an extra session named like the exporter waits for t1 as well.
    """
    pg.execute("CREATE TABLE t1 (id int); CREATE TABLE t2 (id int)", dbname)
    with sessions(pg, dbname) as group:
        group.open("holder_a").execute("LOCK TABLE t1 IN ACCESS EXCLUSIVE MODE")
        group.open("waiter_b").execute("LOCK TABLE t2 IN ACCESS EXCLUSIVE MODE")
        group.start("waiter_b", "SELECT count(*) FROM t1")
        group.open("waiter_c")
        group.start("waiter_c", "SELECT count(*) FROM t1")
        group.open("waiter_d")
        group.start("waiter_d", "SELECT count(*) FROM t2")
        expected = 3
        if exporter_waiter:
            group.open("exporter_like", application_name="pgvitals")
            group.start("exporter_like", "SELECT count(*) FROM t1")
            expected = 4
        wait_until(lambda: group.waiting() == expected, timeout=20)
        yield group
        # Release in order: A's lock lets B and C finish, then B's lets D finish.
        group.conns["holder_a"].rollback()
        group.join("waiter_b")
        group.conns["waiter_b"].rollback()
        for name in list(group.threads):
            group.join(name)
        assert not group.errors, group.errors


def collect_locks(pg: Server) -> Metrics:
    return collect_once(pg, LOCK_COLLECTORS)


def test_chain_of_three_waiters_behind_one_root(pg: Server, fresh_db: str) -> None:
    with chain_of_three(pg, fresh_db):
        first = collect_locks(pg)
        time.sleep(1.5)
        second = collect_locks(pg)

    for metrics in (first, second):
        assert metrics.value("pgvitals_collector_success", collector="pg_locks") == 1
        assert metrics.value("pgvitals_collector_success", collector="pg_lock_waits") == 1
        # B, C and D wait; the exporter-named session waiting too is not counted as a waiter.
        assert metrics.value("pg_lock_waiting_sessions", target="main", datname=fresh_db) == 3
        assert metrics.value("pg_lock_blocking_roots", datname=fresh_db) == 1
        # D waits behind B, which waits behind A: all three are stuck behind A.
        assert metrics.value("pg_lock_max_blocked_by_one_root", target="main") == 3
        # Each waiter asks for an ACCESS SHARE lock on t1 or t2.
        assert metrics.value("pg_locks", datname=fresh_db, mode="AccessShareLock", granted="false") == 3
        assert metrics.value("pg_locks", datname=fresh_db, mode="AccessExclusiveLock", granted="true") == 2
        assert sum(v for _, v in metrics.find("pg_locks", datname=fresh_db, granted="false")) == 3
        # Databases without waits say so with zeros.
        assert metrics.value("pg_lock_waiting_sessions", datname="postgres") == 0
        assert metrics.value("pg_lock_blocking_roots", datname="postgres") == 0
        assert metrics.value("pg_lock_wait_max_seconds", datname="postgres") == 0
        assert metrics.value("pg_locks", datname="postgres", mode="AccessExclusiveLock", granted="false") == 0

    wait_first = first.value("pg_lock_wait_max_seconds", datname=fresh_db)
    wait_second = second.value("pg_lock_wait_max_seconds", datname=fresh_db)
    assert wait_first is not None and wait_second is not None
    assert wait_first > 0
    assert wait_second >= wait_first + 1.0  # the oldest wait keeps growing between collections
    assert wait_second < 60  # sanity: the waits began during this test

    after = collect_locks(pg)
    assert after.value("pg_lock_waiting_sessions", datname=fresh_db) == 0
    assert after.value("pg_lock_blocking_roots", datname=fresh_db) == 0
    assert after.value("pg_lock_max_blocked_by_one_root") == 0
    assert after.value("pg_lock_wait_max_seconds", datname=fresh_db) == 0


def test_a_wait_late_in_a_long_statement_is_not_counted_from_its_start(pg: Server, fresh_db: str) -> None:
    """PostgreSQL 12-13 record no wait start: a run that saw no wait bounds it (14+ read waitstart)."""
    pg.execute("CREATE TABLE t1 (id int)", fresh_db)

    def slow_statement() -> dict[str, float] | None:
        rows = pg.execute("SELECT extract(epoch FROM query_start)::float8 AS started, "
                          "extract(epoch FROM clock_timestamp() - query_start)::float8 AS ran "
                          "FROM pg_stat_activity WHERE application_name = 'slow' AND state = 'active'")
        return rows[0] if rows else None

    with sessions(pg, fresh_db) as group, Runner(pg, ["pg_lock_waits"], strict=True) as runner:
        group.open("holder").execute("LOCK TABLE t1 IN ACCESS EXCLUSIVE MODE")
        group.open("slow")
        # Sleeps first, then waits for t1: the wait begins 6 s after the statement.
        group.start("slow", "DO $$ BEGIN PERFORM pg_sleep(6); PERFORM count(*) FROM t1; END $$")
        wait_until(lambda: (row := slow_statement()) is not None and row["ran"] >= 2, timeout=20)
        before_first_run = time.time()
        assert runner.collect().value("pg_lock_waiting_sessions", datname=fresh_db) == 0
        wait_until(lambda: group.waiting() == 1, timeout=20)
        statement = slow_statement()
        metrics = runner.collect()
        after_second_run = time.time()
        group.conns["holder"].rollback()
    wait = metrics.value("pg_lock_wait_max_seconds", datname=fresh_db)
    assert metrics.value("pg_lock_waiting_sessions", datname=fresh_db) == 1
    assert statement is not None and wait is not None
    # The first run saw no wait, so it began after that run started; counting from the statement's
    # start would add the 2+ s the statement had already run by then.
    assert 0 < wait <= after_second_run - before_first_run
    assert after_second_run - statement["started"] > wait + 2


def _waits(*waiters: tuple[int, float, bool, float], at: float) -> list[dict[str, object]]:
    """Rows as the pg_lock_waits query returns them: (pid, query_start, exact, wait_seconds) and the clock."""
    rows: list[dict[str, object]] = [
        {"kind": "waiter", "pid": pid, "query_start": started, "exact": exact, "wait_seconds": wait}
        for pid, started, exact, wait in waiters]
    return [*rows, {"kind": "clock", "query_start": at}]


def test_inexact_waits_are_bounded_by_the_last_run_that_did_not_see_them() -> None:
    state: dict[str, object] = {}
    # First run at t=100: no history, so statement 1 (started at 40) counts from its start.
    first = bound_inexact_waits(_waits((1, 40.0, False, 60.0), at=100.0), state)
    assert first[0]["wait_seconds"] == 60.0
    # t=115: statement 1 keeps its bound (40); statement 2 (started at 50) was not waiting at t=100.
    second = bound_inexact_waits(_waits((1, 40.0, False, 75.0), (2, 50.0, False, 65.0), at=115.0), state)
    assert [r["wait_seconds"] for r in second[:2]] == [75.0, 15.0]
    # t=130: statement 2 still bounded by t=100; pid 1 runs a new statement (started 110), not seen
    # waiting at t=115: bounded by 115; an exact wait (waitstart known, 14+) stays as the server measured it.
    third = bound_inexact_waits(
        _waits((2, 50.0, False, 80.0), (1, 110.0, False, 20.0), (3, 10.0, True, 7.0), at=130.0), state)
    assert [r["wait_seconds"] for r in third[:3]] == [30.0, 15.0, 7.0]
    # Forgotten once not seen: statement 2 waiting again at t=160 is bounded by the run at t=145.
    state_keys = set(state["wait_bounds"])  # type: ignore[call-overload]
    assert state_keys == {(2, 50.0), (1, 110.0)}
    bound_inexact_waits(_waits(at=145.0), state)
    fourth = bound_inexact_waits(_waits((2, 50.0, False, 110.0), at=160.0), state)
    assert fourth[0]["wait_seconds"] == 15.0


def test_lock_counts_leave_out_our_own_query(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE TABLE held (id int)", fresh_db)
    with sessions(pg, fresh_db) as group:
        conn = group.open("holder")
        conn.execute("LOCK TABLE held IN SHARE MODE")
        conn.execute("SELECT pg_advisory_lock(42)")
        metrics = collect_locks(pg)
        conn.rollback()
    assert metrics.value("pg_locks", datname=fresh_db, mode="ShareLock", granted="true") == 1
    # Advisory locks belong to the database they are taken in; session-level, so still held here.
    assert metrics.value("pg_locks", datname=fresh_db, mode="ExclusiveLock", granted="true") >= 1  # type: ignore[operator]
    # The exporter's query runs in "postgres" and takes ACCESS SHARE locks on the views it reads:
    # none of them is counted.
    assert metrics.value("pg_locks", datname="postgres", mode="AccessShareLock", granted="true") == 0
    modes = {labels["mode"] for labels, _ in metrics.find("pg_locks", datname=fresh_db)}
    assert {"AccessShareLock", "AccessExclusiveLock", "ShareUpdateExclusiveLock"} <= modes


def test_deadlock_increments_the_counter(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE TABLE d (id int PRIMARY KEY, v int); INSERT INTO d VALUES (1, 0), (2, 0)", fresh_db)
    before = collect_once(pg, ["pg_stat_database"]).value("pg_stat_database_deadlocks_total", datname=fresh_db)
    assert before == 0
    with sessions(pg, fresh_db) as group:
        first, second = group.open("first"), group.open("second")
        for conn in (first, second):
            conn.execute("SET deadlock_timeout = '100ms'")
        first.execute("UPDATE d SET v = 1 WHERE id = 1")
        second.execute("UPDATE d SET v = 1 WHERE id = 2")
        group.start("first", "UPDATE d SET v = 2 WHERE id = 2")
        wait_until(lambda: group.waiting() == 1, timeout=20)
        try:
            second.execute("UPDATE d SET v = 2 WHERE id = 1")
        except psycopg.errors.DeadlockDetected as exc:
            group.errors["second"] = exc
        group.join("first")
        assert len(group.errors) == 1  # exactly one of the two was chosen as the victim
        assert all(isinstance(e, psycopg.errors.DeadlockDetected) for e in group.errors.values())
        first.rollback()
        second.rollback()
    # Statistics reach the shared view when the backends report (at the latest when they exit).
    metrics = wait_until(
        lambda: (m := collect_once(pg, ["pg_stat_database"])).value(
            "pg_stat_database_deadlocks_total", datname=fresh_db) == 1 and m,
        timeout=15, interval=0.5,
    )
    assert metrics.value("pg_stat_database_deadlocks_total", target="main", datname=fresh_db) == 1


def _waiter(datname: str, pid: int, blocked_by: list[int], ours: bool = False, wait: float = 1.0) -> dict[str, object]:
    return {"kind": "waiter", "pid": pid, "datname": datname, "ours": ours, "wait_seconds": wait,
            "blocked_by": blocked_by}


def test_blocking_summary_walks_chains_across_roots() -> None:
    """The graph logic alone, on shapes hard to stage live: two roots, a cycle, a prepared transaction."""
    rows = [
        {"kind": "database", "pid": None, "datname": "a"},
        {"kind": "database", "pid": None, "datname": "b"},
        {"kind": "blocker", "pid": 1, "datname": "a"},
        {"kind": "blocker", "pid": 5, "datname": "b"},
        _waiter("a", 2, [1], wait=4.0),
        _waiter("a", 3, [2, 2]),  # duplicates (parallel workers) count once
        _waiter("a", 4, [3, 1]),  # behind both the root and a waiter: counted once for the root
        _waiter("b", 6, [5]),
        _waiter("b", 7, [8]),  # 7 and 8 wait on each other: no root
        _waiter("b", 8, [7], wait=9.0),
        _waiter("b", 9, [0]),  # a prepared transaction
        _waiter("a", 10, [1], ours=True),  # the exporter's own session: not a waiter
    ]
    out = {row.get("datname"): row for row in blocking_summary(rows)}
    assert out["a"] == {"datname": "a", "waiting": 3, "wait_max": 4.0, "roots": 1}
    assert out["b"] == {"datname": "b", "waiting": 4, "wait_max": 9.0, "roots": 2}
    assert out[None] == {"max_blocked": 3}
