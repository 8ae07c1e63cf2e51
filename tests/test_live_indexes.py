"""Index usage on a real server, as pg_monitor: scans the test makes, and indexes it never uses."""

from __future__ import annotations

from typing import Any

import pytest

from exporter.localpg import wait_until
from tests.support.exporters import collect_in
from tests.support.scrape import Metrics
from tests.support.servers import Server
from tests.support.sessions import run_in_session

pytestmark = [pytest.mark.live, pytest.mark.family("indexes")]

INDEXES = "pg_stat_user_indexes"


def _collect(pg: Server, db: str, **params: Any) -> Metrics:
    return collect_in(pg, db, [INDEXES], **params)


def _size(pg: Server, db: str, index: str) -> int:
    return int(pg.execute(f"SELECT pg_relation_size('{index}') AS s", db)[0]["s"])


def _setup(pg: Server, db: str) -> None:
    # Indexes built after the rows are loaded: CREATE INDEX records their exact size in pg_class.relpages.
    pg.execute("""
        CREATE TABLE orders (id int, customer int, note text, code int);
        INSERT INTO orders SELECT g, g % 500, md5(g::text), g FROM generate_series(1, 20000) g;
        ALTER TABLE orders ADD PRIMARY KEY (id);
        CREATE INDEX orders_customer ON orders (customer);
        CREATE INDEX orders_note ON orders (note);
        CREATE UNIQUE INDEX orders_code ON orders (code);
    """, db)


def test_unused_index_counts_with_its_real_size_and_scans_show(pg: Server, fresh_db: str) -> None:
    _setup(pg, fresh_db)
    scans = 3
    run_in_session(pg, fresh_db, "SET enable_seqscan = off", "SET enable_bitmapscan = off",
                   *[f"SELECT count(*) FROM orders WHERE customer = {n}" for n in range(scans)])

    def reported() -> Metrics | None:  # statistics reach the shared view shortly after the session ends
        metrics = _collect(pg, fresh_db)
        return metrics if metrics.value("pg_stat_user_indexes_scans_total", indexrelname="orders_customer") \
            == scans else None

    metrics: Metrics = wait_until(reported, timeout=30, interval=0.5)
    # Never scanned and enforcing nothing: orders_note. The primary key and the unique index are never
    # scanned either, but they are needed.
    assert metrics.value("pg_index_unused_indexes", datname=fresh_db) == 1
    assert metrics.value("pg_index_unused_bytes", datname=fresh_db) == _size(pg, fresh_db, "orders_note")
    unused = metrics.find("pg_index_unused_size_bytes")
    assert [(labels["indexrelname"], value) for labels, value in unused] == [
        ("orders_note", _size(pg, fresh_db, "orders_note"))]
    assert unused[0][0]["relname"] == "orders" and unused[0][0]["schemaname"] == "public"
    for index in ("orders_pkey", "orders_customer", "orders_note", "orders_code"):
        assert metrics.value("pg_index_size_bytes", indexrelname=index) == _size(pg, fresh_db, index), index
    assert metrics.value("pg_stat_user_indexes_scans_total", indexrelname="orders_note") == 0
    # Each scan returned the 40 rows of one customer, fetched from the table.
    assert metrics.value("pg_stat_user_indexes_tup_read_total", indexrelname="orders_customer") == 40 * scans
    assert metrics.value("pg_stat_user_indexes_tup_fetch_total", indexrelname="orders_customer") == 40 * scans
    last = metrics.value("pg_stat_user_indexes_last_scan_timestamp_seconds", indexrelname="orders_customer")
    assert (last is not None) == (pg.version_num >= 160000)
    assert metrics.value("pg_stat_user_indexes_last_scan_timestamp_seconds", indexrelname="orders_note") is None
    assert metrics.value("pg_stat_user_indexes_scans_total", indexrelname="other") == 0

    # Once scanned, it is no longer unused.
    run_in_session(pg, fresh_db, "SET enable_seqscan = off", "SET enable_bitmapscan = off",
                   "SELECT count(*) FROM orders WHERE note = 'x'")

    def used() -> Metrics | None:
        metrics = _collect(pg, fresh_db)
        return metrics if metrics.value("pg_index_unused_indexes", datname=fresh_db) == 0 else None

    metrics = wait_until(used, timeout=30, interval=0.5)
    assert metrics.value("pg_index_unused_bytes", datname=fresh_db) == 0
    assert not metrics.find("pg_index_unused_size_bytes")


def test_top_n_and_the_remainder_add_up(pg: Server, fresh_db: str) -> None:
    _setup(pg, fresh_db)
    run_in_session(pg, fresh_db, "SET enable_seqscan = off", "SET enable_bitmapscan = off",
                   "SELECT count(*) FROM orders WHERE customer = 7", "SELECT count(*) FROM orders WHERE code = 7",
                   "SELECT count(*) FROM orders WHERE id = 7")

    def settled() -> Metrics | None:
        metrics = _collect(pg, fresh_db, top_n=1, unused_top_n=0)
        total = sum(v for _, v in metrics.find("pg_stat_user_indexes_scans_total"))
        return metrics if total == 3 else None

    metrics: Metrics = wait_until(settled, timeout=30, interval=0.5)
    sizes = {name: _size(pg, fresh_db, name) for name in ("orders_pkey", "orders_customer", "orders_note",
                                                           "orders_code")}
    largest = max(sizes, key=lambda name: sizes[name])
    exported = {labels["indexrelname"]: value for labels, value in metrics.find("pg_index_size_bytes")}
    assert exported == {largest: sizes[largest], "other": sum(sizes.values()) - sizes[largest]}
    # Unused ones are still summed when none is listed one by one.
    assert not metrics.find("pg_index_unused_size_bytes")
    assert metrics.value("pg_index_unused_bytes", datname=fresh_db) == sizes["orders_note"]
