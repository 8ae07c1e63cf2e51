"""Vacuum state, dead tuples and sizes of the largest and busiest tables; database sizes; wraparound ages."""

from __future__ import annotations

from exporter.catalog import Collector, Param, SqlVariant
from exporter.collectors import relations
from exporter.collectors._helpers import MS, counter, gauge
from exporter.hooks import STICKINESS

TABLE = ("datname", "schemaname", "relname")

TOP_N = Param(
    "top_n", 30,
    "Tables exported one by one, the largest first (pg_class.relpages of heap, TOAST and indexes: no "
    "relation lock); the rest are summed into one `relname=\"other\"` series per database.",
)
TOP_N_CHURN = Param(
    "top_n_churn", 10,
    "Also exported: the tables with the most rows updated and deleted since statistics were reset (where "
    "dead tuples come from), however small.",
)

_OTHER = " The relname=\"other\" series sums the tables not exported one by one."

STAT_USER_TABLES = Collector(
    name="pg_stat_user_tables",
    family="vacuum",
    help="Dead and live tuples, vacuum and analyze history, and sizes of the largest and busiest user tables, from "
         "pg_stat_user_tables.",
    scope="database",
    interval=300.0,
    timeout=60.0,
    params=(TOP_N, TOP_N_CHURN),
    variants=relations.VARIANTS,
    fetch=relations.fetch_pass,
    shared_pass=relations.PASS,
    metrics=(
        gauge("pg_stat_user_tables_n_live_tup", "Estimated live rows." + _OTHER, "n_live_tup", TABLE),
        gauge("pg_stat_user_tables_n_dead_tup",
              "Estimated dead rows (removed by the next VACUUM)." + _OTHER, "n_dead_tup", TABLE),
        gauge("pg_stat_user_tables_n_mod_since_analyze", "Rows modified since the table was last analyzed.",
              "n_mod_since_analyze", TABLE),
        gauge("pg_stat_user_tables_n_ins_since_vacuum", "Rows inserted since the table was last vacuumed (13+).",
              "n_ins_since_vacuum", TABLE),
        gauge("pg_stat_user_tables_last_vacuum_timestamp_seconds",
              "Last manual VACUUM of the table (Unix time); absent if never.", "last_vacuum", TABLE, unit="seconds"),
        gauge("pg_stat_user_tables_last_autovacuum_timestamp_seconds",
              "Last autovacuum of the table (Unix time); absent if never.", "last_autovacuum", TABLE,
              unit="seconds"),
        gauge("pg_stat_user_tables_last_analyze_timestamp_seconds",
              "Last manual ANALYZE of the table (Unix time); absent if never.", "last_analyze", TABLE,
              unit="seconds"),
        gauge("pg_stat_user_tables_last_autoanalyze_timestamp_seconds",
              "Last autoanalyze of the table (Unix time); absent if never.", "last_autoanalyze", TABLE,
              unit="seconds"),
        counter("pg_stat_user_tables_vacuum_count_total", "Manual VACUUMs of the table.", "vacuum_count", TABLE),
        counter("pg_stat_user_tables_autovacuum_count_total", "Autovacuums of the table.", "autovacuum_count",
                TABLE),
        counter("pg_stat_user_tables_analyze_count_total", "Manual ANALYZEs of the table.", "analyze_count", TABLE),
        counter("pg_stat_user_tables_autoanalyze_count_total", "Autoanalyzes of the table.", "autoanalyze_count",
                TABLE),
        counter("pg_stat_user_tables_vacuum_time_seconds_total", "Time spent in manual VACUUMs of the table (18+).",
                "total_vacuum_time", TABLE, unit="seconds", scale=MS),
        counter("pg_stat_user_tables_autovacuum_time_seconds_total", "Time spent in autovacuums of the table (18+).",
                "total_autovacuum_time", TABLE, unit="seconds", scale=MS),
        counter("pg_stat_user_tables_analyze_time_seconds_total", "Time spent in manual ANALYZEs of the table (18+).",
                "total_analyze_time", TABLE, unit="seconds", scale=MS),
        counter("pg_stat_user_tables_autoanalyze_time_seconds_total",
                "Time spent in autoanalyzes of the table (18+).", "total_autoanalyze_time", TABLE, unit="seconds",
                scale=MS),
        gauge("pg_relation_size_bytes",
              "Size of the table's main data (pg_relation_size); absent while DDL holds or awaits its lock.",
              "relation_size", TABLE, unit="bytes"),
        gauge("pg_total_relation_size_bytes",
              "Size of the table with its indexes and TOAST data (pg_total_relation_size); absent while DDL holds "
              "or awaits a lock on it.", "total_relation_size", TABLE, unit="bytes"),
    ),
    notes=(
        "Tables exported one by one: the `top_n` largest by pg_class.relpages of heap + TOAST + indexes (no relation "
        "lock) and the `top_n_churn` with the most rows updated and deleted; an exported table stays until "
        f"another is {STICKINESS:g}x larger or busier. The `relname=\"other\"` row (schemaname=\"\") sums tuple "
        "counts and vacuum counts of the rest. Sizes take an ACCESS SHARE lock per table: tables with an ACCESS "
        "EXCLUSIVE lock held or requested in pg_locks are skipped for that run, and lock_timeout bounds any other "
        "wait; only the size series of that table goes missing."
    ),
)

DATABASE_SIZE = Collector(
    name="pg_database_size",
    family="vacuum",
    help="On-disk size of each database (pg_database_size: walks the database's files, so it runs rarely).",
    interval=300.0,
    timeout=60.0,
    variants=(
        SqlVariant(
            min_version=120000,
            # Without CONNECT on a database (and without pg_read_all_stats, which pg_monitor has) the
            # function raises: such a database yields no sample instead of failing the run.
            sql="""
SELECT d.datname,
       CASE WHEN pg_catalog.has_database_privilege(d.oid, 'CONNECT')
                 OR pg_catalog.pg_has_role('pg_read_all_stats', 'MEMBER')
            THEN pg_catalog.pg_database_size(d.oid) END AS size_bytes
FROM pg_catalog.pg_database d WHERE NOT d.datistemplate""",
        ),
    ),
    metrics=(gauge("pg_database_size_bytes", "On-disk size of the database.", "size_bytes", ("datname",),
                   unit="bytes"),),
)

DATABASE_WRAPAROUND = Collector(
    name="pg_database_wraparound",
    family="vacuum",
    help="Transaction ID and multixact ID age of each database (pg_database), including templates: the distance "
         "to an anti-wraparound vacuum and, beyond about 2 billion, to a shutdown.",
    interval=60.0,
    timeout=5.0,
    variants=(
        SqlVariant(
            min_version=120000,
            sql="""
SELECT d.datname, pg_catalog.age(d.datfrozenxid) AS xid_age, pg_catalog.mxid_age(d.datminmxid) AS mxid_age
FROM pg_catalog.pg_database d""",
        ),
    ),
    metrics=(
        gauge("pg_database_xid_age",
              "Age of the database's oldest unfrozen transaction ID, age(datfrozenxid); autovacuum forces a "
              "freeze at pg_settings_autovacuum_freeze_max_age.", "xid_age", ("datname",), unit="transactions"),
        gauge("pg_database_mxid_age",
              "Age of the database's oldest multixact ID, mxid_age(datminmxid); compare with "
              "pg_settings_autovacuum_multixact_freeze_max_age.", "mxid_age", ("datname",), unit="multixacts"),
    ),
)

WRAPAROUND_TOP_N = Param(
    "top_n", 5,
    "Tables exported one by one: the oldest by transaction ID age, and the oldest by multixact ID age.",
)

TABLE_WRAPAROUND = Collector(
    name="pg_table_wraparound",
    family="vacuum",
    help="The oldest tables by transaction ID and multixact ID age in each database (pg_class.relfrozenxid, "
         "relminmxid; TOAST counted with its table).",
    scope="database",
    interval=300.0,
    timeout=30.0,
    params=(WRAPAROUND_TOP_N,),
    variants=relations.VARIANTS,
    fetch=relations.fetch_pass,
    shared_pass=relations.PASS,
    metrics=(
        gauge("pg_database_oldest_table_xid_age",
              "Transaction ID age of the database's oldest table, age(relfrozenxid): what VACUUM must freeze "
              "before the database's age can go down.", "oldest_xid_age", ("datname",), unit="transactions"),
        gauge("pg_database_oldest_table_mxid_age", "Multixact ID age of the database's oldest table, "
              "mxid_age(relminmxid).", "oldest_mxid_age", ("datname",), unit="multixacts"),
        gauge("pg_table_xid_age", "Transaction ID age of one of the oldest tables (its TOAST table included).",
              "table_xid_age", TABLE, unit="transactions"),
        gauge("pg_table_mxid_age", "Multixact ID age of one of the oldest tables (its TOAST table included).",
              "table_mxid_age", TABLE, unit="multixacts"),
    ),
    notes=(
        "Includes system catalogs and other sessions' temporary tables (which autovacuum cannot freeze). "
        "Compare with `pg_settings_autovacuum_freeze_max_age`: autovacuum starts an anti-wraparound vacuum of a "
        "table whose age passes it; writes stop near 2^31 (about 2.1 billion)."
    ),
)

COLLECTORS = (STAT_USER_TABLES, DATABASE_SIZE, DATABASE_WRAPAROUND, TABLE_WRAPAROUND)
