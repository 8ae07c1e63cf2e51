"""Version coverage without a server: every collector's variants cover PostgreSQL 12-18 exactly once,
every variant can be exercised by a major of the CI matrix, and the matrix report says what happened."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exporter.catalog import PG_MAX_SUPPORTED, PG_MIN_SUPPORTED, Collector, MetricSpec, SqlVariant, load
from tests.support.embedded import CACHE
from tests.support.variant_coverage import (
    EXTENSION_VERSIONS,
    FULL_SUITE_MAJOR,
    MATRIX_MAJORS,
    UNIT_ROW,
    MajorRun,
    cells,
    coverage_problems,
    extension_versions,
    failing_cells,
    never_exercised,
    render_table,
    render_variants,
    skipped_tests,
    sql_errors,
    variant_reports,
)

POSTGRES_COLLECTORS = [c for c in load().collectors if c.target_kind == "postgres"]


def _collector(*variants: SqlVariant, **fields: object) -> Collector:
    return Collector(name="probe_me", family="f", help="h", variants=variants,  # type: ignore[arg-type]
                     metrics=(MetricSpec("probe_me_value", "gauge", "h", value="v"),), **fields)


def test_the_matrix_is_every_supported_major() -> None:
    assert range(PG_MIN_SUPPORTED // 10000, PG_MAX_SUPPORTED // 10000) == range(MATRIX_MAJORS[0], MATRIX_MAJORS[-1] + 1)
    assert list(MATRIX_MAJORS) == sorted(set(MATRIX_MAJORS))
    assert FULL_SUITE_MAJOR in MATRIX_MAJORS


@pytest.mark.parametrize("collector", POSTGRES_COLLECTORS, ids=lambda c: c.name)
def test_variants_cover_every_major_once_and_each_can_be_exercised(collector: Collector) -> None:
    assert coverage_problems(collector) == []


@pytest.mark.parametrize(("variants", "fields", "expected"), [
    # A gap: nothing for 14.
    ((SqlVariant("a", 120000, 140000), SqlVariant("b", 150000)), {}, [r"PostgreSQL 14: no variant"]),
    # Overlap (the catalog loader rejects it too, but the checker must not rely on that).
    ((SqlVariant("a", 120000, 150000), SqlVariant("b", 140000)), {}, [r"PostgreSQL 14: variants \[0, 1\]"]),
    # A boundary inside a major: 16.0-16.4 and 16.5+ would run different SQL.
    ((SqlVariant("a", 120000, 160005), SqlVariant("b", 160005)), {}, [r"PostgreSQL 16: variants \[0, 1\]"]),
    # Nothing for 18 and later.
    ((SqlVariant("a", 120000, 180000),), {}, [r"PostgreSQL 18: no variant"]),
    # A variant for servers older than the matrix can never be tested.
    ((SqlVariant("a", 100000, 120000), SqlVariant("b", 120000)), {}, [r"variant 0 \[10, 12\).*never be tested"]),
    # Starts later with min_server_version: fine from there on, but not with a gap after it.
    ((SqlVariant("a", 160000, 180000), SqlVariant("b", 180000)), {"min_server_version": 160000}, []),
    ((SqlVariant("a", 160000, 170000), SqlVariant("b", 180000)), {"min_server_version": 160000},
     [r"PostgreSQL 17: no variant"]),
    ((SqlVariant("a", 170000),), {"min_server_version": 160000}, [r"PostgreSQL 16: no variant"]),
])
def test_the_server_version_check_finds_gaps_overlaps_and_dead_variants(
        variants: tuple[SqlVariant, ...], fields: dict[str, object], expected: list[str]) -> None:
    problems = coverage_problems(_collector(*variants, **fields))
    assert len(problems) == len(expected), problems
    for pattern, problem in zip(expected, problems, strict=True):
        assert re.search(pattern, problem), problem


@pytest.mark.parametrize(("variants", "expected"), [
    ((SqlVariant("a", 104, 108), SqlVariant("b", 108, 111), SqlVariant("c", 111)), []),
    ((SqlVariant("a", 107, 108), SqlVariant("b", 108)), [r"pg_stat_statements 1.4: no variant",
                                                         r"pg_stat_statements 1.5: no variant",
                                                         r"pg_stat_statements 1.6: no variant"]),
    ((SqlVariant("a", 104, 112),), [r"pg_stat_statements 1.12: no variant"]),
    ((SqlVariant("a", 100, 104), SqlVariant("b", 104)), [r"variant 0 .*\[1.0, 1.4\).*never be tested"]),
])
def test_the_extension_version_check_covers_what_the_majors_ship(
        variants: tuple[SqlVariant, ...], expected: list[str]) -> None:
    collector = _collector(*variants, extension="pg_stat_statements", version_source="pg_stat_statements")
    problems = coverage_problems(collector)
    assert len(problems) == len(expected), problems
    for pattern, problem in zip(expected, problems, strict=True):
        assert re.search(pattern, problem), problem


def test_an_extension_without_known_versions_is_reported() -> None:
    collector = _collector(SqlVariant("a", 100), extension="pg_foo", version_source="pg_foo")
    assert "not in tests/support/variant_coverage.py" in coverage_problems(collector)[0]


def _extension_dirs() -> dict[int, Path]:
    """Extension script directories of the majors whose binaries are on this machine (no download)."""
    found = {}
    for major in MATRIX_MAJORS:
        for candidate in (Path(f"/usr/share/postgresql/{major}/extension"),
                          CACHE / str(major) / "native" / "share" / "postgresql" / "extension"):
            if (candidate / "plpgsql.control").exists():
                found[major] = candidate
                break
    return found


def test_extension_version_table_matches_the_shipped_scripts() -> None:
    dirs = _extension_dirs()
    assert FULL_SUITE_MAJOR in dirs, "PostgreSQL 15 server binaries are needed (scripts/setup installs them)"
    for extension, per_major in EXTENSION_VERSIONS.items():
        for major, directory in dirs.items():
            control = (directory / f"{extension}.control").read_text()
            default = re.search(r"default_version\s*=\s*'([^']+)'", control)
            assert default is not None
            bases = [m.group(1) for p in directory.glob(f"{extension}--*.sql")
                     if (m := re.fullmatch(rf"{re.escape(extension)}--([\d.]+)\.sql", p.name))]
            oldest = min(bases, key=lambda v: tuple(int(n) for n in v.split(".")))
            assert per_major[major] == (oldest, default.group(1)), f"{extension} on {major}"
            assert extension_versions(extension, major)[-1] % 100 == int(default.group(1).split(".")[1])


# -- the matrix report -------------------------------------------------------------------------------


def _doc(tests: list[dict[str, object]], variants: list[dict[str, object]] | None = None) -> dict[str, object]:
    return {"tests": tests, "variants": variants or [], "servers": [{"version_num": 120022, "version": "12.22"}]}


def _test(nodeid: str, outcome: str, family: str | None = "locks", live: bool = True) -> dict[str, object]:
    return {"nodeid": nodeid, "family": family, "live": live, "outcome": outcome, "message": f"{outcome} here"}


def test_cells_count_outcomes_per_family_and_major() -> None:
    runs = [
        MajorRun(12, "pytest", 1, documents=[_doc([_test("a", "passed"), _test("b", "failed"),
                                                  _test("c", "skipped"), _test("u", "passed", None, False)])]),
        MajorRun(13, "pytest", 0, documents=[_doc([_test("a", "passed")])]),
    ]
    table = cells(runs)
    assert (table["locks"][12].passed, table["locks"][12].failed, table["locks"][12].skipped) == (1, 1, 1)
    assert table[UNIT_ROW][12].passed == 1
    assert table["locks"][13].text() == "1 passed"
    rendered = render_table(runs)
    assert "| locks | 1 passed, **1 failed**, 1 skipped | 1 passed |" in rendered
    assert "| slow_queries | — | — |" in rendered
    assert failing_cells(runs) == ["PostgreSQL 12 / locks: b: failed here"]
    assert skipped_tests(runs) == ["`c` on 12: skipped here"]


def test_run_status_no_tests_is_not_a_failure_but_crashes_and_timeouts_are() -> None:
    assert MajorRun(14, "pytest", 5, documents=[_doc([])]).status() == (True, "no tests")
    assert MajorRun(14, "pytest", 1, documents=[_doc([])]).status() == (True, "ok")
    assert MajorRun(14, "pytest", 2, documents=[_doc([])]).status() == (False, "pytest exit 2")
    assert not MajorRun(14, "pytest", 0, documents=[]).status()[0]  # scripts/test stopped before pytest
    assert MajorRun(14, "pytest", -2, timed_out=True, seconds=900, documents=[_doc([])]).status() == (
        False, "TIMEOUT after 900 s")
    assert MajorRun(14, "pytest", None).status() == (False, "not run")


def test_variant_coverage_lists_what_never_ran_and_sql_errors() -> None:
    old = SqlVariant("old", 120000, 160000)
    new = SqlVariant("new", 160000)
    collector = _collector(old, new)

    def record(index: int, ok: int, errors: dict[str, int], shipped: bool = True) -> dict[str, object]:
        return {"collector": "probe_me", "index": index, "shipped": shipped, "versions": [120022], "ok": ok,
                "errors": errors, "last_error": "missing_object: column x does not exist", "tests": ["t"]}

    runs = [MajorRun(12, "pytest", 0, documents=[_doc([], [record(0, 3, {"connection": 1}),
                                                          record(1, 5, {}, shipped=False)])]),
            MajorRun(16, "pytest", 0, documents=[_doc([], [record(1, 0, {"missing_object": 2})])])]
    reports = variant_reports([collector], runs)
    assert reports[("probe_me", 0)].ok == {12: 3}
    missing = never_exercised(reports)
    assert len(missing) == 1 and missing[0].startswith("probe_me variant 1 [16, ∞): never ran successfully")
    assert "column x does not exist" in missing[0]
    errors = sql_errors(reports)
    assert len(errors) == 1 and "on 16: 2 failed run(s)" in errors[0]  # connection errors are not SQL errors
    table = render_variants(reports, [12, 16], [collector])
    assert "| probe_me | 0: [12, 16) | ✓ | · |" in table  # ran on 12; 16 runs the other variant
    assert "| probe_me | 1: [16, ∞) | · | ✗ |" in table
