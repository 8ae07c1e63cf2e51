"""The catalog's rules, checked without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.catalog import (
    CatalogError,
    Collector,
    MetricSpec,
    SqlVariant,
    load,
    validate,
)
from exporter.docs import metrics_markdown

ROOT = Path(__file__).parent.parent


def _collector(**overrides: object) -> Collector:
    base: dict[str, object] = {
        "name": "c", "family": "f", "help": "h",
        "variants": (SqlVariant("SELECT 1 AS v"),),
        "metrics": (MetricSpec("c_value", "gauge", "help", value="v"),),
    }
    base.update(overrides)
    return Collector(**base)  # type: ignore[arg-type]


def test_shipped_catalog_is_valid() -> None:
    catalog = load()
    assert catalog.collectors
    names = [spec.name for spec in catalog.metrics()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"variants": (SqlVariant("a", 120000, 150000), SqlVariant("b", 140000))}, "overlap"),
    ({"variants": (SqlVariant("a", 150000, 140000),)}, "empty version range"),
    ({"metrics": (MetricSpec("c_calls", "counter", "h", value="v"),)}, "must end in _total"),
    ({"metrics": (MetricSpec("c_size_total", "gauge", "h", value="v"),)}, "ends in _total"),
    ({"metrics": (MetricSpec("c_v", "gauge", "h", value="v", labels=("target",)),)}, "reserved label"),
    ({"metrics": (MetricSpec("c-v", "gauge", "h", value="v"),)}, "bad metric name"),
    ({"metrics": (MetricSpec("c_v", "gauge", " ", value="v"),)}, "no help"),
    ({"interval": 5.0, "timeout": 5.0}, "must be below interval"),
    ({"variants": ()}, "needs SQL variants"),
    ({"writes": True, "enabled": False}, "must be disabled by default and primary-only"),
    ({"writes": True, "role": "primary"}, "must be disabled by default and primary-only"),
    ({"visit_only": (SqlVariant("SELECT 'x' AS datname"),)}, "visit_only applies to per-database collectors"),
    ({"scope": "database", "visit_only": (SqlVariant("a", 120000, 150000), SqlVariant("b", 140000))},
     "visit_only: variants .* overlap"),
])
def test_rule_violations_are_rejected(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        validate([_collector(**overrides)])


def test_only_the_heartbeat_writer_writes() -> None:
    writers = [c.name for c in load().collectors if c.writes]
    assert writers == ["pg_replication_heartbeat_writer"]


def test_a_metric_name_belongs_to_one_collector() -> None:
    with pytest.raises(CatalogError, match="already declared"):
        validate([_collector(), _collector(name="d")])


def test_docs_metrics_md_is_up_to_date() -> None:
    current = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert current == metrics_markdown(load()), "run: pgvitals docs --out docs/metrics.md"
