"""Pytest plugin for the version matrix: which SQL variant of which collector ran, and how each test ended.

Active only when ``$PGVITALS_MATRIX_RESULTS`` names a directory (scripts/matrix gives each pytest
process its own). It observes the engine without changing what it does: ``Engine._run_one`` is
wrapped to see each run's outcome, ``Collector.variant_for`` to see which variant the run chose.
At the end of the session it writes ``results-<pid>.json`` there; tests/support/variant_coverage.py reads it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ENV = "PGVITALS_MATRIX_RESULTS"
SCHEMA = 1
_MESSAGE_LIMIT = 600
_TESTS_PER_VARIANT = 5  # enough to find the tests that ran a variant, without bloating the file


@dataclass
class VariantRun:
    """Outcomes of one variant of one collector in this process."""

    collector: str
    family: str
    index: int | None  # position in Collector.variants; None for a collector that has only a fetch hook
    min_version: int | None
    max_version: int | None
    version_source: str
    shipped: bool  # the catalog's own declaration, not a collector a test built for itself
    versions: set[int] = field(default_factory=set)  # server or extension versions it was chosen for
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    last_error: str = ""
    tests: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "collector": self.collector, "family": self.family, "index": self.index,
            "min_version": self.min_version, "max_version": self.max_version,
            "version_source": self.version_source, "shipped": self.shipped, "versions": sorted(self.versions),
            "ok": self.ok, "errors": self.errors, "last_error": self.last_error, "tests": self.tests,
        }


@dataclass
class TestResult:
    """The outcome of one test over its setup, call and teardown phases."""

    nodeid: str
    family: str | None
    live: bool
    outcome: str = "passed"  # passed | failed | skipped
    message: str = ""
    duration: float = 0.0


class Recorder:
    """Collects test outcomes and variant runs; writes them as one JSON document."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.lock = threading.Lock()
        self.local = threading.local()
        self.current_test: str | None = None
        self.tests: dict[str, TestResult] = {}
        self.markers: dict[str, tuple[str | None, bool]] = {}
        self.variants: dict[tuple[str, int | None, bool], VariantRun] = {}
        self.servers: dict[int, str] = {}
        self.started = time.time()
        self._undo: list[tuple[Any, str, Any]] = []
        self.recorder_errors: list[str] = []

    # -- observing the engine ------------------------------------------------------------------

    def install(self) -> None:
        """Wrap the engine's run and the collector's variant choice (undone at the end of the session)."""
        from exporter.catalog import Collector
        from exporter.engine import Engine

        recorder = self
        original_variant_for = Collector.variant_for
        original_run_one = Engine._run_one

        def variant_for(collector: Collector, version: int) -> Any:
            variant = original_variant_for(collector, version)
            recorder.local.choice = (version, variant)
            return variant

        def run_one(engine: Engine, runtime: Any, eff: Any, dbname: str | None) -> Any:
            recorder.local.choice = None  # the applicability check before the run also asks variant_for
            try:
                result = original_run_one(engine, runtime, eff, dbname)
            except Exception as exc:
                recorder.safe_note(runtime, eff.collector, exc)
                raise
            if result[2] is None:  # a skip (extension missing, version) did not run any SQL
                recorder.safe_note(runtime, eff.collector, None)
            return result

        for owner, name, replacement in ((Collector, "variant_for", variant_for), (Engine, "_run_one", run_one)):
            self._undo.append((owner, name, getattr(owner, name)))
            setattr(owner, name, replacement)

    def uninstall(self) -> None:
        """Put the engine back as it was."""
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    def safe_note(self, runtime: Any, collector: Any, error: BaseException | None) -> None:
        """Record a run; a bug in the recorder must never change what the engine does."""
        try:
            self.note(runtime, collector, error)
        except Exception as exc:
            self.recorder_errors.append(f"{type(exc).__name__}: {exc}"[:_MESSAGE_LIMIT])

    def note(self, runtime: Any, collector: Any, error: BaseException | None) -> None:
        """Record one run of ``collector`` (on the variant this thread's last variant_for chose)."""
        from exporter.catalog import load
        from exporter.db import classify

        choice = getattr(self.local, "choice", None)
        self.local.choice = None
        facts = runtime.facts
        if choice is not None:
            version, variant = choice
            if variant is None:
                return
            index: int | None = collector.variants.index(variant)
        elif not collector.variants:
            version, variant, index = None, None, None  # a fetch hook without SQL variants
        elif runtime.is_pgbouncer:
            version, variant, index = None, collector.variants[0], 0  # PgBouncer runs the one variant
        else:
            return  # it failed before choosing a variant (e.g. no connection): no variant was exercised
        shipped_collector = load().by_name.get(collector.name)
        if shipped_collector is None:
            shipped = False
        elif index is None:
            shipped = shipped_collector == collector
        else:
            shipped = index < len(shipped_collector.variants) and shipped_collector.variants[index] == variant
        key = (collector.name, index, shipped)
        with self.lock:
            if facts is not None:
                self.servers[facts.version_num] = facts.version
            run = self.variants.get(key)
            if run is None:
                run = self.variants[key] = VariantRun(
                    collector=collector.name, family=collector.family, index=index,
                    min_version=None if variant is None else variant.min_version,
                    max_version=None if variant is None else variant.max_version,
                    version_source=collector.version_source, shipped=shipped,
                )
            if version is not None:
                run.versions.add(version)
            if error is None:
                run.ok += 1
            else:
                reason = classify(error).reason
                run.errors[reason] = run.errors.get(reason, 0) + 1
                run.last_error = f"{reason}: {classify(error)}"[:_MESSAGE_LIMIT]
            test = self.current_test or "(outside a test)"
            if test not in run.tests and len(run.tests) < _TESTS_PER_VARIANT:
                run.tests.append(test)

    # -- observing the tests -------------------------------------------------------------------

    def remember(self, item: pytest.Item) -> None:
        """The family and live markers of a test, for the report of its phases."""
        family = item.get_closest_marker("family")
        name = str(family.args[0]) if family is not None and family.args else None
        self.markers[item.nodeid] = (name, item.get_closest_marker("live") is not None)

    def report(self, report: pytest.TestReport) -> None:
        """Fold one phase's report into the test's result: any failure wins, then a skip."""
        family, live = self.markers.get(report.nodeid, (None, False))
        result = self.tests.setdefault(report.nodeid, TestResult(report.nodeid, family, live))
        result.duration += report.duration
        if report.failed:
            result.outcome = "failed"
            phase = "" if report.when == "call" else f"in {report.when}: "
            result.message = result.message or (phase + _failure_text(report))[:_MESSAGE_LIMIT]
        elif report.skipped and result.outcome != "failed":
            result.outcome = "skipped"
            result.message = _skip_text(report)[:_MESSAGE_LIMIT]

    def collection_error(self, report: pytest.CollectReport) -> None:
        """A module that could not be collected: a failure of its own, without a family."""
        self.tests[report.nodeid or "(collection)"] = TestResult(
            report.nodeid, "collection", True, "failed", _failure_text(report)[:_MESSAGE_LIMIT])

    def write(self, config: pytest.Config, exitstatus: int) -> Path:
        """The session's results as JSON in the results directory."""
        from exporter.catalog import load
        from tests.support.pgbins import selected_major

        try:
            catalog = [
                {"collector": c.name, "family": c.family, "index": i if c.variants else None,
                 "min_version": v.min_version if v else None, "max_version": v.max_version if v else None,
                 "version_source": c.version_source, "target_kind": c.target_kind}
                for c in load().collectors for i, v in (enumerate(c.variants) if c.variants else [(0, None)])
            ]
        except Exception as exc:  # an invalid catalog fails its own tests; the results must still be written
            catalog = []
            self.recorder_errors.append(f"catalog: {exc}"[:_MESSAGE_LIMIT])
        document = {
            "schema": SCHEMA,
            "selected_major": selected_major(),
            "servers": [{"version_num": num, "version": text} for num, text in sorted(self.servers.items())],
            "args": list(config.invocation_params.args),
            "markexpr": config.getoption("markexpr", ""),
            "exitstatus": int(exitstatus),
            "started": dt.datetime.fromtimestamp(self.started, dt.UTC).isoformat(timespec="seconds"),
            "duration_seconds": round(time.time() - self.started, 1),
            "tests": [vars(result) for result in self.tests.values()],
            "variants": [run.as_json() for run in self.variants.values()],
            "catalog": catalog,
            "recorder_errors": self.recorder_errors[:20],
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"results-{os.getpid()}.json"
        path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        return path


def _failure_text(report: pytest.TestReport | pytest.CollectReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    message = getattr(crash, "message", None)
    if message:
        return str(message).strip()
    lines = [line for line in str(report.longrepr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E ")]
    return "\n".join(errors[-5:] or lines[-5:])


def _skip_text(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2])
    return str(report.longrepr or "")


_recorder: Recorder | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _recorder
    out = os.environ.get(ENV)
    if out and _recorder is None:
        _recorder = Recorder(Path(out))
        _recorder.install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    if _recorder is not None:
        _recorder.remember(item)
        _recorder.current_test = item.nodeid
    yield
    if _recorder is not None:
        _recorder.current_test = None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _recorder is not None:
        _recorder.report(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if _recorder is not None and report.failed:
        _recorder.collection_error(report)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _recorder is not None:
        path = _recorder.write(session.config, exitstatus)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"matrix results: {path}")


def pytest_unconfigure(config: pytest.Config) -> None:
    global _recorder
    if _recorder is not None:
        _recorder.uninstall()
        _recorder = None
