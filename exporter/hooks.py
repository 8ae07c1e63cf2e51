"""What a collector's fetch and transform hooks get: the run's context (and, later, their toolkit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exporter.config import Settings
from exporter.db import Facts


@dataclass
class RunContext:
    """What a fetch or transform hook may know about the run it is part of."""

    target: str
    database: str | None
    facts: Facts | None
    params: dict[str, Any]
    state: dict[str, Any]
    settings: Settings
    timeout: float = 5.0
