"""PromQL building blocks shared by dashboards and alert rules: catalog look-ups and a metric-name tokenizer.

Every metric an expression names goes through :func:`m` (or :func:`spec`), which raises when the catalog
does not declare it, so a renamed metric breaks generation instead of shipping a query that never matches.
:func:`referenced_metrics` parses names back out of finished expressions, so tests can check the result
independently of how it was built (tests/support/promql_check.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporter.catalog import Catalog, MetricSpec
from exporter.durations import format_duration

#: Names Prometheus itself provides (scrape health and alert state), usable next to our metrics.
PROMETHEUS_BUILTINS = frozenset({
    "up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added",
    "scrape_samples_post_metric_relabeling", "ALERTS", "ALERTS_FOR_STATE",
})
#: Labels Prometheus adds to every scraped series.
SCRAPE_LABELS = frozenset({"job", "instance"})

#: 2^31: transaction and multixact IDs wrap around at this age (PostgreSQL stops well before it).
WRAPAROUND_HORIZON = 2**31


class UnknownMetric(KeyError):
    """An expression names a metric the catalog does not declare."""


def spec(name: str) -> MetricSpec:
    """The catalog declaration of ``name``; UnknownMetric when pgvitals does not export it."""
    try:
        return Catalog.builtin().metric(name)  # shipped dashboards and rules name built-in metrics only
    except KeyError:
        raise UnknownMetric(f"no metric {name!r} in the catalog (renamed or not declared yet?)") from None


def m(name: str, **matchers: str) -> str:
    """A selector for catalog metric ``name``; each matcher label must be one the metric carries.

    A matcher value starting with ``~`` is a regex match (``=~``), with ``!`` a negative match (``!=``).
    """
    if name in PROMETHEUS_BUILTINS:
        allowed = None  # ALERTS carries the alert's own labels; up only job and instance, which we allow
    else:
        declared = spec(name)
        allowed = set(declared.labels) | ({"target"} if declared.per_target else set()) | SCRAPE_LABELS
    parts = []
    for label, value in matchers.items():
        if allowed is not None and label not in allowed:
            raise UnknownMetric(f"metric {name} has no label {label!r} (labels: {', '.join(sorted(allowed))})")
        op, text = ("=~", value[1:]) if value.startswith("~") else ("!=", value[1:]) if value.startswith("!") \
            else ("=", value)
        parts.append(f'{label}{op}"{text}"')
    return f"{name}{{{','.join(parts)}}}" if parts else name


def has_label(name: str, label: str) -> bool:
    """True when catalog metric ``name`` carries ``label`` (``target`` included)."""
    declared = spec(name)
    return label in declared.labels or (label == "target" and declared.per_target)


def labels_of(name: str) -> tuple[str, ...]:
    """Every label catalog metric ``name`` carries, ``target`` first when it has one."""
    declared = spec(name)
    return (("target",) if declared.per_target else ()) + declared.labels


def labels_beyond(name: str, other: str) -> tuple[str, ...]:
    """Labels of ``name`` that ``other`` does not carry (what to aggregate away before matching them)."""
    return tuple(label for label in labels_of(name) if label not in labels_of(other))


def grouping(keyword: str, labels: tuple[str, ...], *metrics: str) -> str:
    """A label list such as ``without (datname)``; each label must be one every metric in ``metrics`` carries."""
    for name in metrics:
        missing = [label for label in labels if label not in labels_of(name)]
        if missing:
            raise UnknownMetric(f"metric {name} has no label {missing} for {keyword} (...)")
    if not labels:
        raise UnknownMetric(f"empty label list for {keyword} (...) over {', '.join(metrics)}")
    return f"{keyword} ({', '.join(labels)})"


def duration(seconds: float) -> str:
    """A Prometheus duration string: 300 -> 5m, 90 -> 90s, 0.5 -> 500ms, 0 -> 0s (see exporter.durations)."""
    return format_duration(seconds)


def number(value: float) -> str:
    """A number literal without float noise (0.95, 1073741824, 1e-06)."""
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


# -- parsing names back out of finished expressions ------------------------------------------------------------

FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "exp", "floor", "histogram_count",
    "histogram_fraction", "histogram_quantile", "histogram_sum", "holt_winters", "hour", "idelta", "increase",
    "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2", "max_over_time",
    "min_over_time", "minute", "month", "pi", "predict_linear", "present_over_time", "quantile_over_time", "rad",
    "rate", "resets", "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_desc", "sqrt", "stddev_over_time",
    "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year",
})
FUNCTIONS = FUNCTIONS | {"start", "end"}  # the @ modifier's start() and end()
AGGREGATORS = frozenset({
    "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2"})
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
LITERALS = frozenset({"inf", "nan"})

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]+\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[^\]]+\]\])
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>=,(){}\[\]:@])
""", re.VERBOSE)


class PromQLSyntaxError(ValueError):
    """The expression has a character sequence PromQL does not allow."""


@dataclass(frozen=True)
class Reference:
    """A metric an expression selects, with the label names its matchers use."""

    metric: str
    labels: tuple[str, ...]


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise PromQLSyntaxError(f"unexpected {expr[pos:pos + 20]!r} at {pos} in {expr!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            out.append((kind, match.group()))
        pos = match.end()
    return out


def _skip_group(tokens: list[tuple[str, str]], index: int, opening: str, closing: str) -> int:
    """Index just past the bracket group that opens at ``index``."""
    depth = 0
    for position in range(index, len(tokens)):
        if tokens[position][1] == opening:
            depth += 1
        elif tokens[position][1] == closing:
            depth -= 1
            if depth == 0:
                return position + 1
    raise PromQLSyntaxError(f"unbalanced {opening}{closing}")


def _matcher_labels(tokens: list[tuple[str, str]], start: int, end: int) -> tuple[list[str], list[str]]:
    """Label names used in the matcher list tokens[start:end] and metric names given as __name__ matchers."""
    labels, names = [], []
    position = start
    while position < end:
        kind, text = tokens[position]
        if kind == "ident":
            if position + 2 >= end + 1 or tokens[position + 1][0] != "op":
                raise PromQLSyntaxError(f"bad label matcher near {text!r}")
            if text == "__name__":
                op, value = tokens[position + 1][1], tokens[position + 2][1][1:-1]
                alternatives = value.split("|") if op == "=~" else [value]
                if op not in ("=", "=~") or not all(re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", a) for a in alternatives):
                    raise PromQLSyntaxError(f"cannot tell which metrics __name__{op}{value!r} selects")
                names.extend(alternatives)
            else:
                labels.append(text)
            position += 3
            continue
        position += 1
    return labels, names


def references(expr: str) -> list[Reference]:
    """Every metric selector in ``expr`` (functions, keywords, label lists and strings are not metrics)."""
    tokens = _tokens(expr)
    found: list[Reference] = []
    position = 0
    while position < len(tokens):
        kind, text = tokens[position]
        following = tokens[position + 1][1] if position + 1 < len(tokens) else ""
        if kind == "ident" and text in LABEL_LIST_KEYWORDS:
            position += 1
            if following == "(":
                position = _skip_group(tokens, position, "(", ")")
            continue
        if kind == "ident" and (text in KEYWORDS or text.lower() in LITERALS):
            position += 1
            continue
        if kind == "ident" and following == "(":
            if text not in FUNCTIONS and text not in AGGREGATORS:
                raise PromQLSyntaxError(f"unknown function {text!r} in {expr!r}")
            position += 1
            continue
        if kind == "ident" and text in AGGREGATORS and following in ("by", "without"):
            position += 1
            continue
        if kind == "ident":
            labels: list[str] = []
            position += 1
            if position < len(tokens) and tokens[position][1] == "{":
                end = _skip_group(tokens, position, "{", "}")
                labels, _ = _matcher_labels(tokens, position + 1, end - 1)
                position = end
            found.append(Reference(text, tuple(labels)))
            continue
        if text == "{":  # a selector without a metric name: {__name__="x", ...}
            end = _skip_group(tokens, position, "{", "}")
            labels, names = _matcher_labels(tokens, position + 1, end - 1)
            found.extend(Reference(name, tuple(labels)) for name in names)
            position = end
            continue
        if text == "[":
            position = _skip_group(tokens, position, "[", "]")
            continue
        position += 1
    return found


def referenced_metrics(expr: str) -> set[str]:
    """The metric names ``expr`` selects."""
    return {ref.metric for ref in references(expr)}
