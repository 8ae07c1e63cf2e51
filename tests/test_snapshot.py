"""The snapshot owns collector status: runs and skips are recorded through it, readers get copies."""

from __future__ import annotations

import dataclasses

import pytest

from exporter import __version__
from exporter.catalog import SELF_METRICS, Collector, MetricSpec, SqlVariant, validate
from exporter.exposition import label_text
from exporter.snapshot import Snapshot

COLLECTOR = Collector(name="c", family="f", help="h", variants=(SqlVariant("SELECT 1 AS v"),),
                      metrics=(MetricSpec("c_value", "gauge", "help", value="v"),))
PREFIX = label_text([("target", "main")])


def _snapshot() -> Snapshot:
    snapshot = Snapshot(validate([COLLECTOR]), __version__)
    snapshot.add_target("main", PREFIX)
    snapshot.set_up("main", True)
    return snapshot


def _families(body: bytes) -> dict[str, list[str]]:
    """Sample lines by family name."""
    out: dict[str, list[str]] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            out.setdefault(line.partition("{")[0].partition(" ")[0], []).append(line)
    return out


def test_reading_a_status_creates_nothing() -> None:
    snapshot = _snapshot()
    before = snapshot.render(now=100.0)
    assert snapshot.status("main", "c") is None
    assert snapshot.render(now=100.0) == before
    assert "pgvitals_collector_success" not in _families(before)


def test_a_status_is_immutable_and_later_runs_leave_it_alone() -> None:
    snapshot = _snapshot()
    lines = {"": {"c_value": f"c_value{{{PREFIX}}} 1\n".encode()}}
    snapshot.record_run("main", "c", duration=0.5, finished=90.0, series=1, failures=["timeout"], results=lines)
    status = snapshot.status("main", "c")
    assert status is not None
    assert status.success is False and status.errors == {"timeout": 1} and status.runs == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.success = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        status.errors["timeout"] = 5  # type: ignore[index]
    snapshot.record_run("main", "c", duration=0.1, finished=95.0, series=1, failures=[], results=lines)
    assert status.errors == {"timeout": 1} and status.success is False  # the copy did not follow
    latest = snapshot.status("main", "c")
    assert latest is not None and latest.success is True and latest.last_success == 95.0 and latest.runs == 2


def test_a_failed_run_without_lines_serves_nothing_and_a_skip_drops_the_lines() -> None:
    snapshot = _snapshot()
    lines = {"": {"c_value": f"c_value{{{PREFIX}}} 1\n".encode()}}
    snapshot.record_run("main", "c", duration=0.1, finished=90.0, series=1, failures=[], results=lines)
    assert "c_value" in _families(snapshot.render(now=100.0))
    snapshot.record_run("main", "c", duration=0.1, finished=91.0, series=0, failures=["query"], results={})
    body = _families(snapshot.render(now=100.0))
    assert "c_value" not in body and "pgvitals_collector_data_age_seconds" not in body
    assert body["pgvitals_collector_last_success_timestamp_seconds"] == [
        f'pgvitals_collector_last_success_timestamp_seconds{{{PREFIX},collector="c"}} 90']
    snapshot.record_run("main", "c", duration=0.1, finished=92.0, series=1, failures=[], results=lines)
    assert snapshot.record_skip("main", "c", "role") is None
    assert snapshot.record_skip("main", "c", "role") == "role"
    body = _families(snapshot.render(now=100.0))
    assert "c_value" not in body
    assert body["pgvitals_collector_skipped"] == [
        f'pgvitals_collector_skipped{{{PREFIX},collector="c",reason="role"}} 1']
    status = snapshot.status("main", "c")
    assert status is not None and status.runs == 3  # a skip found before running is not a run


def test_self_metrics_are_rendered_as_declared() -> None:
    snapshot = _snapshot()
    lines = {"": {"c_value": f"c_value{{{PREFIX}}} 1\n".encode()}}
    snapshot.record_run("main", "c", duration=0.25, finished=90.0, series=1, failures=["timeout"], results=lines)
    snapshot.record_run("main", "c", duration=0.25, finished=91.0, series=1, failures=[], results=lines)
    snapshot.add_target("other", label_text([("target", "other")]))
    snapshot.record_skip("other", "c", "version")
    snapshot.add_target("edge", label_text([("target", "edge")]), is_pgbouncer=True)
    snapshot.set_up("edge", False, "auth")
    snapshot.add_target("full", label_text([("target", "full")]))
    snapshot.set_up("full", False, "too_many_connections")
    assert snapshot.record_denied("other", "d", frozenset({"pg_ls_waldir"}))
    assert not snapshot.record_denied("other", "d", frozenset({"pg_ls_waldir"}))  # no news: not logged again
    assert snapshot.record_databases("main", ["app", "db2"], {"app": "database_unavailable"}) == {
        "app": "database_unavailable"}
    snapshot.record_reload(True, now=50.0)
    snapshot.record_reload(False, now=60.0)
    body = _families(snapshot.render(now=100.0))
    assert body["pgvitals_config_last_reload_successful"] == ["pgvitals_config_last_reload_successful 0"]
    assert body["pgvitals_config_last_reload_success_timestamp_seconds"] == [
        "pgvitals_config_last_reload_success_timestamp_seconds 50"]
    assert body["pg_up_reason"] == ['pg_up_reason{target="full",reason="too_many_connections"} 1']
    assert body["pgvitals_collector_denied"] == [
        'pgvitals_collector_denied{target="other",collector="d",object="pg_ls_waldir"} 1']
    declared = {spec.name: spec for spec in SELF_METRICS}
    assert set(declared) <= set(body)  # this state shows every self-metric
    for name, samples in body.items():
        if name == "c_value":
            continue
        spec = declared[name]
        for sample in samples:
            labels = sample[sample.index("{") + 1:sample.index("}")] if "{" in sample else ""
            names = [pair.partition("=")[0] for pair in labels.split(",") if pair]
            assert names == (["target"] if spec.per_target else []) + list(spec.labels), sample


def test_database_refusals_are_reported_until_the_database_answers_or_goes() -> None:
    snapshot = _snapshot()
    assert snapshot.record_databases("main", ["a", "b"], {"a": "database_unavailable"}) == {"a": "database_unavailable"}
    assert snapshot.record_databases("main", ["a", "b"], {"a": "database_unavailable"}) == {}
    assert "pgvitals_database_unavailable" in _families(snapshot.render(now=1.0))
    assert snapshot.record_databases("main", ["a"], {}) == {"a": None}
    assert "pgvitals_database_unavailable" not in _families(snapshot.render(now=1.0))
    snapshot.record_databases("main", ["c"], {"c": "too_many_connections"})
    snapshot.forget_databases("main", keep=["a"])  # c was dropped: its refusal is no longer news
    assert "pgvitals_database_unavailable" not in _families(snapshot.render(now=1.0))

