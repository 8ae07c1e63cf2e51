"""Rotating secrets against a real server: a new password_file after ALTER ROLE, password_command, passfile."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support.exporters import Runner, running_exporter
from tests.support.scrape import wait_for_metric
from tests.support.servers import Server, settings_for, start_server
from tests.support.token_command import LEAK, runs, token_command

pytestmark = [pytest.mark.live, pytest.mark.family("secrets")]

ROLE = "rotor"


@pytest.fixture(scope="module")
def rotating() -> Iterator[Server]:
    """A server of its own: the tests restart it and change a role's password."""
    server = start_server("rotating")
    server.execute(f"DROP ROLE IF EXISTS {ROLE}")
    server.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD 'First-Rotor-Pw1' IN ROLE pg_monitor")
    yield server
    server.cluster.destroy()


def _set_password(server: Server, password: str) -> None:
    server.execute(f"ALTER ROLE {ROLE} PASSWORD '{password}'")


def test_a_new_password_file_is_used_after_alter_role_and_a_restart(rotating: Server, tmp_path: Path) -> None:
    _set_password(rotating, "First-Rotor-Pw1")
    password_file = tmp_path / "rotor.pw"
    password_file.write_text("First-Rotor-Pw1\n")
    settings = settings_for([{"name": "rot", "dsn": rotating.cluster.dsn(ROLE), "password_file": str(password_file)}],
                            probe_interval="1s", max_backoff="1s")
    with running_exporter(settings) as daemon:
        port = daemon.server.port
        before = wait_for_metric(port, "pg_postmaster_start_time_seconds", target="rot")
        started = before.value("pg_postmaster_start_time_seconds", target="rot")

        _set_password(rotating, "Second-Rotor-Pw2")
        password_file.write_text("Second-Rotor-Pw2\n")
        rotating.cluster.restart()  # every connection pgvitals had is gone: it must log in again
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(rotating.cluster.dsn(ROLE, "First-Rotor-Pw1")).close()

        after = wait_for_metric(port, "pg_postmaster_start_time_seconds", lambda v: v != started, target="rot")
        assert after.value("pg_up", target="rot") == 1
        assert after.find("pg_up_reason", target="rot") == []
        assert "Rotor-Pw" not in after.body


def test_password_command_token_is_cached_and_never_logged_nor_exported(
        rotating: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The command prints Token-<n>-; the role's password follows it, as an IAM token would be accepted."""
    _set_password(rotating, "Token-1-")
    command = token_command(tmp_path)
    caplog.set_level(logging.DEBUG)
    targets = [{"name": "cmd", "dsn": rotating.cluster.dsn(ROLE), "password_command": command,
                "password_command_ttl": "1h"}]
    with Runner(rotating, targets=targets, strict=True) as runner:
        metrics = runner.collect()
        runner.engine.close()  # new connections next time: the cached token serves them
        metrics = runner.collect()
    assert metrics.value("pg_up", target="cmd") == 1
    assert runs(tmp_path) == 1
    for text in (caplog.text, metrics.body):
        assert "Token-1-" not in text and LEAK not in text


def test_a_refused_token_is_asked_for_again_and_a_failing_command_says_so_without_its_output(
        rotating: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _set_password(rotating, "Token-2-")  # the first token the command prints is already refused
    caplog.set_level(logging.DEBUG)
    targets = [{"name": "cmd", "dsn": rotating.cluster.dsn(ROLE), "password_command": token_command(tmp_path)}]
    with Runner(rotating, targets=targets) as runner:
        assert runner.collect().value("pg_up_reason", target="cmd", reason="auth") == 1
        metrics = runner.collect()  # an expired token is not kept for its TTL
    assert metrics.value("pg_up", target="cmd") == 1
    assert runs(tmp_path) == 2

    failing = tmp_path / "failing"
    failing.mkdir()
    targets = [{"name": "bad", "dsn": rotating.cluster.dsn(ROLE),
                "password_command": token_command(failing, exit_status=1)}]
    with Runner(rotating, targets=targets) as runner:
        metrics = runner.collect()
    assert metrics.value("pg_up", target="bad") == 0
    assert metrics.value("pg_up_reason", target="bad", reason="secret") == 1
    assert "failed (exit status 1); its output is not shown" in caplog.text
    for text in (caplog.text, metrics.body):
        assert "Token-" not in text and LEAK not in text


def test_libpq_passfile_and_pgpassfile_keep_working(rotating: Server, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _set_password(rotating, "Pass-File-Pw3")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{rotating.cluster.port}:*:{ROLE}:Pass-File-Pw3\n")
    passfile.chmod(0o600)  # libpq ignores a passfile others may read
    in_dsn = f"{rotating.cluster.dsn(ROLE)}?passfile={passfile}"
    with Runner(rotating, targets=[{"name": "dsn", "dsn": in_dsn}], strict=True) as runner:
        assert runner.collect().value("pg_up", target="dsn") == 1
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    with Runner(rotating, targets=[{"name": "env", "dsn": rotating.cluster.dsn(ROLE)}], strict=True) as runner:
        assert runner.collect().value("pg_up", target="env") == 1
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    with Runner(rotating, targets=[{"name": "none", "dsn": rotating.cluster.dsn(ROLE)}]) as runner:
        assert runner.collect().value("pg_up", target="none") == 0  # the passfile was what logged in
