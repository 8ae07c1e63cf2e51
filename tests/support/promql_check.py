"""Test-side PromQL checks: Grafana variable expansion and metric/label references checked against the catalog."""

from __future__ import annotations

import re

from exporter.catalog import load
from exporter.dashboards.promql import PROMETHEUS_BUILTINS, SCRAPE_LABELS, references


def expand_variables(expr: str, rate_interval: str = "1m", time_range: str = "1h", **values: str) -> str:
    """``expr`` with Grafana's variables replaced, as Grafana would before sending it to Prometheus.

    ``$__rate_interval`` and ``$__range`` become the given durations; ``$name`` / ``${name}`` become
    ``values[name]`` (default ``.*``, what "All" expands to in our regex matchers).
    """
    builtins = {"__rate_interval": rate_interval, "__range": time_range, "__interval": rate_interval}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in builtins:
            return builtins[name]
        return values.get(name, ".*")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", replace, expr)


def reference_problems(expr: str, where: str, extra_names: frozenset[str] = frozenset()) -> list[str]:
    """Metrics in ``expr`` that pgvitals does not export, and matchers on labels a metric does not carry.

    ``extra_names``: names that exist besides the catalog and Prometheus' own (recording rules).
    """
    catalog = load()
    exported = catalog.metric_names()
    problems = []
    for ref in references(expr):
        if ref.metric not in exported | extra_names | PROMETHEUS_BUILTINS:
            problems.append(f"{where}: {ref.metric} is not exported by pgvitals ({expr})")
            continue
        if ref.metric in exported:
            declared = catalog.metric(ref.metric)
            labels = set(declared.labels) | SCRAPE_LABELS | ({"target"} if declared.per_target else set())
            unknown = set(ref.labels) - labels - {"__name__"}
            if unknown:
                problems.append(f"{where}: {ref.metric} has no label {sorted(unknown)}")
    return problems
