"""The README's figures that come from the catalog stay true: every "every N s" names the right interval."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exporter.catalog import Catalog, load
from exporter.durations import UNIT_SECONDS

ROOT = Path(__file__).parent.parent

_EVERY = re.compile(r"\bevery (\d+(?:\.\d+)?) ?(ms|s|min|minutes?|h|hours?)\b")
_WORD_SECONDS = {"ms": 0.001, "s": 1.0, "min": 60.0, "minute": 60.0, "minutes": 60.0, "hour": 3600.0,
                 "hours": 3600.0, "h": UNIT_SECONDS["h"]}
_IDENT = re.compile(r"[a-z][a-z0-9_]*")


def _collector_named_by(word: str, catalog: Catalog) -> str | None:
    """The collector a word of prose stands for: its own name, or a metric it yields (``pg_statio_user_tables_*``)."""
    word = word.rstrip("_")
    if word in catalog.by_name:
        return word
    owner = catalog.metric_owner.get(word)
    return owner if owner in catalog.by_name else None


def interval_claims(text: str, catalog: Catalog) -> list[tuple[str, str, float]]:
    """(claim, collector, seconds claimed) for each "every N unit" after a collector or metric name in its paragraph."""
    claims = []
    for paragraph in re.split(r"\n\s*\n", text):
        for match in _EVERY.finditer(paragraph):
            before = _IDENT.findall(paragraph[:match.start()])
            named = [c for c in (_collector_named_by(w, catalog) for w in reversed(before)) if c is not None]
            if named:
                seconds = float(match.group(1)) * _WORD_SECONDS[match.group(2)]
                claims.append((paragraph[max(0, match.start() - 80):match.end()], named[0], seconds))
    return claims


def test_readme_intervals_are_the_catalog_intervals() -> None:
    catalog = load()
    claims = interval_claims((ROOT / "README.md").read_text(encoding="utf-8"), catalog)
    assert len(claims) >= 5, claims  # the check itself still finds the README's figures
    wrong = [f"{collector}: README says every {seconds:g}s, the catalog {catalog.by_name[collector].interval:g}s "
             f"in ...{claim!r}" for claim, collector, seconds in claims
             if seconds != catalog.by_name[collector].interval]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("text", "expected"), [
    ("Vacuum state (`pg_stat_user_tables`, every 60 s in every database)", [("pg_stat_user_tables", 60.0)]),
    ("`pg_statio_user_tables_*` run in every database (every 5 min)", [("pg_statio_user_tables", 300.0)]),
    ("`pg_database_size_bytes{datname}` runs every 5 minutes.", [("pg_database_size", 300.0)]),
    ("The role is re-read every 15 s.", []),
])
def test_interval_claims_are_found(text: str, expected: list[tuple[str, float]]) -> None:
    assert [(collector, seconds) for _claim, collector, seconds in interval_claims(text, load())] == expected
