"""WAL, checkpoints, background writer, I/O statistics and the WAL archiver, version-aware.

PostgreSQL 17 moved the checkpoint counters from pg_stat_bgwriter to pg_stat_checkpointer and 18
reshaped pg_stat_io and pg_stat_wal: every variant returns the same columns (NULL where a server has
no such figure), so the metric names stay the same on 12 to 18.
"""

from __future__ import annotations

from exporter.catalog import Collector, SqlVariant
from exporter.collectors._helpers import MS, counter, gauge

WAL = Collector(
    name="pg_wal",
    family="wal",
    help="WAL position: written on a primary, replayed on a standby.",
    interval=30.0,
    timeout=5.0,
    variants=(SqlVariant(min_version=120000, sql="""
SELECT pg_catalog.pg_wal_lsn_diff(
         CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()
              ELSE pg_catalog.pg_current_wal_lsn() END, '0/0') AS position_bytes"""),),
    metrics=(
        gauge("pg_wal_position_bytes",
              "WAL position as a byte offset: written on a primary, replayed on a standby. Only ever grows: "
              "rate() is WAL throughput; the primary's minus a standby's is that standby's lag in bytes.",
              "position_bytes", unit="bytes"),
    ),
)

# pg_ls_waldir() is what managed services revoke first: in a collector of its own, so that a denial
# takes only the directory figures, never the WAL position.
WAL_DIRECTORY = Collector(
    name="pg_wal_directory",
    family="wal",
    help="Size and segment count of pg_wal (pg_ls_waldir(): pg_monitor, or an explicit EXECUTE grant).",
    interval=30.0,
    timeout=5.0,
    requires=("pg_catalog.pg_ls_waldir()",),
    variants=(SqlVariant(min_version=120000, sql="""
SELECT COALESCE(sum(f.size), 0) AS size_bytes,
       count(*) FILTER (WHERE f.name ~ '^[0-9A-F]{24}$') AS segments
FROM pg_catalog.pg_ls_waldir() f"""),),
    metrics=(
        gauge("pg_wal_directory_size_bytes", "Total size of the files in pg_wal.", "size_bytes", unit="bytes"),
        gauge("pg_wal_directory_segments", "WAL segment files in pg_wal.", "segments"),
    ),
)


CHECKPOINTER = Collector(
    name="pg_stat_checkpointer",
    family="wal",
    help="Checkpoints and restartpoints (pg_stat_bgwriter before 17, pg_stat_checkpointer since).",
    interval=60.0,
    timeout=5.0,
    variants=(
        SqlVariant(min_version=120000, max_version=170000, sql="""
SELECT b.checkpoints_timed AS num_timed, b.checkpoints_req AS num_requested, NULL::bigint AS num_done,
       NULL::bigint AS restartpoints_timed, NULL::bigint AS restartpoints_req, NULL::bigint AS restartpoints_done,
       b.checkpoint_write_time AS write_time, b.checkpoint_sync_time AS sync_time,
       b.buffers_checkpoint AS buffers_written, NULL::bigint AS slru_written,
       pg_catalog.date_part('epoch', b.stats_reset) AS stats_reset
FROM pg_catalog.pg_stat_bgwriter b"""),
        SqlVariant(min_version=170000, max_version=180000, sql="""
SELECT c.num_timed, c.num_requested, NULL::bigint AS num_done,
       c.restartpoints_timed, c.restartpoints_req, c.restartpoints_done,
       c.write_time, c.sync_time, c.buffers_written, NULL::bigint AS slru_written,
       pg_catalog.date_part('epoch', c.stats_reset) AS stats_reset
FROM pg_catalog.pg_stat_checkpointer c"""),
        SqlVariant(min_version=180000, sql="""
SELECT c.num_timed, c.num_requested, c.num_done,
       c.restartpoints_timed, c.restartpoints_req, c.restartpoints_done,
       c.write_time, c.sync_time, c.buffers_written, c.slru_written,
       pg_catalog.date_part('epoch', c.stats_reset) AS stats_reset
FROM pg_catalog.pg_stat_checkpointer c"""),
    ),
    metrics=(
        counter("pg_stat_checkpointer_num_timed_total",
                "Checkpoints scheduled by checkpoint_timeout (before 17 a standby counts its restartpoints "
                "here; skipped idle checkpoints count too).", "num_timed"),
        counter("pg_stat_checkpointer_num_requested_total",
                "Checkpoints requested (max_wal_size reached, CHECKPOINT, backups...); a high rate against "
                "timed ones means max_wal_size is too small.", "num_requested"),
        counter("pg_stat_checkpointer_num_done_total", "Checkpoints actually performed (PostgreSQL 18+).",
                "num_done"),
        counter("pg_stat_checkpointer_restartpoints_timed_total",
                "Restartpoints (standby checkpoints) scheduled by timeout (17+).", "restartpoints_timed"),
        counter("pg_stat_checkpointer_restartpoints_req_total", "Restartpoints requested (17+).",
                "restartpoints_req"),
        counter("pg_stat_checkpointer_restartpoints_done_total", "Restartpoints performed (17+).",
                "restartpoints_done"),
        counter("pg_stat_checkpointer_write_time_seconds_total",
                "Time spent writing checkpoint buffers to the operating system.", "write_time", unit="seconds",
                scale=MS),
        counter("pg_stat_checkpointer_sync_time_seconds_total", "Time spent syncing checkpoint files to disk.",
                "sync_time", unit="seconds", scale=MS),
        counter("pg_stat_checkpointer_buffers_written_total", "Shared buffers written by checkpoints.",
                "buffers_written"),
        counter("pg_stat_checkpointer_slru_written_total", "SLRU buffers written by checkpoints (18+).",
                "slru_written"),
        gauge("pg_stat_checkpointer_stats_reset_timestamp_seconds",
              "When these counters were last reset (Unix time).", "stats_reset", unit="seconds"),
    ),
)


BGWRITER = Collector(
    name="pg_stat_bgwriter",
    family="wal",
    help="The background writer; before 17 also the buffers backends had to write themselves.",
    interval=60.0,
    timeout=5.0,
    variants=(
        SqlVariant(min_version=120000, max_version=170000, sql="""
SELECT b.buffers_clean, b.maxwritten_clean, b.buffers_alloc, b.buffers_backend, b.buffers_backend_fsync,
       pg_catalog.date_part('epoch', b.stats_reset) AS stats_reset
FROM pg_catalog.pg_stat_bgwriter b"""),
        SqlVariant(min_version=170000, sql="""
SELECT b.buffers_clean, b.maxwritten_clean, b.buffers_alloc,
       NULL::bigint AS buffers_backend, NULL::bigint AS buffers_backend_fsync,
       pg_catalog.date_part('epoch', b.stats_reset) AS stats_reset
FROM pg_catalog.pg_stat_bgwriter b"""),
    ),
    metrics=(
        counter("pg_stat_bgwriter_buffers_clean_total", "Buffers written by the background writer.",
                "buffers_clean"),
        counter("pg_stat_bgwriter_maxwritten_clean_total",
                "Times the background writer stopped because it wrote bgwriter_lru_maxpages buffers.",
                "maxwritten_clean"),
        counter("pg_stat_bgwriter_buffers_alloc_total", "Buffers allocated.", "buffers_alloc"),
        counter("pg_stat_bgwriter_buffers_backend_total",
                "Buffers written directly by backends (before 17; since then see pg_stat_io).",
                "buffers_backend"),
        counter("pg_stat_bgwriter_buffers_backend_fsync_total",
                "Times backends had to fsync themselves (before 17; since then see pg_stat_io).",
                "buffers_backend_fsync"),
        gauge("pg_stat_bgwriter_stats_reset_timestamp_seconds", "When these counters were last reset (Unix time).",
              "stats_reset", unit="seconds"),
    ),
)


IO = ("backend_type", "object", "context")

# The (backend_type, object, context) combinations are a fixed, small set; rows that never saw any
# I/O are left out (most of them, on 18 especially), so series appear once there is activity.
_IO_ACTIVE = """(COALESCE(i.reads, 0) + COALESCE(i.writes, 0) + COALESCE(i.writebacks, 0) + COALESCE(i.extends, 0)
       + COALESCE(i.hits, 0) + COALESCE(i.evictions, 0) + COALESCE(i.reuses, 0) + COALESCE(i.fsyncs, 0)) > 0"""


def _io_sql(read_bytes: str, write_bytes: str, extend_bytes: str) -> str:
    return f"""
SELECT i.backend_type, i.object, i.context,
       i.reads, {read_bytes} AS read_bytes, i.read_time, i.writes, {write_bytes} AS write_bytes, i.write_time,
       i.writebacks, i.extends, {extend_bytes} AS extend_bytes, i.hits, i.evictions, i.reuses,
       i.fsyncs, i.fsync_time
FROM pg_catalog.pg_stat_io i
WHERE {_IO_ACTIVE}"""


STAT_IO = Collector(
    name="pg_stat_io",
    family="wal",
    help="I/O by backend type, object and context (PostgreSQL 16+); rows without any I/O are left out.",
    interval=60.0,
    timeout=5.0,
    min_server_version=160000,
    variants=(
        SqlVariant(min_version=160000, max_version=180000,
                   sql=_io_sql("i.reads * i.op_bytes", "i.writes * i.op_bytes", "i.extends * i.op_bytes")),
        SqlVariant(min_version=180000, sql=_io_sql("i.read_bytes", "i.write_bytes", "i.extend_bytes")),
    ),
    metrics=(
        counter("pg_stat_io_reads_total", "Read operations.", "reads", IO),
        counter("pg_stat_io_read_bytes_total", "Bytes read.", "read_bytes", IO, unit="bytes"),
        counter("pg_stat_io_read_time_seconds_total", "Time spent reading (needs track_io_timing).", "read_time",
                IO, unit="seconds", scale=MS),
        counter("pg_stat_io_writes_total", "Write operations.", "writes", IO),
        counter("pg_stat_io_write_bytes_total", "Bytes written.", "write_bytes", IO, unit="bytes"),
        counter("pg_stat_io_write_time_seconds_total", "Time spent writing (needs track_io_timing).",
                "write_time", IO, unit="seconds", scale=MS),
        counter("pg_stat_io_writebacks_total", "Writeback requests issued to the kernel.", "writebacks", IO),
        counter("pg_stat_io_extends_total", "Relation extend operations.", "extends", IO),
        counter("pg_stat_io_extend_bytes_total", "Bytes added by relation extends.", "extend_bytes", IO,
                unit="bytes"),
        counter("pg_stat_io_hits_total", "Times a wanted block was found in a buffer.", "hits", IO),
        counter("pg_stat_io_evictions_total", "Times a buffer was evicted to make room.", "evictions", IO),
        counter("pg_stat_io_reuses_total", "Times a ring buffer was reused (bulk reads, writes, vacuum).",
                "reuses", IO),
        counter("pg_stat_io_fsyncs_total", "fsync calls.", "fsyncs", IO),
        counter("pg_stat_io_fsync_time_seconds_total", "Time spent in fsync (needs track_io_timing).",
                "fsync_time", IO, unit="seconds", scale=MS),
    ),
)


STAT_WAL = Collector(
    name="pg_stat_wal",
    family="wal",
    help="WAL generation statistics (PostgreSQL 14+; 18 moved WAL write/sync counts to pg_stat_io).",
    interval=30.0,
    timeout=5.0,
    min_server_version=140000,
    variants=(
        SqlVariant(min_version=140000, max_version=180000, sql="""
SELECT w.wal_records, w.wal_fpi, w.wal_bytes, w.wal_buffers_full,
       w.wal_write, w.wal_sync, w.wal_write_time, w.wal_sync_time,
       pg_catalog.date_part('epoch', w.stats_reset) AS stats_reset
FROM pg_catalog.pg_stat_wal w"""),
        SqlVariant(min_version=180000, sql="""
SELECT w.wal_records, w.wal_fpi, w.wal_bytes, w.wal_buffers_full,
       NULL::bigint AS wal_write, NULL::bigint AS wal_sync,
       NULL::float8 AS wal_write_time, NULL::float8 AS wal_sync_time,
       pg_catalog.date_part('epoch', w.stats_reset) AS stats_reset
FROM pg_catalog.pg_stat_wal w"""),
    ),
    metrics=(
        counter("pg_stat_wal_records_total", "WAL records generated.", "wal_records"),
        counter("pg_stat_wal_fpi_total", "WAL full page images generated.", "wal_fpi"),
        counter("pg_stat_wal_bytes_total", "WAL generated.", "wal_bytes", unit="bytes"),
        counter("pg_stat_wal_buffers_full_total", "Times WAL was written because the WAL buffers were full.",
                "wal_buffers_full"),
        counter("pg_stat_wal_write_total", "WAL buffer writes to disk (14 to 17; pg_stat_io object 'wal' on 18).",
                "wal_write"),
        counter("pg_stat_wal_sync_total", "WAL file syncs to disk (14 to 17).", "wal_sync"),
        counter("pg_stat_wal_write_time_seconds_total", "Time writing WAL (14 to 17; needs track_wal_io_timing).",
                "wal_write_time", unit="seconds", scale=MS),
        counter("pg_stat_wal_sync_time_seconds_total", "Time syncing WAL (14 to 17; needs track_wal_io_timing).",
                "wal_sync_time", unit="seconds", scale=MS),
        gauge("pg_stat_wal_stats_reset_timestamp_seconds", "When these counters were last reset (Unix time).",
              "stats_reset", unit="seconds"),
    ),
)


ARCHIVER = Collector(
    name="pg_stat_archiver",
    family="wal",
    help="The WAL archiver: archived and failed segments, age of the last success.",
    interval=30.0,
    timeout=5.0,
    variants=(SqlVariant(min_version=120000, sql="""
SELECT a.archived_count, a.failed_count,
       pg_catalog.date_part('epoch', pg_catalog.now() - a.last_archived_time) AS last_archive_age,
       pg_catalog.date_part('epoch', pg_catalog.now() - a.last_failed_time) AS last_failure_age,
       -- archive_mode = on archives only while not in recovery; 'always' archives on standbys too.
       CASE pg_catalog.current_setting('archive_mode')
         WHEN 'always' THEN 1
         WHEN 'on' THEN (NOT pg_catalog.pg_is_in_recovery())::int
         ELSE 0 END AS enabled
FROM pg_catalog.pg_stat_archiver a"""),),
    metrics=(
        counter("pg_stat_archiver_archived_total", "WAL files archived successfully.", "archived_count"),
        counter("pg_stat_archiver_failed_total", "Failed attempts to archive a WAL file.", "failed_count"),
        gauge("pg_stat_archiver_last_archive_age_seconds",
              "Seconds since the last successful archive (absent if none since the statistics were reset).",
              "last_archive_age", unit="seconds"),
        gauge("pg_stat_archiver_last_failure_age_seconds", "Seconds since the last failed archive attempt.",
              "last_failure_age", unit="seconds"),
        gauge("pg_stat_archiver_enabled",
              "1 when this server archives WAL (archive_mode on and not a standby, or always).", "enabled"),
    ),
)

# Like pg_ls_waldir(), pg_ls_archive_statusdir() may be revoked: the archiver counters must not go with it.
ARCHIVE_STATUS = Collector(
    name="pg_archive_status",
    family="wal",
    help="WAL files waiting to be archived (pg_ls_archive_statusdir(): pg_monitor, or an explicit EXECUTE grant).",
    interval=30.0,
    timeout=5.0,
    requires=("pg_catalog.pg_ls_archive_statusdir()",),
    variants=(SqlVariant(min_version=120000, sql="""
SELECT count(*) AS pending FROM pg_catalog.pg_ls_archive_statusdir() f WHERE f.name LIKE '%.ready'"""),),
    metrics=(
        gauge("pg_stat_archiver_pending_files",
              "WAL files waiting to be archived (.ready in pg_wal/archive_status); grows while archiving fails.",
              "pending"),
    ),
)

COLLECTORS = (WAL, WAL_DIRECTORY, CHECKPOINTER, BGWRITER, STAT_IO, STAT_WAL, ARCHIVER, ARCHIVE_STATUS)
