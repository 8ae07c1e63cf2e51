"""The path from config to scrape, on a real PostgreSQL: values, guards, failures, recovery, secrets."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import psycopg
import pytest

from exporter import __version__
from exporter.catalog import Collector, Rows, SqlVariant, validate
from exporter.catalog import load as load_catalog
from exporter.cli import main
from exporter.collectors._helpers import gauge
from exporter.db import Session
from exporter.engine import Engine
from exporter.hooks import RunContext
from exporter.localpg import LocalCluster, free_port, wait_until
from exporter.snapshot import Snapshot
from tests.support.pgbins import bindir_for, selected_major
from tests.support.scrape import Metrics, http_status, scrape, wait_for_metric
from tests.support.servers import MONITOR_PASSWORD, MONITOR_ROLE, Server, settings_for

pytestmark = [pytest.mark.live, pytest.mark.family("skeleton")]


def _target(pg: Server, name: str = "main", **extra: object) -> dict[str, object]:
    return {"name": name, "dsn": pg.monitor_dsn, **extra}


def _engine_with(pg: Server, *collectors: Collector, **settings: object) -> tuple[Engine, Snapshot]:
    catalog = validate(list(collectors))
    snapshot = Snapshot(catalog, __version__)
    engine = Engine(catalog, settings_for([_target(pg)], **settings), snapshot)
    return engine, snapshot


def test_stat_database_matches_the_server(pg: Server, fresh_db: str, exporter_for) -> None:
    pg.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g", fresh_db)
    for _ in range(5):
        pg.execute("SELECT count(*) FROM t", fresh_db)
    before = pg.execute(f"SELECT blks_hit, blks_read, xact_commit FROM pg_stat_database WHERE datname = '{fresh_db}'")
    daemon = exporter_for([_target(pg)])
    wait_until(lambda: http_status(daemon.server.port, "/readyz")[0] == 200, timeout=30)
    metrics = wait_for_metric(daemon.server.port, "pg_stat_database_blks_hit_total", datname=fresh_db)
    after = pg.execute(f"SELECT blks_hit, blks_read, xact_commit FROM pg_stat_database WHERE datname = '{fresh_db}'")
    for column in ("blks_hit", "blks_read", "xact_commit"):
        value = metrics.value(f"pg_stat_database_{column}_total", target="main", datname=fresh_db)
        assert value is not None
        assert before[0][column] <= value <= after[0][column], column
    assert metrics.value("pg_stat_database_blks_hit_total", datname=fresh_db) >= 5  # type: ignore[operator]
    assert metrics.value("pg_up", target="main") == 1
    assert metrics.value("pgvitals_build_info", version=__version__) == 1
    # The shared-objects row (datid 0, no name) is not exported as a database.
    assert not metrics.find("pg_stat_database_blks_hit_total", datname="")


def test_settings_and_connections(pg: Server, fresh_db: str, exporter_for) -> None:
    conns = [psycopg.connect(pg.dsn(fresh_db, monitor=False), application_name="skeleton_app") for _ in range(3)]
    try:
        daemon = exporter_for([_target(pg)])
        wait_until(lambda: http_status(daemon.server.port, "/readyz")[0] == 200, timeout=30)
        metrics = wait_for_metric(daemon.server.port, "pg_connections", lambda v: v == 3,
                                  application_name="skeleton_app", datname=fresh_db, state="idle")
        assert metrics.value("pg_settings_max_connections", target="main") == 200
        assert metrics.value("pg_settings_shared_buffers_bytes") == 64 * 1024 * 1024
        assert metrics.value("pg_settings_track_io_timing") == 1
        assert metrics.value("pgvitals_collector_success", collector="pg_connections") == 1
        assert metrics.value("pgvitals_collector_success", collector="pg_settings") == 1
        last = metrics.value("pgvitals_collector_last_success_timestamp_seconds", collector="pg_stat_database")
        assert last is not None and abs(time.time() - last) < 60
        assert metrics.value("pgvitals_collector_data_age_seconds", collector="pg_stat_database") is not None
    finally:
        for conn in conns:
            conn.close()


def test_readyz_and_healthz(pg: Server, exporter_for) -> None:
    daemon = exporter_for([_target(pg)])
    port = daemon.server.port
    assert http_status(port, "/healthz")[0] == 200
    wait_until(lambda: http_status(port, "/readyz")[0] == 200, timeout=30)
    assert http_status(port, "/nope")[0] == 404


def test_readyz_names_the_unreachable_target(pg: Server, exporter_for) -> None:
    dead = f"postgresql://{MONITOR_ROLE}:{MONITOR_PASSWORD}@127.0.0.1:{free_port()}/postgres"
    daemon = exporter_for([_target(pg), {"name": "ghost", "dsn": dead}], connect_timeout=1)
    port = daemon.server.port
    wait_for_metric(port, "pg_up", lambda v: v == 0, target="ghost")
    # Its failed first attempt counts as done: ready (a dead server must not stall a rolling update), and named.
    _status, body = wait_until(lambda: (r := http_status(port, "/readyz"))[0] == 200 and r, timeout=30)
    assert "ghost: not reachable" in body
    assert MONITOR_PASSWORD not in body


def test_a_scrape_never_queries_postgresql(pg: Server, exporter_for) -> None:
    """Count the statements the exporter's role ran, before and after many scrapes."""
    # Every collector (and the probe) runs once at start, then not for an hour: no scheduled run can
    # fall between the two counts, whatever the catalog's default intervals are.
    daemon = exporter_for(
        [_target(pg)], probe_interval="1h",
        collectors={c.name: {"interval": "1h"} for c in load_catalog().collectors},
    )
    port = daemon.server.port
    wait_until(lambda: http_status(port, "/readyz")[0] == 200, timeout=30)

    def statements_by_exporter() -> int:
        rows = pg.execute(
            "SELECT coalesce(sum(calls), 0)::bigint AS calls FROM pg_stat_statements s "
            f"JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = '{MONITOR_ROLE}'"
        )
        return int(rows[0]["calls"])

    def xacts_by_exporter() -> int:
        # Our read-only transactions end in ROLLBACK: the role's sessions would add rollbacks.
        return sum(int(r["n"]) for r in pg.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE usename = 'pgvitals_mon' AND state = 'active'"))

    before = statements_by_exporter()
    for _ in range(100):
        assert scrape(port).value("pg_up", target="main") == 1
    assert statements_by_exporter() == before
    assert xacts_by_exporter() == 0


def test_target_down_at_start_then_recovers_without_restart(exporter_for) -> None:
    port = free_port()
    cluster = LocalCluster(bindir=bindir_for(selected_major()), port=port, name="late")
    try:
        daemon = exporter_for([{"name": "late", "dsn": cluster.dsn()}], max_backoff="1s", connect_timeout=1)
        metrics_port = daemon.server.port
        wait_for_metric(metrics_port, "pg_up", lambda v: v == 0, target="late")
        # A failed first attempt is a finished first collection: ready, naming the target.
        dsn_text = daemon.engine.targets["late"].dsn_text
        assert http_status(metrics_port, "/readyz") == (200, f"ready; late: not reachable ({dsn_text})\n")
        cluster.init().start()
        metrics = wait_for_metric(metrics_port, "pgvitals_collector_success", lambda v: v == 1, timeout=30,
                                  target="late", collector="pg_stat_database")
        assert metrics.value("pg_up", target="late") == 1
        # Mid-run outage: the server stops; pg_up drops, data is no longer served, then it all recovers.
        cluster.stop()
        metrics = wait_for_metric(metrics_port, "pg_up", lambda v: v == 0, timeout=40, target="late")
        wait_until(lambda: not scrape(metrics_port).find("pg_stat_database_xact_commit_total", target="late"),
                   timeout=30)
        cluster.start()
        wait_for_metric(metrics_port, "pg_up", lambda v: v == 1, timeout=30, target="late")
        wait_until(lambda: scrape(metrics_port).find("pg_stat_database_xact_commit_total", target="late"),
                   timeout=30)
    finally:
        cluster.destroy()


SLEEPER = Collector(
    name="test_sleeper", family="test", help="Sleeps longer than its timeout.", interval=60, timeout=1,
    variants=(SqlVariant("SELECT pg_catalog.pg_sleep(30) IS NULL AS slept, 1 AS one"),),
    metrics=(gauge("test_sleeper_one", "one", "one"),),
)


def test_a_query_over_its_timeout_is_cancelled_server_side(pg: Server) -> None:
    engine, snapshot = _engine_with(pg, SLEEPER)
    runtime = engine.targets["main"]
    assert engine.probe(runtime)
    started = time.monotonic()
    engine.collect(runtime, engine.collectors["test_sleeper"])
    assert time.monotonic() - started < 20  # the server gave up after 1 s, not after pg_sleep(30)
    status = snapshot.status("main", "test_sleeper")
    assert status.success is False
    assert status.errors == {"timeout": 1}
    body = Metrics(snapshot.render().decode())
    assert body.value("pgvitals_collector_errors_total", collector="test_sleeper", reason="timeout") == 1
    assert body.value("pgvitals_collector_success", collector="test_sleeper") == 0
    assert not body.find("test_sleeper_one")
    sleeping = pg.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' "
                          "AND state = 'active' AND pid <> pg_backend_pid()")
    assert sleeping[0]["n"] == 0
    engine.close()


def _stamp(session: Session, ctx: RunContext, _sql: str | None) -> Rows:
    """Try to write a row (a fetch hook, so the same code runs with and without ``writes``)."""
    session.query("INSERT INTO public.stamps VALUES (1)")
    return [{"n": 1}]


def test_only_a_collector_declared_writing_can_write(pg: Server, fresh_db: str) -> None:
    pg.execute(f"CREATE TABLE stamps (n int); GRANT INSERT ON stamps TO {MONITOR_ROLE}", fresh_db)
    common = {"family": "test", "help": "Writes a row.", "interval": 60, "timeout": 5, "scope": "database",
              "fetch": _stamp}
    sneaky = Collector(name="test_sneaky_writer", metrics=(gauge("test_sneaky_stamped", "1 when stamped", "n"),),
                       **common)  # type: ignore[arg-type]
    declared = Collector(name="test_declared_writer", writes=True, enabled=False, role="primary",
                         metrics=(gauge("test_declared_stamped", "1 when stamped", "n"),),
                         **common)  # type: ignore[arg-type]
    catalog = validate([sneaky, declared])
    snapshot = Snapshot(catalog, __version__)
    settings = settings_for([_target(pg, databases={"include": [fresh_db]})])
    engine = Engine(catalog, settings, snapshot)
    runtime = engine.targets["main"]
    assert engine.probe(runtime)
    engine.collect(runtime, engine.collectors["test_sneaky_writer"])
    assert snapshot.status("main", "test_sneaky_writer").success is False  # read-only transaction
    assert pg.execute("SELECT count(*) AS n FROM stamps", fresh_db)[0]["n"] == 0
    engine.collect(runtime, engine.collectors["test_declared_writer"])  # disabled only keeps the scheduler off
    assert snapshot.status("main", "test_declared_writer").success is True
    assert pg.execute("SELECT count(*) AS n FROM stamps", fresh_db)[0]["n"] == 1  # committed
    engine.close()


def test_monitoring_never_queues_behind_access_exclusive(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE TABLE hot (id int); GRANT SELECT ON hot TO pg_monitor", fresh_db)
    reader = Collector(
        name="test_reads_user_table", family="test", help="Reads a user table (takes a relation lock).",
        interval=60, timeout=10, scope="database",
        variants=(SqlVariant("SELECT count(*) AS n FROM public.hot"),),
        metrics=(gauge("test_hot_rows", "rows", "n"),),
    )
    real = list(load_catalog().collectors)
    catalog = validate([*real, reader])
    snapshot = Snapshot(catalog, __version__)
    settings = settings_for([_target(pg, databases={"include": [fresh_db]})])
    engine = Engine(catalog, settings, snapshot)
    runtime = engine.targets["main"]
    assert engine.probe(runtime)

    hot_oid = int(pg.execute("SELECT 'public.hot'::regclass::oid AS oid", fresh_db)[0]["oid"])
    locker = psycopg.connect(pg.dsn(fresh_db, monitor=False))
    locker.execute("LOCK TABLE hot IN ACCESS EXCLUSIVE MODE")  # held until rollback
    waiting_seen: list[tuple[object, ...]] = []
    hot_waits: list[tuple[object, ...]] = []  # proves the watcher sees the waits it is looking for
    stop = threading.Event()

    def watch() -> None:
        with psycopg.connect(pg.dsn(monitor=False), autocommit=True) as conn:
            while not stop.is_set():
                # Ask pg_locks, not pg_stat_activity.query: the query text is copied at the start of the
                # view's scan and the wait event read later, so a session moving on to the hot table would
                # show its previous statement's text next to a lock wait.
                for row in conn.execute(
                    "SELECT l.pid, l.locktype, l.relation::regclass::text AS relation, l.mode, "
                    "(l.database, l.relation) IS NOT DISTINCT FROM "
                    "((SELECT oid FROM pg_database WHERE datname = %s), %s::oid) AS on_hot "
                    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE NOT l.granted AND a.application_name = 'pgvitals'", (fresh_db, hot_oid)):
                    (hot_waits if row[-1] else waiting_seen).append(row)
                time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(3):
            for eff in engine.applicable(runtime):
                started = time.monotonic()
                engine.collect(runtime, eff)
                if eff.collector.name == "test_reads_user_table":
                    # Gave up on the lock (lock_timeout) instead of waiting for the 10 s statement timeout.
                    assert time.monotonic() - started < 5
    finally:
        stop.set()
        watcher.join()
        locker.rollback()
        locker.close()
    assert snapshot.status("main", "test_reads_user_table").errors == {"lock_timeout": 3}
    for name in ("pg_stat_database", "pg_settings", "pg_connections"):
        assert snapshot.status("main", name).success is True, name
    assert hot_waits, "the watcher never saw the deliberate wait on the hot table"
    assert waiting_seen == []
    engine.close()


def test_password_never_in_logs_errors_or_metrics(
    pg: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
    exporter_for,
) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text(MONITOR_PASSWORD + "\n")
    wrong = "Wr0ng-Pa55word-Quokka"
    inline = "Inl1ne-Secret-Narwhal"
    dead_port = free_port()
    caplog.set_level(logging.DEBUG)
    from exporter.cli import RedactingFormatter

    caplog.handler.setFormatter(RedactingFormatter(json_lines=False))
    targets = [
        {"name": "good", "dsn": f"postgresql://{MONITOR_ROLE}@127.0.0.1:{pg.cluster.port}/postgres",
         "password_file": str(password_file)},
        {"name": "wrongpw", "dsn": f"postgresql://{MONITOR_ROLE}:{wrong}@127.0.0.1:{pg.cluster.port}/postgres"},
        {"name": "dead", "dsn": f"host=127.0.0.1 port={dead_port} user=x password={inline} dbname=postgres"},
    ]
    daemon = exporter_for(targets, connect_timeout=1)
    port = daemon.server.port
    wait_for_metric(port, "pg_up", lambda v: v == 1, target="good")
    metrics = wait_for_metric(port, "pg_up", lambda v: v == 0, target="wrongpw")
    wait_for_metric(port, "pg_up", lambda v: v == 0, target="dead")
    texts = [metrics.body, http_status(port, "/readyz")[1], caplog.text]
    config = tmp_path / "c.yaml"
    config.write_text("targets:\n" + "".join(
        f"  - {{name: {t['name']}, dsn: '{t['dsn']}'"
        + (f", password_file: '{t['password_file']}'" if "password_file" in t else "") + "}\n" for t in targets))
    assert main(["check", "--config", str(config)]) == 1
    assert main(["once", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    assert "password authentication failed" in caplog.text  # the failure itself is reported...
    for text in texts:
        for secret in (MONITOR_PASSWORD, wrong, inline):
            assert secret not in text  # ...but never the secret


def test_once_prints_the_exposition(pg: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["once", "--dsn", pg.monitor_dsn, "--name", "cli"]) == 0
    metrics = Metrics(capsys.readouterr().out)
    assert metrics.value("pg_up", target="cli") == 1
    assert metrics.find("pg_stat_database_xact_commit_total", target="cli", datname="postgres")
    assert main(["once", "--dsn", f"postgresql://x@127.0.0.1:{free_port()}/postgres"]) == 1


def test_check_reports_each_collector(pg: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--dsn", pg.monitor_dsn]) == 0
    out = capsys.readouterr().out
    assert f"PostgreSQL {pg.cluster.major}" in out
    assert "pg_monitor" in out
    for name in ("pg_stat_database", "pg_settings", "pg_connections"):
        assert any(line.strip().startswith(name) and " ok (" in line for line in out.splitlines()), out


def test_two_targets_share_metric_families(pg: Server, exporter_for) -> None:
    daemon = exporter_for([_target(pg, "one"), _target(pg, "two", labels={"env": "test"})])
    port = daemon.server.port
    wait_until(lambda: http_status(port, "/readyz")[0] == 200, timeout=30)
    metrics = scrape(port)  # parse_exposition asserts that no family is split or duplicated
    assert metrics.find("pg_stat_database_xact_commit_total", target="one", datname="postgres")
    assert metrics.find("pg_stat_database_xact_commit_total", target="two", env="test", datname="postgres")


def test_an_extension_in_an_oddly_named_schema_is_read_there(pg: Server, fresh_db: str) -> None:
    """The variant's ``{ext_schema}`` becomes the quoted schema the extension was installed in."""
    schema = 'odd "schema"'
    quoted = '"odd ""schema"""'
    pg.execute(f"CREATE SCHEMA {quoted}; CREATE EXTENSION pg_stat_statements SCHEMA {quoted}; "
               f"GRANT USAGE ON SCHEMA {quoted} TO {MONITOR_ROLE}", fresh_db)
    catalog = load_catalog()
    snapshot = Snapshot(catalog, __version__)
    engine = Engine(catalog, settings_for([{"name": "main", "dsn": pg.dsn(fresh_db)}]), snapshot)
    try:
        runtime = engine.targets["main"]
        assert engine.probe(runtime)
        engine.collect(runtime, engine.collectors["pg_stat_statements"])
        status = snapshot.status("main", "pg_stat_statements")
        assert status is not None and status.success is True, runtime.last_errors
        assert runtime.facts is not None and runtime.facts.extensions[fresh_db]["pg_stat_statements"][0] == schema
        assert Metrics(snapshot.render().decode()).find("pg_stat_statements_calls_total", datname=fresh_db)
    finally:
        engine.close()
