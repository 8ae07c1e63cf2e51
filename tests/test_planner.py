"""What runs where, decided without a server: overrides, skip reasons and extension versions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from exporter import catalog, cli
from exporter.catalog import SKIP_REASONS, Collector, MetricSpec, SqlVariant, load
from exporter.config import load_settings
from exporter.db import Facts
from exporter.planner import applicable, effective_collectors, not_applicable

ROOT = Path(__file__).parent.parent


def _facts(version_num: int = 150004, in_recovery: bool = False, preload: frozenset[str] | None = frozenset()) -> Facts:
    return Facts(version_num=version_num, version="15.4", in_recovery=in_recovery, is_superuser=False,
                 roles=frozenset({"pg_monitor"}), databases=("postgres",), preload_libraries=preload)


def _collector(**overrides: object) -> Collector:
    base: dict[str, object] = {
        "name": "c", "family": "f", "help": "h", "variants": (SqlVariant("SELECT 1 AS v"),),
        "metrics": (MetricSpec("c_value", "gauge", "help", value="v"),),
    }
    base.update(overrides)
    return Collector(**base)  # type: ignore[arg-type]


def test_the_skipped_help_lists_exactly_the_reasons_the_planner_gives() -> None:
    help_text = catalog.COLLECTOR_SKIPPED.help
    listed = help_text[help_text.index("(reason: ") + len("(reason: "):help_text.index(")")].split(", ")
    assert tuple(listed) == SKIP_REASONS == ("version", "role", "extension", "preload", "denied")
    assert set(cli.SKIP_EXPLANATIONS) == set(SKIP_REASONS)
    given = {
        not_applicable(_collector(min_server_version=160000), _facts()),
        not_applicable(_collector(variants=(SqlVariant("SELECT 1", 160000),)), _facts()),
        not_applicable(_collector(role="standby"), _facts()),
        not_applicable(_collector(role="primary"), _facts(in_recovery=True)),
        not_applicable(_collector(preload="pg_stat_statements"), _facts()),
    }
    # "extension" (and "version" per database) come at the run; "denied" from the probe's privilege check.
    assert given == {"version", "role", "preload"}
    assert not_applicable(_collector(preload="pg_stat_statements"),
                          _facts(preload=frozenset({"pg_stat_statements"}))) is None
    # A role that may not read shared_preload_libraries: unknown, so the run is tried (it says not_ready).
    assert not_applicable(_collector(preload="pg_stat_statements"), _facts(preload=None)) is None


def test_overrides_and_target_kinds() -> None:
    settings = load_settings(raw={
        "targets": [{"name": "main", "dsn": "host=127.0.0.1 dbname=postgres"}],
        "collectors": {"pg_settings": {"interval": "2m", "enabled": False}},
    }, environ={})
    effective = effective_collectors(load(), settings)
    by_name = {e.collector.name: e for e in effective}
    assert by_name["pg_settings"].interval == 120 and not by_name["pg_settings"].enabled
    postgres = {e.collector.name for e in applicable(effective, is_pgbouncer=False)}
    pgbouncer = {e.collector.name for e in applicable(effective, is_pgbouncer=True)}
    assert "pg_settings" not in postgres and "pg_stat_database" in postgres
    assert pgbouncer and all(by_name[name].collector.target_kind == "pgbouncer" for name in pgbouncer)
    assert not postgres & pgbouncer


def test_alerts_and_the_planner_load_without_the_engine() -> None:
    code = ("import sys\n"
            "from exporter.alerts import render_rules\n"
            "from exporter.config import Settings\n"
            "import exporter.planner\n"
            "render_rules(Settings())\n"
            "assert 'exporter.engine' not in sys.modules, 'the engine was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
