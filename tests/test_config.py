"""Configuration: every problem at once, with its YAML path, exit code 2, no stack trace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exporter.catalog import Collector, load
from exporter.cli import main
from exporter.config import ConfigError, load_settings
from exporter.dashboards.promql import duration
from exporter.durations import format_duration, parse_duration

GOOD_DSN = "postgresql://mon@127.0.0.1:5432/postgres"
ONE = f"targets: [{{name: a, dsn: '{GOOD_DSN}'}}]\n"

# (name, YAML text, expected fragments of the error output)
BROKEN = [
    ("top-level list", "- a\n- b\n", ["(top level): expected a mapping"]),
    ("not yaml", "targets: [\n", ["not valid YAML at line"]),
    ("unknown top key", ONE + "listen_port: 1\n", ["listen_port: unknown key"]),
    ("missing dsn", "targets:\n  - name: a\n  - name: b\n", ["targets[0].dsn: missing", "targets[1].dsn: missing"]),
    ("missing name", f"targets:\n  - dsn: '{GOOD_DSN}'\n", ["targets[0].name: missing"]),
    ("targets not a list", "targets: {name: a}\n", ["targets: Input should be a valid list"]),
    ("unknown target key", f"targets:\n  - {{name: a, dsn: '{GOOD_DSN}', passwd: x}}\n",
     ["targets[0].passwd: unknown key"]),
    ("duplicate target names", f"targets:\n  - {{name: a, dsn: '{GOOD_DSN}'}}\n  - {{name: a, dsn: '{GOOD_DSN}'}}\n",
     ["targets[1].name: duplicate of targets[0]"]),
    ("bad dsn", "targets:\n  - {name: a, dsn: 'host=x port=5432 dbname'}\n",
     ["targets[0].dsn: not a valid PostgreSQL connection string"]),
    ("unreadable password_file",
     f"targets:\n  - {{name: a, dsn: '{GOOD_DSN}', password_file: /nonexistent/pw}}\n",
     ["targets[0].password_file: cannot read /nonexistent/pw"]),
    ("unset password_env", f"targets:\n  - {{name: a, dsn: '{GOOD_DSN}', password_env: PGV_NOPE_XYZ}}\n",
     ["targets[0].password_env: environment variable PGV_NOPE_XYZ is not set"]),
    ("password_command as a shell line",
     f"targets:\n  - {{name: a, dsn: '{GOOD_DSN}', password_command: 'aws rds generate-db-auth-token'}}\n",
     ["targets[0].password_command: expected a list of arguments such as [aws, rds, generate-db-auth-token, ...]"]),
    ("empty password_command", f"targets:\n  - {{name: a, dsn: '{GOOD_DSN}', password_command: []}}\n",
     ["targets[0].password_command: List should have at least 1 item"]),
    ("password_command not found",
     f"pgbouncers:\n  - {{name: b, dsn: '{GOOD_DSN}', password_command: [pgv-no-such-tool, token]}}\n",
     ["pgbouncers[0].password_command[0]: command not found: pgv-no-such-tool"]),
    ("password_command beside password_env",
     f"targets:\n  - {{name: a, dsn: '{GOOD_DSN}', password_command: [cat, /dev/null], password_env: HOME}}\n",
     ["targets[0].password_command: give either password_command or password_env"]),
    ("password_command_ttl without a command",
     f"targets:\n  - {{name: a, dsn: '{GOOD_DSN}', password_command_ttl: 5m}}\n",
     ["targets[0].password_command_ttl: only used with password_command"]),
    ("bad password_command_ttl and timeout",
     f"targets:\n  - {{name: a, dsn: '{GOOD_DSN}', password_command: [cat, /dev/null], password_command_ttl: soon,"
     " password_command_timeout: 0}\n",
     ["targets[0].password_command_ttl: expected a duration", "targets[0].password_command_timeout: must be a"]),
    ("bad interval", ONE + "collectors:\n  pg_stat_database: {interval: soon}\n",
     ["collectors.pg_stat_database.interval: expected a duration"]),
    ("negative interval", ONE + "collectors:\n  pg_settings: {interval: -5}\n",
     ["collectors.pg_settings.interval: must be a positive duration"]),
    ("timeout above interval",
     ONE + "collectors:\n  pg_connections: {interval: 10s, timeout: 30s}\n",
     ["collectors.pg_connections.timeout: 30s must be shorter than the interval (10s)"]),
    ("unknown collector", ONE + "collectors:\n  pg_nope: {enabled: false}\n",
     ["collectors.pg_nope: unknown collector"]),
    ("enabled not bool",
     ONE + "collectors:\n  pg_settings: {enabled: perhaps}\n",
     ["collectors.pg_settings.enabled: Input should be a valid boolean"]),
    ("unknown parameter", ONE + "collectors:\n  pg_stat_statements: {topn: 5}\n",
     ["collectors.pg_stat_statements.topn: unknown key (parameters: "]),
    ("parameter of the wrong type", ONE + "collectors:\n  pg_stat_statements: {top_n: many, query_text: 1}\n",
     ["collectors.pg_stat_statements.top_n: Input should be a valid integer",
      "collectors.pg_stat_statements.query_text: Input should be a valid boolean"]),
    ("negative parameter", ONE + "collectors:\n  pg_stat_user_tables: {top_n: -1}\n",
     ["collectors.pg_stat_user_tables.top_n: Input should be greater than or equal to 0"]),
    ("parameter named like a model attribute", ONE + "collectors:\n  pg_replication_heartbeat: {schema: 1}\n",
     ["collectors.pg_replication_heartbeat.schema: Input should be a valid string"]),
    ("collectors not a mapping", ONE + "collectors: [pg_settings]\n", ["collectors: Input should be"]),
    ("bad listen", f"listen: everywhere\ntargets: [{{name: a, dsn: '{GOOD_DSN}'}}]\n", ["listen: expected HOST:PORT"]),
    ("bad max_connections", f"targets: [{{name: a, dsn: '{GOOD_DSN}', max_connections: 0}}]\n",
     ["targets[0].max_connections: Input should be greater than or equal to 1"]),
    ("bad idle_connections", f"targets: [{{name: a, dsn: '{GOOD_DSN}', idle_connections: 0}}]\n",
     ["targets[0].idle_connections: Input should be greater than or equal to 1"]),
    ("bad label name", f"targets: [{{name: a, dsn: '{GOOD_DSN}', labels: {{'bad-label': x}}}}]\n",
     ["targets[0].labels: label name 'bad-label' is not a valid Prometheus label name"]),
    ("reserved label", f"targets: [{{name: a, dsn: '{GOOD_DSN}', labels: {{datname: x}}}}]\n",
     ["targets[0].labels: label name 'datname' is set by pgvitals itself"]),
    ("label a metric uses", f"targets: [{{name: a, dsn: '{GOOD_DSN}', labels: {{user: x}}}}]\n",
     ["targets[0].labels: label name 'user' is set by pgvitals itself"]),
    ("pool named unmatched", ONE + "pools: [{name: unmatched, capacity: 10, usename: x}]\n",
     ["pools[0].name: 'unmatched' is reserved"]),
    ("no targets", "targets: []\n", ["targets: at least one target"]),
    ("pool without matcher", ONE + "pools: [{name: p, capacity: 10}]\n",
     ["pools[0]: give application_name, usename or client_addr"]),
    ("pool bad cidr",
     ONE + "pools: [{name: p, capacity: 10, client_addr: 10.0.0.0/99}]\n",
     ["pools[0].client_addr: expected an address range in CIDR form"]),
    ("bad log level", ONE + "log: {level: loud}\n", ["log.level: String should"]),
]


@pytest.mark.parametrize(("name", "text", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_exits_2_naming_the_yaml_path(
    name: str, text: str, expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATA_SOURCE_NAME", raising=False)
    monkeypatch.delenv("PGVITALS_DSN", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    code = main(["check", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    err = re.sub(r" \(line \d+\)", "", err)  # lines are checked by test_errors_name_the_yaml_line
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in:\n{err}"


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "listen: nowhere\n"
        "targets:\n  - {name: a}\n  - {name: a, dsn: 'postgresql://x@h/db', extra: 1}\n"
        "collectors:\n  pg_settings: {interval: 1s, timeout: 5s}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    text = re.sub(r" \(line \d+\)", "", "\n".join(info.value.problems))
    for fragment in ("listen:", "targets[0].dsn: missing", "targets[1].extra: unknown key",
                     "targets[1].name: duplicate", "collectors.pg_settings.timeout"):
        assert fragment in text


def test_errors_name_the_yaml_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "# comment\n"
        "listen: nowhere\n"                                           # 2
        "targets:\n"                                                  # 3
        f"  - name: a\n    dsn: '{GOOD_DSN}'\n"                       # 4-5
        "  - name: b\n"                                               # 6
        "    dsn: 'host=x port=5432 dbname'\n"                        # 7
        "    labels:\n      datname: x\n"                             # 8-9
        "  - name: c\n"                                               # 10: dsn missing
        "collectors:\n"                                               # 11
        "  pg_stat_statements:\n"                                     # 12
        "    top_n: many\n"                                           # 13
        "  pg_settings: {interval: 1s, timeout: 5s}\n"                # 14
        "pools:\n  - {name: p, capacity: 10}\n"                       # 15-16
        "alerts:\n  runbook_base_url: wiki\n"                         # 17-18
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={"PGVITALS_LOG_LEVEL": "loud"})
    problems = info.value.problems
    for expected in ("listen (line 2): expected HOST:PORT",
                     "targets[1].dsn (line 7): not a valid PostgreSQL connection string",
                     "targets[1].labels (line 8): label name 'datname' is set by pgvitals itself",
                     "targets[2].dsn (line 10): missing",
                     "collectors.pg_stat_statements.top_n (line 13): Input should be a valid integer",
                     "collectors.pg_settings.timeout (line 14): 5s must be shorter",
                     "pools[0] (line 16): give application_name",
                     "alerts.runbook_base_url (line 18): expected an absolute http"):
        assert any(problem.startswith(expected) for problem in problems), (expected, problems)
    # From the environment, not the file: no line to point at.
    assert any(problem.startswith("log.level: String should") for problem in problems), problems


def test_password_never_in_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("targets:\n  - {name: 'bad name!', dsn: 'postgresql://u:Sup3rSecretPw@h:5432/db', x: 1}\n")
    assert main(["check", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert "Sup3rSecretPw" not in captured.err + captured.out


def test_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGVITALS_MAIN_PASSWORD", "x")
    example = Path(__file__).parent.parent / "config.example.yaml"
    settings = load_settings(example, environ={"PGVITALS_MAIN_PASSWORD": "x"})
    assert settings.targets
    assert settings.listen_port == 9839


def test_environment_overrides_and_data_source_name() -> None:
    settings = load_settings(raw={}, environ={
        "DATA_SOURCE_NAME": "postgresql://mon@db:5432/postgres",
        "PGVITALS_LISTEN": "127.0.0.1:9999",
        "PGVITALS_LOG_LEVEL": "debug",
    })
    assert [t.name for t in settings.targets] == ["default"]
    assert settings.listen_port == 9999
    assert settings.log.level == "debug"


def test_durations() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("5m") == 300
    assert parse_duration(2) == 2.0
    assert parse_duration("1m30s") == 90
    assert parse_duration("2h15m") == 8100
    assert parse_duration("1d") == 86400
    assert parse_duration("1w2d") == 9 * 86400
    assert parse_duration("1s500ms") == 1.5
    assert parse_duration(" 45 ") == 45
    assert parse_duration("0s", allow_zero=True) == 0
    for bad in ("fast", True, "-1s", 0, "0s", "5s1m", "1m1m", "1m 30s", "m", "", None, "1y"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize("seconds", [0.001, 0.5, 1, 45, 60, 90, 300, 3599, 3600, 5400, 86400, 90000, 93784.5,
                                     14 * 86400, 123456.789])
def test_duration_formatter_round_trips_through_the_parser(seconds: float) -> None:
    text = format_duration(seconds)
    assert parse_duration(text) == pytest.approx(seconds), text
    assert format_duration(parse_duration(text)) == text
    assert duration(seconds) == text, "promql emits what the config parser reads"


def test_formatter_output_is_a_config_value() -> None:
    """`promql.duration` emits 1d for a day: the config must accept it (it used to refuse)."""
    assert duration(86400) == "1d"
    settings = load_settings(raw={"targets": [{"name": "a", "dsn": GOOD_DSN}],
                                  "collectors": {"pg_bloat_estimate": {"interval": duration(86400)}},
                                  "alerts": {"slot_inactive": {"for": "1h30m"}}}, environ={})
    assert settings.collectors["pg_bloat_estimate"].interval == 86400
    assert settings.alerts.slot_inactive.for_ == 5400


_WRONG = {bool: "yes", int: True, float: "fast", str: 1}


@pytest.mark.parametrize("collector", [c for c in load().collectors if c.params], ids=lambda c: c.name)
def test_parameter_models_follow_the_declared_params(collector: Collector) -> None:
    """Each declared Param is accepted with its default's type and refused, at its YAML path, with another."""
    from exporter.planner import effective_collectors

    given = {p.name: p.default for p in collector.params}
    settings = load_settings(raw={"targets": [{"name": "a", "dsn": GOOD_DSN}],
                                  "collectors": {collector.name: given}}, environ={})
    effective = {e.collector.name: e for e in effective_collectors(load(), settings)}[collector.name]
    assert effective.params == collector.param_defaults()
    wrong = {p.name: _WRONG[type(p.default)] for p in collector.params}
    with pytest.raises(ConfigError) as error:
        load_settings(raw={"targets": [{"name": "a", "dsn": GOOD_DSN}],
                           "collectors": {collector.name: wrong}}, environ={})
    for param in collector.params:
        assert any(p.startswith(f"collectors.{collector.name}.{param.name}: Input should be a valid")
                   for p in error.value.problems), error.value.problems


def test_a_float_parameter_takes_an_integer() -> None:
    collector = next(c for c in load().collectors for p in c.params if isinstance(p.default, float))
    param = next(p for p in collector.params if isinstance(p.default, float))
    settings = load_settings(raw={"targets": [{"name": "a", "dsn": GOOD_DSN}],
                                  "collectors": {collector.name: {param.name: 3}}}, environ={})
    assert settings.collectors[collector.name].model_extra == {param.name: 3.0}


def test_tuning_a_collector_keeps_its_default_switch() -> None:
    """An interval for a disabled-by-default collector does not enable it; `enabled` says so explicitly."""
    from exporter.catalog import load
    from exporter.planner import effective_collectors

    disabled = next(c.name for c in load().collectors if not c.enabled)
    enabled = next(c.name for c in load().collectors if c.enabled)
    settings = load_settings(raw={"targets": [{"name": "a", "dsn": "postgresql://x@h/db"}], "collectors": {
        disabled: {"interval": "60s"}, enabled: {"interval": "60s"}}}, environ={})
    effective = {e.collector.name: e for e in effective_collectors(load(), settings)}
    assert not effective[disabled].enabled and effective[disabled].interval == 60
    assert effective[enabled].enabled
    switched = load_settings(raw={"targets": [{"name": "a", "dsn": "postgresql://x@h/db"}], "collectors": {
        disabled: {"enabled": True}, enabled: {"enabled": False}}}, environ={})
    effective = {e.collector.name: e for e in effective_collectors(load(), switched)}
    assert effective[disabled].enabled and not effective[enabled].enabled
