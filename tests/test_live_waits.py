"""Wait events on a real server, as pg_monitor: sessions the test blocks show what they wait on."""

from __future__ import annotations

import pytest

from exporter.localpg import wait_until
from tests.support.exporters import collect_once
from tests.support.servers import Server
from tests.support.sessions import sessions

pytestmark = [pytest.mark.live, pytest.mark.family("wait_events")]

CLIENT = "client backend"


def test_sessions_blocked_on_a_lock_are_counted_by_wait_event(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE TABLE hot (id int)", fresh_db)
    with sessions(pg, fresh_db) as group:
        group.open("holder").execute("LOCK TABLE hot IN ACCESS EXCLUSIVE MODE")  # then idle in transaction
        for name in ("w1", "w2", "w3"):
            group.open(name)
            group.start(name, "SELECT count(*) FROM hot")
        wait_until(lambda: group.waiting() == 3, timeout=30)
        metrics = collect_once(pg, ["pg_connections"])
    assert metrics.value("pgvitals_collector_success", collector="pg_connections") == 1
    waits = {(labels["wait_event_type"], labels["wait_event"], labels["state"]): value
             for labels, value in metrics.find("pg_wait_event_sessions", datname=fresh_db, backend_type=CLIENT)}
    assert waits == {("Lock", "relation", "active"): 3, ("Client", "ClientRead", "idle in transaction"): 1}
    # The same scan counts connections: per database the two views add up.
    connections = sum(v for _, v in metrics.find("pg_connections", datname=fresh_db))
    assert connections == 4
    # Background processes are there with their own type, outside any database and state.
    checkpointer = metrics.find("pg_wait_event_sessions", backend_type="checkpointer")
    assert len(checkpointer) == 1 and checkpointer[0][0]["datname"] == "" and checkpointer[0][0]["state"] == ""
    assert checkpointer[0][1] == 1
    # The exporter's own session, running the scan, waits for nothing.
    running = metrics.find("pg_wait_event_sessions", backend_type=CLIENT, wait_event_type="none", state="active")
    assert sum(v for _, v in running) >= 1


def test_every_client_backend_is_counted_once(pg: Server) -> None:
    metrics = collect_once(pg, ["pg_connections"])
    by_wait = sum(v for _, v in metrics.find("pg_wait_event_sessions", backend_type=CLIENT))
    assert by_wait == sum(v for _, v in metrics.find("pg_connections")) >= 1
