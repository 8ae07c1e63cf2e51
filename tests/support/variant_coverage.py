"""The version matrix: which majors CI runs, which versions each collector's variants must cover,
and the version-by-family table and variant coverage built from the plugin's result files.

Used by tests/test_versions.py (no server) and scripts/matrix (after the runs).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.catalog import PG_MAX_SUPPORTED, PG_MIN_SUPPORTED, VERSION_INFINITY, Collector

#: Every major CI tests; 15 runs the whole suite, the others the live family tests.
MATRIX_MAJORS: tuple[int, ...] = (12, 13, 14, 15, 16, 17, 18)
FULL_SUITE_MAJOR = 15
FAMILIES: tuple[str, ...] = ("skeleton", "slow_queries", "locks", "cache_hit", "connections", "pgbouncer",
                             "replication", "wal", "bloat", "vacuum")
UNIT_ROW = "unit (no server)"
NO_FAMILY_ROW = "live, no family marker"
COLLECTION_ROW = "collection"

#: Extension versions each major ships: (oldest that CREATE EXTENSION ... VERSION can install, the default).
#: Checked against the control files and install scripts of the binaries by tests/test_versions.py.
EXTENSION_VERSIONS: Mapping[str, Mapping[int, tuple[str, str]]] = {
    "pg_stat_statements": {12: ("1.4", "1.7"), 13: ("1.4", "1.8"), 14: ("1.4", "1.9"), 15: ("1.4", "1.10"),
                           16: ("1.4", "1.10"), 17: ("1.4", "1.11"), 18: ("1.4", "1.12")},
    "pgstattuple": {major: ("1.4", "1.5") for major in MATRIX_MAJORS},
    "pg_buffercache": {12: ("1.2", "1.3"), 13: ("1.2", "1.3"), 14: ("1.2", "1.3"), 15: ("1.2", "1.3"),
                       16: ("1.2", "1.4"), 17: ("1.2", "1.5"), 18: ("1.2", "1.6")},
}


def version_number(text: str) -> int:
    """``1.10`` -> 110, as the engine compares extension versions."""
    from exporter.db import extension_version_number

    return extension_version_number(text)


def extension_versions(extension: str, major: int) -> list[int]:
    """Every extension version a server of ``major`` can install (oldest to default), as numbers.

    Contrib versions step by one minor (1.4, 1.5, ... 1.12) within major 1.
    """
    low, high = (version_number(v) for v in EXTENSION_VERSIONS[extension][major])
    return list(range(low, high + 1))


def _major_text(version: int) -> str:
    return "∞" if version >= VERSION_INFINITY else f"{version // 10000}"


def describe_range(collector: Collector, min_version: int | None, max_version: int | None) -> str:
    """A variant's range in words: ``[14, 18)`` for servers, ``[1.8, 1.9)`` for extensions."""
    if min_version is None or max_version is None:
        return "fetch hook"
    if collector.target_kind == "pgbouncer":
        return "any PgBouncer"
    if collector.version_source == "server":
        return f"[{_major_text(min_version)}, {_major_text(max_version)})"

    def ext(v: int) -> str:
        return "∞" if v >= VERSION_INFINITY else f"{v // 100}.{v % 100}"

    return f"{collector.version_source} [{ext(min_version)}, {ext(max_version)})"


# -- static checks (no server) ---------------------------------------------------------------------


def server_coverage_problems(collector: Collector, majors: Sequence[int] = MATRIX_MAJORS) -> list[str]:
    """Gaps, overlaps and unexercisable variants of a collector whose variants follow the server version."""
    problems: list[str] = []
    first = max(PG_MIN_SUPPORTED, collector.min_server_version)
    for start in range(first - first % 10000, PG_MAX_SUPPORTED, 10000):
        if start < first:
            continue
        # A whole major (every minor release) must run one variant.
        covering = [i for i, v in enumerate(collector.variants) if v.covers(start) and v.covers(start + 9999)]
        partial = [i for i, v in enumerate(collector.variants)
                   if (v.covers(start) or v.covers(start + 9999)) and i not in covering]
        if len(covering) != 1 or partial:
            what = "no variant" if not covering and not partial else f"variants {sorted(covering + partial)}"
            problems.append(f"{collector.name}: PostgreSQL {start // 10000}: {what} (need exactly one for the "
                            "whole major)")
    problems.extend(_unexercisable(collector, {m: [m * 10000] for m in majors},
                                   lambda v, m: v.min_version < (m + 1) * 10000 and v.max_version > m * 10000))
    return problems


def extension_coverage_problems(collector: Collector, majors: Sequence[int] = MATRIX_MAJORS) -> list[str]:
    """Gaps, overlaps and unexercisable variants of a collector whose variants follow an extension's version."""
    extension = collector.version_source
    if extension not in EXTENSION_VERSIONS:
        return [f"{collector.name}: versions of extension {extension!r} are not in tests/support/variant_coverage.py "
                "EXTENSION_VERSIONS (add what each major ships)"]
    lowest_major = max(majors[0], collector.min_server_version // 10000)
    problems: list[str] = []
    shipped = sorted({v for m in majors if m >= lowest_major for v in extension_versions(extension, m)})
    for version in shipped:
        covering = [i for i, v in enumerate(collector.variants) if v.covers(version)]
        if len(covering) != 1:
            what = "no variant" if not covering else f"variants {covering}"
            problems.append(f"{collector.name}: {extension} {version // 100}.{version % 100}: {what} "
                            "(need exactly one)")
    by_major = {m: extension_versions(extension, m) for m in majors if m >= lowest_major}
    problems.extend(_unexercisable(collector, by_major, lambda v, m: any(v.covers(x) for x in by_major[m])))
    return problems


def _unexercisable(collector: Collector, majors: Mapping[int, list[int]], runs_on: Any) -> list[str]:
    problems = []
    for index, variant in enumerate(collector.variants):
        if not any(runs_on(variant, major) for major in majors):
            problems.append(f"{collector.name}: variant {index} "
                            f"{describe_range(collector, variant.min_version, variant.max_version)} "
                            f"matches no major of the CI matrix {sorted(majors)}: it can never be tested")
    return problems


def coverage_problems(collector: Collector, majors: Sequence[int] = MATRIX_MAJORS) -> list[str]:
    """Every version-coverage problem of one collector (PgBouncer collectors have no server versions)."""
    if collector.target_kind != "postgres" or not collector.variants:
        return []
    if collector.version_source == "server":
        return server_coverage_problems(collector, majors)
    return extension_coverage_problems(collector, majors)


# -- results of a matrix run -----------------------------------------------------------------------


@dataclass
class MajorRun:
    """One pytest process of the matrix: its major, how it ended, and the plugin's results."""

    major: int
    command: str
    returncode: int | None  # None: not run
    timed_out: bool = False
    seconds: float = 0.0
    documents: list[dict[str, Any]] = field(default_factory=list)
    log: Path | None = None
    binaries: str = ""  # where the server binaries came from, with their exact version
    pgbouncer: str = ""  # the PgBouncer the run's tests started (version and origin)

    @property
    def tests(self) -> list[dict[str, Any]]:
        return [t for doc in self.documents for t in doc.get("tests", [])]

    @property
    def server_versions(self) -> list[str]:
        """Versions of this major's servers the engine met (tests also start other majors now and then)."""
        return sorted({s["version"] for doc in self.documents for s in doc.get("servers", [])
                       if s["version_num"] // 10000 == self.major})

    def status(self) -> tuple[bool, str]:
        """(ok, words) for the run as a whole; cell failures are counted separately."""
        if self.returncode is None:
            return False, "not run"
        if self.timed_out:
            return False, f"TIMEOUT after {self.seconds:.0f} s"
        if not self.documents:
            return False, f"no results (exit {self.returncode}: setup, lint or type check failed?)"
        # pytest: 0 all passed, 1 some tests failed (shown in the cells), 5 no tests collected.
        if self.returncode in (0, 1, 5):
            return True, "no tests" if self.returncode == 5 else "ok"
        return False, f"pytest exit {self.returncode}"


def read_documents(directory: Path) -> list[dict[str, Any]]:
    """The plugin's result files in ``directory``."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("results-*.json"))]


def row_of(test: Mapping[str, Any]) -> str:
    """The table row a test belongs to."""
    if test.get("family"):
        return str(test["family"])
    return NO_FAMILY_ROW if test.get("live") else UNIT_ROW


@dataclass
class Cell:
    """Test outcomes of one family on one major."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def text(self) -> str:
        if not (self.passed or self.failed or self.skipped):
            return "—"
        parts = [f"{self.passed} passed"]
        if self.failed:
            parts.append(f"**{self.failed} failed**")
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        return ", ".join(parts)


def cells(runs: Iterable[MajorRun]) -> dict[str, dict[int, Cell]]:
    """Row -> major -> cell."""
    table: dict[str, dict[int, Cell]] = defaultdict(dict)
    for run in runs:
        for test in run.tests:
            cell = table[row_of(test)].setdefault(run.major, Cell())
            outcome = test["outcome"]
            if outcome == "passed":
                cell.passed += 1
            elif outcome == "skipped":
                cell.skipped += 1
            else:
                cell.failed += 1
                cell.failures.append((test["nodeid"], test.get("message", "")))
    return table


def ordered_rows(table: Mapping[str, object]) -> list[str]:
    """Families in their usual order, then any other family, then unit tests and problems."""
    extra = sorted(r for r in table if r not in FAMILIES and r not in (UNIT_ROW, NO_FAMILY_ROW, COLLECTION_ROW))
    tail = [r for r in (UNIT_ROW, NO_FAMILY_ROW, COLLECTION_ROW) if r in table]
    return [*FAMILIES, *extra, *tail]


def render_table(runs: Sequence[MajorRun]) -> str:
    """The version-by-family table in Markdown (rows: families; columns: majors)."""
    table = cells(runs)
    majors = [run.major for run in runs]
    header = ["family", *[f"{run.major}" for run in runs]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    status = []
    for run in runs:
        ok, words = run.status()
        status.append(words if ok else f"**{words}**")
    lines.append("| (run) | " + " | ".join(status) + " |")
    for row in ordered_rows(table):
        lines.append(f"| {row} | " + " | ".join(table.get(row, {}).get(m, Cell()).text() for m in majors) + " |")
    return "\n".join(lines)


def failing_cells(runs: Sequence[MajorRun]) -> list[str]:
    """Every failed test (and failed run), one line each, for the end of the report."""
    out = []
    for run in runs:
        ok, words = run.status()
        if not ok:
            out.append(f"PostgreSQL {run.major}: run {words}" + (f" (log: {run.log})" if run.log else ""))
    table = cells(runs)
    for row in ordered_rows(table):
        for major, cell in sorted(table.get(row, {}).items()):
            for nodeid, message in cell.failures:
                first = message.strip().splitlines()[0] if message.strip() else "(no message)"
                out.append(f"PostgreSQL {major} / {row}: {nodeid}: {first}")
    return out


def skipped_tests(runs: Sequence[MajorRun]) -> list[str]:
    """Each skipped test with the majors it was skipped on and its reason, for a reviewer to judge."""
    where: dict[str, list[int]] = defaultdict(list)
    reason: dict[str, str] = {}
    for run in runs:
        for test in run.tests:
            if test["outcome"] == "skipped":
                where[test["nodeid"]].append(run.major)
                reason.setdefault(test["nodeid"], str(test.get("message", "")).removeprefix("Skipped: ").strip())
    return [f"`{nodeid}` on {', '.join(map(str, majors))}: {reason[nodeid]}" for nodeid, majors in where.items()]


# -- variant coverage ------------------------------------------------------------------------------

VariantKey = tuple[str, int | None]
#: Errors that mean the variant's SQL (or its hooks) is wrong for the server it ran on; connection
#: failures, timeouts and lock timeouts are what tests provoke on purpose.
SQL_ERROR_REASONS = frozenset({"missing_object", "query", "internal"})


@dataclass
class VariantReport:
    """Where one shipped variant ran: successful runs and errors per major."""

    collector: str
    index: int | None
    described: str
    ok: dict[int, int] = field(default_factory=dict)
    errors: dict[int, dict[str, int]] = field(default_factory=dict)
    last_error: dict[int, str] = field(default_factory=dict)
    tests: dict[int, list[str]] = field(default_factory=dict)
    versions: set[int] = field(default_factory=set)


def variant_reports(catalog: Sequence[Collector], runs: Iterable[MajorRun]) -> dict[VariantKey, VariantReport]:
    """Every shipped variant, with what the runs recorded about it."""
    reports: dict[VariantKey, VariantReport] = {}
    for collector in catalog:
        indexes: list[int | None] = list(range(len(collector.variants))) if collector.variants else [None]
        for index in indexes:
            variant = collector.variants[index] if index is not None else None
            reports[(collector.name, index)] = VariantReport(
                collector.name, index, describe_range(collector, variant and variant.min_version,
                                                      variant and variant.max_version))
    for run in runs:
        for doc in run.documents:
            for rec in doc.get("variants", []):
                report = reports.get((rec["collector"], rec["index"]))
                if report is None or not rec["shipped"]:
                    continue
                report.versions.update(rec["versions"])
                if rec["ok"]:
                    report.ok[run.major] = report.ok.get(run.major, 0) + rec["ok"]
                for reason, count in rec["errors"].items():
                    per = report.errors.setdefault(run.major, {})
                    per[reason] = per.get(reason, 0) + count
                    report.last_error[run.major] = rec["last_error"]
                report.tests.setdefault(run.major, []).extend(rec["tests"])
    return reports


def never_exercised(reports: Mapping[VariantKey, VariantReport]) -> list[str]:
    """Shipped variants that no run executed successfully."""
    out = []
    for report in reports.values():
        if report.ok:
            continue
        label = "fetch hook" if report.index is None else f"variant {report.index} {report.described}"
        tried = "; ".join(f"on {m}: {report.last_error.get(m, '')}" for m in sorted(report.errors))
        out.append(f"{report.collector} {label}: never ran successfully" + (f" (failed {tried})" if tried else ""))
    return out


def sql_errors(reports: Mapping[VariantKey, VariantReport]) -> list[str]:
    """Shipped variants whose SQL failed on a server of a version they are declared for."""
    out = []
    for report in reports.values():
        for major, reasons in sorted(report.errors.items()):
            bad = {r: n for r, n in reasons.items() if r in SQL_ERROR_REASONS}
            if bad:
                label = "fetch hook" if report.index is None else f"variant {report.index} {report.described}"
                tests = ", ".join(sorted(set(report.tests.get(major, [])))[:3])
                out.append(f"{report.collector} {label} on {major}: {sum(bad.values())} failed run(s): "
                           f"{report.last_error.get(major, '')} (during {tests})")
    return out


def applies(collector: Collector, index: int | None, major: int) -> bool:
    """Whether the variant is the one a server of ``major`` (with any extension version it ships) would run."""
    if collector.target_kind != "postgres" or index is None:
        return True
    variant = collector.variants[index]
    if (major + 1) * 10000 <= collector.min_server_version:
        return False
    if collector.version_source == "server":
        return variant.min_version < (major + 1) * 10000 and variant.max_version > major * 10000
    if collector.version_source not in EXTENSION_VERSIONS:
        return True
    return any(variant.covers(v) for v in extension_versions(collector.version_source, major))


def render_variants(reports: Mapping[VariantKey, VariantReport], majors: Sequence[int],
                    catalog: Sequence[Collector]) -> str:
    """Markdown: each shipped variant and, per major, ✓ ran, ✗ SQL error, blank did not run, · does not apply."""
    by_name = {c.name: c for c in catalog}
    header = ["collector", "variant", *[str(m) for m in majors]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (name, index), report in sorted(reports.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        marks = []
        for major in majors:
            bad = any(r in SQL_ERROR_REASONS for r in report.errors.get(major, {}))
            ran = "✓" if report.ok.get(major) else "" if applies(by_name[name], index, major) else "·"
            marks.append("✗" if bad else ran)
        label = report.described if index is None else f"{index}: {report.described}"
        lines.append(f"| {name} | {label} | " + " | ".join(marks) + " |")
    return "\n".join(lines)
