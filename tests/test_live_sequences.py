"""Sequences near exhaustion on a real server: ratios of sequences the test advanced with setval."""

from __future__ import annotations

from typing import Any

import pytest

from exporter.collectors.sequences import used_share
from tests.support.exporters import collect_in
from tests.support.scrape import Metrics
from tests.support.servers import Server

pytestmark = [pytest.mark.live, pytest.mark.family("sequences")]

SEQUENCES = "pg_sequences"


def _collect(pg: Server, db: str, **params: Any) -> Metrics:
    return collect_in(pg, db, [SEQUENCES], **params)


def _setup(pg: Server, db: str) -> None:
    pg.execute("""
        CREATE SCHEMA app;
        CREATE SEQUENCE app.near MAXVALUE 1000;
        SELECT setval('app.near', 960);
        CREATE SEQUENCE app.low MAXVALUE 1000;
        SELECT setval('app.low', 10);
        CREATE SEQUENCE app.fresh;
        CREATE SEQUENCE app.down INCREMENT -1 MINVALUE -100 MAXVALUE -1;
        SELECT setval('app.down', -81);
        CREATE SEQUENCE app.wraps MAXVALUE 100 CYCLE;
        SELECT setval('app.wraps', 99);
        CREATE TABLE app.narrow (id int);
        CREATE SEQUENCE app.wide AS bigint OWNED BY app.narrow.id;
        SELECT setval('app.wide', 1610612736);
        CREATE TABLE app.ident (id smallint GENERATED ALWAYS AS IDENTITY, v text);
        SELECT setval(pg_get_serial_sequence('app.ident', 'id'), 30000);
        CREATE SEQUENCE app.hidden MAXVALUE 10;
        SELECT setval('app.hidden', 9);
    """, db)
    readable = "app.near, app.low, app.fresh, app.down, app.wraps, app.wide, app.ident_id_seq"
    pg.execute(f"GRANT USAGE ON SCHEMA app TO pgvitals_mon; GRANT SELECT ON {readable} TO pgvitals_mon", db)


def test_sequences_over_the_floor_with_their_real_ratio(pg: Server, fresh_db: str) -> None:
    _setup(pg, fresh_db)
    metrics = _collect(pg, fresh_db)
    ratios = {labels["sequencename"]: value for labels, value in metrics.find("pg_sequence_used_ratio")}
    # 960 of 1..1000, 80 of -1..-100, 3/4 of int4 (the column, not the bigint sequence), 30000 of smallint.
    assert set(ratios) == {"near", "down", "wide", "ident_id_seq"}, ratios
    assert ratios["near"] == pytest.approx(0.96, abs=0.001)
    assert ratios["down"] == pytest.approx(80 / 99)
    assert ratios["wide"] == pytest.approx(0.75, abs=1e-9)
    assert ratios["ident_id_seq"] == pytest.approx((30000 - 1) / (32767 - 1))
    assert metrics.value("pg_sequence_remaining_values", sequencename="near") == 40
    assert metrics.value("pg_sequence_remaining_values", sequencename="down") == 19
    assert metrics.value("pg_sequence_remaining_values", sequencename="wide") == 2**31 - 1 - 1610612736
    wide = metrics.find("pg_sequence_info", sequencename="wide")
    assert [labels for labels, _ in wide] == [{
        "target": "main", "datname": fresh_db, "schemaname": "app", "sequencename": "wide", "data_type": "bigint",
        "column": "app.narrow.id", "column_type": "integer"}]
    ident = metrics.find("pg_sequence_info", sequencename="ident_id_seq")[0][0]
    assert (ident["data_type"], ident["column_type"]) == ("smallint", "smallint")
    assert metrics.find("pg_sequence_info", sequencename="near")[0][0]["column"] == ""
    # The highest ratio is always there; the sequence the role may not read is counted, not measured.
    assert metrics.value("pg_sequences_max_used_ratio", datname=fresh_db) == pytest.approx(0.96, abs=0.001)
    assert metrics.value("pg_sequences_unreadable", datname=fresh_db) == 1
    assert metrics.value("pg_sequences_unmeasured", datname=fresh_db) == 0


def test_the_floor_is_a_parameter_and_the_maximum_stays(pg: Server, fresh_db: str) -> None:
    _setup(pg, fresh_db)
    metrics = _collect(pg, fresh_db, floor=0.95)
    assert [labels["sequencename"] for labels, _ in metrics.find("pg_sequence_used_ratio")] == ["near"]
    assert metrics.value("pg_sequences_max_used_ratio", datname=fresh_db) == pytest.approx(0.96, abs=0.001)
    pg.execute("SELECT setval('app.near', 1000)", fresh_db)  # exhausted: the next nextval() fails
    metrics = _collect(pg, fresh_db, floor=0.95)
    assert metrics.value("pg_sequence_used_ratio", sequencename="near") == 1.0
    assert metrics.value("pg_sequence_remaining_values", sequencename="near") == 0


def test_pg_monitor_alone_reads_no_value_and_says_so(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE SEQUENCE s MAXVALUE 10; SELECT setval('s', 9); CREATE TABLE t (id serial)", fresh_db)
    metrics = _collect(pg, fresh_db)
    assert not metrics.find("pg_sequence_used_ratio")
    assert metrics.value("pg_sequences_unreadable", datname=fresh_db) == 2
    assert metrics.value("pg_sequences_max_used_ratio", datname=fresh_db) is None


def test_a_sequence_under_ddl_is_skipped_not_waited_for(pg: Server, fresh_db: str) -> None:
    import psycopg

    _setup(pg, fresh_db)
    with psycopg.connect(pg.dsn(fresh_db, monitor=False)) as ddl:
        ddl.execute("ALTER SEQUENCE app.near RENAME TO renamed")  # ACCESS EXCLUSIVE until rollback
        metrics = _collect(pg, fresh_db)
        ddl.rollback()
    assert metrics.value("pg_sequence_used_ratio", sequencename="near") is None
    assert metrics.value("pg_sequence_used_ratio", sequencename="wide") == pytest.approx(0.75)
    assert metrics.value("pg_sequences_unmeasured", datname=fresh_db) == 1


@pytest.mark.parametrize(("row", "last", "expected"), [
    ({"cycle": True}, 5, None),
    ({"cycle": False, "increment_by": 1, "min_value": 1, "max_value": 11, "column_max": None}, None, (0.0, 10)),
    ({"cycle": False, "increment_by": 3, "min_value": 1, "max_value": 11, "column_max": None}, 4, (0.3, 2)),
    ({"cycle": False, "increment_by": 1, "min_value": 1, "max_value": 2**63 - 1, "column_min": -32768,
      "column_max": 32767}, 32767, (1.0, 0)),
])
def test_used_share_arithmetic(row: dict[str, Any], last: int | None, expected: tuple[float, int] | None) -> None:
    assert used_share(row, last) == expected


def test_many_sequences_are_all_read_across_batches(pg: Server, fresh_db: str) -> None:
    from exporter.collectors.sequences import BATCH

    count = 2 * BATCH + 50
    pg.execute(f"""
        DO $$ BEGIN
          FOR i IN 1..{count} LOOP
            EXECUTE format('CREATE SEQUENCE s%s MAXVALUE 1000', i);
          END LOOP;
        END $$;
        SELECT setval('s{count}', 990);
        GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO pgvitals_mon;
    """, fresh_db)
    metrics = _collect(pg, fresh_db)
    # The last one created is read in the last batch.
    assert metrics.value("pg_sequence_used_ratio", sequencename=f"s{count}") == pytest.approx(989 / 999)
    assert len(metrics.find("pg_sequence_used_ratio")) == 1
    assert metrics.value("pg_sequences_unmeasured", datname=fresh_db) == 0
    assert metrics.value("pg_sequences_unreadable", datname=fresh_db) == 0
