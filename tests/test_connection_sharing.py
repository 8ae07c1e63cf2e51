"""How sweeps over many databases share connections: the order they visit databases in, and fair slots.

FairSlots hands a released connection slot to the longest waiter, never to a thread that asks again.
"""

from __future__ import annotations

import threading

from exporter.db import FairSlots
from exporter.engine import sweep_order
from exporter.localpg import wait_until


def _queued(slots: FairSlots) -> int:
    return len(slots._waiters)


def test_a_released_slot_goes_to_the_longest_waiter() -> None:
    slots = FairSlots(1)
    assert slots.acquire(timeout=0)
    order: list[str] = []

    def wait_for_slot(name: str) -> None:
        assert slots.acquire(timeout=30)
        order.append(name)
        slots.release()

    first = threading.Thread(target=wait_for_slot, args=("first",))
    first.start()
    wait_until(lambda: _queued(slots) == 1, timeout=10, interval=0.01)
    second = threading.Thread(target=wait_for_slot, args=("second",))
    second.start()
    wait_until(lambda: _queued(slots) == 2, timeout=10, interval=0.01)
    # The holder releases and at once asks again (a sweep going to its next database): it queues last.
    slots.release()
    assert slots.acquire(timeout=30)
    order.append("holder again")
    slots.release()
    first.join(10)
    second.join(10)
    assert order == ["first", "second", "holder again"]


def test_a_waiter_that_gives_up_leaves_the_queue() -> None:
    slots = FairSlots(1)
    assert slots.acquire(timeout=0)
    assert not slots.acquire(timeout=0.01)
    assert _queued(slots) == 0
    slots.release()
    assert slots.acquire(timeout=0)
    assert not slots.acquire(timeout=0)


DATABASES = [f"db{i}" for i in range(6)]


def test_a_sweep_starts_at_the_oldest_database_still_connected() -> None:
    # The previous sweep ended with db3, db4 (least recently used first) still connected: start there.
    assert sweep_order(DATABASES, ["db3", "db4"]) == ["db3", "db4", "db5", "db0", "db1", "db2"]
    # The DSN's database is kept open for the server-level collectors: it does not choose the start.
    assert sweep_order([*DATABASES, "postgres"], ["postgres", "db4"], keep="postgres") == \
        ["db4", "db5", "postgres", "db0", "db1", "db2", "db3"]
    # Nothing connected (or only databases no longer selected): the plain order.
    assert sweep_order(DATABASES, []) == DATABASES
    assert sweep_order(DATABASES, ["gone"]) == DATABASES
