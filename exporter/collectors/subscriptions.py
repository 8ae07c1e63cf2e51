"""Logical replication seen from the subscriber: workers, message ages, lag, and apply and sync errors."""

from __future__ import annotations

from exporter.catalog import Collector, SqlVariant
from exporter.collectors._helpers import counter, gauge

SUB = ("datname", "subname")


# Every subscription of every database (pg_subscription is a shared catalog), by oid. Only columns of
# pg_subscription that every role may read are used (subconninfo is not); before 14 that excludes oid, so
# the oid comes from pg_stat_subscription (a view that reads pg_subscription as its owner) by name. A name is
# unique only within its database: where databases share one, the apply worker's database tells them apart,
# and without a running worker such subscriptions are left out (pg_shdepend records no owner for the
# superusers who own them).
_SUBS_12 = """
  SELECT s.subid, su.subname, d.datname, su.subenabled
  FROM pg_catalog.pg_subscription su
  JOIN pg_catalog.pg_database d ON d.oid = su.subdbid
  JOIN (SELECT DISTINCT st.subid, st.subname FROM pg_catalog.pg_stat_subscription st) s ON s.subname = su.subname
  WHERE (SELECT count(*) FROM pg_catalog.pg_subscription o WHERE o.subname = su.subname) = 1
     OR EXISTS (SELECT FROM pg_catalog.pg_stat_subscription st
                JOIN pg_catalog.pg_stat_activity a ON a.pid = st.pid
                WHERE st.subid = s.subid AND a.datid = su.subdbid)"""
_SUBS_14 = """
  SELECT su.oid AS subid, su.subname, d.datname, su.subenabled
  FROM pg_catalog.pg_subscription su JOIN pg_catalog.pg_database d ON d.oid = su.subdbid"""


def _subscription_sql(subscriptions: str, worker: str, parallel_workers: str) -> str:
    """One row per subscription, its workers summed.

    ``worker`` classifies a pg_stat_subscription row as 'apply', 'parallel apply' or 'table synchronization'.
    """
    return f"""
WITH subs AS ({subscriptions}
), w AS (
  SELECT st.subid, st.pid, st.received_lsn, st.last_msg_receipt_time, st.latest_end_lsn, st.latest_end_time,
         {worker} AS worker
  FROM pg_catalog.pg_stat_subscription st
  WHERE st.pid IS NOT NULL
)
SELECT su.subname::text AS subname, su.datname::text AS datname, su.subenabled::int AS enabled,
       count(w.pid) FILTER (WHERE w.worker = 'apply') AS apply_workers,
       {parallel_workers} AS parallel_apply_workers,
       count(w.pid) FILTER (WHERE w.worker = 'table synchronization') AS sync_workers,
       max(pg_catalog.date_part('epoch', pg_catalog.statement_timestamp() - w.last_msg_receipt_time))
         FILTER (WHERE w.worker = 'apply') AS last_message_age,
       max(pg_catalog.date_part('epoch', pg_catalog.statement_timestamp() - w.latest_end_time))
         FILTER (WHERE w.worker = 'apply') AS report_age,
       max(CASE WHEN w.latest_end_lsn IS NOT NULL AND w.received_lsn IS NOT NULL
                THEN GREATEST(pg_catalog.pg_wal_lsn_diff(w.latest_end_lsn, w.received_lsn), 0) END)
         FILTER (WHERE w.worker = 'apply') AS receive_lag_bytes
FROM subs su
LEFT JOIN w ON w.subid = su.subid
GROUP BY su.subid, su.subname, su.datname, su.subenabled"""


_PARALLEL = "count(w.pid) FILTER (WHERE w.worker = 'parallel apply')"
_WORKER_15 = "CASE WHEN st.relid IS NULL THEN 'apply' ELSE 'table synchronization' END"

SUBSCRIPTIONS = Collector(
    name="pg_stat_subscription",
    family="subscriptions",
    help="Each logical replication subscription on this server (the subscriber): enabled, its workers, how "
         "long since the publisher was heard from, and WAL it has not received yet.",
    interval=15.0,
    timeout=5.0,
    variants=(
        # Before 16 a row with a relation is a table synchronization worker, any other the apply worker.
        SqlVariant(min_version=120000, max_version=140000,
                   sql=_subscription_sql(_SUBS_12, _WORKER_15, "NULL::bigint")),
        SqlVariant(min_version=140000, max_version=160000,
                   sql=_subscription_sql(_SUBS_14, _WORKER_15, "NULL::bigint")),
        # 16 adds parallel apply workers (leader_pid set); 17 names the kind itself (worker_type).
        SqlVariant(min_version=160000, max_version=170000,
                   sql=_subscription_sql(_SUBS_14, "CASE WHEN st.relid IS NOT NULL THEN 'table synchronization' "
                                         "WHEN st.leader_pid IS NOT NULL THEN 'parallel apply' ELSE 'apply' END",
                                         _PARALLEL)),
        SqlVariant(min_version=170000, sql=_subscription_sql(_SUBS_14, "st.worker_type", _PARALLEL)),
    ),
    metrics=(
        gauge("pg_subscription_enabled", "1 when the subscription is enabled, 0 when disabled (by ALTER SUBSCRIPTION "
              "... DISABLE, or by disable_on_error after an error).", "enabled", SUB),
        gauge("pg_subscription_apply_workers",
              "Apply workers running for the subscription: 1 when it replicates; 0 while enabled means it is "
              "stopped (failing to connect, or erroring and restarting).", "apply_workers", SUB),
        gauge("pg_subscription_parallel_apply_workers",
              "Parallel apply workers streaming large transactions (16+).", "parallel_apply_workers", SUB),
        gauge("pg_subscription_sync_workers",
              "Table synchronization workers copying tables' initial data.", "sync_workers", SUB),
        gauge("pg_subscription_last_message_age_seconds",
              "Seconds since the apply worker last received a message from the publisher (data or keepalive; "
              "keepalives come at least every wal_sender_timeout / 2 from a healthy publisher).",
              "last_message_age", SUB, unit="seconds"),
        gauge("pg_subscription_report_age_seconds",
              "Seconds since the publisher's send time of the last WAL end position it reported (latest_end_time): "
              "grows while the publisher is paused or the link is stalled.", "report_age", SUB, unit="seconds"),
        gauge("pg_subscription_receive_lag_bytes",
              "WAL the publisher reported having (latest_end_lsn) that the apply worker has not received yet.",
              "receive_lag_bytes", SUB, unit="bytes"),
    ),
    notes="Per subscription on the subscriber; the publisher side is pg_replication_slots and pg_stat_replication "
          "(the slot is named after the subscription). Age and lag series are absent while no apply worker "
          "runs: the PostgresSubscriptionStopped alert is `pg_subscription_enabled unless "
          "pg_subscription_apply_workers > 0` (disabled ones included). On 12 and 13 "
          "pg_monitor cannot read pg_subscription.oid: subscriptions are matched by name, and one whose name "
          "another database also uses is reported only while its apply worker runs.",
)

_STATS_COMMON = """
SELECT su.subname::text AS subname, d.datname::text AS datname, s.apply_error_count, s.sync_error_count,
       pg_catalog.date_part('epoch', s.stats_reset) AS stats_reset, NULL::text AS conflict, NULL::bigint AS conflicts
FROM pg_catalog.pg_stat_subscription_stats s
JOIN pg_catalog.pg_subscription su ON su.oid = s.subid
JOIN pg_catalog.pg_database d ON d.oid = su.subdbid"""

# 18 counts conflicts by kind: one row per (subscription, kind) so that each is a labelled counter.
_STATS_18 = _STATS_COMMON + """
UNION ALL
SELECT su.subname::text, d.datname::text, NULL, NULL, NULL, c.conflict, c.conflicts
FROM pg_catalog.pg_stat_subscription_stats s
JOIN pg_catalog.pg_subscription su ON su.oid = s.subid
JOIN pg_catalog.pg_database d ON d.oid = su.subdbid
CROSS JOIN LATERAL (VALUES ('insert_exists', s.confl_insert_exists),
                           ('update_origin_differs', s.confl_update_origin_differs),
                           ('update_exists', s.confl_update_exists),
                           ('update_missing', s.confl_update_missing),
                           ('delete_origin_differs', s.confl_delete_origin_differs),
                           ('delete_missing', s.confl_delete_missing),
                           ('multiple_unique_conflicts', s.confl_multiple_unique_conflicts))
  AS c(conflict, conflicts)"""

SUBSCRIPTION_STATS = Collector(
    name="pg_stat_subscription_stats",
    family="subscriptions",
    help="Errors of each subscription's apply and table synchronization workers (15+), and conflicts by kind (18+).",
    interval=30.0,
    timeout=5.0,
    min_server_version=150000,
    variants=(
        SqlVariant(min_version=150000, max_version=180000, sql=_STATS_COMMON),
        SqlVariant(min_version=180000, sql=_STATS_18),
    ),
    metrics=(
        counter("pg_subscription_apply_errors_total",
                "Errors the subscription's apply worker hit (each one stops and restarts the worker).",
                "apply_error_count", SUB),
        counter("pg_subscription_sync_errors_total", "Errors during the initial copy of tables.",
                "sync_error_count", SUB),
        counter("pg_subscription_conflicts_total",
                "Conflicts met while applying changes, by kind (18+; insert_exists and update_exists stop the "
                "worker with an error, the others are resolved and only counted).", "conflicts", (*SUB, "conflict")),
        gauge("pg_subscription_stats_reset_timestamp_seconds",
              "When the subscription's statistics were last reset (Unix time); absent if never.", "stats_reset", SUB,
              unit="seconds"),
    ),
)

COLLECTORS = (SUBSCRIPTIONS, SUBSCRIPTION_STATS)
