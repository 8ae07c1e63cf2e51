"""Targets added and removed at run time through the daemon's own API (used by reload and /probe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from exporter.config import TargetConfig
from exporter.localpg import wait_until
from tests.support.scrape import scrape, wait_for_metric
from tests.support.servers import Server

pytestmark = [pytest.mark.live, pytest.mark.family("reload")]

PER_DATABASE = "pg_table_wraparound"  # a per-database collector: connects to each selected database


def _pgvitals_backends(pg: Server, dbname: str) -> int:
    rows = pg.execute("SELECT pg_catalog.count(*) AS n FROM pg_catalog.pg_stat_activity "
                      f"WHERE datname = '{dbname}' AND application_name = 'pgvitals'")
    return int(rows[0]["n"])


def test_an_added_target_runs_on_its_own_and_a_removed_one_stops_and_leaves(
        pg: Server, fresh_db: str, exporter_for: Callable[..., Any]) -> None:
    daemon = exporter_for([{"name": "first", "dsn": pg.dsn(), "databases": {"include": ["postgres"]}}],
                          probe_interval="1s")
    port = daemon.server.port
    wait_for_metric(port, "pg_up", lambda v: v == 1, target="first")

    daemon.add_target(TargetConfig(name="second", dsn=pg.dsn(fresh_db), databases={"include": [fresh_db]}))
    metrics = wait_for_metric(port, "pgvitals_collector_success", lambda v: v == 1, target="second",
                              collector=PER_DATABASE)
    assert metrics.value("pg_up", target="second") == 1
    assert _pgvitals_backends(pg, fresh_db) > 0
    with pytest.raises(ValueError, match="exists already"):
        daemon.add_target(TargetConfig(name="second", dsn=pg.dsn()))
    assert sorted(daemon.target_names()) == ["first", "second"]

    assert daemon.remove_target("second") is True
    metrics = scrape(port)
    assert [key for key in metrics.samples if ("target", "second") in key[1]] == []
    assert metrics.value("pg_up", target="first") == 1
    wait_until(lambda: _pgvitals_backends(pg, fresh_db) == 0, timeout=10)
    assert daemon.remove_target("second") is False
    assert daemon.target_names() == ["first"]
    # Nothing of the removed target comes back later (no job of it is left to run).
    wait_for_metric(port, "pgvitals_collector_success", lambda v: v == 1, target="first", collector=PER_DATABASE)
    assert [key for key in scrape(port).samples if ("target", "second") in key[1]] == []
