"""Secrets that must never reach a log line, an error message or a metric."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from urllib.parse import quote

_lock = threading.Lock()
_secrets: set[str] = set()
# user:password@ in URIs and password=... in key/value conninfo, whatever the password is.
_URI_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def register(secret: str | None) -> None:
    """Remember a secret so that redact() hides it wherever it appears."""
    if secret and len(secret) >= 3:
        with _lock:
            _secrets.add(secret)
            _secrets.add(quote(secret, safe=""))


def redact(text: str) -> str:
    """Replace every known secret and every password in a DSN with ``***``."""
    text = _URI_PASSWORD.sub(r"\1***@", text)
    text = _KV_PASSWORD.sub(r"\1***", text)
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def read_secret(password_file: Path | None, password_env: str | None) -> str | None:
    """The password from ``password_file`` (first) or ``password_env``, registered for redaction."""
    password = None
    if password_file is not None:
        password = password_file.read_text(encoding="utf-8").rstrip("\r\n")
    elif password_env is not None:
        password = os.environ.get(password_env)
    register(password)
    return password
