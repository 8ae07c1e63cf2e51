"""Sequences near exhaustion: how much of its range each sequence has used, counting the column it feeds."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from exporter.catalog import Collector, Param, Rows, SqlVariant
from exporter.collectors._helpers import gauge
from exporter.db import CollectError

if TYPE_CHECKING:
    from exporter.db import Session
    from exporter.hooks import RunContext

FLOOR = Param(
    "floor", 0.5,
    "Sequences are exported one by one only once they have used at least this share of their range, so "
    "that the series stay few; the database's highest ratio is always exported.",
)

# The catalog alone (no relation lock): every sequence with its bounds, whether this role may read its
# value, and the type of the column it feeds when it is owned by one (serial: deptype 'a', identity: 'i').
# An int4 or int2 column runs out before its int8 sequence does: the column's bound is the real limit.
# Temporary sequences of other sessions cannot be read, nor unlogged ones during recovery.
_SEQUENCES_SQL = """
SELECT c.oid::bigint AS oid, n.nspname::text AS schemaname, c.relname::text AS sequencename,
       pg_catalog.format_type(s.seqtypid, NULL) AS data_type,
       s.seqmin AS min_value, s.seqmax AS max_value, s.seqincrement AS increment_by, s.seqcycle AS cycle,
       pg_catalog.has_sequence_privilege(c.oid, 'SELECT,USAGE') AS readable,
       col.column_name, col.column_type, col.column_min, col.column_max
FROM pg_catalog.pg_sequence s
JOIN pg_catalog.pg_class c ON c.oid = s.seqrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN LATERAL (
  SELECT pg_catalog.quote_ident(tn.nspname) || '.' || pg_catalog.quote_ident(t.relname) || '.'
           || pg_catalog.quote_ident(a.attname) AS column_name,
         pg_catalog.format_type(a.atttypid, NULL) AS column_type,
         CASE a.atttypid WHEN 'pg_catalog.int2'::pg_catalog.regtype THEN -32768
                         WHEN 'pg_catalog.int4'::pg_catalog.regtype THEN -2147483648 END AS column_min,
         CASE a.atttypid WHEN 'pg_catalog.int2'::pg_catalog.regtype THEN 32767
                         WHEN 'pg_catalog.int4'::pg_catalog.regtype THEN 2147483647 END AS column_max
  FROM pg_catalog.pg_depend d
  JOIN pg_catalog.pg_class t ON t.oid = d.refobjid
  JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
  JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
  WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = c.oid
    AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjsubid > 0
    AND d.deptype IN ('a', 'i')
  ORDER BY d.refobjid, d.refobjsubid LIMIT 1
) col ON true
WHERE c.relpersistence <> 't' AND NOT (c.relpersistence = 'u' AND pg_catalog.pg_is_in_recovery())"""

# Reading a sequence's value opens it with an ACCESS SHARE lock (only ACCESS EXCLUSIVE conflicts):
# sequences with such a lock held or requested are left out beforehand, lock_timeout bounds the rest.
_VALUES_SQL = """
SELECT r.oid::bigint AS oid, pg_catalog.pg_sequence_last_value(r.oid) AS last_value
FROM pg_catalog.unnest(%(oids)s::oid[]) AS r(oid)"""


def used_share(row: dict[str, Any], last_value: int | None) -> tuple[float, int] | None:
    """(share of the usable range consumed, values left) for one sequence; None when it cannot run out.

    The usable range ends at the sequence's own bound or at its column type's, whichever comes first.
    A sequence never called (``last_value`` NULL) has used nothing; a cycling one never runs out.
    """
    if row["cycle"]:
        return None
    step = int(row["increment_by"])
    low, high = int(row["min_value"]), int(row["max_value"])
    if row["column_max"] is not None:
        low, high = max(low, int(row["column_min"])), min(high, int(row["column_max"]))
    if high <= low:
        return None
    if step > 0:
        start, limit = low, high
        position = start if last_value is None else last_value
        used, left = position - start, limit - position
    else:
        start, limit = high, low
        position = start if last_value is None else last_value
        used, left = start - position, position - limit
    span = high - low
    return min(1.0, max(0.0, used / span)), max(0, left) // abs(step)


def fetch_sequences(session: Session, ctx: RunContext, sql: str | None) -> Rows:
    """Sequences of this database over the floor, and the database's highest ratio and blind spots."""
    assert sql is not None
    floor = float(ctx.params["floor"])
    sequences = session.query(sql)
    readable = [int(row["oid"]) for row in sequences if row["readable"] and not row["cycle"]]
    values = _last_values(session, readable)
    out: Rows = []
    highest: float | None = None
    for row in sequences:
        oid = int(row["oid"])
        if oid not in values:
            continue
        share = used_share(row, values[oid])
        if share is None:
            continue
        ratio, left = share
        highest = ratio if highest is None else max(highest, ratio)
        if ratio >= floor:
            out.append({
                "schemaname": row["schemaname"], "sequencename": row["sequencename"], "used_ratio": ratio,
                "remaining_values": left, "data_type": row["data_type"], "column": row["column_name"] or "",
                "column_type": row["column_type"] or "", "present": 1,
            })
    out.append({
        "max_used_ratio": highest,
        "unreadable": sum(1 for row in sequences if not row["readable"]),
        "unmeasured": sum(1 for row in sequences if row["readable"] and not row["cycle"]
                          and int(row["oid"]) not in values),
    })
    return out


#: Sequences read per savepoint. Each read holds an ACCESS SHARE lock until its (sub)transaction ends: rolling
#: the savepoint back after each batch keeps a database with thousands of sequences from filling the shared
#: lock table (max_locks_per_transaction), which every session shares.
BATCH = 500


def _last_values(session: Session, oids: list[int]) -> dict[int, int | None]:
    """Each sequence's last value (None: never called); sequences locked by DDL now are left out."""
    values: dict[int, int | None] = {}
    for start in range(0, len(oids), BATCH):
        values.update(_read_batch(session, oids[start:start + BATCH]))
    return values


def _read_batch(session: Session, oids: list[int]) -> dict[int, int | None]:
    locked = session.locked_tables(oids)
    wanted = [oid for oid in oids if oid not in locked]

    def read(ids: list[int]) -> Rows:
        return session.query(_VALUES_SQL, {"oids": ids})

    found = session.attempt(partial(read, wanted))
    if isinstance(found, CollectError):
        if found.reason != "lock_timeout":
            raise found
        # DDL took a lock after the check: look again and leave the newly locked ones out.
        locked = session.locked_tables(wanted)
        again = session.attempt(partial(read, [oid for oid in wanted if oid not in locked]))
        if isinstance(again, CollectError):
            raise again
        found = again
    return {int(row["oid"]): row["last_value"] for row in found}


SEQ = ("datname", "schemaname", "sequencename")

SEQUENCES = Collector(
    name="pg_sequences",
    family="sequences",
    help="How much of its range each sequence has used (bounded by the type of the column it feeds), for "
         "sequences over a floor, and each database's highest ratio.",
    scope="database",
    interval=120.0,
    timeout=15.0,
    params=(FLOOR,),
    variants=(SqlVariant(min_version=120000, sql=_SEQUENCES_SQL),),
    fetch=fetch_sequences,
    metrics=(
        gauge("pg_sequence_used_ratio",
              "Share of the sequence's usable range already handed out: from its start bound to the nearer of "
              "its own bound and its column type's (an int4 column fed by a bigint sequence ends at 2^31 - 1). "
              "Only sequences at or above the floor (default 0.5).", "used_ratio", SEQ, unit="ratio"),
        gauge("pg_sequence_remaining_values",
              "Values the sequence can still hand out before nextval() fails or the column overflows "
              "(same sequences as pg_sequence_used_ratio).", "remaining_values", SEQ),
        # A gauge of constant 1 rather than an info metric: the run's per-database row must not yield one.
        gauge("pg_sequence_info",
              "Value 1, with the sequence's data type and, where it is owned by a column (serial, identity), "
              "that column as schema.table.column and its type (same sequences as pg_sequence_used_ratio).",
              "present", (*SEQ, "data_type", "column", "column_type")),
        gauge("pg_sequences_max_used_ratio",
              "The highest pg_sequence_used_ratio in the database, floor or not (absent when the role can read "
              "no sequence there).", "max_used_ratio", ("datname",), unit="ratio"),
        gauge("pg_sequences_unreadable",
              "Sequences in the database whose value the exporter's role may not read (needs SELECT or USAGE "
              "on them): they are not measured.", "unreadable", ("datname",)),
        gauge("pg_sequences_unmeasured",
              "Readable sequences left out of this run because DDL held or awaited an exclusive lock on them.",
              "unmeasured", ("datname",)),
    ),
    notes="pg_monitor alone cannot read a sequence's value (pg_sequences.last_value is NULL, "
          "pg_sequence_last_value() raises): grant `pg_read_all_data` (14+) or `SELECT` on the sequences "
          "(`GRANT SELECT ON ALL SEQUENCES IN SCHEMA ... TO pgvitals`); `pg_sequences_unreadable` counts the "
          "rest. Cycling sequences never run out and are left out. Sequences that feed a column only through "
          "a DEFAULT, without OWNED BY, are measured against their own bounds. Reading a value takes an "
          "ACCESS SHARE lock on the sequence: sequences with an ACCESS EXCLUSIVE lock held or requested are "
          "skipped for that run.",
)

COLLECTORS = (SEQUENCES,)
