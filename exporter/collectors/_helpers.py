"""Shorthands that keep the declarations compact and uniform."""

from __future__ import annotations

from exporter.catalog import MetricSpec

MS = 0.001  # PostgreSQL reports times in milliseconds; we export seconds


def counter(name: str, help_: str, value: str, labels: tuple[str, ...] = (), unit: str = "",
            scale: float = 1.0) -> MetricSpec:
    """A counter; ``name`` must end in ``_total``."""
    return MetricSpec(name=name, kind="counter", help=help_, value=value, labels=labels, unit=unit, scale=scale)


def gauge(name: str, help_: str, value: str, labels: tuple[str, ...] = (), unit: str = "",
          scale: float = 1.0) -> MetricSpec:
    """A gauge."""
    return MetricSpec(name=name, kind="gauge", help=help_, value=value, labels=labels, unit=unit, scale=scale)


def info(name: str, help_: str, labels: tuple[str, ...]) -> MetricSpec:
    """An info metric: value 1, the information is in the labels."""
    return MetricSpec(name=name, kind="info", help=help_, labels=labels)
