"""Rendering and assembly of the text format, without a server."""

from __future__ import annotations

from decimal import Decimal

from exporter import __version__
from exporter.catalog import MetricSpec, validate
from exporter.exposition import escape_label, format_value, render_rows
from exporter.snapshot import Snapshot
from tests.support.scrape import Metrics

SPEC = MetricSpec("x_bytes", "gauge", "Bytes.", value="v", labels=("name",))
COUNT = MetricSpec("x_ops_total", "counter", "Ops.", value="c", labels=("name",), scale=0.001)


def test_escaping_and_values() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert format_value(3.0) == "3"
    assert format_value(0.25) == "0.25"
    assert format_value(float("nan")) == "NaN"
    assert format_value(10**20) == str(10**20)


def test_nulls_are_skipped_and_scale_applied() -> None:
    rows = [{"name": "a", "v": Decimal(5), "c": 1500}, {"name": 'q"x', "v": None, "c": None}]
    chunks, count, truncated = render_rows([SPEC, COUNT], rows, 'target="t"', limit=100)
    assert count == 2 and not truncated
    assert chunks["x_bytes"] == b'x_bytes{target="t",name="a"} 5\n'
    assert chunks["x_ops_total"] == b'x_ops_total{target="t",name="a"} 1.5\n'


def test_series_limit() -> None:
    rows = [{"name": str(i), "v": i, "c": i} for i in range(10)]
    _, count, truncated = render_rows([SPEC], rows, 'target="t"', limit=4)
    assert count == 4 and truncated


def test_families_stay_together_across_targets() -> None:
    from exporter.catalog import Collector, SqlVariant

    collector = Collector(name="x", family="f", help="h", variants=(SqlVariant("SELECT 1"),),
                          metrics=(SPEC, COUNT))
    catalog = validate([collector])
    snapshot = Snapshot(catalog, __version__)
    snapshot.add_target("a", 'target="a"')
    assert Metrics(snapshot.render().decode()).value("pg_up", target="a") is None  # not probed: unknown, not 0
    for target in ("a", "b"):
        snapshot.add_target(target, f'target="{target}"')
        chunks, _, _ = render_rows([SPEC, COUNT], [{"name": "n", "v": 1, "c": 2}], f'target="{target}"', 10)
        snapshot.replace(target, "x", {"": chunks})
        snapshot.set_up(target, True)
    body = snapshot.render().decode()
    metrics = Metrics(body)  # asserts families are contiguous and declared once
    assert metrics.value("x_bytes", target="a") == 1
    assert metrics.value("x_bytes", target="b") == 1
    assert body.count("# TYPE x_bytes gauge") == 1
    snapshot.set_up("a", False)
    metrics = Metrics(snapshot.render().decode())
    assert metrics.value("x_bytes", target="a") is None  # a down target serves no stale data
    assert metrics.value("pg_up", target="a") == 0
