"""Per-statement totals from pg_stat_statements: a stable top N plus an exact "other" remainder per database.

The SQL returns the statements ranked within the top 2N by execution time (and those we tracked last time),
plus one aggregate row per database for every other entry; the selection and the remainder's bookkeeping
happen here, with what the previous run saw kept in ``ctx.state``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from psycopg import sql as pgsql

from exporter.catalog import VERSION_INFINITY, Collector, Param, Row, Rows, SqlVariant
from exporter.collectors._helpers import MS, counter, gauge
from exporter.db import CollectError

if TYPE_CHECKING:
    from exporter.db import Session
    from exporter.hooks import RunContext

log = logging.getLogger("pgvitals.collectors.statements")

EXTENSION = "pg_stat_statements"
STMT = ("datname", "usename", "queryid")
OTHER = "other"

#: The counters we export, in the order of the state vectors.
COUNTERS = (
    "calls", "exec_ms", "plan_ms", "rows", "shared_blks_hit", "shared_blks_read",
    "temp_blks_read", "temp_blks_written", "blk_read_ms", "blk_write_ms", "wal_bytes",
)

MAX_TEXT_LENGTH = 1000  # a label, not a log: longer texts belong in the database's own tools

Key = tuple[int, int, int]  # (dbid, userid, queryid)
Vector = tuple[float | None, ...]  # one value per COUNTERS entry; None: the extension has no such counter


# -- SQL ------------------------------------------------------------------------------------------
# Each variant only maps the extension version's columns onto ours (typed NULL where it has none);
# the ranking, the tracked statements and the per-database remainder are the same for every version.

_PLAN_TIME = ("CASE WHEN pg_catalog.current_setting('pg_stat_statements.track_planning', true) = 'on' "
              "THEN s.total_plan_time END")

_RAW_1_4 = """
  SELECT s.dbid, s.userid, s.queryid, s.calls, s.total_time AS exec_ms, NULL::float8 AS plan_ms, s.rows,
    s.shared_blks_hit, s.shared_blks_read, s.temp_blks_read, s.temp_blks_written,
    s.blk_read_time AS blk_read_ms, s.blk_write_time AS blk_write_ms, NULL::numeric AS wal_bytes,
    NULL::timestamptz AS stats_since
  FROM {ext_schema}.pg_stat_statements(false) s"""

_RAW_1_8 = f"""
  SELECT s.dbid, s.userid, s.queryid, s.calls, s.total_exec_time AS exec_ms, {_PLAN_TIME} AS plan_ms, s.rows,
    s.shared_blks_hit, s.shared_blks_read, s.temp_blks_read, s.temp_blks_written,
    s.blk_read_time AS blk_read_ms, s.blk_write_time AS blk_write_ms, s.wal_bytes,
    NULL::timestamptz AS stats_since
  FROM {{ext_schema}}.pg_stat_statements(false) s"""

# 1.11 split block I/O time into shared and local; their sum keeps the meaning of the older blk_*_time.
_RAW_1_11 = f"""
  SELECT s.dbid, s.userid, s.queryid, s.calls, s.total_exec_time AS exec_ms, {_PLAN_TIME} AS plan_ms, s.rows,
    s.shared_blks_hit, s.shared_blks_read, s.temp_blks_read, s.temp_blks_written,
    s.shared_blk_read_time + s.local_blk_read_time AS blk_read_ms,
    s.shared_blk_write_time + s.local_blk_write_time AS blk_write_ms, s.wal_bytes, s.stats_since
  FROM {{ext_schema}}.pg_stat_statements(false) s"""

_NO_INFO = "SELECT NULL::bigint AS dealloc, NULL::timestamptz AS stats_reset"
_INFO = "SELECT i.dealloc, i.stats_reset FROM {ext_schema}.pg_stat_statements_info i"

_SUMS = ",\n    ".join(f"sum(r.{c}::float8) AS {c}" for c in COUNTERS)
_COLUMNS = ", ".join(f"s.{c}" for c in COUNTERS)
_TOTALS = ", ".join(f"sum(e.{c})" for c in COUNTERS)
_NULLS = ", ".join("NULL::float8" for _ in COUNTERS)


def _statements_sql(raw: str, info: str) -> str:
    # Entries are summed per (dbid, userid, queryid): since 1.9 a statement run both at top level and
    # nested has two rows, which would otherwise become duplicate series. Only the top 2N (a bounded
    # sort) and the statements tracked last time come back one by one; everything else comes back as
    # one total per database, and the remainder is the total minus the statements returned. Entries
    # of dropped databases (they linger until evicted) are never ranked and their totals have no
    # datname. A NULL queryid (another role's statement, seen without pg_read_all_stats) is never
    # ranked either: it can only be part of the remainder.
    return f"""
WITH entries AS (
  SELECT r.dbid, r.userid, r.queryid, count(*) AS entries, max(r.stats_since) AS stats_since,
    {_SUMS}
  FROM ({raw}) r
  GROUP BY r.dbid, r.userid, r.queryid
), top AS (
  SELECT t.*, pg_catalog.row_number() OVER (ORDER BY t.exec_ms DESC, t.dbid, t.userid, t.queryid) AS rank
  FROM (SELECT e.* FROM entries e
        WHERE e.queryid IS NOT NULL AND e.dbid IN (SELECT d.oid FROM pg_catalog.pg_database d)
        ORDER BY e.exec_ms DESC, e.dbid, e.userid, e.queryid LIMIT %(candidates)s) t
), tracked AS (
  SELECT e.*, NULL::int8 AS rank FROM entries e
  WHERE (e.dbid, e.userid, e.queryid) IN (
    SELECT t.dbid, t.userid, t.queryid
    FROM ROWS FROM (pg_catalog.unnest(%(tracked_dbid)s::oid[]), pg_catalog.unnest(%(tracked_userid)s::oid[]),
                    pg_catalog.unnest(%(tracked_queryid)s::int8[])) AS t(dbid, userid, queryid))
    AND (e.dbid, e.userid, e.queryid) NOT IN (SELECT t.dbid, t.userid, t.queryid FROM top t)
)
SELECT 'statement' AS kind, s.dbid::int8 AS dbid, d.datname, s.userid::int8 AS userid,
  pg_catalog.pg_get_userbyid(s.userid) AS usename, s.queryid, s.rank, s.stats_since, {_COLUMNS},
  NULL::int8 AS entries, NULL::int8 AS dealloc, NULL::timestamptz AS stats_reset,
  NULL::timestamptz AS started, NULL::timestamptz AS collected_at
FROM (SELECT * FROM top UNION ALL SELECT * FROM tracked) s JOIN pg_catalog.pg_database d ON d.oid = s.dbid
UNION ALL
SELECT 'total', e.dbid::int8, d.datname, NULL, NULL, NULL, NULL, NULL, {_TOTALS}, sum(e.entries)::int8, NULL, NULL,
  NULL, NULL
FROM entries e LEFT JOIN pg_catalog.pg_database d ON d.oid = e.dbid GROUP BY e.dbid, d.datname
UNION ALL
SELECT 'info', NULL, NULL, NULL, NULL, NULL, NULL, NULL, {_NULLS}, NULL, i.dealloc, i.stats_reset,
  pg_catalog.pg_postmaster_start_time(), pg_catalog.statement_timestamp()
FROM ({info}) i"""


_TEXT_SQL = """
SELECT DISTINCT ON (s.dbid, s.userid, s.queryid) s.dbid::int8 AS dbid, s.userid::int8 AS userid, s.queryid,
  pg_catalog.left(s.query, %(fetch_length)s) AS query
FROM {ext_schema}.pg_stat_statements(true) s
WHERE (s.dbid, s.userid, s.queryid) IN (
  SELECT t.dbid, t.userid, t.queryid
  FROM ROWS FROM (pg_catalog.unnest(%(dbid)s::oid[]), pg_catalog.unnest(%(userid)s::oid[]),
                  pg_catalog.unnest(%(queryid)s::int8[])) AS t(dbid, userid, queryid))"""


# -- bookkeeping ----------------------------------------------------------------------------------


@dataclass
class Tracked:
    """What the last run saw of one statement ranked within the top 2N."""

    values: Vector
    stats_since: datetime | None


@dataclass
class StatementState:
    """What survives between runs on one target."""

    tracked: dict[Key, Tracked] = field(default_factory=dict)
    selected: set[Key] = field(default_factory=set)
    # Per database: the sum over every entry that is not tracked, and the exported remainder.
    untracked: dict[int, Vector] = field(default_factory=dict)
    other: dict[int, Vector] = field(default_factory=dict)
    stats_reset: datetime | None = None
    started: datetime | None = None  # the server's start time: another value means a restart or failover
    collected_at: datetime | None = None  # the server's clock at the last run
    texts: dict[Key, str] = field(default_factory=dict)
    text_failure: str | None = None


ZERO: Vector = (0.0,) * len(COUNTERS)


def vector(row: Row) -> Vector:
    """The counters of a row, in COUNTERS order."""
    return tuple([None if (v := row.get(c)) is None else float(v) for c in COUNTERS])


def add(a: Vector, b: Vector) -> Vector:
    """Element-wise sum; a counter the extension does not have stays None."""
    return tuple([None if y is None else (y if x is None else x + y) for x, y in zip(a, b, strict=True)])


def increase(now: Vector, before: Vector | None) -> Vector:
    """Per counter, how much ``now`` grew since ``before`` (never negative; all of it if it had no value)."""
    if before is None:
        return now
    return tuple(None if x is None else (x if y is None else max(0.0, x - y)) for x, y in zip(now, before, strict=True))


def subtract(a: Vector, b: Vector) -> Vector:
    """Element-wise difference; None where either side has no value."""
    return tuple([None if x is None or y is None else x - y for x, y in zip(a, b, strict=True)])


def was_recreated(row: Row, seen: Tracked) -> bool:
    """True when the entry restarted from zero since the last run (reset, or evicted and created again)."""
    if row["stats_since"] is not None and seen.stats_since is not None:
        return bool(row["stats_since"] != seen.stats_since)
    calls, calls_before = row["calls"], seen.values[0]
    return calls is not None and calls_before is not None and float(calls) < calls_before


def select(candidates: list[Row], top_n: int, incumbents: set[Key], eligible: set[Key] | None) -> list[Row]:
    """The top N with hysteresis: a statement already shown competes at half its rank.

    A newcomer must rank within the top N and beat an incumbent's halved rank to take its place, so a
    statement hovering around rank N does not flap in and out. ``eligible`` (None: all) limits newcomers
    to statements whose previous values we know, so the remainder's bookkeeping stays exact.
    """
    pool = [r for r in candidates if eligible is None or key_of(r) in eligible]

    def score(row: Row) -> tuple[float, int]:
        rank = int(row["rank"])
        return (rank / 2 if key_of(row) in incumbents else float(rank), rank)

    return sorted(pool, key=score)[:top_n]


def key_of(row: Row) -> Key:
    """The identity of a statement entry."""
    return (int(row["dbid"]), int(row["userid"]), int(row["queryid"]))


def bookkeep(rows: Rows, state: StatementState, top_n: int) -> tuple[Rows, list[Row]]:
    """Choose the statements to show and update the remainders; returns (output rows, selected rows)."""
    singles: dict[Key, Row] = {}
    for row in rows:
        # A statement both in the top 2N and tracked comes back twice: keep the ranked row.
        if row["kind"] == "statement" and (key_of(row) not in singles or row["rank"] is not None):
            singles[key_of(row)] = row
    values_of = {key: vector(row) for key, row in singles.items()}
    totals = {int(r["dbid"]): vector(r) for r in rows if r["kind"] == "total" and r["datname"] is not None}
    datnames = {int(r["dbid"]): str(r["datname"]) for r in rows if r["kind"] == "total" and r["datname"] is not None}
    entries = sum(int(r["entries"]) for r in rows if r["kind"] == "total")
    info = next((r for r in rows if r["kind"] == "info"), {})

    stats_reset, started = info.get("stats_reset"), info.get("started")
    first = not state.tracked and not state.other
    # Another server behind the DSN (failover) or a restart (the view survives a clean one, not a crash):
    # its values do not continue ours. The remainder keeps its value for this run and counts from here.
    rebase = not first and started is not None and state.started is not None and started != state.started
    # A full reset (pg_stat_statements_reset(), seen in pg_stat_statements_info since 1.9) after our last
    # run: everything in the view happened since, so every current value is new work. A reset time older
    # than our last run (with the same start time) means we cannot tell what is new: rebase.
    reset_seen = stats_reset is not None and state.stats_reset is not None and stats_reset != state.stats_reset
    full_reset = bool(reset_seen and not rebase and stats_reset is not None and state.collected_at is not None
                      and stats_reset >= state.collected_at)
    rebase = rebase or (reset_seen and not full_reset)
    fresh = first or rebase or full_reset  # no previous values to compare with
    known = {} if fresh else state.tracked
    candidates = [r for r in singles.values() if r["rank"] is not None and int(r["rank"]) <= 2 * top_n]
    chosen = select(candidates, top_n, state.selected, None if fresh else set(known))
    selected_keys = {key_of(r) for r in chosen}

    # Work done since the last run by the entries that make up "other" now: the untracked population
    # (every entry not tracked last time, the ones shown from this run on excepted) by difference of its
    # sums, and the tracked ones that are not shown by their own differences.
    untracked_now = dict(totals)
    grown: dict[int, Vector] = {}
    for key, row in singles.items():
        db, values, seen = key[0], values_of[key], known.get(key)
        if db not in totals:
            continue
        if seen is not None or key in selected_keys:
            untracked_now[db] = subtract(untracked_now[db], values)
        if seen is not None and key not in selected_keys:
            delta = values if was_recreated(row, seen) else increase(values, seen.values)
            grown[db] = add(grown.get(db, ZERO), delta)
    other: dict[int, Vector] = {}
    for db, untracked in untracked_now.items():
        if first or rebase:
            # The remainder counts from here: from 0 when the exporter starts (a drop to 0 after an exporter
            # restart is a counter reset Prometheus understands; starting at the absolute value is not).
            zero = tuple(None if x is None else 0.0 for x in untracked)
            other[db] = state.other.get(db, zero) if rebase else zero
            continue
        before = None if full_reset else state.untracked.get(db)
        # Entries evicted since the last run take their totals with them: the difference of sums can
        # then go negative, and increase() clamps it at 0 rather than let the counter go backwards.
        work = increase(untracked, before)
        if db in grown:
            work = add(work, grown[db])
        other[db] = add(state.other[db], work) if db in state.other else work

    # Remember for the next run: the top 2N by their own values, everything else as sums per database.
    tracked_next = {key_of(r): Tracked(values_of[key_of(r)], r["stats_since"]) for r in candidates}
    untracked_next = dict(totals)
    for key in tracked_next:
        if key[0] in totals:
            untracked_next[key[0]] = subtract(untracked_next[key[0]], values_of[key])
    state.tracked, state.selected, state.untracked, state.other = tracked_next, selected_keys, untracked_next, other
    state.stats_reset, state.started, state.collected_at = stats_reset, started, info.get("collected_at")

    out: Rows = []
    for row in chosen:
        out.append({"datname": row["datname"], "usename": row["usename"], "queryid": str(row["queryid"]),
                    **{c: row[c] for c in COUNTERS}})
    for db, values in other.items():
        out.append({"datname": datnames[db], "usename": "", "queryid": OTHER,
                    **dict(zip(COUNTERS, values, strict=True))})
    out.append({"entries": entries, "dealloc": info.get("dealloc"), "stats_reset": stats_reset})
    return out, chosen


# Literals can carry secrets (ALTER ROLE ... PASSWORD '...' is kept verbatim): dollar-quoted and
# single-quoted strings are masked, including one the truncation cut open.
_LITERAL = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$.*?(?:\$\1\$|\Z)|[eE]?'(?:[^'\\]|''|\\.)*(?:'|\Z)", re.DOTALL)
_SPACE = re.compile(r"\s+")


def clean_text(text: str, length: int) -> str:
    """A query text fit for a label: literals masked, whitespace collapsed, at most ``length`` characters."""
    masked = _LITERAL.sub(lambda m: "$$***$$" if m.group(0).startswith("$") else "'***'", text)
    return _SPACE.sub(" ", masked).strip()[:length]


def read_texts(session: Session, ctx: RunContext, state: StatementState, chosen: list[Row]) -> None:
    """Fill the text cache for the shown statements; reads texts only for statements not cached yet."""
    wanted = [key_of(r) for r in chosen]
    state.texts = {k: v for k, v in state.texts.items() if k in set(wanted)}
    missing = [k for k in wanted if k not in state.texts]
    if not missing or ctx.facts is None:
        return
    schema = ctx.extension_schema(session.dbname, EXTENSION)
    length = min(int(ctx.params["query_text_length"]), MAX_TEXT_LENGTH)
    query = pgsql.SQL(_TEXT_SQL).format(ext_schema=schema).as_string(session.conn)
    # The text read loads the whole query text file server-side: done only when the shown set changes,
    # under the run's statement_timeout, and in a savepoint so that its failure leaves the numbers intact.
    rows = session.attempt(lambda: session.query(query, {
        "fetch_length": max(length * 4, length + 64),
        "dbid": [k[0] for k in missing], "userid": [k[1] for k in missing], "queryid": [k[2] for k in missing],
    }))
    if isinstance(rows, CollectError):
        message = str(rows)
        if state.text_failure != message:
            log.warning("pg_stat_statements on %s: query text not read (%s)", ctx.target, message)
        state.text_failure = message
        return
    state.text_failure = None
    for row in rows:
        state.texts[key_of(row)] = clean_text(str(row["query"] or ""), length)


def fetch(session: Session, ctx: RunContext, sql: str | None) -> Rows:
    """Read the ranked statements, choose the top N, account for the remainder, add texts when asked."""
    assert sql is not None
    state = ctx.state.setdefault("statements", StatementState())
    assert isinstance(state, StatementState)
    top_n = max(1, int(ctx.params["top_n"]))
    tracked = list(state.tracked)
    rows = session.query(sql, {
        "candidates": 2 * top_n,
        "tracked_dbid": [k[0] for k in tracked], "tracked_userid": [k[1] for k in tracked],
        "tracked_queryid": [k[2] for k in tracked],
    })
    out, chosen = bookkeep(rows, state, top_n)
    if ctx.params["query_text"]:
        read_texts(session, ctx, state, chosen)
        # bookkeep() puts the shown statements first, in the order of ``chosen``.
        for source, row in zip(chosen, out, strict=False):
            text = state.texts.get(key_of(source))
            if text is not None:
                row["query"] = text
                row["query_info"] = 1
    return out


def _variant(raw: str, info: str, low: int, high: int = VERSION_INFINITY) -> SqlVariant:
    return SqlVariant(sql=_statements_sql(raw, info), min_version=low, max_version=high)


STATEMENTS = Collector(
    name="pg_stat_statements",
    family="slow_queries",
    help="Per-statement totals from pg_stat_statements: the top N statements by total execution time, chosen "
         'stably, plus one queryid="other" remainder per database.',
    interval=30.0,
    timeout=10.0,
    extension=EXTENSION,
    preload="pg_stat_statements",
    version_source=EXTENSION,
    fetch=fetch,
    variants=(
        _variant(_RAW_1_4, _NO_INFO, 104, 108),
        _variant(_RAW_1_8, _NO_INFO, 108, 109),
        _variant(_RAW_1_8, _INFO, 109, 111),
        _variant(_RAW_1_11, _INFO, 111),
    ),
    params=(
        Param("top_n", 100, "Statements shown individually, by total execution time (the rest is summed "
                            'into queryid="other" per database); each adds about 12 series.'),
        Param("query_text", False, "Export the text of the shown statements in pg_stat_statements_query_info. "
                                   "Off by default: texts can hold data and, for some statements, secrets."),
        Param("query_text_length", 120, "Characters of query text kept (after masking literals and "
                                        "collapsing whitespace; at most 1000)."),
    ),
    notes=(
        "Runs in the database of the target's DSN, where the extension must be installed; its installed version "
        "there (not the server's) chooses the columns. Statements are ranked by total execution time; a shown "
        "statement stays while it ranks within the top 2N, and a newcomer enters when it ranks within the top N "
        "and better than half an incumbent's rank, after being seen in the top 2N for one run. "
        'Series with queryid="other" and usename="" sum every statement of the database that is not shown: '
        "that remainder is counted by the exporter, starting at 0 when it starts and growing by exactly what "
        "those statements did between runs, so `increase()` of the top plus `other` equals the increase of "
        "the database's total, and it never goes backwards when statements enter or leave the top N or "
        "when statistics are reset (a reset shows as a drop only in the shown statements' own series, which "
        "Prometheus treats as the counter reset it is). After a server restart or failover (another "
        "pg_postmaster_start_time) the remainder does not count that run's work rather than invent it. Entries "
        "evicted between two runs (see pg_stat_statements_dealloc_total) take their work since the previous "
        "run with them. Read without "
        "query text; texts are read only with query_text on, only for the shown statements and only when "
        "that set changes; string literals are masked."
    ),
    metrics=(
        counter("pg_stat_statements_calls_total", "Times the statement was executed.", "calls", STMT),
        counter("pg_stat_statements_exec_seconds_total", "Time spent executing the statement.", "exec_ms", STMT,
                unit="seconds", scale=MS),
        counter("pg_stat_statements_plan_seconds_total",
                "Time spent planning the statement (extension 1.8+ with pg_stat_statements.track_planning on; "
                "absent otherwise).", "plan_ms", STMT, unit="seconds", scale=MS),
        counter("pg_stat_statements_rows_total", "Rows retrieved or affected by the statement.", "rows", STMT),
        counter("pg_stat_statements_shared_blks_hit_total", "Shared buffer hits of the statement.",
                "shared_blks_hit", STMT),
        counter("pg_stat_statements_shared_blks_read_total",
                "Shared blocks the statement read (from the OS cache or disk).", "shared_blks_read", STMT),
        counter("pg_stat_statements_temp_blks_read_total", "Temporary file blocks the statement read.",
                "temp_blks_read", STMT),
        counter("pg_stat_statements_temp_blks_written_total",
                "Temporary file blocks the statement wrote (work_mem too small).", "temp_blks_written", STMT),
        counter("pg_stat_statements_block_read_seconds_total",
                "Time the statement spent reading data file blocks (shared and local; needs track_io_timing).",
                "blk_read_ms", STMT, unit="seconds", scale=MS),
        counter("pg_stat_statements_block_write_seconds_total",
                "Time the statement spent writing data file blocks (shared and local; needs track_io_timing).",
                "blk_write_ms", STMT, unit="seconds", scale=MS),
        counter("pg_stat_statements_wal_bytes_total", "WAL the statement generated (extension 1.8+).",
                "wal_bytes", STMT, unit="bytes"),
        gauge("pg_stat_statements_query_info",
              "Value 1; the query label holds the statement's text, truncated, literals masked (only with "
              "query_text on, only for the shown statements).", "query_info", (*STMT, "query")),
        gauge("pg_stat_statements_entries",
              "Entries pg_stat_statements holds now; near pg_settings_pg_stat_statements_max it evicts.",
              "entries"),
        counter("pg_stat_statements_dealloc_total",
                "Times pg_stat_statements evicted its least used entries to make room (extension 1.9+).",
                "dealloc"),
        gauge("pg_stat_statements_stats_reset_timestamp_seconds",
              "When all pg_stat_statements statistics were last reset (Unix time; extension 1.9+).",
              "stats_reset", unit="seconds"),
    ),
)

COLLECTORS = (STATEMENTS,)
