"""Secrets that must never reach a log line, an error message or a metric, and where passwords come from."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

_lock = threading.Lock()
_secrets: set[str] = set()
# Secrets that rotate (a password file, a command's token): only the latest few of each source are kept,
# so that a token renewed every few minutes does not grow the list redact() scans for ever.
_rotating: dict[str, deque[str]] = {}
ROTATING_KEPT = 3
# user:password@ in URIs and password=... in key/value conninfo, whatever the password is.
_URI_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def register(secret: str | None, source: str | None = None) -> None:
    """Remember a secret so that redact() hides it wherever it appears; ``source`` names one that rotates."""
    if not secret or len(secret) < 3:
        return
    with _lock:
        if source is None:
            _secrets.update((secret, quote(secret, safe="")))
            return
        recent = _rotating.setdefault(source, deque(maxlen=ROTATING_KEPT))
        if secret not in recent:
            recent.append(secret)


def redact(text: str) -> str:
    """Replace every known secret and every password in a DSN with ``***``."""
    text = _URI_PASSWORD.sub(r"\1***@", text)
    text = _KV_PASSWORD.sub(r"\1***", text)
    with _lock:
        rotating = {form for recent in _rotating.values() for s in recent for form in (s, quote(s, safe=""))}
        known = sorted(_secrets | rotating, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class SecretError(Exception):
    """A password could not be had; the message never holds the secret nor anything the command printed."""


class PasswordSource:
    """A target's password, asked for at each new connection (libpq's own ``passfile`` when there is none).

    ``password_file`` is read every time (a rotated file is used at the next connection), ``password_env``
    too, and ``password_command``'s stdout is kept for ``ttl`` seconds (tokens such as RDS IAM's).
    """

    def __init__(self, password_file: Path | None = None, password_env: str | None = None,
                 command: Sequence[str] | None = None, ttl: float = 600.0, timeout: float = 10.0):
        self.password_file = password_file
        self.password_env = password_env
        self.command = tuple(command) if command else None
        self.ttl = ttl
        self.timeout = timeout
        self._lock = threading.Lock()  # one command at a time: concurrent connections share its answer
        self._cached: tuple[str, float] | None = None  # (password, monotonic expiry)

    def get(self) -> str | None:
        """The password now (None: libpq finds its own, e.g. in the passfile); raises SecretError."""
        if self.command is not None:
            return self._from_command()
        if self.password_file is not None:
            try:
                password = self.password_file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise SecretError(f"cannot read password_file {self.password_file} ({exc.strerror})") from None
            register(password, f"file:{self.password_file}")
            return password
        if self.password_env is not None:
            from_env = os.environ.get(self.password_env)
            register(from_env)
            return from_env
        return None

    def invalidate(self) -> None:
        """Forget a command's cached answer (the server refused it): the next connection runs the command again."""
        with self._lock:
            self._cached = None

    def _from_command(self) -> str:
        with self._lock:
            if self._cached is not None and time.monotonic() < self._cached[1]:
                return self._cached[0]
            password = self._run()
            self._cached = (password, time.monotonic() + self.ttl)
            return password

    def _run(self) -> str:
        """Run the command; its stdout is the password. Neither stdout nor stderr is ever shown."""
        assert self.command is not None
        name = Path(self.command[0]).name
        try:
            # A session of its own: on timeout the whole group dies, children that hold the pipe included.
            proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise SecretError(f"password_command {name} could not start ({exc.strerror})") from None
        with proc:
            try:
                out, _ = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise SecretError(f"password_command {name} gave no answer within {self.timeout:g}s") from None
        if proc.returncode != 0:
            raise SecretError(f"password_command {name} failed (exit status {proc.returncode}); "
                              "its output is not shown") from None
        password = out.decode("utf-8", errors="replace").rstrip("\r\n")
        register(password, f"command:{id(self)}")
        if not password:
            raise SecretError(f"password_command {name} printed nothing")
        return password
