"""User-declared collectors: postgres_exporter's queries.yaml files and our native ``custom_collectors``.

Both become ordinary catalog collectors, so their SQL runs exactly like built-in SQL (read-only guarded
transaction, statement and lock timeouts, the target's bounded connections, a series cap). The running
exporter's catalog is :func:`build_catalog`: the built-in one plus these, passed to engine and snapshot.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from exporter.catalog import (
    VERSION_INFINITY,
    Catalog,
    CatalogError,
    Collector,
    MetricKind,
    MetricSpec,
    Row,
    Rows,
    ShadowedMetric,
    SqlVariant,
    metric_problems,
    variant_problems,
)
from exporter.compat import exported_owners
from exporter.config import (
    ConfigError,
    CustomCollectorConfig,
    Loc,
    Problem,
    QueriesFileConfig,
    Settings,
    _line,
    _read_yaml,
    _report,
    _yaml_path,
)
from exporter.db import Session
from exporter.exposition import label_value
from exporter.hooks import RunContext

log = logging.getLogger("pgvitals.custom")

#: Column usages of postgres_exporter's queries.yaml (HISTOGRAM too: its own example file uses it).
USAGES = ("DISCARD", "LABEL", "COUNTER", "GAUGE", "MAPPEDMETRIC", "DURATION", "HISTOGRAM")
_QUERY_KEYS = frozenset({"query", "metrics", "master", "cache_seconds", "runonserver"})
_COLUMN_KEYS = frozenset({"usage", "description", "metric_mapping", "pg_version"})
QUERIES_PREFIX = "queries:"  # collector names of queries-file namespaces (they may equal a built-in's name)


@dataclass(frozen=True)
class _Column:
    """One entry of a query's ``metrics`` list."""

    name: str
    usage: str
    description: str
    mapping: Mapping[str, float] | None = None


# -- postgres_exporter's value rules ------------------------------------------------------------------


def pe_value(value: Any) -> float | None:
    """A column as postgres_exporter reads a value: NULL is NaN, times are Unix seconds; None when unparseable."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float | Decimal):
        return float(value)
    if isinstance(value, datetime | date):
        return float(math.floor(_epoch(value)))  # Go's time.Unix(): whole seconds
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def pe_label(value: Any) -> str:
    """A column as postgres_exporter writes a label value: NULL is empty, times are Unix seconds."""
    if isinstance(value, datetime | date):
        return str(math.floor(_epoch(value)))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float):
        return go_float(value)
    return label_value(value)


def _epoch(value: datetime | date) -> float:
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day, tzinfo=UTC)
    elif value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # lib/pq reads a timestamp without time zone as UTC
    return value.timestamp()


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNIT_NS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}


def pe_duration_ms(value: Any) -> float | None:
    """A DURATION column in whole milliseconds: Go duration text ("1h2m3.5s"); -1 and anything else: None."""
    if isinstance(value, timedelta):  # an interval column (postgres_exporter reads only Go duration text)
        return float(int(value / timedelta(milliseconds=1)))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or value == "-1":
        return None
    text = value.strip()
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    if text == "0":
        return 0.0
    parts = _GO_DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    nanoseconds = sum(float(number) * _GO_UNIT_NS[unit] for number, unit in parts)
    return float(sign * int(nanoseconds // 1e6))  # Go: Duration / time.Millisecond, an integer division


def go_float(value: float) -> str:
    """A float as Go's strconv 'g' shortest form writes it (how client_golang writes ``le``)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits))
    exp10 = len(text) + exponent - 1
    prefix = "-" if sign else ""
    if exp10 < -4 or exp10 >= 6:  # strconv 'g' with the shortest precision switches to %e at these exponents
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{prefix}{mantissa}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    return prefix + format(Decimal(repr(abs(value))).normalize(), "f")


# -- queries.yaml ---------------------------------------------------------------------------------------


def parse_semver_range(text: str) -> list[tuple[int, int]] | str:
    """postgres_exporter's ``runonserver`` (">=10.0.0 <13.0.0 || >=15.0.0") as server_version_num ranges.

    Returns the ``[min, max)`` ranges, or a message saying what is wrong.
    """
    ranges: list[tuple[int, int]] = []
    for alternative in text.split("||"):
        low, high = 0, VERSION_INFINITY
        comparators = alternative.split()
        if not comparators:
            return f"empty range in {text!r}"
        for comparator in comparators:
            match = re.fullmatch(r"(>=|<=|>|<|==|=)?v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", comparator)
            if match is None:
                return f"cannot read {comparator!r} (expected comparisons such as >=10.0.0 <16.0.0)"
            operator = match.group(1) or "="
            major, minor, patch = (int(match.group(i) or 0) for i in (2, 3, 4))
            # PostgreSQL 10+ reads as major.minor.0 (15.4 -> 150004); before 10 as major.minor.patch.
            number = major * 10000 + minor if major >= 10 else major * 10000 + minor * 100 + patch
            if operator in (">=", "=", "=="):
                low = max(low, number)
            if operator == ">":
                low = max(low, number + 1)
            if operator == "<":
                high = min(high, number)
            if operator in ("<=", "=", "=="):
                high = min(high, number + 1)
        ranges.append((low, high))
    return ranges


def _file_problem(entry: int, file: Path, inner: Loc, message: str, lines: Mapping[Loc, int]) -> Problem:
    line = _line(inner, lines)
    where = f"{_yaml_path(inner)}{'' if line is None else f' (line {line})'}"
    return ("queries_files", entry, "path"), f"{file}: {where}: {message}"


def read_queries_file(entry: int, source: QueriesFileConfig) -> tuple[list[Collector], list[Problem]]:
    """The collectors of one queries file and the problems found in it (file and path inside it named)."""
    try:
        data, lines = _read_yaml(source.path)
    except ConfigError as error:
        return [], [(("queries_files", entry, "path"), problem) for problem in error.problems]
    if not isinstance(data, dict) or not data:
        return [], [_file_problem(entry, source.path, (), "expected a mapping of namespace: {query, metrics}", lines)]
    collectors: list[Collector] = []
    problems: list[Problem] = []

    def problem(inner: Loc, message: str) -> None:
        problems.append(_file_problem(entry, source.path, inner, message, lines))

    for namespace, spec in data.items():
        at: Loc = (str(namespace),)
        if not isinstance(spec, dict):
            problem(at, "expected a mapping with query and metrics")
            continue
        for key in sorted(set(spec) - _QUERY_KEYS):
            problem((*at, str(key)), f"unknown key (known: {', '.join(sorted(_QUERY_KEYS))})")
        query = spec.get("query")
        if not isinstance(query, str) or not query.strip():
            problem((*at, "query"), "missing: the SQL to run")
        cache_seconds = spec.get("cache_seconds", 0)
        if not isinstance(cache_seconds, int) or isinstance(cache_seconds, bool) or cache_seconds < 0:
            problem((*at, "cache_seconds"), "expected a whole number of seconds >= 0")
            cache_seconds = 0
        if not isinstance(spec.get("master", False), bool):
            problem((*at, "master"), "expected true or false")
        ranges: list[tuple[int, int]] = [(0, VERSION_INFINITY)]
        runonserver = spec.get("runonserver")
        if runonserver is not None:
            parsed = parse_semver_range(str(runonserver))
            if isinstance(parsed, str):
                problem((*at, "runonserver"), parsed)
            else:
                ranges = parsed
        columns = _columns(spec.get("metrics"), at, problem)
        if columns is None or not isinstance(query, str) or not query.strip():
            continue
        if (why := statement_problem(query)) is not None:
            problem((*at, "query"), why)
        collector = _queries_collector(str(namespace), query, columns, ranges, cache_seconds, source)
        for message in variant_problems(collector.variants):
            problem((*at, "runonserver"), message)
        for column, metric in _column_metrics(collector, columns):
            for message in metric_problems(metric, compat=True):
                problem((*at, "metrics", column), message)
        collectors.append(collector)
    return collectors, problems


def _columns(raw: Any, at: Loc, problem: Callable[[Loc, str], None]) -> list[_Column] | None:
    """The ``metrics`` list of one query, or None when it is unusable."""
    if not isinstance(raw, list) or not raw:
        problem((*at, "metrics"), "expected a list of column: {usage, description} entries")
        return None
    columns: list[_Column] = []
    usable = True
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not item:
            problem((*at, "metrics", index), "expected column: {usage, description}")
            usable = False
            continue
        for name, options in item.items():
            where = (*at, "metrics", index, str(name))
            if not isinstance(options, dict):
                problem(where, "expected a mapping with usage and description")
                usable = False
                continue
            for key in sorted(set(options) - _COLUMN_KEYS):
                problem((*where, str(key)), f"unknown key (known: {', '.join(sorted(_COLUMN_KEYS))})")
                usable = False
            usage = options.get("usage")
            if usage not in USAGES:
                problem((*where, "usage"), f"expected one of {', '.join(USAGES)}, got {usage!r}")
                usable = False
                continue
            mapping = options.get("metric_mapping")
            if mapping is not None and not (isinstance(mapping, dict) and all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in mapping.values())):
                problem((*where, "metric_mapping"), "expected a mapping of text value: number")
                usable = False
                continue
            description = options.get("description")
            columns.append(_Column(str(name), usage, "" if description is None else str(description),
                                   None if mapping is None else {str(k): float(v) for k, v in mapping.items()}))
    return columns if usable else None


def _column_metrics(collector: Collector, columns: Sequence[_Column]) -> list[tuple[str, MetricSpec]]:
    """Each metric of a queries-file collector with the column it comes from (for error paths)."""
    by_name = {spec.name: spec for spec in collector.metrics}
    namespace = collector.name.removeprefix(QUERIES_PREFIX)
    out = []
    for column in columns:
        for name in pe_metric_names(namespace, column.name, column.usage):
            out.append((column.name, by_name[name]))
    return out


def pe_metric_names(namespace: str, column: str, usage: str) -> tuple[str, ...]:
    """The names postgres_exporter gives a column's metric: ``namespace_column`` (DURATION: ``_milliseconds``)."""
    base = f"{namespace}_{column}"
    if usage in ("DISCARD", "LABEL"):
        return ()
    if usage == "DURATION":
        return (f"{base}_milliseconds",)
    if usage == "HISTOGRAM":
        return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
    return (base,)


def _queries_collector(namespace: str, query: str, columns: Sequence[_Column], ranges: Sequence[tuple[int, int]],
                       cache_seconds: int, source: QueriesFileConfig) -> Collector:
    labels = tuple(c.name for c in columns if c.usage == "LABEL")
    metrics: list[MetricSpec] = []
    for column in columns:
        help_text = column.description.strip() or f"Column {column.name} of {namespace} (no description given)"
        names = pe_metric_names(namespace, column.name, column.usage)
        if column.usage == "HISTOGRAM":
            bucket, total, count = names
            metrics += [
                MetricSpec(bucket, "counter", help_text, f"{column.name}_bucket", (*labels, "le")),
                MetricSpec(total, "counter", help_text, f"{column.name}_sum", labels),
                MetricSpec(count, "counter", help_text, f"{column.name}_count", labels),
            ]
        elif names:
            kind: MetricKind = "counter" if column.usage == "COUNTER" else "gauge"
            unit = "milliseconds" if column.usage == "DURATION" else ""
            metrics.append(MetricSpec(names[0], kind, help_text, column.name, labels, unit))
    # cache_seconds says how long a result may be reused: a longer one is the query's interval.
    interval = max(source.interval, float(cache_seconds))
    return Collector(
        name=f"{QUERIES_PREFIX}{namespace}", family="custom", help=f"{namespace} from {source.path.name}",
        metrics=tuple(metrics), variants=tuple(SqlVariant(query, low, high) for low, high in ranges),
        interval=interval, timeout=source.timeout, scope="server", role="any", max_series=source.max_series,
        fetch=fetch_one_statement, transform=_pe_transform(tuple(columns)), origin=f"{source.path}: {namespace}",
        compat_names=True,
    )


def _pe_transform(columns: tuple[_Column, ...]) -> Callable[[Rows, RunContext], Rows]:
    """Rows as postgres_exporter reads them: its label and value rules, histograms as ``_bucket`` rows."""
    labels = [c.name for c in columns if c.usage == "LABEL"]
    values = [c for c in columns if c.usage in ("COUNTER", "GAUGE", "MAPPEDMETRIC", "DURATION")]
    histograms = [c.name for c in columns if c.usage == "HISTOGRAM"]

    def transform(rows: Rows, _ctx: RunContext) -> Rows:
        out: Rows = []
        for row in rows:
            converted: Row = {name: pe_label(row.get(name)) for name in labels}
            for column in values:
                if column.name in row:
                    converted[column.name] = _pe_column_value(column, row[column.name])
            out.append(converted)
            for name in histograms:
                out.extend(_histogram_rows(name, row, converted, labels))
        return out

    return transform


def _pe_column_value(column: _Column, raw: Any) -> float | None:
    if column.usage == "DURATION":
        return pe_duration_ms(raw)
    if column.usage == "MAPPEDMETRIC":
        # postgres_exporter ignores metric_mapping in user files (no sample at all); we apply it when given.
        text = raw.decode() if isinstance(raw, bytes) else raw
        return column.mapping.get(text) if column.mapping and isinstance(text, str) else None
    return pe_value(raw)


def _histogram_rows(name: str, row: Row, converted: Row, labels: Sequence[str]) -> Rows:
    """A histogram column as client_golang writes it: a row per bucket, ``+Inf`` holding the count."""
    bounds, counts = row.get(name), row.get(f"{name}_bucket")
    total, count = pe_value(row.get(f"{name}_sum")), pe_value(row.get(f"{name}_count"))
    if not isinstance(bounds, list) or not isinstance(counts, list) or total is None or count is None:
        return []  # postgres_exporter skips the histogram of such a row too
    converted[f"{name}_sum"] = total
    converted[f"{name}_count"] = count
    own = {label: converted[label] for label in labels}
    rows = [{**own, "le": go_float(float(bound)), f"{name}_bucket": float(value)}
            for bound, value in zip(bounds, counts, strict=False)]
    rows.append({**own, "le": "+Inf", f"{name}_bucket": count})
    return rows


# -- native declarations --------------------------------------------------------------------------------


def native_collector(index: int, declared: CustomCollectorConfig) -> tuple[Collector, list[Problem]]:
    """One ``custom_collectors`` entry as a catalog collector, with the catalog rules it breaks."""
    at: Loc = ("custom_collectors", index)
    problems: list[Problem] = []
    metrics = []
    for position, metric in enumerate(declared.metrics):
        labels = tuple(metric.labels)
        if declared.scope == "database" and "datname" not in labels:
            labels = (*labels, "datname")  # each database's series apart (the engine fills datname)
        spec = MetricSpec(metric.name, metric.kind, metric.help, metric.value, labels, metric.unit, metric.scale)
        problems += [((*at, "metrics", position, "name"), message) for message in metric_problems(spec)]
        metrics.append(spec)
    variants = ((SqlVariant(declared.sql),) if declared.sql is not None else
                tuple(SqlVariant(v.sql, v.min_version, v.max_version) for v in declared.variants))
    problems += [((*at, "variants"), message) for message in variant_problems(variants)]
    if declared.sql is not None and (why := statement_problem(declared.sql)) is not None:
        problems.append(((*at, "sql"), why))
    for position, variant in enumerate(declared.variants):
        if (why := statement_problem(variant.sql)) is not None:
            problems.append(((*at, "variants", position, "sql"), why))
    collector = Collector(
        name=declared.name, family="custom", help=declared.help or f"Custom collector {declared.name}.",
        metrics=tuple(metrics), variants=variants, interval=declared.interval, timeout=declared.timeout,
        scope=declared.scope, role=declared.role, max_series=declared.max_series, enabled=declared.enabled,
        fetch=fetch_one_statement, origin=_yaml_path(at),
    )
    return collector, problems


# -- the catalog ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Declared:
    """A user collector with the YAML path of each of its metrics (for clash reports)."""

    collector: Collector
    loc: Loc  # where its name is given: the entry's `name`, or the queries file's entry
    metric_locs: Mapping[str, Loc]


def _declared(settings: Settings) -> tuple[list[_Declared], list[Problem]]:
    declared: list[_Declared] = []
    problems: list[Problem] = []
    for index, source in enumerate(settings.queries_files):
        collectors, found = read_queries_file(index, source)
        problems += found
        for collector in collectors:
            at: Loc = ("queries_files", index, "path")
            declared.append(_Declared(collector, at, {spec.name: at for spec in collector.metrics}))
    for index, entry in enumerate(settings.custom_collectors):
        collector, found = native_collector(index, entry)
        problems += found
        locs = {spec.name: ("custom_collectors", index, "metrics", position, "name")
                for position, spec in enumerate(collector.metrics)}
        declared.append(_Declared(collector, ("custom_collectors", index, "name"), locs))
    return declared, problems


def _assemble(settings: Settings, base: Catalog) -> tuple[Catalog | None, list[Problem]]:
    declared, problems = _declared(settings)
    kept: list[Collector] = []
    shadowed: list[ShadowedMetric] = []
    seen_collectors: dict[str, str] = {}
    seen_metrics: dict[str, str] = {}
    # A target's constant labels go on every series: a custom label of the same name would repeat it.
    constant = {label: endpoint.name for endpoint in (*settings.targets, *settings.pgbouncers)
                for label in endpoint.labels}
    # A name the built-ins already serve in the active naming mode (ours, postgres_exporter's or both) wins.
    builtin_owners = exported_owners(base, settings.metric_names)
    for item in declared:
        collector = item.collector
        if collector.name in base.by_name:
            problems.append((item.loc, f"collector name {collector.name!r} is a built-in collector's"))
        elif collector.name in seen_collectors:
            problems.append((item.loc, f"collector {collector.name!r} is already declared by "
                                       f"{seen_collectors[collector.name]}"))
        seen_collectors.setdefault(collector.name, collector.origin)
        metrics = []
        # The path of a queries file's metric is the file entry: say which namespace inside it.
        at = f"{collector.origin}: " if collector.compat_names else ""
        for spec in collector.metrics:
            loc = item.metric_locs[spec.name]
            owner = builtin_owners.get(spec.name)
            if owner is not None:
                if settings.strict_custom:
                    problems.append((loc, f"{at}metric {spec.name} is already exported by "
                                          f"the built-in collector {owner} (strict_custom: true)"))
                shadowed.append(ShadowedMetric(spec.name, collector.name, collector.origin, owner))
                continue
            for label in spec.labels:
                if label in constant:
                    problems.append((loc, f"{at}metric {spec.name}: label {label!r} is a constant label of "
                                          f"target {constant[label]!r}"))
            if spec.name in seen_metrics:
                problems.append((loc, f"{at}metric {spec.name} is already declared by "
                                      f"{seen_metrics[spec.name]}"))
            seen_metrics.setdefault(spec.name, collector.origin)
            metrics.append(spec)
        if metrics:  # every metric left to the built-ins: nothing to run
            kept.append(_replace_metrics(collector, tuple(metrics)))
    if problems:
        return None, problems
    try:
        return base.with_custom(kept, shadowed), []
    except CatalogError as error:  # a rule the checks above do not cover: still the user's declaration
        return None, [(("custom_collectors",), str(error))]


def _replace_metrics(collector: Collector, metrics: tuple[MetricSpec, ...]) -> Collector:
    return collector if metrics == collector.metrics else replace(collector, metrics=metrics)


def declaration_problems(settings: Settings) -> list[Problem]:
    """Every problem of the user's queries files and custom collectors (none: the catalog can be built)."""
    if not settings.queries_files and not settings.custom_collectors:
        return []
    return _assemble(settings, Catalog.builtin())[1]


def build_catalog(settings: Settings, base: Catalog | None = None) -> Catalog:
    """The catalog the exporter runs: ``base`` (the built-ins) plus the user's declarations; ConfigError if bad."""
    base = Catalog.builtin() if base is None else base
    if not settings.queries_files and not settings.custom_collectors:
        return base
    catalog, problems = _assemble(settings, base)
    if catalog is None:
        raise ConfigError(_report(problems, {}))
    by_origin: dict[str, list[str]] = defaultdict(list)
    for item in catalog.shadowed:
        by_origin[item.origin].append(f"{item.name} ({item.owner})")
    for origin, names in by_origin.items():
        # Once, at load: migrated files often re-declare what we export; the built-in series is kept.
        log.warning("%s: skipped %s: a built-in collector exports the name (strict_custom: true makes this an "
                    "error)", origin, ", ".join(names))
    return catalog


# -- one statement, read-only -----------------------------------------------------------------------------

_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def statement_problem(sql: str) -> str | None:
    """Why ``sql`` is not one statement (a trailing ``;`` is fine), or None.

    More statements could end the read-only transaction (``COMMIT; DELETE ...``): refused at load, and at run
    time the extended protocol makes the server refuse them too (:func:`fetch_one_statement`).
    """
    position, length = 0, len(sql)
    ended: int | None = None  # where a top-level ';' was seen
    while position < length:
        char = sql[position]
        if sql.startswith("--", position):
            newline = sql.find("\n", position)
            position = length if newline < 0 else newline + 1
            continue
        if sql.startswith("/*", position):
            depth, position = 1, position + 2
            while depth and position < length:
                if sql.startswith("/*", position):
                    depth, position = depth + 1, position + 2
                elif sql.startswith("*/", position):
                    depth, position = depth - 1, position + 2
                else:
                    position += 1
            if depth:
                return "unterminated /* comment"
            continue
        if char.isspace():
            position += 1
            continue
        if ended is not None:
            return f"one statement only: more SQL follows the ';' at character {ended + 1}"
        if char == ";":
            ended = position
            position += 1
            continue
        previous = sql[position - 1] if position else " "
        identifier_before = previous.isalnum() or previous in "_$"
        if char in "'\"":
            escaped = char == "'" and previous in "eE" and not (
                position >= 2 and (sql[position - 2].isalnum() or sql[position - 2] in "_$"))
            end = _quote_end(sql, position, char, escaped)
            if end is None:
                return f"unterminated {char} quote starting at character {position + 1}"
            position = end
            continue
        tag = _DOLLAR_TAG.match(sql, position) if char == "$" and not identifier_before else None
        if tag is not None:
            close = sql.find(tag.group(0), tag.end())
            if close < 0:
                return f"unterminated {tag.group(0)} quote starting at character {position + 1}"
            position = close + len(tag.group(0))
            continue
        position += 1
    return None


def _quote_end(sql: str, start: int, quote: str, backslash_escapes: bool) -> int | None:
    """The position after the quote opened at ``start`` ('' or "" inside is the quote itself)."""
    position = start + 1
    while position < len(sql):
        char = sql[position]
        if backslash_escapes and char == "\\":
            position += 2
            continue
        if char == quote:
            if sql.startswith(quote * 2, position):
                position += 2
                continue
            return position + 1
        position += 1
    return None


def fetch_one_statement(session: Session, _ctx: RunContext, sql_text: str | None) -> Rows:
    """Run user SQL with the extended protocol (pipeline mode), where the server refuses a second statement."""
    assert sql_text is not None
    with session.conn.pipeline() as pipeline, session.conn.cursor() as cursor:
        cursor.execute(sql_text, prepare=False)
        pipeline.sync()
        return cursor.fetchall()
