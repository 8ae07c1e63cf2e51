"""Streaming replication seen from both ends, and replication slots.

Byte distances come from pg_wal_lsn_diff and are exact. The ``*_lag`` intervals of
pg_stat_replication are sampled by PostgreSQL and go NULL when the standby has nothing to replay,
so they have no sample then. Standby lag in seconds is made idle-proof: see ``_standby_lag``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import sql

from exporter.catalog import Collector, Param, Rows, SqlVariant
from exporter.collectors._helpers import counter, gauge

if TYPE_CHECKING:
    from exporter.db import Session
    from exporter.hooks import RunContext

STANDBY = ("application_name", "client_addr", "state", "sync_state")
SLOT = ("slot_name", "slot_type", "database")


def _distance(newer: str, older: str) -> str:
    """Bytes from ``older`` to ``newer`` (never negative); NULL when either position is unknown."""
    return (f"CASE WHEN {newer} IS NOT NULL AND {older} IS NOT NULL "
            f"THEN GREATEST(pg_catalog.pg_wal_lsn_diff({newer}, {older}), 0) END")


ROLE = Collector(
    name="pg_replication_role",
    family="replication",
    help="Whether the server is a standby (in recovery) or a primary.",
    interval=15.0,
    timeout=5.0,
    variants=(SqlVariant(min_version=120000,
                         sql="SELECT pg_catalog.pg_is_in_recovery()::int AS is_replica"),),
    metrics=(
        gauge("pg_replication_is_replica", "1 on a standby (server in recovery), 0 on a primary.", "is_replica"),
    ),
)


# Several WAL senders can share one label set (two pg_receivewal from one host): one series per set,
# with the worst figure, so that a scrape never carries duplicate series.
_STAT_REPLICATION_SQL = f"""
WITH pos AS (
  -- Guarded: pg_current_wal_lsn() fails on a standby, and the role can change between probes.
  SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL ELSE pg_catalog.pg_current_wal_lsn() END AS lsn
)
SELECT COALESCE(r.application_name, '') AS application_name,
       COALESCE(pg_catalog.host(r.client_addr), '') AS client_addr,
       COALESCE(r.state, '') AS state,
       COALESCE(r.sync_state, '') AS sync_state,
       count(*) AS senders,
       max(pg_catalog.date_part('epoch', r.write_lag)) AS write_lag,
       max(pg_catalog.date_part('epoch', r.flush_lag)) AS flush_lag,
       max(pg_catalog.date_part('epoch', r.replay_lag)) AS replay_lag,
       max({_distance("pos.lsn", "r.sent_lsn")}) AS sent_lag_bytes,
       max({_distance("pos.lsn", "r.write_lsn")}) AS write_lag_bytes,
       max({_distance("pos.lsn", "r.flush_lsn")}) AS flush_lag_bytes,
       max({_distance("pos.lsn", "r.replay_lsn")}) AS replay_lag_bytes,
       max(pg_catalog.date_part('epoch', pg_catalog.now() - r.reply_time)) AS reply_age
FROM pg_catalog.pg_stat_replication r CROSS JOIN pos
WHERE pos.lsn IS NOT NULL
GROUP BY 1, 2, 3, 4"""

STAT_REPLICATION = Collector(
    name="pg_stat_replication",
    family="replication",
    help="Each standby (WAL sender) as the primary sees it: sampled lag times and exact byte distances.",
    interval=15.0,
    timeout=5.0,
    role="primary",
    variants=(SqlVariant(min_version=120000, sql=_STAT_REPLICATION_SQL),),
    metrics=(
        gauge("pg_stat_replication_senders",
              "WAL sender processes with these labels (normally 1; more when several share a name and host).",
              "senders", STANDBY),
        gauge("pg_stat_replication_write_lag_seconds",
              "Time until recent WAL was written on the standby, as sampled by PostgreSQL; no sample when "
              "the standby is idle and caught up (the column is NULL then).", "write_lag", STANDBY,
              unit="seconds"),
        gauge("pg_stat_replication_flush_lag_seconds",
              "Time until recent WAL was flushed on the standby (sampled; no sample when idle).", "flush_lag",
              STANDBY, unit="seconds"),
        gauge("pg_stat_replication_replay_lag_seconds",
              "Time until recent WAL was replayed on the standby (sampled; no sample when idle; can stay at a "
              "stale value while replay is paused: use the byte distance for alerts).", "replay_lag", STANDBY,
              unit="seconds"),
        gauge("pg_stat_replication_sent_lag_bytes",
              "WAL bytes written on the primary but not yet sent to the standby (exact).", "sent_lag_bytes",
              STANDBY, unit="bytes"),
        gauge("pg_stat_replication_write_lag_bytes",
              "WAL bytes written on the primary but not yet written on the standby (exact).", "write_lag_bytes",
              STANDBY, unit="bytes"),
        gauge("pg_stat_replication_flush_lag_bytes",
              "WAL bytes written on the primary but not yet flushed on the standby (exact).", "flush_lag_bytes",
              STANDBY, unit="bytes"),
        gauge("pg_stat_replication_replay_lag_bytes",
              "WAL bytes written on the primary but not yet replayed on the standby (exact; absent for "
              "senders that do not replay, e.g. pg_basebackup).", "replay_lag_bytes", STANDBY, unit="bytes"),
        gauge("pg_stat_replication_reply_age_seconds",
              "Seconds since the standby's last status reply (it replies every wal_receiver_status_interval).",
              "reply_age", STANDBY, unit="seconds"),
    ),
)


_STANDBY_SQL = """
WITH s AS (
  SELECT pg_catalog.pg_last_wal_receive_lsn() AS receive_lsn,
         pg_catalog.pg_last_wal_replay_lsn() AS replay_lsn,
         pg_catalog.pg_last_xact_replay_timestamp() AS replay_ts,
         pg_catalog.pg_is_wal_replay_paused() AS paused
  -- Guarded: the pause function fails outside recovery, and a promotion can precede the next probe.
  WHERE pg_catalog.pg_is_in_recovery()
), w AS (
  SELECT status, latest_end_lsn, last_msg_receipt_time FROM pg_catalog.pg_stat_wal_receiver LIMIT 1
)
SELECT pg_catalog.date_part('epoch', pg_catalog.now()) AS now_epoch,
       pg_catalog.date_part('epoch', pg_catalog.pg_postmaster_start_time()) AS started_epoch,
       pg_catalog.date_part('epoch', s.replay_ts) AS replay_ts_epoch,
       pg_catalog.date_part('epoch', pg_catalog.now() - s.replay_ts) AS replay_age,
       s.paused::int AS paused,
       COALESCE(w.status = 'streaming', false)::int AS streaming,
       w.status AS status,
       CASE WHEN w.status IS NOT NULL THEN 1 END AS receiver_present,
       pg_catalog.date_part('epoch', pg_catalog.now() - w.last_msg_receipt_time) AS last_message_age,
       CASE WHEN s.receive_lsn IS NOT NULL
            THEN GREATEST(pg_catalog.pg_wal_lsn_diff(s.receive_lsn, s.replay_lsn), 0) END AS replay_lag_bytes,
       CASE WHEN w.latest_end_lsn IS NOT NULL AND s.receive_lsn IS NOT NULL
            THEN GREATEST(pg_catalog.pg_wal_lsn_diff(w.latest_end_lsn, s.receive_lsn), 0) END
         AS receive_lag_bytes,
       -- Caught up: streaming, everything received is replayed, and the sender has reported no WAL
       -- beyond what we received. An idle primary leaves the standby caught up: lag 0.
       COALESCE(w.status = 'streaming' AND s.replay_lsn >= s.receive_lsn
                AND (w.latest_end_lsn IS NULL OR w.latest_end_lsn <= s.receive_lsn), false) AS caught_up
FROM s LEFT JOIN w ON true"""

#: How long an observation "caught up at time T" may be carried between runs (see _standby_lag).
CAUGHT_UP_MEMORY_SECONDS = 600.0


def _standby_lag(rows: Rows, ctx: RunContext) -> Rows:
    """Lag in seconds: 0 when caught up, else the tighter of two upper bounds on data staleness.

    ``now - pg_last_xact_replay_timestamp()`` alone grows without bound on an idle primary, and the
    first write after an idle hour would briefly look like an hour of lag. Everything the primary
    had was replayed at the last run we saw the standby caught up, so staleness is also at most
    ``now - caught_up_at``; that observation is kept only while the same server keeps being seen
    as a standby by this collector (same postmaster start, runs not far apart).
    """
    state = ctx.state
    for row in rows:
        now = float(row["now_epoch"])
        continuity = (row["started_epoch"], state.get("last_run", -1.0))
        if continuity[0] != state.get("started") or now - continuity[1] > CAUGHT_UP_MEMORY_SECONDS:
            state.pop("caught_up_at", None)
        state["started"], state["last_run"] = row["started_epoch"], now
        if row["caught_up"]:
            state["caught_up_at"] = now
            row["lag_seconds"] = 0.0
            continue
        bounds: list[Any] = [row["replay_ts_epoch"], state.get("caught_up_at")]
        known = [now - float(t) for t in bounds if t is not None]
        row["lag_seconds"] = max(0.0, min(known)) if known else None
    return rows


STANDBY_STATUS = Collector(
    name="pg_replication_standby",
    family="replication",
    help="A standby's own view: replication lag, received/replayed WAL gaps, WAL receiver and replay pause.",
    interval=15.0,
    timeout=5.0,
    role="standby",
    variants=(SqlVariant(min_version=120000, sql=_STANDBY_SQL),),
    transform=_standby_lag,
    metrics=(
        gauge("pg_replication_lag_seconds",
              "How stale the standby's data may be: 0 while the WAL receiver streams and everything received "
              "is replayed (an idle primary is not lag), else seconds since the last replayed transaction or "
              "since the standby was last seen caught up, whichever is less.", "lag_seconds", unit="seconds"),
        gauge("pg_replication_last_xact_replay_age_seconds",
              "now() - pg_last_xact_replay_timestamp(): grows on an idle primary, so not a lag by itself.",
              "replay_age", unit="seconds"),
        gauge("pg_replication_receive_lag_bytes",
              "WAL the primary reported having that this standby has not received and flushed yet (as of the "
              "last message from the primary).", "receive_lag_bytes", unit="bytes"),
        gauge("pg_replication_replay_lag_bytes",
              "WAL received by this standby but not replayed yet (exact).", "replay_lag_bytes", unit="bytes"),
        gauge("pg_replication_replay_paused",
              "1 when WAL replay is paused or a pause was requested (pg_wal_replay_pause).", "paused"),
        gauge("pg_replication_wal_receiver_streaming",
              "1 when the WAL receiver is connected and streaming from the primary.", "streaming"),
        gauge("pg_replication_wal_receiver_status",
              "Value 1 with the WAL receiver's status (streaming, waiting, ...); absent when no receiver runs.",
              "receiver_present", ("status",)),
        gauge("pg_replication_wal_receiver_last_message_age_seconds",
              "Seconds since the last message from the primary (keepalives included).", "last_message_age",
              unit="seconds"),
    ),
)


def _slots_sql(wal_status: str, safe_wal_size: str, inactive_since: str) -> str:
    return f"""
WITH pos AS (
  -- On a standby WAL is held back relative to what it has received (or replayed, if more).
  SELECT CASE WHEN pg_catalog.pg_is_in_recovery()
              THEN GREATEST(pg_catalog.pg_last_wal_receive_lsn(), pg_catalog.pg_last_wal_replay_lsn())
              ELSE pg_catalog.pg_current_wal_lsn() END AS lsn
)
SELECT s.slot_name::text AS slot_name, s.slot_type, COALESCE(s.database::text, '') AS database,
       s.active::int AS active,
       {_distance("pos.lsn", "s.restart_lsn")} AS retained_bytes,
       {_distance("pos.lsn", "s.confirmed_flush_lsn")} AS confirmed_flush_lag_bytes,
       pg_catalog.age(s.xmin) AS xmin_age,
       pg_catalog.age(s.catalog_xmin) AS catalog_xmin_age,
       {safe_wal_size} AS safe_wal_size,
       {wal_status} AS wal_status,
       CASE WHEN {wal_status} IS NOT NULL THEN 1 END AS wal_status_present,
       CASE WHEN NOT s.active THEN pg_catalog.date_part('epoch', pg_catalog.now() - {inactive_since}) END
         AS inactive_seconds
FROM pg_catalog.pg_replication_slots s CROSS JOIN pos"""


SLOTS = Collector(
    name="pg_replication_slots",
    family="replication",
    help="Replication slots: whether in use, WAL and transaction horizons they hold back, WAL safety margin.",
    interval=30.0,
    timeout=5.0,
    variants=(
        SqlVariant(min_version=120000, max_version=130000,
                   sql=_slots_sql("NULL::text", "NULL::bigint", "NULL::timestamptz")),
        SqlVariant(min_version=130000, max_version=170000,
                   sql=_slots_sql("s.wal_status", "s.safe_wal_size", "NULL::timestamptz")),
        SqlVariant(min_version=170000, sql=_slots_sql("s.wal_status", "s.safe_wal_size", "s.inactive_since")),
    ),
    metrics=(
        gauge("pg_replication_slot_active", "1 when a process is using the slot.", "active", SLOT),
        gauge("pg_replication_slot_retained_bytes",
              "WAL the slot holds back: current WAL position (received/replayed on a standby) minus restart_lsn. "
              "An inactive slot's figure grows until the disk is full unless max_slot_wal_keep_size is set.",
              "retained_bytes", SLOT, unit="bytes"),
        gauge("pg_replication_slot_confirmed_flush_lag_bytes",
              "Logical slots: WAL the consumer has not confirmed yet (current position minus "
              "confirmed_flush_lsn); differs from retained bytes.", "confirmed_flush_lag_bytes", SLOT,
              unit="bytes"),
        gauge("pg_replication_slot_xmin_age",
              "Age in transactions of the xmin the slot holds back (hot_standby_feedback): blocks vacuum.",
              "xmin_age", SLOT),
        gauge("pg_replication_slot_catalog_xmin_age",
              "Age in transactions of the catalog xmin a logical slot holds back: blocks catalog vacuum.",
              "catalog_xmin_age", SLOT),
        gauge("pg_replication_slot_safe_wal_size_bytes",
              "WAL that can still be written before the slot risks losing WAL it needs (13+; absent when "
              "max_slot_wal_keep_size = -1, i.e. unlimited).", "safe_wal_size", SLOT, unit="bytes"),
        gauge("pg_replication_slot_wal_status",
              "Value 1 with the slot's wal_status (reserved, extended, unreserved, lost; PostgreSQL 13+).",
              "wal_status_present", (*SLOT, "wal_status")),
        gauge("pg_replication_slot_inactive_seconds",
              "Seconds since the slot became inactive (PostgreSQL 17+; absent while active).",
              "inactive_seconds", SLOT, unit="seconds"),
    ),
)


STAT_REPLICATION_SLOTS = Collector(
    name="pg_stat_replication_slots",
    family="replication",
    help="Logical decoding statistics per logical slot: transactions spilled to disk and streamed (14+).",
    interval=60.0,
    timeout=5.0,
    min_server_version=140000,
    variants=(SqlVariant(min_version=140000, sql="""
SELECT st.slot_name::text AS slot_name, COALESCE(s.slot_type, 'logical') AS slot_type,
       COALESCE(s.database::text, '') AS database,
       st.spill_txns, st.spill_count, st.spill_bytes, st.stream_txns, st.stream_count, st.stream_bytes,
       st.total_txns, st.total_bytes
FROM pg_catalog.pg_stat_replication_slots st
LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name = st.slot_name"""),),
    metrics=(
        counter("pg_stat_replication_slots_spill_txns_total",
                "Transactions spilled to disk because logical_decoding_work_mem was exceeded.", "spill_txns", SLOT),
        counter("pg_stat_replication_slots_spill_count_total", "Times transactions were spilled to disk.",
                "spill_count", SLOT),
        counter("pg_stat_replication_slots_spill_bytes_total", "Decoded transaction data spilled to disk.",
                "spill_bytes", SLOT, unit="bytes"),
        counter("pg_stat_replication_slots_stream_txns_total",
                "In-progress transactions streamed to the consumer.", "stream_txns", SLOT),
        counter("pg_stat_replication_slots_stream_count_total", "Times in-progress transactions were streamed.",
                "stream_count", SLOT),
        counter("pg_stat_replication_slots_stream_bytes_total", "Decoded transaction data streamed.",
                "stream_bytes", SLOT, unit="bytes"),
        counter("pg_stat_replication_slots_decoded_txns_total", "Decoded transactions sent to the consumer.",
                "total_txns", SLOT),
        counter("pg_stat_replication_slots_decoded_bytes_total", "Decoded transaction data sent to the consumer.",
                "total_bytes", SLOT, unit="bytes"),
    ),
)


# -- optional heartbeat ------------------------------------------------------------------------
# A row the exporter stamps with the primary's clock; its age read on a standby is the lag,
# whether or not the application writes. Off by default: it needs a table and write rights.

_HEARTBEAT_PARAMS = (
    Param("schema", "pgvitals", "Schema of the heartbeat table (in the target DSN's database)."),
    Param("table", "heartbeat", "Heartbeat table: (id integer PRIMARY KEY, ts timestamptz NOT NULL)."),
)


def _heartbeat_table(ctx: RunContext) -> sql.Composed:
    """The configured table as quoted identifiers: config values never become SQL text."""
    return sql.SQL("{}.{}").format(sql.Identifier(str(ctx.params["schema"])), sql.Identifier(str(ctx.params["table"])))


def _write_heartbeat(session: Session, ctx: RunContext, _sql: str | None) -> Rows:
    """Stamp the heartbeat row (the engine commits it: this collector declares ``writes``)."""
    stamp = sql.SQL(
        "INSERT INTO {} (id, ts) VALUES (1, pg_catalog.now()) ON CONFLICT (id) DO UPDATE SET ts = excluded.ts"
    ).format(_heartbeat_table(ctx))
    with session.conn.cursor() as cur:
        cur.execute(stamp, prepare=False)
    return []


def _read_heartbeat(session: Session, ctx: RunContext, _sql: str | None) -> Rows:
    """Age of the newest heartbeat as this standby sees it."""
    query = sql.SQL(
        "SELECT pg_catalog.date_part('epoch', pg_catalog.now() - max(h.ts)) AS lag FROM {} h"
    ).format(_heartbeat_table(ctx))
    with session.conn.cursor() as cur:
        cur.execute(query, prepare=False)
        return list(cur.fetchall())


HEARTBEAT_WRITER = Collector(
    name="pg_replication_heartbeat_writer",
    family="replication",
    help="Writes the heartbeat row on the primary (the only collector that writes; disabled by default).",
    interval=5.0,
    timeout=2.0,
    role="primary",
    min_server_version=120000,
    enabled=False,
    writes=True,
    params=_HEARTBEAT_PARAMS,
    fetch=_write_heartbeat,
    metrics=(),
    notes="Needs the table and `GRANT SELECT, INSERT, UPDATE` on it for the exporter's role; writes one "
          "row every interval in a short read-write transaction with the usual timeouts and "
          "synchronous_commit = local, so it never waits for a synchronous standby.",
)

HEARTBEAT = Collector(
    name="pg_replication_heartbeat",
    family="replication",
    help="Replication lag from the heartbeat row read on a standby (disabled by default).",
    interval=15.0,
    timeout=5.0,
    role="standby",
    min_server_version=120000,
    enabled=False,
    params=_HEARTBEAT_PARAMS,
    fetch=_read_heartbeat,
    metrics=(
        gauge("pg_replication_heartbeat_lag_seconds",
              "Standby's now() minus the newest heartbeat written on the primary: true lag plus up to one "
              "writer interval; assumes synchronized clocks.", "lag", unit="seconds"),
    ),
    notes="Enable together with `pg_replication_heartbeat_writer` on the primary; the role needs SELECT on "
          "the table.",
)

COLLECTORS = (ROLE, STAT_REPLICATION, STANDBY_STATUS, SLOTS, STAT_REPLICATION_SLOTS, HEARTBEAT_WRITER, HEARTBEAT)
