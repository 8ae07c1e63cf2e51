"""postgres_exporter's mixin as test data: its alert rules as a rule file, and scrapes as promtool input series."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from exporter.compat_docs import load_mixin

MIXIN = load_mixin(Path(__file__).resolve().parent.parent / "data" / "postgres_mixin.yaml")

#: A scrape as parse_exposition gives it: (name, labels) -> value.
Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]

_IDENT = re.compile(r"\b[a-z][a-z0-9_]*\b")


def mixin_rule_file() -> str:
    """The mixin's alert rules as a Prometheus rule file (no `for`: the stored expressions carry none)."""
    rules = [{"alert": a["name"], "expr": a["expr"]} for a in MIXIN["alerts"]]
    return yaml.safe_dump({"groups": [{"name": "PostgreSQL", "rules": rules}]})


def mixin_alert_metrics() -> frozenset[str]:
    """Every identifier the mixin's alert expressions name (metric names among PromQL's words)."""
    return frozenset(word for alert in MIXIN["alerts"] for word in _IDENT.findall(alert["expr"]))


def as_instance(labels: frozenset[tuple[str, str]], job: str) -> dict[str, str]:
    """The README's relabeling (`target` becomes `instance`) plus the scrape job's label."""
    out = {k: v for k, v in labels if k != "target"}
    target = dict(labels).get("target")
    if target:
        out["instance"] = target
    out["job"] = job
    return out


def _series_text(name: str, labels: Mapping[str, str]) -> str:
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped, strict=True)) + "}"


def _value_text(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    return repr(value)


def input_series(scrapes: Sequence[Samples], names: frozenset[str], job: str) -> list[dict[str, str]]:
    """promtool `input_series` from consecutive scrapes: the scraped values, one per scrape; a series that
    leaves a scrape gets the staleness marker Prometheus writes then, and no sample after."""
    keys: dict[tuple[str, frozenset[tuple[str, str]]], None] = {}
    for samples in scrapes:
        keys.update(dict.fromkeys(k for k in samples if k[0] in names))
    out = []
    for name, labels in keys:
        values: list[str] = []
        for samples in scrapes:
            value = samples.get((name, labels))
            if value is not None:
                values.append(_value_text(value))
            else:
                values.append("stale" if values and values[-1] not in ("_", "stale") else "_")
        out.append({"series": _series_text(name, as_instance(labels, job)), "values": " ".join(values)})
    return out


def alert_test(alertname: str, eval_index: int, firing: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """One `alert_rule_test` entry: at scrape ``eval_index`` (1 s apart) exactly ``firing`` (their labels)."""
    return {"eval_time": f"{eval_index}s", "alertname": alertname,
            "exp_alerts": [{"exp_labels": dict(labels)} for labels in firing]}
