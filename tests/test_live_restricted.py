"""Restricted and managed servers: a database or a function the role may not use never takes a target down.

Each scenario is what a monitoring role meets on RDS, Cloud SQL, AlloyDB or Azure: system databases it
may not connect to, functions revoked from pg_monitor, a wrong password, a server out of connection slots.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from exporter import __version__
from exporter.catalog import Collector, SqlVariant, validate
from exporter.cli import main
from exporter.collectors._helpers import gauge
from exporter.engine import Engine
from exporter.localpg import wait_until
from exporter.snapshot import Snapshot
from tests.support.exporters import running_exporter
from tests.support.scrape import Metrics, scrape, wait_for_metric
from tests.support.servers import MONITOR_ROLE, Server, settings_for, start_server

pytestmark = [pytest.mark.live, pytest.mark.family("restricted")]

# Per-database collectors on a short interval, so that a minute of behaviour fits in a few seconds.
FAST = {"pg_table_wraparound": {"interval": "1s", "timeout": "900ms"}}
PER_DATABASE = "pg_database_oldest_table_xid_age"


@pytest.fixture(scope="module")
def restricted() -> Iterator[Server]:
    """A server of its own: the tests revoke privileges and edit pg_hba.conf, which others must not see."""
    server = start_server("restricted")
    yield server
    server.cluster.destroy()


def _pgvitals_errors(server: Server) -> list[str]:
    """ERROR lines the exporter's own sessions caused in the server log (the prefix names the application)."""
    text = Path(server.cluster.log_file).read_text(errors="replace")
    return [line for line in text.splitlines() if " pgvitals " in line and "ERROR:" in line]


def _reject_in_hba(server: Server, dbname: str) -> None:
    """Put a ``reject`` line for ``dbname`` first in pg_hba.conf and reload."""
    hba = server.cluster.data / "pg_hba.conf"
    hba.write_text(f"host {dbname} all 127.0.0.1/32 reject\n" + hba.read_text())
    server.execute("SELECT pg_catalog.pg_reload_conf()")


def test_a_database_the_role_may_not_use_never_takes_the_target_down(restricted: Server, exporter_for) -> None:
    # Names sort around the refused ones, so a loop that stops at the first refusal would lose "zeta".
    for name in ("alpha", "locked_db", "hba_db", "zeta"):
        restricted.execute(f"DROP DATABASE IF EXISTS {name}")
        restricted.execute(f"CREATE DATABASE {name}")
    restricted.execute("REVOKE CONNECT ON DATABASE locked_db FROM PUBLIC")
    _reject_in_hba(restricted, "hba_db")
    daemon = exporter_for([{"name": "managed", "dsn": restricted.dsn()}], collectors=FAST)
    port = daemon.server.port
    metrics = wait_for_metric(port, "pgvitals_database_unavailable", timeout=30, target="managed", datname="hba_db")
    samples = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = scrape(port)
        samples.append(metrics.value("pg_up", target="managed"))
        time.sleep(0.5)
    assert samples and all(v == 1 for v in samples), f"pg_up flapped: {samples}"
    # Discovery asked has_database_privilege(): the database without CONNECT is not even tried.
    assert metrics.find("pgvitals_database_unavailable", datname="locked_db") == []
    assert metrics.find(PER_DATABASE, datname="locked_db") == []
    # pg_hba's refusal is that database's error, with its reason; the others keep their series.
    assert metrics.value("pgvitals_database_unavailable", target="managed", datname="hba_db",
                         reason="database_unavailable") == 1
    for name in ("alpha", "zeta", "postgres"):
        assert metrics.find(PER_DATABASE, datname=name), f"no series for {name}"
    errors = metrics.find("pgvitals_collector_errors_total", target="managed", reason="database_unavailable")
    assert errors, "the refused database's runs are counted as its errors"
    assert metrics.value("pg_up_reason", target="managed") is None  # only while down


def test_cloud_system_databases_are_left_out_unless_included(restricted: Server, exporter_for) -> None:
    restricted.execute("DROP DATABASE IF EXISTS rdsadmin")
    restricted.execute("CREATE DATABASE rdsadmin")
    daemon = exporter_for([{"name": "rds", "dsn": restricted.dsn(monitor=False)}], collectors=FAST)
    metrics = wait_for_metric(daemon.server.port, PER_DATABASE, target="rds", datname="postgres")
    assert metrics.find(PER_DATABASE, datname="rdsadmin") == []
    daemon = exporter_for([{"name": "rds2", "dsn": restricted.dsn(monitor=False),
                            "databases": {"exclude_managed_system": False}}], collectors=FAST)
    wait_for_metric(daemon.server.port, PER_DATABASE, target="rds2", datname="rdsadmin")


def test_revoked_functions_are_denials_not_failures(restricted: Server, exporter_for,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = len(_pgvitals_errors(restricted))
    for function in ("pg_ls_waldir()", "pg_ls_archive_statusdir()"):
        restricted.execute(f"REVOKE EXECUTE ON FUNCTION pg_catalog.{function} FROM pg_monitor")
    try:
        daemon = exporter_for([{"name": "mon", "dsn": restricted.dsn()}], denial_recheck_interval="2s",
                              collectors={"pg_wal": {"interval": "1s", "timeout": "900ms"},
                                          "pg_wal_directory": {"interval": "1s", "timeout": "900ms"},
                                          "pg_stat_archiver": {"interval": "1s", "timeout": "900ms"},
                                          "pg_archive_status": {"interval": "1s", "timeout": "900ms"}})
        port = daemon.server.port
        metrics = wait_for_metric(port, "pgvitals_collector_denied", target="mon", object="pg_ls_waldir")
        metrics = wait_for_metric(port, "pgvitals_collector_denied", target="mon", object="pg_ls_archive_statusdir")
        time.sleep(3)  # a few runs and one re-check more
        metrics = scrape(port)
        assert metrics.value("pg_wal_position_bytes", target="mon") is not None
        assert metrics.value("pg_stat_archiver_archived_total", target="mon") is not None
        assert metrics.value("pg_wal_directory_size_bytes", target="mon") is None
        assert [v for _, v in metrics.find("pgvitals_collector_success", target="mon") if v != 1] == []
        denied = {labels["object"]: labels["collector"]
                  for labels, _ in metrics.find("pgvitals_collector_denied", target="mon")}
        assert denied == {"pg_ls_waldir": "pg_wal_directory", "pg_ls_archive_statusdir": "pg_archive_status"}
        # The privilege is checked before the call: the denied functions caused no ERROR in the server log.
        assert _pgvitals_errors(restricted)[before:] == []
        # `check` says what to grant.
        assert main(["check", "--dsn", restricted.dsn()]) == 0
        out = capsys.readouterr().out
        line = next(line for line in out.splitlines() if line.strip().startswith("pg_wal_directory "))
        assert "may not use pg_ls_waldir (GRANT" in line, out
    finally:
        for function in ("pg_ls_waldir()", "pg_ls_archive_statusdir()"):
            restricted.execute(f"GRANT EXECUTE ON FUNCTION pg_catalog.{function} TO pg_monitor")
    # Granted back: the denial clears at the next re-check and the metrics return.
    metrics = wait_for_metric(port, "pg_wal_directory_size_bytes", timeout=20, target="mon")
    wait_until(lambda: not scrape(port).find("pgvitals_collector_denied", target="mon"), timeout=20)


def test_a_denial_found_at_run_time_is_remembered_until_the_recheck(restricted: Server) -> None:
    """A "not supported" or permission error that no privilege check foresees (Aurora) is asked once, not per run."""
    restricted.execute("CREATE OR REPLACE FUNCTION public.refuse() RETURNS int LANGUAGE plpgsql AS "
                       "$$BEGIN RAISE feature_not_supported USING MESSAGE = 'Function refuse() is currently not "
                       "supported'; END$$")
    refusing = Collector(name="refusing", family="test", help="Calls a function the platform refuses.",
                         metrics=(gauge("refusing_value", "What refuse() returns.", "v"),),
                         variants=(SqlVariant("SELECT public.refuse() AS v"),), interval=60, timeout=5)
    plain = Collector(name="plain", family="test", help="A query that works.",
                      metrics=(gauge("plain_value", "One.", "v"),), variants=(SqlVariant("SELECT 1 AS v"),),
                      interval=60, timeout=5)
    catalog = validate([refusing, plain])
    snapshot = Snapshot(catalog, __version__)
    before = len(_pgvitals_errors(restricted))
    for recheck, runs, errors_expected in (("1h", 5, 1), ("1ms", 3, 3)):
        engine = Engine(catalog, settings_for([{"name": "aurora", "dsn": restricted.dsn()}],
                                              denial_recheck_interval=recheck), snapshot)
        try:
            for _ in range(runs):
                # Let 1 ms pass for sure: a run and a probe can take less on a quick machine, and the denial
                # would then not have expired yet (seen on PostgreSQL 12 in CI).
                time.sleep(0.01)
                runtime = engine.targets["aurora"]
                assert engine.probe(runtime)
                for eff in engine.applicable(runtime):
                    engine.collect(runtime, eff)
        finally:
            engine.close()
        metrics = Metrics(snapshot.render().decode())
        assert metrics.value("pgvitals_collector_denied", collector="refusing", object="refuse") == 1
        assert metrics.value("pgvitals_collector_success", collector="refusing") is None
        assert metrics.value("pgvitals_collector_success", collector="plain") == 1
        assert metrics.value("plain_value", target="aurora") == 1
        # Remembered: one ERROR in the server log per re-check, not one per run. The log is written by the
        # logging collector process, a moment after the backend raised: wait for the lines expected.
        with contextlib.suppress(TimeoutError):  # the assertion below shows what the log holds
            wait_until(lambda skip=before, want=errors_expected: len(_pgvitals_errors(restricted)[skip:]) >= want
                       or None, timeout=10)
        errors = _pgvitals_errors(restricted)[before:]
        assert len(errors) == errors_expected, errors
        before += len(errors)


def test_reasons_a_user_can_act_on(restricted: Server, exporter_for) -> None:
    daemon = exporter_for([{"name": "badpw", "dsn": restricted.cluster.dsn(MONITOR_ROLE, "wrong-password")},
                           {"name": "nobody", "dsn": "host=127.0.0.1 port=1 dbname=postgres user=x"}])
    port = daemon.server.port
    metrics = wait_for_metric(port, "pg_up_reason", target="badpw", reason="auth")
    assert metrics.value("pg_up", target="badpw") == 0
    metrics = wait_for_metric(port, "pg_up_reason", target="nobody", reason="connection")
    assert "wrong-password" not in metrics.body


def fill_free_slots(server: Server, held: list[psycopg.Connection[object]]) -> None:
    """Open connections as an ordinary role until the server refuses one for lack of slots."""
    while True:
        try:
            held.append(psycopg.connect(server.cluster.dsn("hog", "hog")))
        except psycopg.OperationalError as exc:
            assert re.search(r"reserved|too many", str(exc)), exc
            return


def test_too_many_connections_then_recovery() -> None:
    server = start_server("slots", settings={"max_connections": "8", "superuser_reserved_connections": "3"})
    held: list[psycopg.Connection[object]] = []
    try:
        server.execute(f"CREATE ROLE hog LOGIN PASSWORD 'hog' IN ROLE {MONITOR_ROLE}")
        with running_exporter(settings_for([{"name": "full", "dsn": server.dsn()}], probe_interval="1s",
                                           max_backoff="1s")) as daemon:
            port = daemon.server.port
            wait_for_metric(port, "pg_up", lambda v: v == 1, target="full")
            # The exporter reconnects within a second of losing a connection, so it may win a slot freed
            # while we fill them: take every free slot, end the exporter's sessions from a reserved
            # superuser slot, take the slots they freed, until the exporter holds none.
            for _ in range(20):
                fill_free_slots(server, held)
                ended = server.execute("SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
                                       "WHERE application_name LIKE 'pgvitals%' AND pid <> pg_backend_pid()")
                fill_free_slots(server, held)
                if ended[0]["n"] == 0:
                    break
            metrics = wait_for_metric(port, "pg_up_reason", target="full", reason="too_many_connections",
                                      timeout=30)
            assert metrics.value("pg_up", target="full") == 0
            for conn in held:
                conn.close()
            held.clear()
            metrics: Metrics = wait_for_metric(port, "pg_up", lambda v: v == 1, target="full", timeout=30)
            assert metrics.find("pg_up_reason", target="full") == []
    finally:
        for conn in held:
            conn.close()
        server.cluster.destroy()


def test_a_role_without_pg_monitor_is_up_and_told_what_it_lacks(restricted: Server) -> None:
    """Azure once could not grant pg_monitor: the probe must not need it (shared_preload_libraries is unreadable)."""
    from tests.support.exporters import Runner

    restricted.execute("DROP ROLE IF EXISTS bare")
    restricted.execute("CREATE ROLE bare LOGIN PASSWORD 'bare-pw'")
    with Runner(restricted, targets=[{"name": "bare", "dsn": restricted.cluster.dsn("bare", "bare-pw")}],
                strict=True) as runner:
        metrics = runner.collect()
    assert metrics.value("pg_up", target="bare") == 1
    assert [labels["collector"] for labels, v in metrics.find("pgvitals_collector_success") if v != 1] == []
    denied = {(labels["collector"], labels["object"]) for labels, _ in metrics.find("pgvitals_collector_denied")}
    assert denied == {("pg_wal_directory", "pg_ls_waldir"), ("pg_archive_status", "pg_ls_archive_statusdir")}
    assert metrics.value("pg_wal_position_bytes", target="bare") is not None
