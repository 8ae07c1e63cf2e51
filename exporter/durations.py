"""Durations as people and Prometheus write them (``500ms``, ``1m30s``, ``1d``): one parser, one formatter."""

from __future__ import annotations

import re
from typing import Any

#: Prometheus' units, largest first; a compound duration names each at most once, in this order.
UNIT_SECONDS: dict[str, float] = {"w": 604_800.0, "d": 86_400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|[wdhms])")
_PLAIN = re.compile(r"^\d+(?:\.\d+)?$")
_HINT = "expected a duration such as 30s, 5m, 1m30s, 1d or a number of seconds"


def parse_duration(value: Any, allow_zero: bool = False) -> float:
    """Seconds from a number of seconds or a duration string (``500ms``, ``30s``, ``1m30s``, ``2h15m``, ``1d``)."""
    if isinstance(value, bool):
        raise ValueError(_HINT)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value.strip())
    else:
        raise ValueError(_HINT)
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError("must be a positive duration")
    return seconds


def _parse_text(text: str) -> float:
    if _PLAIN.match(text):
        return float(text)
    parts = _PART.findall(text)
    units = [unit for _number, unit in parts]
    order = list(UNIT_SECONDS)
    if not parts or "".join(n + u for n, u in parts) != text or units != sorted(set(units), key=order.index):
        # A unit twice or out of order (5s1m) is most likely a typo: Prometheus refuses it too.
        raise ValueError(_HINT)
    return sum(float(number) * UNIT_SECONDS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """The shortest Prometheus duration for ``seconds``, rounded to milliseconds: 300 -> 5m, 90 -> 1m30s."""
    millis = round(seconds * 1000)
    if millis < 0:
        raise ValueError(f"negative duration {seconds}")
    if millis == 0:
        return "0s"
    single = next((f"{millis // round(size * 1000)}{unit}" for unit, size in UNIT_SECONDS.items()
                   if unit != "w" and millis % round(size * 1000) == 0), None)
    parts = []
    for unit, size in UNIT_SECONDS.items():
        if unit == "w":
            continue  # 14d reads better than 2w, and a week is rarely what a threshold means
        count, millis = divmod(millis, round(size * 1000))
        if count:
            parts.append(f"{count}{unit}")
    compound = "".join(parts)
    return single if single is not None and len(single) <= len(compound) else compound
