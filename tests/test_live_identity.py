"""Restarts and identity on a real server, as pg_monitor: start time, reload time and the info labels."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from exporter.localpg import wait_until
from tests.support.exporters import Runner, collect_once
from tests.support.scrape import Metrics
from tests.support.servers import Server, start_server

pytestmark = [pytest.mark.live, pytest.mark.family("identity")]

IDENTITY = ["pg_server_identity"]
TRUTH = """
SELECT pg_catalog.date_part('epoch', pg_catalog.pg_postmaster_start_time()) AS started,
       pg_catalog.date_part('epoch', pg_catalog.pg_conf_load_time()) AS loaded,
       current_setting('server_version') AS version, current_setting('server_version_num') AS num,
       current_setting('data_checksums') AS checksums,
       (SELECT system_identifier::text FROM pg_control_system()) AS sysid"""


@pytest.fixture
def own_server() -> Iterator[Server]:
    """A cluster of its own: this test restarts it."""
    server = start_server("identity", settings={"cluster_name": "'vitals_id'"})
    yield server
    server.cluster.destroy()


def _ok(metrics: Metrics) -> Metrics:
    assert metrics.value("pgvitals_collector_success", collector="pg_server_identity") == 1
    return metrics


def test_restart_moves_the_start_time_to_the_servers_own(own_server: Server) -> None:
    truth = own_server.execute(TRUTH)[0]
    metrics = _ok(collect_once(own_server, IDENTITY))
    first = metrics.value("pg_postmaster_start_time_seconds")
    assert first == truth["started"]
    info = metrics.find("pg_server_info")
    assert len(info) == 1
    labels, value = info[0]
    assert value == 1
    assert labels["version"] == truth["version"]
    assert labels["server_version_num"] == truth["num"]
    # initdb enables checksums by default from 18 on (the test clusters pass no option either way).
    assert labels["data_checksums"] == truth["checksums"] == ("on" if own_server.version_num >= 180000 else "off")
    assert labels["cluster_name"] == "vitals_id"
    assert labels["system_identifier"] == truth["sysid"] and int(truth["sysid"]) > 0

    own_server.cluster.restart()
    after = own_server.execute(TRUTH)[0]
    assert after["started"] > truth["started"]
    metrics = _ok(collect_once(own_server, IDENTITY))
    assert metrics.value("pg_postmaster_start_time_seconds") == after["started"]
    # A restart also loads the configuration anew (just before the postmaster records its start time);
    # the identity of the cluster stays.
    reload_time = metrics.value("pg_config_reload_time_seconds")
    assert reload_time is not None and truth["started"] < reload_time <= after["started"]
    assert metrics.find("pg_server_info")[0][0]["system_identifier"] == truth["sysid"]


def test_reload_moves_the_reload_time_but_not_the_start_time(pg: Server) -> None:
    with Runner(pg, IDENTITY) as runner:
        before = _ok(runner.collect())
        loaded = before.value("pg_config_reload_time_seconds")
        started = before.value("pg_postmaster_start_time_seconds")
        assert loaded is not None and started is not None
        pg.execute("SELECT pg_reload_conf()")

        # The postmaster handles SIGHUP asynchronously; the exporter's pooled session re-reads the files
        # at its next command after the signal reached it.
        def reloaded() -> Metrics | None:
            metrics = _ok(runner.collect())
            value = metrics.value("pg_config_reload_time_seconds")
            return metrics if value is not None and value > loaded else None

        after: Metrics = wait_until(reloaded, timeout=30, interval=0.2)
    assert after.value("pg_postmaster_start_time_seconds") == started
    # Each session records when it re-read the files itself: the postmaster's time or a moment later.
    now = pg.execute("SELECT pg_catalog.date_part('epoch', now()) AS now")[0]["now"]
    value = after.value("pg_config_reload_time_seconds")
    assert value is not None and loaded < value <= now
