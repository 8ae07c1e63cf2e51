"""A collector that cannot run on the server's version (or extension version) is skipped and says so, on every major."""

from __future__ import annotations

import re

import pytest

from exporter import __version__
from exporter.catalog import Collector, MetricSpec, SqlVariant, load, validate
from exporter.cli import _skip_detail, main
from exporter.engine import Engine
from exporter.localpg import LocalCluster, free_port, wait_until
from exporter.snapshot import Snapshot
from tests.support.exporters import collect_once
from tests.support.pgbins import bindir_for, selected_major
from tests.support.scrape import Metrics
from tests.support.servers import MONITOR_PASSWORD, MONITOR_ROLE, Server, settings_for

pytestmark = [pytest.mark.live, pytest.mark.family("skeleton")]


def _server_version(pg: Server) -> str:
    return str(pg.execute("SELECT current_setting('server_version') AS v")[0]["v"])


def _version_skips_expected(version_num: int) -> dict[str, int]:
    """Enabled PostgreSQL collectors that cannot run on ``version_num``, with the first major they run on."""
    out = {}
    for c in load().collectors:
        if c.target_kind != "postgres" or not c.enabled:
            continue
        server_variants = c.version_source == "server" and c.variants
        if version_num < c.min_server_version or (server_variants and c.variant_for(version_num) is None):
            lowest = min(v.min_version for v in c.variants) if server_variants else 0
            out[c.name] = max(c.min_server_version, lowest) // 10000
    return out


def test_check_and_self_metric_name_each_collector_this_version_lacks(pg: Server, capsys) -> None:
    expected = _version_skips_expected(pg.version_num)
    assert main(["check", "--dsn", pg.monitor_dsn, "--name", "main", "--log-level", "ERROR"]) == 0
    out = capsys.readouterr().out
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^  (\S+)\s+(.*)$", out, re.MULTILINE)}
    said = {name for name, text in lines.items() if "not available for this version" in text}
    assert said == set(expected), out
    version = _server_version(pg)
    for name, first_major in expected.items():
        assert f"(PostgreSQL {version}; runs on PostgreSQL {first_major} " in lines[name], lines[name]
    metrics: Metrics = collect_once(pg)
    skipped = {labels["collector"] for labels, value in metrics.find("pgvitals_collector_skipped", reason="version")
               if value == 1}
    assert skipped == set(expected)
    for name in expected:  # skipped, not failing at every interval
        assert not metrics.find("pgvitals_collector_errors_total", collector=name)
        assert metrics.value("pgvitals_collector_success", collector=name) is None


def _ext_collector(*variants: SqlVariant) -> Collector:
    return Collector(
        name="ext_version_probe", family="skeleton", help="Reads only some pg_stat_statements versions.",
        extension="pg_stat_statements", version_source="pg_stat_statements", variants=variants,
        metrics=(MetricSpec("ext_version_probe_value", "gauge", "A constant.", value="v"),),
    )


@pytest.mark.parametrize(("variant", "detail"), [
    (SqlVariant("SELECT 1 AS v", 9900), r"reads pg_stat_statements 99\.0 and newer: "
                                        r"ALTER EXTENSION pg_stat_statements UPDATE\)$"),
    (SqlVariant("SELECT 1 AS v", 100, 104), r"reads pg_stat_statements 1\.0 up to 1\.3\)$"),
])
def test_an_extension_version_it_cannot_read_is_skipped_not_failed(
        pg: Server, fresh_db: str, variant: SqlVariant, detail: str) -> None:
    pg.execute("CREATE EXTENSION pg_stat_statements", fresh_db)
    installed = pg.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'",
                           fresh_db)[0]["extversion"]
    collector = _ext_collector(variant)
    catalog = validate([collector])
    snapshot = Snapshot(catalog, __version__)
    engine = Engine(catalog, settings_for([{"name": "main", "dsn": pg.dsn(fresh_db)}]), snapshot)
    try:
        runtime = engine.targets["main"]
        assert engine.probe(runtime)
        for _ in range(2):
            engine.collect(runtime, engine.collectors[collector.name])
        status = snapshot.status("main", collector.name)
        assert status.skipped == "version"
        assert status.errors == {}
        text = _skip_detail(collector, "version", runtime)
        assert text.startswith(f" (pg_stat_statements {installed} installed; "), text
        assert re.search(detail, text), text
        rendered = Metrics(snapshot.render().decode())
        assert rendered.value("pgvitals_collector_skipped", collector=collector.name, reason="version") == 1
        assert rendered.value("ext_version_probe_value") is None
    finally:
        engine.close()


def _engine(collector: Collector, dsn: str) -> tuple[Engine, Snapshot]:
    catalog = validate([collector])
    snapshot = Snapshot(catalog, __version__)
    return Engine(catalog, settings_for([{"name": "main", "dsn": dsn}]), snapshot), snapshot


def _collect_value(engine: Engine, snapshot: Snapshot, collector: Collector) -> float | None:
    engine.collect(engine.targets["main"], engine.collectors[collector.name])
    return Metrics(snapshot.render().decode()).value(f"{collector.name}_value")


def test_an_extension_update_switches_the_variant_at_the_next_probe(pg: Server, fresh_db: str) -> None:
    pg.execute("CREATE EXTENSION pg_stat_statements VERSION '1.4'", fresh_db)
    collector = Collector(
        name="ext_switch_probe", family="skeleton", help="Says which variant ran.",
        extension="pg_stat_statements", version_source="pg_stat_statements",
        variants=(SqlVariant("SELECT 1 AS v", 104, 105), SqlVariant("SELECT 2 AS v", 105)),
        metrics=(MetricSpec("ext_switch_probe_value", "gauge", "Which variant ran.", value="v"),),
    )
    engine, snapshot = _engine(collector, pg.dsn(fresh_db))
    try:
        runtime = engine.targets["main"]
        assert engine.probe(runtime)
        assert _collect_value(engine, snapshot, collector) == 1
        pg.execute("ALTER EXTENSION pg_stat_statements UPDATE", fresh_db)
        assert engine.probe(runtime)
        assert _collect_value(engine, snapshot, collector) == 2
    finally:
        engine.close()


def test_another_major_behind_the_same_address_gets_its_variant(pg: Server) -> None:
    """An upgrade (or a failover to another major): the probe sees the new version and the variant follows."""
    first = selected_major() or pg.cluster.major
    second = 15 if first != 15 else 16
    port = free_port()
    clusters = [LocalCluster(bindir=bindir_for(major), port=port, name=f"pg{major}") for major in (first, second)]
    boundary = max(first, second) * 10000
    collector = Collector(
        name="major_switch_probe", family="skeleton", help="Says which variant ran.",
        variants=(SqlVariant("SELECT 1 AS v", 120000, boundary), SqlVariant("SELECT 2 AS v", boundary)),
        metrics=(MetricSpec("major_switch_probe_value", "gauge", "Which variant ran.", value="v"),),
    )
    engine, snapshot = _engine(collector, clusters[0].dsn(MONITOR_ROLE, MONITOR_PASSWORD))
    try:
        runtime = engine.targets["main"]
        values = []
        for cluster in clusters:
            cluster.init().start()
            cluster.create_monitor_role(MONITOR_ROLE, MONITOR_PASSWORD)
            wait_until(lambda: engine.probe(runtime), timeout=30, interval=0.2)
            assert runtime.facts is not None and runtime.facts.version_num // 10000 == cluster.major
            values.append(_collect_value(engine, snapshot, collector))
            cluster.stop()
        assert values == [1 if first < second else 2, 2 if first < second else 1]
    finally:
        engine.close()
        for cluster in clusters:
            cluster.destroy()
