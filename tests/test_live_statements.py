"""pg_stat_statements on a real server, read as a pg_monitor-only role: top N, remainder, resets, versions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from exporter import __version__
from exporter.catalog import load
from exporter.collectors.statements import clean_text, select
from exporter.engine import Engine
from exporter.localpg import LocalCluster, wait_until
from exporter.snapshot import Snapshot
from tests.support.pgbins import bindir_for, selected_major
from tests.support.scrape import Metrics
from tests.support.servers import MONITOR_PASSWORD, MONITOR_ROLE, Server, settings_for, start_server

pytestmark = [pytest.mark.live, pytest.mark.family("slow_queries")]

COLLECTOR = "pg_stat_statements"
METRICS = {
    "calls": "pg_stat_statements_calls_total",
    "total_exec_time": "pg_stat_statements_exec_seconds_total",
    "rows": "pg_stat_statements_rows_total",
    "shared_blks_hit": "pg_stat_statements_shared_blks_hit_total",
    "shared_blks_read": "pg_stat_statements_shared_blks_read_total",
    "temp_blks_read": "pg_stat_statements_temp_blks_read_total",
    "temp_blks_written": "pg_stat_statements_temp_blks_written_total",
}
SCALE = {"total_exec_time": 0.001}  # milliseconds in the view, seconds in the metric


class Collecting:
    """One engine kept across runs (the top-N memory lives in its state), run synchronously."""

    def __init__(self, dsn: str, **params: Any):
        catalog = load()
        self.snapshot = Snapshot(catalog, __version__)
        settings = settings_for([{"name": "main", "dsn": dsn}], collectors={COLLECTOR: params} if params else {})
        self.engine = Engine(catalog, settings, self.snapshot)

    def run(self) -> Metrics:
        for runtime in self.engine.targets.values():
            # After a server restart the first probe may find a dead pooled connection: it reconnects.
            wait_until(lambda runtime=runtime: self.engine.probe(runtime), timeout=30, interval=0.5)
            for eff in self.engine.applicable(runtime):
                if eff.collector.name == COLLECTOR:
                    self.engine.collect(runtime, eff)
        return Metrics(self.snapshot.render().decode())

    def close(self) -> None:
        self.engine.close()


@pytest.fixture(scope="module")
def pg() -> Iterator[Server]:
    """A server of our own (it replaces the session's ``pg`` here, also under ``fresh_db``): these tests reset
    pg_stat_statements and count its entries."""
    srv = start_server("statements")
    if srv.version_num >= 130000:
        srv.execute("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
        srv.execute("SELECT pg_reload_conf()")
    yield srv
    srv.cluster.destroy()


@pytest.fixture
def collecting() -> Iterator[list[Collecting]]:
    made: list[Collecting] = []
    yield made
    for item in made:
        item.close()


def _start(made: list[Collecting], dsn: str, **params: Any) -> Collecting:
    item = Collecting(dsn, **params)
    made.append(item)
    return item


def _run_many(pg: Server, dbname: str, statements: list[str]) -> None:
    with pg.cluster.connect(dbname) as conn:
        for sql in statements:
            conn.execute(sql.encode())


def _wide_table(pg: Server, dbname: str, columns: int = 500, rows: int = 2000) -> list[str]:
    """A table with ``columns`` columns, and one distinct statement per column (a different Var per query)."""
    cols = ", ".join(f"g + {i} AS c{i}" for i in range(columns))
    pg.execute(f"CREATE TABLE wide AS SELECT {cols} FROM generate_series(1, {rows}) g", dbname)
    return [f"SELECT sum(c{i}) FROM wide" for i in range(columns)]


def _exec_time(pg: Server) -> str:
    """The execution time column of the extension installed in the postgres database (total_time before 1.8)."""
    version = pg.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'")[0]
    major, minor = (int(part) for part in version["extversion"].split("."))
    return "total_exec_time" if (major, minor) >= (1, 8) else "total_time"


def _direct(pg: Server, dbname: str) -> dict[int, dict[str, float]]:
    """Each statement of ``dbname`` as the superuser sees it, summed per queryid (read from another database)."""
    sums = ", ".join(f"sum({_exec_time(pg) if c == 'total_exec_time' else c})::float8 AS {c}" for c in METRICS)
    rows = pg.execute(
        f"SELECT queryid, {sums} FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
        f"WHERE d.datname = '{dbname}' GROUP BY queryid", "postgres")
    return {int(r["queryid"]): {c: float(r[c]) for c in METRICS} for r in rows}


def _shown(metrics: Metrics, dbname: str | None = None) -> dict[int, dict[str, float]]:
    """The statements the exporter shows (of ``dbname`` when given), per queryid, in the view's units."""
    out: dict[int, dict[str, float]] = {}
    for column, name in METRICS.items():
        labels = {"datname": dbname} if dbname else {}
        for found, value in metrics.find(name, **labels):
            if found["queryid"] != "other":
                out.setdefault(int(found["queryid"]), {})[column] = value / SCALE.get(column, 1.0)
    return out


def _other(metrics: Metrics, dbname: str) -> dict[str, float]:
    values = {}
    for column, name in METRICS.items():
        value = metrics.value(name, datname=dbname, queryid="other")
        assert value is not None, f"no remainder for {name} in {dbname}"
        values[column] = value / SCALE.get(column, 1.0)
    return values


def test_top_n_plus_remainder_adds_up(pg: Server, fresh_db: str, collecting: list[Collecting]) -> None:
    statements = _wide_table(pg, fresh_db)
    _run_many(pg, fresh_db, statements)
    exporter = _start(collecting, pg.monitor_dsn, top_n=100)
    first = exporter.run()
    assert first.value("pgvitals_collector_success", collector=COLLECTOR) == 1
    for name in METRICS.values():
        shown = [labels for labels, _ in first.find(name) if labels["queryid"] != "other"]
        assert len(shown) == 100, name  # the server holds more than 500 statements: exactly the top 100
        assert len({(s["datname"], s["usename"], s["queryid"]) for s in shown}) == 100
        assert first.find(name, datname=fresh_db, queryid="other"), name
    # Shown values are the view's own, and on a first run the top is the top by execution time.
    direct1 = _direct(pg, fresh_db)
    shown1 = _shown(first, fresh_db)
    assert shown1, "some statements of the busy database should make the top 100"
    for queryid, values in shown1.items():
        assert values == pytest.approx(direct1[queryid], rel=1e-9)
    hidden = [v["total_exec_time"] for q, v in direct1.items() if q not in shown1]
    assert min(v["total_exec_time"] for v in shown1.values()) >= max(hidden)
    # The remainder counts from the exporter's start.
    assert _other(first, fresh_db)["calls"] == 0

    # Work between two runs: every statement again, a tenth of them five more times.
    _run_many(pg, fresh_db, statements + [s for s in statements[::10] for _ in range(5)])
    second = exporter.run()
    direct2 = _direct(pg, fresh_db)
    shown2 = _shown(second, fresh_db)
    other1, other2 = _other(first, fresh_db), _other(second, fresh_db)
    for column in METRICS:
        grown_total = sum(v[column] for v in direct2.values()) - sum(v[column] for v in direct1.values())
        grown_top = sum(v[column] - direct1.get(q, {}).get(column, 0.0) for q, v in shown2.items())
        grown_other = other2[column] - other1[column]
        assert grown_other >= 0, column
        assert grown_top + grown_other == pytest.approx(grown_total, rel=1e-9, abs=1e-9), column
    assert other2["calls"] - other1["calls"] >= len(statements) - len(shown2)


def test_selection_is_stable(pg: Server, fresh_db: str, collecting: list[Collecting]) -> None:
    _wide_table(pg, fresh_db, columns=60, rows=3000)
    # Costs far apart: statement i adds up i + 1 columns of every row.
    statements = [f"SELECT sum({' + '.join(f'c{j}' for j in range(i + 1))}) FROM wide" for i in range(60)]
    _run_many(pg, fresh_db, statements * 5)
    exporter = _start(collecting, pg.monitor_dsn, top_n=20)
    first = exporter.run()
    ids = {labels["queryid"] for labels, _ in first.find("pg_stat_statements_calls_total")} - {"other"}
    assert len(ids) == 20
    # Nothing changes much: a fifth more of the same workload (near neighbours may swap ranks).
    _run_many(pg, fresh_db, statements)
    second = exporter.run()
    ids2 = {labels["queryid"] for labels, _ in second.find("pg_stat_statements_calls_total")} - {"other"}
    assert len(ids2) == 20
    # Usually the very same set. On a busy machine one execution can take much longer than usual and really
    # lift a statement to the top: then the change must follow the rule (a newcomer ranks better than half
    # the rank of the statement it displaces, or that one fell out of the top 40).
    ranks = {str(r["queryid"]): i for i, r in enumerate(pg.execute(
        f"SELECT queryid, sum({_exec_time(pg)}) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
        "GROUP BY dbid, userid, queryid ORDER BY 2 DESC"), start=1)}
    left, entered = ids - ids2, ids2 - ids
    assert len(left) <= 2, (left, entered)
    for gone in left:
        assert ranks.get(gone, 10**6) > 40 or all(ranks[new] < ranks[gone] / 2 + 1 for new in entered), \
            ({q: ranks.get(q) for q in left}, {q: ranks.get(q) for q in entered})


def test_hysteresis_keeps_a_statement_near_the_boundary() -> None:
    def rows(order: list[int]) -> list[dict[str, Any]]:
        return [{"dbid": 1, "userid": 1, "queryid": q, "rank": rank} for rank, q in enumerate(order, start=1)]

    first = select(rows([1, 2, 3, 4, 5, 6]), 3, set(), None)
    assert [r["queryid"] for r in first] == [1, 2, 3]
    shown = {(1, 1, 3)} | {(1, 1, 1), (1, 1, 2)}
    # 4 overtakes 3 by a little: 3 (now rank 4, counted as 2) stays.
    assert {r["queryid"] for r in select(rows([1, 2, 4, 3, 5, 6]), 3, shown, None)} == {1, 2, 3}
    # 6 jumps to the very top: it enters, the weakest incumbent leaves.
    assert {r["queryid"] for r in select(rows([6, 1, 2, 4, 5, 3]), 3, shown, None)} == {6, 1, 2}
    # A newcomer whose earlier values are unknown waits one run.
    eligible = {(1, 1, q) for q in (1, 2, 3, 4, 5)}
    assert {r["queryid"] for r in select(rows([6, 1, 2, 4, 5, 3]), 3, shown, eligible)} == {1, 2, 3}


def test_query_text_is_opt_in_masked_and_truncated(pg: Server, fresh_db: str, collecting: list[Collecting]) -> None:
    secret = "Zebra-Password-4711"
    pg.execute("DROP ROLE IF EXISTS text_probe")
    pg.execute("CREATE ROLE text_probe")
    pg.execute("SELECT pg_stat_statements_reset()")
    try:
        _run_many(pg, fresh_db, [f"ALTER ROLE text_probe PASSWORD '{secret}'",
                               "SELECT relname, relpages FROM pg_class WHERE relkind = 'r' AND relpages >= 0 "
                               "ORDER BY relname LIMIT 3"])
        plain = _start(collecting, pg.monitor_dsn, top_n=1000).run()
        assert plain.value("pgvitals_collector_success", collector=COLLECTOR) == 1
        assert _shown(plain, fresh_db), "the test statements should be shown"
        assert not plain.find("pg_stat_statements_query_info")
        assert secret not in plain.body

        with_text = _start(collecting, pg.monitor_dsn, top_n=1000, query_text=True, query_text_length=40)
        texts = with_text.run()
        infos = texts.find("pg_stat_statements_query_info", datname=fresh_db)
        direct = {int(r["queryid"]): r["query"] for r in pg.execute(
            f"SELECT queryid, query FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            f"WHERE d.datname = '{fresh_db}'")}
        assert {int(labels["queryid"]) for labels, _ in infos} == set(_shown(texts, fresh_db))
        for labels, value in infos:
            assert value == 1
            assert len(labels["query"]) <= 40
            assert labels["query"] == clean_text(direct[int(labels["queryid"])], 40)
        assert any(labels["query"].startswith("SELECT relname, relpages FROM pg_class") for labels, _ in infos)
        # Verbatim up to 15, normalized ($1) on some later majors: either way the secret never shows.
        assert any(labels["query"].startswith("ALTER ROLE text_probe PASSWORD") for labels, _ in infos)
        assert secret not in texts.body
        # Only shown statements get a text: never the remainder.
        assert not texts.find("pg_stat_statements_query_info", queryid="other")
        # Texts are read again only when the shown set changes (the view itself counts our text reads).
        assert with_text.run().find("pg_stat_statements_query_info", datname=fresh_db) == infos
        reads = pg.execute(
            f"SELECT sum(calls) AS calls FROM pg_stat_statements WHERE userid = '{MONITOR_ROLE}'::regrole "
            "AND query LIKE '%DISTINCT ON (s.dbid, s.userid, s.queryid)%'")
        assert reads[0]["calls"] == 1
    finally:
        pg.execute("DROP ROLE IF EXISTS text_probe")


def test_clean_text_masks_literals() -> None:
    assert clean_text("ALTER ROLE x PASSWORD 'it''s secret'", 100) == "ALTER ROLE x PASSWORD '***'"
    assert clean_text("SELECT $1,\n\t E'a\\'b' FROM t", 100) == "SELECT $1, '***' FROM t"
    assert clean_text("DO $body$ secret $body$; SELECT $$x$$", 100) == "DO $$***$$; SELECT $$***$$"
    assert clean_text("SELECT 'cut off in the mid", 100) == "SELECT '***'"
    assert clean_text("SELECT " + "x, " * 100, 20) == "SELECT x, x, x, x, x"


def test_reset_never_makes_the_remainder_go_backwards(pg: Server, fresh_db: str,
                                                      collecting: list[Collecting]) -> None:
    statements = _wide_table(pg, fresh_db, columns=60, rows=100)
    _run_many(pg, fresh_db, statements)
    exporter = _start(collecting, pg.monitor_dsn, top_n=10)
    before = exporter.run()
    _run_many(pg, fresh_db, statements)
    middle = exporter.run()
    pg.execute("SELECT pg_stat_statements_reset()")
    _run_many(pg, fresh_db, statements[:30])
    after = exporter.run()
    assert after.value("pgvitals_collector_success", collector=COLLECTOR) == 1
    for name in METRICS.values():
        values = [m.value(name, datname=fresh_db, queryid="other") for m in (before, middle, after)]
        assert None not in values
        assert values[0] <= values[1] <= values[2], name  # type: ignore[operator]
    if after.value("pg_stat_statements_dealloc_total") is not None:
        # 1.9+ records the reset: everything the database's hidden statements did since is the increase.
        direct = _direct(pg, fresh_db)
        shown = _shown(after, fresh_db)
        hidden_calls = sum(v["calls"] for q, v in direct.items() if q not in shown)
        grown = after.value("pg_stat_statements_calls_total", datname=fresh_db, queryid="other") \
            - middle.value("pg_stat_statements_calls_total", datname=fresh_db, queryid="other")  # type: ignore[operator]
        assert grown == hidden_calls
        stats_reset = after.value("pg_stat_statements_stats_reset_timestamp_seconds")
        assert stats_reset is not None and stats_reset > 0


def test_server_restart_does_not_inflate_the_remainder(pg: Server, fresh_db: str,
                                                        collecting: list[Collecting]) -> None:
    statements = _wide_table(pg, fresh_db, columns=40, rows=100)
    _run_many(pg, fresh_db, statements)
    exporter = _start(collecting, pg.monitor_dsn, top_n=10)
    exporter.run()
    _run_many(pg, fresh_db, statements)
    before = exporter.run()
    pg.cluster.restart()  # a clean restart keeps pg_stat_statements; a failover would bring other values
    _run_many(pg, fresh_db, statements)
    after = exporter.run()
    _run_many(pg, fresh_db, statements)
    later = exporter.run()
    for name in METRICS.values():
        values = [m.value(name, datname=fresh_db, queryid="other") for m in (before, after, later)]
        # Across the restart the remainder keeps its value (that run's work is not counted), then grows.
        assert values[0] == values[1], name
        assert values[1] <= values[2], name  # type: ignore[operator]
    assert later.value("pg_stat_statements_calls_total", datname=fresh_db, queryid="other") \
        > after.value("pg_stat_statements_calls_total", datname=fresh_db, queryid="other")  # type: ignore[operator]


def _available(pg: Server, version: str) -> bool:
    return bool(pg.execute(
        f"SELECT 1 FROM pg_available_extension_versions WHERE name = 'pg_stat_statements' AND version = '{version}'"))


@pytest.mark.parametrize("version", ["1.4", "1.8", "1.9", "1.10", "1.11", "1.12"])
def test_installed_extension_version_chooses_the_columns(pg: Server, fresh_db: str, version: str,
                                                         collecting: list[Collecting]) -> None:
    if not _available(pg, version):
        pytest.skip(f"pg_stat_statements {version} does not exist on PostgreSQL {pg.cluster.major}")
    pg.execute(f"CREATE EXTENSION pg_stat_statements VERSION '{version}'", fresh_db)
    _run_many(pg, fresh_db, ["CREATE TABLE t (a int)", "INSERT INTO t SELECT generate_series(1, 100)",
                           "SELECT count(*) FROM t", "SELECT count(*) FROM t"])
    metrics = _start(collecting, pg.dsn(fresh_db), top_n=500).run()
    assert metrics.value("pgvitals_collector_success", collector=COLLECTOR) == 1
    counted = [q for q, v in _shown(metrics, fresh_db).items() if v.get("rows") == 2 and v.get("calls") == 2]
    assert counted, "the count(*) statement, run twice, should be shown with its two calls"
    number = int(version.split(".")[0]) * 100 + int(version.split(".")[1])
    has_plan_time = number >= 108 and pg.version_num >= 130000  # track_planning is on for this server
    assert bool(metrics.find("pg_stat_statements_plan_seconds_total", datname=fresh_db)) == has_plan_time
    assert bool(metrics.find("pg_stat_statements_wal_bytes_total", datname=fresh_db)) == (number >= 108)
    assert (metrics.value("pg_stat_statements_dealloc_total") is not None) == (number >= 109)
    entries = metrics.value("pg_stat_statements_entries")
    assert entries is not None and entries >= 4


def test_missing_extension_is_a_skip_not_an_error(pg: Server, fresh_db: str, collecting: list[Collecting]) -> None:
    exporter = _start(collecting, pg.dsn(fresh_db))
    for _ in range(2):
        metrics = exporter.run()
    assert metrics.value("pgvitals_collector_skipped", collector=COLLECTOR, reason="extension") == 1
    assert not metrics.find("pgvitals_collector_errors_total", collector=COLLECTOR)
    assert not metrics.find("pg_stat_statements_calls_total")


def test_not_preloaded_is_a_skip_not_an_error(collecting: list[Collecting]) -> None:
    cluster = LocalCluster(bindir=bindir_for(selected_major()), name="nopreload").init(preload="")
    try:
        cluster.start()
        cluster.execute("CREATE EXTENSION pg_stat_statements")
        dsn = cluster.create_monitor_role(MONITOR_ROLE, MONITOR_PASSWORD)
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            cluster.execute("SELECT count(*) FROM pg_stat_statements")
        exporter = _start(collecting, dsn)
        for _ in range(2):
            metrics = exporter.run()
        assert metrics.value("pgvitals_collector_skipped", collector=COLLECTOR, reason="preload") == 1
        assert not metrics.find("pgvitals_collector_errors_total", collector=COLLECTOR)
    finally:
        for item in collecting:
            item.close()
        cluster.destroy()
