"""Replication against a real streaming standby: byte gaps, lag semantics, slots, failover, heartbeat."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from exporter.localpg import wait_until
from tests.support.exporters import Runner
from tests.support.scrape import wait_for_metric
from tests.support.servers import MONITOR_ROLE, Server, start_server
from tests.support.standby import Standby, drop_slot, standby_of, start_standby

pytestmark = [pytest.mark.live, pytest.mark.family("replication")]

REPLICATION_COLLECTORS = ["pg_replication_role", "pg_stat_replication", "pg_replication_standby",
                          "pg_replication_slots", "pg_stat_replication_slots"]


@pytest.fixture(scope="module")
def primary() -> Iterator[Server]:
    """A primary of our own: no other test's writes, autovacuum off so that idle means idle."""
    server = start_server("repl-primary", settings={"autovacuum": "off"})
    server.execute("CREATE TABLE filler (id int, pad text)")
    yield server
    server.cluster.destroy()


@pytest.fixture(scope="module")
def standby(primary: Server) -> Iterator[Standby]:
    with standby_of(primary, slot="repl_s1", name="repl-standby") as server:
        yield server


@pytest.fixture(params=["monitor", "superuser"])
def monitor(request: pytest.FixtureRequest) -> bool:
    """Run the test as the pg_monitor-only role and as a superuser."""
    return bool(request.param == "monitor")


@pytest.fixture
def runners() -> Iterator[list[Runner]]:
    made: list[Runner] = []
    yield made
    for runner in made:
        runner.close()


def _runner(made: list[Runner], server: Server, monitor: bool, names: list[str] | None = None,
            **settings: Any) -> Runner:
    runner = Runner(server, names or REPLICATION_COLLECTORS, monitor=monitor, strict=True, **settings)
    made.append(runner)
    return runner


def _lsn(server: Server, expr: str = "pg_current_wal_insert_lsn()") -> str:
    return str(server.execute(f"SELECT ({expr})::text AS lsn")[0]["lsn"])


def _scalar(server: Server, sql: str) -> Any:
    return next(iter(server.execute(sql)[0].values()))


def _write_wal(server: Server, rows: int = 20000, sql: str | None = None) -> int:
    """Insert rows (into filler, or run ``sql``); returns the WAL bytes that took."""
    before = _lsn(server)
    server.execute(sql or f"INSERT INTO filler SELECT g, repeat('x', 200) FROM generate_series(1, {rows}) g")
    after = _lsn(server)
    # The test servers commit asynchronously: wait until the WAL writer has written it all out, so
    # that pg_current_wal_lsn() (what distances are measured from) includes it.
    wait_until(lambda: _scalar(server, f"SELECT pg_current_wal_lsn() >= '{after}'"), timeout=10)
    return int(_scalar(server, f"SELECT pg_wal_lsn_diff('{after}', '{before}')"))


def _standby_labels(standby: Standby) -> dict[str, str]:
    return {"application_name": standby.application_name, "client_addr": "127.0.0.1", "sync_state": "async"}


def _wait_received(primary: Server, standby: Standby) -> None:
    target = _lsn(primary, "pg_current_wal_flush_lsn()")  # only flushed WAL is ever sent
    wait_until(lambda: _scalar(standby, f"SELECT pg_last_wal_receive_lsn() >= '{target}'"), timeout=30)


STANDBY_GAP = "SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())"


def test_paused_replay_gap_grows_then_closes(primary: Server, standby: Standby, monitor: bool,
                                             runners: list[Runner]) -> None:
    on_primary = _runner(runners, primary, monitor)
    on_standby = _runner(runners, standby, monitor)
    standby.wait_caught_up()
    assert on_standby.collect().value("pg_replication_lag_seconds") == 0
    labels = _standby_labels(standby)
    primary_gap = ("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) FROM pg_stat_replication "
                   f"WHERE application_name = '{standby.application_name}'")

    paused_at = time.time()
    standby.pause_replay()
    try:
        written = _write_wal(primary)
        _wait_received(primary, standby)
        time.sleep(1.0)  # let lag in seconds become clearly visible

        # Standby: received but not replayed. Replay is frozen, so the truth only grows while we look.
        low = _scalar(standby, STANDBY_GAP)
        collected_at = time.time()
        metrics = on_standby.collect()
        high = _scalar(standby, STANDBY_GAP)
        gap = metrics.value("pg_replication_replay_lag_bytes")
        assert gap is not None and low <= gap <= high
        assert gap >= written
        assert metrics.value("pg_replication_replay_paused") == 1
        assert metrics.value("pg_replication_wal_receiver_streaming") == 1
        assert metrics.value("pg_replication_wal_receiver_status", status="streaming") == 1
        lag = metrics.value("pg_replication_lag_seconds")
        # Nothing written after the pause is replayed: the data is at least this old.
        assert lag is not None and lag >= collected_at - paused_at - 0.05

        # Primary: the standby's replay position (frozen) against the current WAL position.
        low = _scalar(primary, primary_gap)
        metrics = on_primary.collect()
        high = _scalar(primary, primary_gap)
        replay_gap = metrics.value("pg_stat_replication_replay_lag_bytes", **labels)
        assert replay_gap is not None and low <= replay_gap <= high
        assert replay_gap >= written
        assert metrics.value("pg_stat_replication_senders", **labels) == 1
        # Received and flushed by the standby: those distances stay small.
        flush_gap = metrics.value("pg_stat_replication_flush_lag_bytes", **labels)
        assert flush_gap is not None and flush_gap < written
    finally:
        standby.resume_replay()

    def closed() -> bool:
        s, p = on_standby.collect(), on_primary.collect()
        return (s.value("pg_replication_replay_lag_bytes") == 0 and s.value("pg_replication_lag_seconds") == 0
                and s.value("pg_replication_replay_paused") == 0
                and p.value("pg_stat_replication_replay_lag_bytes", **labels) == 0)

    wait_until(closed, timeout=30, interval=0.3)


def test_idle_primary_is_not_lag(primary: Server, standby: Standby, monitor: bool, runners: list[Runner]) -> None:
    _write_wal(primary, rows=100)
    standby.wait_caught_up()
    on_standby = _runner(runners, standby, monitor)
    on_primary = _runner(runners, primary, monitor)
    idle = 4.0
    started = last_zero = time.time()
    assert on_standby.collect().value("pg_replication_lag_seconds") == 0
    # No writes from here on (autovacuum is off on this primary). The primary still writes a little
    # WAL on its own (running-transactions records): the standby replays it at once.
    while time.time() - started < idle:
        time.sleep(0.5)
        before = time.time()
        metrics = on_standby.collect()
        lag = metrics.value("pg_replication_lag_seconds")
        # 0, or, if the sample landed while a record was received but not yet replayed, at most the
        # time since the standby was last seen caught up: never the idle time.
        assert lag is not None and lag <= time.time() - last_zero, (lag, time.time() - last_zero)
        if lag == 0:
            last_zero = before
    # Seconds since the last replayed transaction keep growing: on its own that would read as lag.
    age = metrics.value("pg_replication_last_xact_replay_age_seconds")
    assert age is not None and age >= idle
    wait_until(lambda: on_standby.collect().value("pg_replication_lag_seconds") == 0, timeout=10)
    # The primary's sampled lag times go NULL when the standby is idle and caught up: no sample then,
    # while the exact byte distance says 0.
    labels = _standby_labels(standby)
    wait_until(lambda: on_primary.collect().value("pg_stat_replication_replay_lag_seconds", **labels) is None,
               timeout=30, interval=0.5)
    wait_until(lambda: on_primary.collect().value("pg_stat_replication_replay_lag_bytes", **labels) == 0,
               timeout=30, interval=0.5)


def test_lag_grows_when_the_primary_is_gone(monitor: bool, runners: list[Runner]) -> None:
    """Received == replayed is not "no lag" when nothing is being received: the receiver must stream."""
    lone = start_server("repl-lone", settings={"autovacuum": "off"})
    try:
        with standby_of(lone, slot="lone", name="repl-orphan") as orphan:
            orphan.wait_caught_up()
            runner = _runner(runners, orphan, monitor)
            assert runner.collect().value("pg_replication_lag_seconds") == 0
            stopped_at = time.time()
            lone.cluster.stop()
            wait_until(lambda: _scalar(orphan, "SELECT count(*) FROM pg_stat_wal_receiver "
                                               "WHERE status = 'streaming'") == 0, timeout=30)
            time.sleep(1.0)
            collected_at = time.time()
            metrics = runner.collect()
            assert metrics.value("pg_replication_wal_receiver_streaming") == 0
            assert _scalar(orphan, STANDBY_GAP) == 0  # everything received is replayed, and still:
            lag = metrics.value("pg_replication_lag_seconds")
            assert lag is not None and lag >= collected_at - stopped_at - 0.05
    finally:
        lone.cluster.destroy()


def test_standby_runs_standby_collectors_and_skips_primary_ones(primary: Server, standby: Standby, monitor: bool,
                                                                runners: list[Runner]) -> None:
    replayed = "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0') AS p"
    low = _scalar(standby, replayed)
    metrics = _runner(runners, standby, monitor, [*REPLICATION_COLLECTORS, "pg_wal"]).collect()
    high = _scalar(standby, replayed)
    position = metrics.value("pg_wal_position_bytes")  # on a standby: the replayed position
    assert position is not None and low <= position <= high
    assert metrics.value("pg_replication_is_replica") == 1
    assert metrics.value("pgvitals_collector_skipped", collector="pg_stat_replication", reason="role") == 1
    assert metrics.value("pgvitals_collector_success", collector="pg_replication_standby") == 1
    assert metrics.value("pgvitals_collector_success", collector="pg_replication_slots") == 1
    assert not metrics.find("pgvitals_collector_errors_total")
    metrics = _runner(runners, primary, monitor).collect()
    assert metrics.value("pg_replication_is_replica") == 0
    assert metrics.value("pgvitals_collector_skipped", collector="pg_replication_standby", reason="role") == 1
    assert metrics.value("pg_replication_slot_active", slot_name="repl_s1", slot_type="physical", database="") == 1
    assert not metrics.find("pg_replication_lag_seconds")
    assert not metrics.find("pgvitals_collector_errors_total")


def test_inactive_slot_retains_growing_wal(primary: Server, monitor: bool, runners: list[Runner]) -> None:
    slot = "repl_idle_" + ("mon" if monitor else "su")
    primary.execute(f"SELECT pg_create_physical_replication_slot('{slot}', true)")
    labels = {"slot_name": slot, "slot_type": "physical", "database": ""}
    retained = f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) FROM pg_replication_slots " \
               f"WHERE slot_name = '{slot}'"
    runner = _runner(runners, primary, monitor)
    try:
        seen = []
        for _ in range(2):
            _write_wal(primary, rows=5000)
            low = _scalar(primary, retained)
            metrics = runner.collect()
            high = _scalar(primary, retained)
            value = metrics.value("pg_replication_slot_retained_bytes", **labels)
            assert value is not None and low <= value <= high  # exact: restart_lsn stays put
            assert metrics.value("pg_replication_slot_active", **labels) == 0
            seen.append(value)
        assert seen[1] > seen[0] + 500_000
        if primary.version_num >= 130000:
            assert metrics.value("pg_replication_slot_wal_status", wal_status="reserved", **labels) == 1
            # max_slot_wal_keep_size = -1 (unlimited): no safety margin to report.
            assert metrics.value("pg_replication_slot_safe_wal_size_bytes", **labels) is None
            primary.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1GB'")
            primary.execute("SELECT pg_reload_conf()")
            wait_until(lambda: _scalar(primary, "SELECT current_setting('max_slot_wal_keep_size')") == "1GB")
            low = _scalar(primary, f"SELECT safe_wal_size FROM pg_replication_slots WHERE slot_name = '{slot}'")
            safe = runner.collect().value("pg_replication_slot_safe_wal_size_bytes", **labels)
            high = _scalar(primary, f"SELECT safe_wal_size FROM pg_replication_slots WHERE slot_name = '{slot}'")
            assert safe is not None and high <= safe <= low and 0 < safe <= 1024**3
        else:
            assert not metrics.find("pg_replication_slot_wal_status")
        if primary.version_num >= 170000:
            inactive = metrics.value("pg_replication_slot_inactive_seconds", **labels)
            assert inactive is not None and inactive >= 0
    finally:
        if primary.version_num >= 130000:
            primary.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            primary.execute("SELECT pg_reload_conf()")
        drop_slot(primary, slot)


def test_logical_slot_lag_and_decoding_stats(primary: Server, monitor: bool, runners: list[Runner]) -> None:
    settings = {"wal_level": "logical", "autovacuum": "off"}
    if primary.version_num >= 130000:
        settings["logical_decoding_work_mem"] = "'64kB'"  # the minimum: decoding our transaction spills
    server = start_server("repl-logical", settings=settings)
    try:
        server.execute("SELECT pg_create_logical_replication_slot('decoder', 'test_decoding')")
        server.execute("CREATE TABLE t (id int, pad text)")
        # One transaction far above logical_decoding_work_mem: decoding it must spill to disk.
        written = _write_wal(server, sql="INSERT INTO t SELECT g, repeat('y', 100) FROM generate_series(1, 20000) g")
        runner = _runner(runners, server, monitor)
        labels = {"slot_name": "decoder", "slot_type": "logical", "database": "postgres"}
        consumer_lag = ("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) FROM pg_replication_slots "
                        "WHERE slot_name = 'decoder'")
        low = _scalar(server, consumer_lag)
        metrics = runner.collect()
        high = _scalar(server, consumer_lag)
        lag = metrics.value("pg_replication_slot_confirmed_flush_lag_bytes", **labels)
        assert lag is not None and low <= lag <= high and lag >= written
        retained = metrics.value("pg_replication_slot_retained_bytes", **labels)
        assert retained is not None and retained >= written
        age = metrics.value("pg_replication_slot_catalog_xmin_age", **labels)
        assert age is not None and age >= 1
        assert metrics.value("pg_replication_slot_active", **labels) == 0

        server.execute("SELECT count(*) FROM pg_logical_slot_get_changes('decoder', NULL, NULL)")
        low = _scalar(server, consumer_lag)
        metrics = runner.collect()
        high = _scalar(server, consumer_lag)
        lag = metrics.value("pg_replication_slot_confirmed_flush_lag_bytes", **labels)
        assert lag is not None and low <= lag <= high and lag < written

        if server.version_num < 140000:
            assert not metrics.find("pg_stat_replication_slots_spill_bytes_total")
            return
        stats = "SELECT spill_txns, spill_bytes, total_txns FROM pg_stat_replication_slots WHERE slot_name = 'decoder'"
        wait_until(lambda: server.execute(stats)[0]["spill_txns"] >= 1, timeout=30)
        before = server.execute(stats)[0]
        metrics = runner.collect()
        after = server.execute(stats)[0]
        for column in ("spill_txns", "spill_bytes", "total_txns"):
            value = metrics.value(f"pg_stat_replication_slots_{'decoded_txns' if column == 'total_txns' else column}"
                                  "_total", **labels)
            assert value is not None and before[column] <= value <= after[column], column
        spilled = metrics.value("pg_stat_replication_slots_spill_bytes_total", **labels)
        assert spilled is not None and spilled > 64 * 1024
    finally:
        server.cluster.destroy()


FAST = {name: {"interval": 1, "timeout": 0.9} for name in REPLICATION_COLLECTORS}


def test_promotion_is_picked_up_without_restart(primary: Server, monitor: bool, exporter_for: Any) -> None:
    slot = "repl_promote_" + ("mon" if monitor else "su")
    with standby_of(primary, slot=slot, name="repl-promote") as candidate:
        daemon = exporter_for([{"name": "node", "dsn": candidate.dsn(monitor=monitor)}],
                              probe_interval=1, collectors=FAST)
        port = daemon.server.port
        wait_for_metric(port, "pg_replication_is_replica", lambda v: v == 1, target="node")
        wait_for_metric(port, "pg_replication_wal_receiver_streaming", lambda v: v == 1)
        wait_for_metric(port, "pgvitals_collector_skipped", collector="pg_stat_replication", reason="role")

        candidate.promote()
        metrics = wait_for_metric(port, "pg_replication_is_replica", lambda v: v == 0, timeout=30)
        metrics = wait_for_metric(port, "pgvitals_collector_success", lambda v: v == 1, timeout=30,
                                  collector="pg_stat_replication")
        metrics = wait_for_metric(port, "pgvitals_collector_skipped", timeout=30, collector="pg_replication_standby",
                                  reason="role")
        for gone in ("pg_replication_lag_seconds", "pg_replication_wal_receiver_streaming",
                     "pg_replication_replay_lag_bytes"):
            assert not metrics.find(gone), gone
        # The switch produced no failed runs: the SQL guards itself against a role change between probes.
        errors = [labels for labels, _ in metrics.find("pgvitals_collector_errors_total")
                  if labels["collector"] in REPLICATION_COLLECTORS]
        assert not errors, errors


HEARTBEAT_SETUP = (
    "CREATE SCHEMA IF NOT EXISTS pgvitals",
    "CREATE TABLE IF NOT EXISTS pgvitals.heartbeat (id integer PRIMARY KEY, ts timestamptz NOT NULL)",
    f"GRANT USAGE ON SCHEMA pgvitals TO {MONITOR_ROLE}",
    f"GRANT SELECT, INSERT, UPDATE ON pgvitals.heartbeat TO {MONITOR_ROLE}",
)


def test_heartbeat_lag(primary: Server, standby: Standby, runners: list[Runner]) -> None:
    for statement in HEARTBEAT_SETUP:
        primary.execute(statement)
    writer = _runner(runners, primary, True, ["pg_replication_heartbeat_writer"],
                     collectors={"pg_replication_heartbeat_writer": {"enabled": True}})
    reader = _runner(runners, standby, True, ["pg_replication_heartbeat"],
                     collectors={"pg_replication_heartbeat": {"enabled": True}})
    stamp = "SELECT extract(epoch FROM ts) FROM pgvitals.heartbeat WHERE id = 1"

    # Bounds are taken from our own clock around each step, not fixed numbers: the machine may be slow.
    written_after = time.time()
    metrics = writer.collect()
    assert metrics.value("pgvitals_collector_success", collector="pg_replication_heartbeat_writer") == 1
    assert written_after - 0.05 <= float(_scalar(primary, stamp)) <= time.time() + 0.05
    standby.wait_caught_up()
    lag = reader.collect().value("pg_replication_heartbeat_lag_seconds")
    assert lag is not None and 0 <= lag <= time.time() - written_after + 0.05

    paused_at = time.time()
    standby.pause_replay()
    try:
        for _ in range(3):
            time.sleep(0.8)
            writer.collect()
        _wait_received(primary, standby)
        collected_at = time.time()
        lag = reader.collect().value("pg_replication_heartbeat_lag_seconds")
        assert lag is not None and lag >= collected_at - paused_at - 0.05
    finally:
        standby.resume_replay()
    written_after = time.time()
    writer.collect()
    standby.wait_caught_up()
    lag = reader.collect().value("pg_replication_heartbeat_lag_seconds")
    assert lag is not None and 0 <= lag <= time.time() - written_after + 0.05

    # With synchronous replication to a standby that is not there, an ordinary commit waits forever;
    # the heartbeat commits locally and never hangs the writer.
    primary.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody_here'")
    primary.execute("SELECT pg_reload_conf()")
    try:
        wait_until(lambda: _scalar(primary, "SELECT current_setting('synchronous_standby_names')") == "nobody_here")
        previous = float(_scalar(primary, stamp))
        time.sleep(0.05)
        metrics = writer.collect()
        assert metrics.value("pgvitals_collector_success", collector="pg_replication_heartbeat_writer") == 1
        assert float(_scalar(primary, stamp)) > previous
    finally:
        primary.execute("ALTER SYSTEM RESET synchronous_standby_names")
        primary.execute("SELECT pg_reload_conf()")
    # Never on a standby: the writer is a primary-only collector.
    on_standby = _runner(runners, standby, True, ["pg_replication_heartbeat_writer"],
                         collectors={"pg_replication_heartbeat_writer": {"enabled": True}})
    assert on_standby.collect().value("pgvitals_collector_skipped", collector="pg_replication_heartbeat_writer",
                                      reason="role") == 1


def test_standby_fixture_is_a_real_streaming_copy(primary: Server, standby: Standby) -> None:
    primary.execute("CREATE TABLE IF NOT EXISTS fixture_probe (v int)")
    primary.execute("INSERT INTO fixture_probe VALUES (42)")
    standby.wait_caught_up()
    assert standby.execute("SELECT sum(v) AS s FROM fixture_probe")[0]["s"] >= 42
    assert standby.in_recovery()
    row = primary.execute("SELECT s.active, r.state FROM pg_replication_slots s "
                          "JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = 'repl_s1'")
    assert row == [{"active": True, "state": "streaming"}]
    # A second standby on the same primary, without a slot, works side by side. It connects under
    # the same name from the same address: one series with senders = 2, never duplicate series.
    second = start_standby(primary, slot=None, name="repl-second", application_name=standby.application_name)
    runner = Runner(primary, ["pg_stat_replication"], strict=True)
    try:
        second.wait_caught_up()
        assert second.execute("SELECT sum(v) AS s FROM fixture_probe")[0]["s"] >= 42
        labels = {**_standby_labels(standby), "state": "streaming"}
        wait_until(lambda: runner.collect().value("pg_stat_replication_senders", **labels) == 2, timeout=30)
    finally:
        runner.close()
        second.destroy()
