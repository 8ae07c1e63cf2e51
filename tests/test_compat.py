"""The postgres_exporter naming table: valid against the catalog, documented, and `both` without a series twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter import compat
from exporter.catalog import CatalogError, load
from exporter.compat_docs import compat_markdown, load_mixin
from tests.support.scrape import parse_exposition

ROOT = Path(__file__).resolve().parent.parent


def test_table_is_valid_against_the_catalog() -> None:
    entries = compat.validate(load())
    assert {e.exporter for e in entries} == {"postgres_exporter", "pgbouncer_exporter"}


def test_a_name_shared_with_a_native_metric_must_be_the_same_series() -> None:
    clash = compat.CompatMetric("pg_locks", "pg_locks", "gauge", labels=(("datname", "datname"),))
    with pytest.raises(CatalogError, match="must be the very same series"):
        compat.validate(load(), [clash])
    unknown = compat.CompatMetric("pg_x", "pg_no_such_metric", "gauge")
    with pytest.raises(CatalogError, match="not a native metric"):
        compat.validate(load(), [unknown])


def test_compat_doc_is_up_to_date() -> None:
    expected = compat_markdown(load(), load_mixin(ROOT / "tests/data/postgres_mixin.yaml"))
    assert (ROOT / "docs/compat.md").read_text(encoding="utf-8") == expected, "run `pgvitals docs`"


def test_doc_lists_every_declared_and_missing_name() -> None:
    text = (ROOT / "docs/compat.md").read_text(encoding="utf-8")
    for entry in compat.COMPAT:
        assert f"| `{entry.name}` |" in text
    for missing in compat.NOT_PROVIDED:
        assert f"| `{missing.name}` | | | not provided |" in text


def _render(naming: compat.Naming, collector_name: str, rows: list[dict[str, object]]) -> dict[
        tuple[str, frozenset[tuple[str, str]]], float]:
    from exporter.exposition import render_rows

    collector = load().by_name[collector_name]
    chosen = compat.plan(collector, naming)
    chunks, _, _ = render_rows(chosen.native, rows, 'target="t"', 1000)
    derived, _, _ = compat.render_derived(chosen.derived, rows, 'target="t"', "db:5432", 1000)
    body = b"".join([*chunks.values(), *derived.values()]).decode()
    lines = body.splitlines()
    assert len(lines) == len(set(lines)), "a series twice"
    return parse_exposition(body)


def test_lock_modes_lower_cased_and_granted_summed() -> None:
    rows: list[dict[str, object]] = [
        {"datname": "app", "mode": "AccessShareLock", "granted": True, "locks": 3},
        {"datname": "app", "mode": "AccessShareLock", "granted": False, "locks": 2},
    ]
    series = _render("postgres_exporter", "pg_locks", rows)
    assert series == {("pg_locks_count", frozenset({("target", "t"), ("datname", "app"),
                                                    ("mode", "accesssharelock")})): 5}


def test_milliseconds_datid_and_no_total_suffix() -> None:
    row: dict[str, object] = {"datid": 5, "datname": "app", "xact_commit": 7, "blk_read_time": 1500.0,
                              "numbackends": 2}
    series = _render("postgres_exporter", "pg_stat_database", [row])
    labels = frozenset({("target", "t"), ("datid", "5"), ("datname", "app")})
    assert series[("pg_stat_database_xact_commit", labels)] == 7
    assert series[("pg_stat_database_blk_read_time", labels)] == 1500  # ms, as theirs
    assert series[("pg_stat_database_numbackends", frozenset({("target", "t"), ("datname", "app")}))] == 2
    assert not any(name.endswith("_total") and name.startswith("pg_stat_database_xact") for name, _ in series)


def test_both_mode_serves_each_name_once_and_native_unchanged() -> None:
    row: dict[str, object] = {"datid": 5, "datname": "app", "xact_commit": 7, "numbackends": 2}
    native = _render("native", "pg_stat_database", [row])
    both = _render("both", "pg_stat_database", [row])
    theirs = _render("postgres_exporter", "pg_stat_database", [row])
    assert set(native) <= set(both) and set(theirs) <= set(both)
    assert len(both) == len(set(native) | set(theirs))
    assert not any(name == "pg_stat_database_xact_commit" for name, _ in native)


def test_exposition_order_has_each_family_once() -> None:
    for naming in compat.NAMINGS:
        names = [spec.name for spec in compat.exposition_order(load(), naming)]
        assert len(names) == len(set(names)), naming
    native = compat.exposition_order(load(), "native")
    assert native == (*(s for c in load().collectors for s in c.metrics), *load().self_metrics)


def test_last_scrape_error_follows_the_collectors_of_a_postgres_target() -> None:
    from exporter import __version__
    from exporter.snapshot import Snapshot

    snapshot = Snapshot(load(), __version__)
    snapshot.use_order(compat.exposition_order(load(), "postgres_exporter"),
                       compat.self_order(load(), "postgres_exporter"))
    snapshot.add_target("db", 'target="db"')
    snapshot.add_target("edge", 'target="edge"', is_pgbouncer=True)
    snapshot.set_up("db", True)
    snapshot.set_up("edge", True)

    def flag() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        samples = parse_exposition(snapshot.render().decode())
        return {k: v for k, v in samples.items() if k[0] == "pg_exporter_last_scrape_error"}

    key = ("pg_exporter_last_scrape_error", frozenset({("target", "db")}))
    assert flag() == {key: 0}
    snapshot.record_run("db", "pg_locks", duration=0.1, finished=1.0, series=0, failures=["timeout"], results={})
    assert flag() == {key: 1}
    snapshot.record_run("db", "pg_locks", duration=0.1, finished=2.0, series=0, failures=[], results={})
    assert flag() == {key: 0}
    snapshot.set_up("db", False, "connection")
    assert flag() == {key: 1}
    native = Snapshot(load(), __version__)
    native.add_target("db", 'target="db"')
    native.set_up("db", True)
    assert "pg_exporter_last_scrape_error" not in native.render().decode()


def test_unknown_naming_is_a_config_error_at_its_key() -> None:
    from exporter.config import ConfigError, load_settings

    target = {"name": "a", "dsn": "postgresql://mon@db/postgres"}
    with pytest.raises(ConfigError) as caught:
        load_settings(raw={"targets": [target], "metric_names": "prometheus"}, environ={})
    assert caught.value.problems == ["metric_names: Input should be 'native', 'postgres_exporter' or 'both'"]
    assert load_settings(raw={"targets": [target]}, environ={}).metric_names == "native"
