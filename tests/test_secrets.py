"""Password sources with real files and real commands: re-read, cached for a TTL, failures without output."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from exporter.secrets import PasswordSource, SecretError, redact, register
from tests.support.token_command import LEAK, runs, token_command

HANG = 60.0  # only catches a hang, never a timing claim
def test_password_file_is_read_at_every_connection(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("First-Password\n")
    source = PasswordSource(password_file=path)
    assert source.get() == "First-Password"
    path.write_text("Second-Password\r\n")
    assert source.get() == "Second-Password"
    assert redact("x First-Password Second-Password y") == "x *** *** y"
    path.unlink()
    with pytest.raises(SecretError, match=r"cannot read password_file .*pw \(No such file"):
        source.get()


def test_password_command_is_cached_for_its_ttl(tmp_path: Path) -> None:
    source = PasswordSource(command=token_command(tmp_path), ttl=0.5)
    assert source.get() == "Token-1-"
    assert source.get() == "Token-1-"
    assert runs(tmp_path) == 1
    time.sleep(0.6)
    assert source.get() == "Token-2-"
    assert runs(tmp_path) == 2
    source.invalidate()  # the server refused it: the next connection asks again
    assert source.get() == "Token-3-"
    assert redact("token Token-3- in a message") == "token *** in a message"


def test_a_failing_command_is_reported_without_its_output(tmp_path: Path) -> None:
    source = PasswordSource(command=token_command(tmp_path, exit_status=3))
    with pytest.raises(SecretError) as caught:
        source.get()
    assert str(caught.value) == (f"password_command {Path(sys.executable).name} failed (exit status 3); "
                                 "its output is not shown")
    assert LEAK not in str(caught.value) and "Token" not in str(caught.value)
    with pytest.raises(SecretError, match="could not start"):
        PasswordSource(command=[str(tmp_path / "missing")]).get()
    empty = tmp_path / "empty.sh"
    empty.write_text("#!/bin/sh\nexit 0\n")
    empty.chmod(0o700)
    with pytest.raises(SecretError, match="printed nothing"):
        PasswordSource(command=[str(empty)]).get()


def test_a_hanging_command_is_killed_at_its_timeout(tmp_path: Path) -> None:
    source = PasswordSource(command=token_command(tmp_path, sleep=HANG), timeout=0.5)
    started = time.monotonic()
    with pytest.raises(SecretError, match=r"gave no answer within 0.5s"):
        source.get()
    assert time.monotonic() - started < HANG  # the child holding stdout was killed with it


def test_rotating_secrets_keep_only_the_latest_few() -> None:
    for index in range(10):
        register(f"Rotating-Secret-{index:02d}", "test:rotation")
    assert redact("Rotating-Secret-09") == "***"
    assert redact("Rotating-Secret-00") == "Rotating-Secret-00"  # long replaced, no longer scanned for
