"""`promtool test rules`: postgres_exporter's mixin alert rules over series scraped from pgvitals fire where
postgres_exporter would.

One real server, watched by pgvitals in `metric_names: postgres_exporter` mode, scraped once a second
through three phases: quiet; loaded (33 client sessions against a limit of 37 usable connections, 20000
dead tuples in a table autovacuum leaves alone, a replication slot nobody uses); down (the server stopped).
PostgreSQLMaxConnectionsReached is checked quiet only: at its limit only superusers may connect, the
monitoring role is refused the connections pgvitals opens, and the target shows as down instead.
A control run with one expectation turned around must make promtool fail.
The scraped samples, relabeled as the README says (`target` becomes `instance`), become promtool's
`input_series` (real values, one per second; a series that leaves the scrape gets a staleness marker,
as in Prometheus). The mixin's rules (tests/data/postgres_mixin.yaml, without `for`: the stored
expressions carry none) are then unit-tested at the end of each phase by the real promtool.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.localpg import wait_until
from tests.support.exporters import running_exporter
from tests.support.mixin import MIXIN, Samples, alert_test, input_series, mixin_alert_metrics, mixin_rule_file
from tests.support.prometheus import collector_overrides
from tests.support.scrape import http_status, scrape
from tests.support.servers import Server, settings_for, start_server

pytestmark = [pytest.mark.live, pytest.mark.slow]

PROMTOOL = Path("/usr/bin/promtool")
JOB = "postgres"
#: 40 connections, 3 for superusers: the mixin's limit is 37, "high" above 29.6.
MAX_CONNECTIONS, SUPERUSER_RESERVED = 40, 3
SESSIONS = 33  # above 80 % of 37 with room for pgvitals' own few, below the limit
DEAD_ROWS = 20_000  # above the mixin's 10000 dead tuples
SLOT = "abandoned_slot"
#: The mixin alerts this test creates conditions for, plus PostgresTablesNotVaccumed (quiet: its input is
#: young samples, and it fires only for a condition older than 10 hours).
CHECKED = ("PostgreSQLDown", "PostgresHasExporterErrors", "PostgreSQLHighConnections",
           "PostgreSQLMaxConnectionsReached", "PostgresHasTooManyDeadTuples", "PostgresHasReplicationSlotUsed",
           "PostgresTablesNotVaccumed")


class Recorder:
    """Scrapes /metrics once a second in a thread, keeping every scrape's samples in order."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.scrapes: list[Samples] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        tick = 0
        while not self._stop.is_set():
            self.scrapes.append(scrape(self.port).samples)
            tick += 1
            self._stop.wait(max(0.0, start + tick - time.monotonic()))

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def value(self, name: str, index: int = -1, **labels: str) -> float | None:
        """Sum of ``name`` with ``labels`` in one recorded scrape (None when it has none)."""
        found = [v for (n, ls), v in self.scrapes[index].items()
                 if n == name and all(dict(ls).get(k) == want for k, want in labels.items())]
        return sum(found) if found else None

    def after(self, condition: Any, more: int = 2, timeout: float = 30) -> int:
        """Index of the scrape ``more`` scrapes after the first that satisfies ``condition`` (given an index)."""
        seen = len(self.scrapes)

        def first() -> list[int]:
            return [i for i in range(seen, len(self.scrapes)) if condition(i)][:1]

        found: int = wait_until(first, timeout=timeout, interval=0.2)[0]
        wait_until(lambda: len(self.scrapes) > found + more, timeout=more + 10, interval=0.2)
        return found + more


def _create_conditions(server: Server, cleanup: ExitStack) -> None:
    """Sessions, dead tuples and an unused slot: what the mixin's alerts look for."""
    for _ in range(SESSIONS):
        cleanup.enter_context(server.cluster.connect("app"))
    server.execute(f"INSERT INTO churn SELECT g FROM generate_series(1, {DEAD_ROWS}) g", dbname="app")
    server.execute("DELETE FROM churn", dbname="app")
    server.execute(f"SELECT pg_catalog.pg_create_physical_replication_slot('{SLOT}', true)")


@pytest.fixture
def server() -> Iterator[Server]:
    server = start_server("mixinrules", settings={"max_connections": MAX_CONNECTIONS,
                                                  "superuser_reserved_connections": SUPERUSER_RESERVED})
    try:
        yield server
    finally:
        server.cluster.destroy()


def test_mixin_rules_fire_over_scraped_series_where_postgres_exporter_would(server: Server, tmp_path: Path) -> None:
    if not PROMTOOL.exists():
        pytest.skip("needs /usr/bin/promtool (scripts/setup installs it)")
    server.execute("CREATE DATABASE app")
    server.execute("CREATE TABLE churn (id int) WITH (autovacuum_enabled = off)", dbname="app")
    settings = settings_for([{"name": "primary", "dsn": server.monitor_dsn}], metric_names="postgres_exporter",
                            collectors=collector_overrides(), probe_interval="1s")
    address = f"127.0.0.1:{server.cluster.port}"
    with ExitStack() as cleanup:
        daemon = cleanup.enter_context(running_exporter(settings))
        port = daemon.server.port
        wait_until(lambda: http_status(port, "/readyz")[0] == 200, timeout=60)
        wait_until(lambda: scrape(port).value("pg_stat_user_tables_n_dead_tup", datname="app", relname="churn")
                   is not None, timeout=30)
        recorder = cleanup.enter_context(Recorder(port))

        quiet = recorder.after(lambda i: True, more=4)
        _create_conditions(server, cleanup)
        loaded = recorder.after(lambda i: (recorder.value("pg_stat_activity_count", i) or 0) >= SESSIONS
                                and (recorder.value("pg_stat_user_tables_n_dead_tup", i, relname="churn") or 0)
                                >= DEAD_ROWS
                                and recorder.value("pg_replication_slots_active", i, slot_name=SLOT) == 0)
        server.cluster.stop()
        down = recorder.after(lambda i: recorder.value("pg_up", i) == 0
                              and recorder.value("pg_exporter_last_scrape_error", i) == 1)
        scrapes = list(recorder.scrapes[:down + 1])

    instance = {"instance": "primary", "job": JOB}
    firing: dict[int, dict[str, list[dict[str, str]]]] = {
        quiet: {},
        loaded: {
            "PostgreSQLHighConnections": [{"instance": "primary"}],
            "PostgresHasTooManyDeadTuples": [{"datname": "app", "schemaname": "public", **instance}],
            "PostgresHasReplicationSlotUsed": [{"slot_name": SLOT, "server": address, **instance}],
        },
        down: {"PostgreSQLDown": [instance], "PostgresHasExporterErrors": [instance]},
    }
    checks = [alert_test(name, at, [{"alertname": name, **labels} for labels in expected.get(name, [])])
              for at, expected in firing.items() for name in CHECKED]
    (tmp_path / "mixin.rules.yml").write_text(mixin_rule_file())
    unit: dict[str, Any] = {"rule_files": ["mixin.rules.yml"], "evaluation_interval": "1s",
            "tests": [{"name": "postgres_mixin over pgvitals' scrapes", "interval": "1s",
                       "input_series": input_series(scrapes, mixin_alert_metrics(), JOB),
                       "alert_rule_test": checks}]}
    assert set(CHECKED) <= {a["name"] for a in MIXIN["alerts"]}
    print(f"\nscrapes: {len(scrapes)} (quiet at {quiet}s, loaded at {loaded}s, down at {down}s), "
          f"input series: {len(unit['tests'][0]['input_series'])}")
    result = _promtool_test(tmp_path, unit)
    assert result.returncode == 0, result.stdout + result.stderr

    # The control: claim the stopped server is quiet, and promtool must say PostgreSQLDown fires.
    checks[checks.index(alert_test("PostgreSQLDown", down, [{"alertname": "PostgreSQLDown", **instance}]))] = \
        alert_test("PostgreSQLDown", down, [])
    control = _promtool_test(tmp_path, unit)
    assert control.returncode != 0 and "PostgreSQLDown" in control.stdout + control.stderr, control.stdout


def _promtool_test(directory: Path, unit: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`promtool test rules` on ``unit`` (a unit-test document naming rule files in ``directory``)."""
    (directory / "mixin_test.yml").write_text(yaml.safe_dump(unit, sort_keys=False, width=10_000))
    return subprocess.run([str(PROMTOOL), "test", "rules", "mixin_test.yml"], cwd=directory,
                          capture_output=True, text=True, timeout=60)
