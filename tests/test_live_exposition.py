"""A full /metrics of an exporter on a live server, read by parsers that are not ours: prometheus_client's
text parser and ``promtool check metrics`` must accept it and agree with tests/support/scrape.py."""

from __future__ import annotations

import math
import re
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.catalog import load
from exporter.localpg import wait_until
from tests.support.pgbouncer import pgbouncer_available, running_pgbouncer
from tests.support.scrape import parse_exposition
from tests.support.servers import MONITOR_ROLE, Server

pytestmark = [pytest.mark.live, pytest.mark.family("exposition")]

PROMTOOL = Path("/usr/bin/promtool")

#: Metrics whose ``promtool check metrics`` lint finding is accepted, and why (each must still be reported).
#: None today: pg_index_unused_count (a gauge with a histogram's suffix) became pg_index_unused_indexes.
ACCEPTED_LINT: dict[str, str] = {}


Sample = tuple[str, frozenset[tuple[str, str]], float]


def _unescape(value: str) -> str:
    """A label value as written in the exposition, unescaped (``\\\\``, ``\\"``, ``\\n``)."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _prepare(pg: Server, db: str) -> None:
    """Something for every family to show: tables, indexes, a sequence, statements, pgstattuple."""
    pg.execute(f"""
        CREATE EXTENSION pgstattuple;
        CREATE TABLE orders (id int PRIMARY KEY, customer int, note text);
        INSERT INTO orders SELECT g, g % 100, md5(g::text) FROM generate_series(1, 20000) g;
        DELETE FROM orders WHERE id % 3 = 0;
        CREATE INDEX orders_customer ON orders (customer);
        CREATE SEQUENCE tickets MAXVALUE 1000;
        SELECT setval('tickets', 900);
        GRANT SELECT ON ALL TABLES IN SCHEMA public TO {MONITOR_ROLE};
        GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {MONITOR_ROLE};
        ANALYZE orders;
        SELECT count(*) FROM orders WHERE customer = 7;
    """, db)


def _every_two_seconds() -> dict[str, dict[str, Any]]:
    """Every collector every two seconds, so the scrape holds each one's data within seconds."""
    return {c.name: {"interval": "2s", "timeout": "1500ms"} for c in load().collectors}


@pytest.fixture
def full_scrape(pg: Server, fresh_db: str, exporter_for: Callable[..., Any]) -> Iterator[str]:
    """The body of one /metrics once every collector has run (or been skipped) on every target."""
    _prepare(pg, fresh_db)
    with ExitStack() as stack:
        targets = [{"name": "main", "dsn": pg.dsn(), "databases": {"include": ["postgres", fresh_db]}}]
        extra: dict[str, Any] = {}
        if pgbouncer_available():
            bouncer = stack.enter_context(running_pgbouncer(pg, pool_size=2))
            extra["pgbouncers"] = [{"name": "edge", "dsn": bouncer.admin_dsn}]
        daemon = exporter_for(targets, collectors=_every_two_seconds(), **extra)
        assert daemon.server is not None
        url = f"http://127.0.0.1:{daemon.server.port}/metrics"

        def settled() -> str | None:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read().decode()
            reported = {(labels.get("target"), labels.get("collector"))
                        for (name, label_set), _ in parse_exposition(body).items()
                        if name in ("pgvitals_collector_success", "pgvitals_collector_skipped")
                        for labels in [dict(label_set)]}
            expected = {(target, c.name) for target in ["main", *(["edge"] if extra else [])]
                        for c in load().collectors
                        if c.enabled and (c.target_kind == "pgbouncer") == (target == "edge")}
            return body if expected <= reported else None

        body: str = wait_until(settled, timeout=60, interval=0.5)
        yield body


def test_prometheus_client_parses_the_same_samples_as_we_do(full_scrape: str) -> None:
    theirs: set[Sample] = set()
    families = list(text_string_to_metric_families(full_scrape))
    for family in families:
        for sample in family.samples:
            theirs.add((sample.name, frozenset(sample.labels.items()), sample.value))
    ours = {(name, frozenset((k, _unescape(v)) for k, v in labels), value)
            for (name, labels), value in parse_exposition(full_scrape).items()}

    def comparable(samples: set[Sample]) -> set[tuple[str, frozenset[tuple[str, str]], float | str]]:
        return {(n, labels, "NaN" if math.isnan(v) else v) for n, labels, v in samples}

    assert comparable(theirs) == comparable(ours)
    ours_only = [f for f in families if f.name.startswith(("pg_", "pgbouncer_", "pgvitals_"))]
    assert len(ours_only) > 100  # the scrape is a full one
    untyped = [f.name for f in ours_only if f.type == "unknown" or not f.documentation]
    assert untyped == [], "every family has a TYPE and a HELP"


@pytest.mark.skipif(not PROMTOOL.exists(), reason="needs /usr/bin/promtool (scripts/setup installs it)")
def test_promtool_check_metrics_accepts_the_scrape(full_scrape: str) -> None:
    result = subprocess.run([str(PROMTOOL), "check", "metrics"], input=full_scrape, capture_output=True,
                            text=True, timeout=60)
    findings = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    unexpected = [line for line in findings if line.split(" ", 1)[0] not in ACCEPTED_LINT]
    assert unexpected == [], "\n".join(unexpected)
    assert {line.split(" ", 1)[0] for line in findings} == set(ACCEPTED_LINT), "an accepted finding is gone"
    assert result.returncode == (3 if findings else 0), result  # 3: lint findings only, no parse error
