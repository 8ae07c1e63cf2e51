"""Restarts and identity: when the server started, when it last read its configuration, what it is."""

from __future__ import annotations

from exporter.catalog import Collector, SqlVariant
from exporter.collectors._helpers import gauge, info

# pg_control_system() is executable by any role (pg_monitor suffices); its system_identifier tells two
# clusters apart that share a host and port across a rebuild. pg_conf_load_time() is per backend: our
# pooled session re-reads the files at its next command after a SIGHUP, so it follows reloads.
_IDENTITY_SQL = """
SELECT pg_catalog.date_part('epoch', pg_catalog.pg_postmaster_start_time()) AS start_time,
       pg_catalog.date_part('epoch', pg_catalog.pg_conf_load_time()) AS reload_time,
       pg_catalog.current_setting('server_version') AS version,
       pg_catalog.current_setting('server_version_num') AS server_version_num,
       pg_catalog.current_setting('data_checksums') AS data_checksums,
       COALESCE(pg_catalog.current_setting('cluster_name', true), '') AS cluster_name,
       (SELECT s.system_identifier::text FROM pg_catalog.pg_control_system() s) AS system_identifier"""

IDENTITY = Collector(
    name="pg_server_identity",
    family="identity",
    help="Server start and configuration reload times, and what the server is (version, checksums, identifier).",
    interval=60.0,
    timeout=5.0,
    variants=(SqlVariant(min_version=120000, sql=_IDENTITY_SQL),),
    metrics=(
        gauge("pg_postmaster_start_time_seconds",
              "When the server (postmaster) started, Unix time (pg_postmaster_start_time()); a change is a "
              "restart. Uptime: time() - this.", "start_time", unit="seconds"),
        gauge("pg_config_reload_time_seconds",
              "When the server last loaded its configuration files, Unix time (pg_conf_load_time(), as seen "
              "by the exporter's session); moves on every reload (SIGHUP, pg_reload_conf()) and restart.",
              "reload_time", unit="seconds"),
        info("pg_server_info",
             "Value 1, with the server's version, server_version_num, data_checksums (on/off), cluster_name and "
             "system_identifier (pg_control_system(): differs between clusters, kept by a standby).",
             ("version", "server_version_num", "data_checksums", "cluster_name", "system_identifier")),
    ),
    notes="A restart: `changes(pg_postmaster_start_time_seconds[10m]) > 0` (the PostgresRestarted alert). A "
          "standby built from a primary shares its system_identifier; a cluster rebuilt with initdb gets a new one.",
)

COLLECTORS = (IDENTITY,)
