"""A logical replication pair for tests: a publisher of table ``items`` and a subscriber with the same table.

The subscriber retries a failed apply worker every second (``wal_retrieve_retry_interval``), so conflicts and
disabled subscriptions show within seconds.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from exporter.localpg import wait_until
from tests.support.servers import Server, start_server


@dataclass
class Pair:
    publisher: Server
    subscriber: Server


@contextmanager
def logical_pair() -> Iterator[Pair]:
    """Two clusters: a publisher of ``items`` (publication ``pub``) and a subscriber with the same table."""
    publisher = start_server("publisher", settings={"wal_level": "logical"})
    subscriber = start_server("subscriber", settings={"wal_retrieve_retry_interval": "'1s'"})
    try:
        for server in (publisher, subscriber):
            server.execute("CREATE TABLE items (id int PRIMARY KEY, note text)")
        publisher.execute("CREATE PUBLICATION pub FOR TABLE items")
        yield Pair(publisher, subscriber)
    finally:
        subscriber.cluster.destroy()
        publisher.cluster.destroy()


def subscribe(pair: Pair, name: str, dbname: str = "postgres", slot: str | None = None) -> None:
    """Create subscription ``name`` in ``dbname`` and wait until its apply worker has heard from the publisher."""
    port = pair.publisher.cluster.port
    pair.subscriber.execute(f"CREATE SUBSCRIPTION {name} CONNECTION 'host=127.0.0.1 port={port} user=postgres "
                            f"dbname=postgres' PUBLICATION pub WITH (copy_data = false, slot_name = '{slot or name}')",
                            dbname)
    wait_until(lambda: pair.subscriber.execute(
        f"SELECT count(*) AS n FROM pg_stat_subscription WHERE subname = '{name}' AND relid IS NULL "
        "AND last_msg_receipt_time IS NOT NULL")[0]["n"] >= 1, timeout=60)


def drop_subscription(pair: Pair, name: str, dbname: str = "postgres") -> None:
    pair.subscriber.execute(f"DROP SUBSCRIPTION IF EXISTS {name}", dbname)


@contextmanager
def paused_sender(pair: Pair, name: str) -> Iterator[None]:
    """The publisher's WAL sender for subscription ``name``, frozen: the connection stays, nothing arrives."""
    sender = pair.publisher.execute(f"SELECT pid FROM pg_stat_replication WHERE application_name = '{name}'")
    pid = int(sender[0]["pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
