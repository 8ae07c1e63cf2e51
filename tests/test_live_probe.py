"""/probe against a running exporter with real PostgreSQL targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exporter.localpg import wait_until
from tests.conftest import Server, http_status, scrape


def test_probe_returns_only_the_named_targets_series(pg: Server, exporter_for: Callable[..., Any]) -> None:
    daemon = exporter_for([{"name": "a", "dsn": pg.dsn()}, {"name": "b", "dsn": pg.dsn(), "labels": {"env": "b"}}])
    port = daemon.server.port
    wait_until(lambda: daemon.ready()[0], timeout=60)  # every first collection done: the series set is settled
    probed = scrape(port, "/probe?target=a")
    targets = {labels.get("target") for (_name, pairs) in probed.samples for labels in [dict(pairs)]}
    assert targets == {"a", None}  # None: pgvitals_build_info, which has no target
    assert probed.value("pg_up", target="a") == 1
    assert probed.find("pg_stat_database_numbackends", target="a", datname="postgres")
    whole = scrape(port)
    # Every series of a in /metrics is in /probe, and nothing else of a's: the same snapshot.
    of_a = {key for key in whole.samples if ("target", "a") in key[1] and not key[0].endswith("_age_seconds")}
    assert of_a == {key for key in probed.samples if ("target", "a") in key[1]
                    and not key[0].endswith("_age_seconds")}
    status, body = http_status(port, "/probe?target=c")
    assert status == 404 and "unknown target 'c'" in body
