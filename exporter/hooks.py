"""What a collector's fetch and transform hooks get: the run's context, and the toolkit they share."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from psycopg import sql as pgsql

from exporter.db import CollectError, Row

if TYPE_CHECKING:
    from exporter.config import Settings
    from exporter.db import Facts, Session


class Peer(NamedTuple):
    """A collector of the same shared pass, as enabled on this target: its parameters, its state here, and
    whether it will run soon (a pass reads its section only then: it would reuse it)."""

    params: Mapping[str, Any]
    state: dict[str, Any]
    due: bool = True


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
    collector: str = ""
    # For a collector with a shared pass: every collector of the pass enabled here (itself included), and
    # where the pass leaves what it read for them (``shared_result``).
    peers: Mapping[str, Peer] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    def shared_result(self, sections: Mapping[str, Any]) -> None:
        """Leave a shared pass's rows, by collector, for the other collectors of the pass to reuse."""
        self.shared["sections"] = dict(sections)
        self.shared["at"] = time.monotonic()

    def extension_schema(self, dbname: str, extension: str) -> pgsql.Identifier:
        """The schema ``extension`` is installed in, in ``dbname``, as an identifier to compose SQL with.

        Read from the facts the engine planned this run against (the same source as its ``{ext_schema}``
        substitution): the engine looked the database's extensions up before choosing the collector's variant.
        """
        installed = self.facts.extensions.get(dbname, {}) if self.facts is not None else {}
        if extension not in installed:
            raise CollectError("missing_object", f"extension {extension} is not installed in database {dbname}")
        return pgsql.Identifier(installed[extension][0])


# -- sticky top-N ----------------------------------------------------------------------------------
#
# Top-N collectors export the N largest (or busiest) relations one by one and sum the rest into one
# "other" series. An incumbent (chosen last run) keeps its place until a newcomer is STICKINESS times
# larger, so that relations of similar size do not swap in and out at every VACUUM (each swap breaks
# counters). The ranking key is weighted by STICKY_NUM / STICKY_DEN in integers, so a bigint key stays one.

STICKY_NUM, STICKY_DEN = 5, 4
STICKINESS = STICKY_NUM / STICKY_DEN

#: The state key under which a top-N collector keeps the keys it chose last run.
INCUMBENTS = "incumbents"


def sticky_order(key: str, size: str, incumbents: str = INCUMBENTS) -> str:
    """SQL: the ORDER BY list of the sticky ranking: ``size`` descending, rows whose ``key`` is in
    ``%(incumbents)s`` weighted up.

    Ties go to incumbents, then to the smaller key: the order is total, so the top is stable between runs.
    Take the top N with ``ORDER BY ... LIMIT n``: a bounded heap, where ranking every row sorted them all.
    ``incumbents`` names the SQL parameter (a query ranking for several collectors has one each).
    """
    incumbent = f"{key}::bigint = ANY(%({incumbents})s::bigint[])"
    return f"({size}) * CASE WHEN {incumbent} THEN {STICKY_NUM} ELSE {STICKY_DEN} END DESC, {incumbent} DESC, {key}"


def query_top(session: Session, ctx: RunContext, sql: str, params: Mapping[str, Any], key: str = "relid") -> list[Row]:
    """Run a sticky top-N query with last run's choice as ``%(incumbents)s``; remember this run's.

    The chosen rows are those whose ``key`` is not NULL (the remainder row has none).
    """
    rows = session.query(sql, {**params, INCUMBENTS: list(ctx.state.get(INCUMBENTS, ()))})
    ctx.state[INCUMBENTS] = [row[key] for row in rows if row[key] is not None]
    return rows
