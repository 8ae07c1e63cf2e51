"""Prometheus text format: sample lines rendered once per collection, assembled cheaply per scrape."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from exporter.catalog import MetricSpec

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value: str) -> str:
    """Escape a label value for the text format."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def label_text(pairs: Iterable[tuple[str, str]]) -> str:
    """``a="x",b="y"`` for the given label pairs."""
    return ",".join(f'{k}="{escape_label(v)}"' for k, v in pairs)


def format_value(value: float | int) -> str:
    """A sample value as Prometheus writes it."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def to_number(value: Any) -> float | int | None:
    """A column value as a sample value; None when it has no numeric meaning."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def label_value(value: Any) -> str:
    """A column value as a label value (NULL becomes the empty string)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_rows(
    specs: Iterable[MetricSpec], rows: list[dict[str, Any]], prefix: str, limit: int
) -> tuple[dict[str, bytes], int, bool]:
    """Sample lines per metric for ``rows``; returns (lines by metric name, series count, truncated)."""
    chunks: dict[str, bytes] = {}
    total = 0
    truncated = False
    # Metrics of one collector mostly share their label columns: build each row's label text once.
    label_cache: dict[tuple[str, ...], list[str]] = {}
    for spec in specs:
        label_texts = label_cache.get(spec.labels)
        if label_texts is None:
            label_texts = label_cache[spec.labels] = [_row_labels(prefix, spec.labels, row) for row in rows]
        lines: list[str] = []
        name = spec.name
        for row, labels in zip(rows, label_texts, strict=True):
            number: float | int = 1
            if spec.kind != "info":
                raw = to_number(row.get(spec.value)) if spec.value else None
                if raw is None:
                    continue  # NULL: unknown on this server or this row, not zero
                number = raw * spec.scale if spec.scale != 1.0 else raw
            if total >= limit:
                truncated = True
                break
            lines.append(f"{name}{{{labels}}} {format_value(number)}\n")
            total += 1
        if lines:
            chunks[name] = "".join(lines).encode()
    return chunks, total, truncated


def _row_labels(prefix: str, names: tuple[str, ...], row: dict[str, Any]) -> str:
    if not names:
        return prefix
    own = ",".join(f'{n}="{escape_label(label_value(row.get(n)))}"' for n in names)
    return f"{prefix},{own}" if prefix else own


def header(spec: MetricSpec) -> bytes:
    """The HELP and TYPE lines of a metric family."""
    help_text = spec.help.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {spec.name} {help_text}\n# TYPE {spec.name} {spec.exposition_type}\n".encode()


def assemble(order: Iterable[MetricSpec], chunks_by_metric: Mapping[str, list[bytes]]) -> bytes:
    """The exposition body: each family's header once, then every chunk for it, families never split."""
    parts: list[bytes] = []
    for spec in order:
        chunks = chunks_by_metric.get(spec.name)
        if chunks:
            parts.append(header(spec))
            parts.extend(chunks)
    return b"".join(parts)
