"""Which configured targets a process polls: rendezvous (highest-random-weight) hashing of target names.

Every process computes the same owner for a name from the name and the shard count alone, with no
coordination; going from N to N+1 shards moves only the names the new shard wins, about 1/(N+1) of them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

_ORDINAL = re.compile(r"-(\d+)$")


def weight(name: str, index: int) -> int:
    """The pseudo-random weight of shard ``index`` for target ``name`` (stable across processes and versions)."""
    digest = hashlib.blake2b(f"{index}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(name: str, count: int) -> int:
    """The shard (0..count-1) that polls target ``name``: the one with the highest weight."""
    return max(range(count), key=lambda index: weight(name, index))


def owned(names: Iterable[str], index: int, count: int) -> list[str]:
    """The names shard ``index`` of ``count`` polls, in their given order."""
    return [name for name in names if owner(name, count) == index]


def hostname_ordinal(hostname: str) -> int | None:
    """The ordinal of a StatefulSet pod from its hostname (``pgvitals-2`` -> 2); None without one."""
    match = _ORDINAL.search(hostname.split(".", 1)[0])
    return int(match.group(1)) if match else None
