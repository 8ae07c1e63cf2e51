"""Shards: rendezvous hashing of target names, the shard: section and --shard."""

from __future__ import annotations

import argparse

import pytest

from exporter import shards
from exporter.cli import shard_argument
from exporter.config import ConfigError, load_settings

NAMES = [f"pg-{region}-{n:02d}" for region in ("eu", "us", "ap", "sa") for n in range(25)]  # 100 targets


def test_three_shards_are_disjoint_and_cover_every_target() -> None:
    sets = [set(shards.owned(NAMES, index, 3)) for index in range(3)]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    assert sets[0] | sets[1] | sets[2] == set(NAMES)
    assert all(sets), "every shard polls something"


def test_going_from_three_to_four_shards_moves_at_most_35_percent() -> None:
    moved = [name for name in NAMES if shards.owner(name, 3) != shards.owner(name, 4)]
    assert len(moved) <= 35
    # Rendezvous hashing moves only what the new shard wins: nothing moves between the old ones.
    assert all(shards.owner(name, 4) == 3 for name in moved)


def test_the_owner_depends_on_the_name_and_count_only() -> None:
    assert [shards.owner(name, 5) for name in NAMES] == [shards.owner(name, 5) for name in NAMES]
    assert {shards.owner(name, 1) for name in NAMES} == {0}


@pytest.mark.parametrize(("hostname", "ordinal"), [
    ("pgvitals-0", 0), ("pgvitals-12", 12), ("pg-vitals-3.pgvitals.monitoring.svc.cluster.local", 3),
    ("pgvitals", None), ("pgvitals-", None), ("node1", None),
])
def test_statefulset_ordinal_from_the_hostname(hostname: str, ordinal: int | None) -> None:
    assert shards.hostname_ordinal(hostname) == ordinal


TARGETS = [{"name": "a", "dsn": "host=localhost"}]


def test_shard_section_takes_a_number_or_the_hostname_ordinal() -> None:
    settings = load_settings(raw={"targets": TARGETS, "shard": {"index": 1, "count": 3}}, environ={})
    assert settings.shard is not None and (settings.shard.index, settings.shard.count) == (1, 3)
    settings = load_settings(raw={"targets": TARGETS, "shard": {"index": "hostname", "count": 3}},
                             environ={"HOSTNAME": "pgvitals-2"})
    assert settings.shard is not None and settings.shard.index == 2


@pytest.mark.parametrize(("shard", "hostname", "message"), [
    ({"index": 3, "count": 3}, "x", "shard: index 3 must be below count 3"),
    ({"index": "hostname", "count": 2}, "pgvitals-2", "shard: index 2 must be below count 2"),
    ({"index": "hostname", "count": 3}, "db-host", "shard.index: the hostname 'db-host' ends in no -N ordinal"),
    ({"index": 0, "count": 0}, "x", "shard.count: Input should be greater than or equal to 1"),
])
def test_bad_shard_sections_name_their_path(shard: dict[str, object], hostname: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(raw={"targets": TARGETS, "shard": shard}, environ={"HOSTNAME": hostname})
    assert any(problem.startswith(message) for problem in error.value.problems), error.value.problems


def test_shard_option_overrides_the_file() -> None:
    assert shard_argument("1/3") == {"index": 1, "count": 3}
    assert shard_argument("auto/4") == {"index": "hostname", "count": 4}
    for bad in ("1", "a/3", "1/x", "-1/3"):
        with pytest.raises(argparse.ArgumentTypeError):
            shard_argument(bad)
    settings = load_settings(raw={"targets": TARGETS, "shard": {"index": 0, "count": 2}}, environ={},
                             overrides={"shard": {"index": 2, "count": 5}})
    assert settings.shard is not None and (settings.shard.index, settings.shard.count) == (2, 5)
