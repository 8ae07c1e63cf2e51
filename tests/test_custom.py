"""Custom collectors without a server: postgres_exporter's naming and value rules, validation, the catalog value."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from exporter.catalog import VERSION_INFINITY, Catalog
from exporter.cli import main
from exporter.config import ConfigError, load_settings
from exporter.custom import (
    build_catalog,
    go_float,
    parse_semver_range,
    pe_duration_ms,
    pe_label,
    pe_value,
    statement_problem,
)
from exporter.docs import custom_markdown, metrics_markdown
from exporter.exposition import render_rows
from exporter.hooks import RunContext

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"
PE_FILE = DATA / "postgres_exporter_queries.yaml"
PGMONITOR_FILE = DATA / "pgmonitor_pg15_queries_general.yml"
TARGET = {"name": "a", "dsn": "postgresql://mon@127.0.0.1:5432/postgres"}


def _catalog(**raw: object) -> Catalog:
    return build_catalog(load_settings(raw={"targets": [TARGET], **raw}, environ={}))


def test_postgres_exporter_file_gets_postgres_exporters_names_kinds_and_labels() -> None:
    catalog = _catalog(queries_files=[str(PE_FILE)])
    spec = catalog.metric("pg_stat_user_tables_seq_scan")
    assert (spec.kind, spec.labels) == ("counter", ("datname", "schemaname", "relname"))
    assert catalog.metric("pg_stat_user_tables_last_vacuum").kind == "gauge"
    assert catalog.metric("pg_stat_statements_calls").labels == ("rolname", "datname", "queryid")
    assert catalog.metric("pg_process_idle_seconds_bucket").labels == ("application_name", "le")
    assert {"pg_process_idle_seconds_sum", "pg_process_idle_seconds_count"} <= catalog.metric_names()
    assert catalog.metric("pg_replication_lag").help == "Replication lag behind master in seconds"
    # cache_seconds is the interval when longer than the file's; every query runs once per target.
    assert all(c.scope == "server" and c.role == "any" for c in catalog.custom_collectors())
    # Names a built-in already exports are skipped (the built-in wins), the rest of the query kept.
    assert {s.name for s in catalog.shadowed} == {
        "pg_postmaster_start_time_seconds", "pg_database_size_bytes", "pg_stat_user_tables_n_live_tup",
        "pg_stat_user_tables_n_dead_tup", "pg_stat_user_tables_n_mod_since_analyze"}
    assert "pg_stat_user_tables_n_live_tup" in Catalog.builtin().metric_names()


def test_pgmonitor_file_loads_with_its_ccp_names() -> None:
    catalog = _catalog(queries_files=[{"path": str(PGMONITOR_FILE), "interval": "60s", "timeout": "10s"}])
    assert catalog.metric("ccp_data_checksum_failure_count").labels == ("dbname",)
    assert catalog.metric("ccp_stat_bgwriter_buffers_alloc").kind == "gauge"
    assert catalog.by_name["queries:ccp_stat_bgwriter"].interval == 60
    assert not catalog.shadowed


def test_the_catalog_is_a_value_built_per_configuration() -> None:
    first = _catalog(queries_files=[str(PGMONITOR_FILE)])
    second = _catalog(custom_collectors=[{"name": "q", "sql": "SELECT 1 AS v",
                                          "metrics": [{"name": "q_value", "value": "v", "help": "One."}]}])
    assert "ccp_stat_bgwriter_buffers_alloc" in first.metric_names()
    assert "ccp_stat_bgwriter_buffers_alloc" not in second.metric_names()
    assert "q_value" in second.metric_names() and "q_value" not in first.metric_names()
    assert not Catalog.builtin().custom_collectors()
    assert _catalog() is Catalog.builtin()


def test_custom_metrics_stay_out_of_generated_docs_and_appear_in_the_custom_section() -> None:
    catalog = _catalog(queries_files=[str(PE_FILE)])
    assert metrics_markdown(catalog) == metrics_markdown(Catalog.builtin())
    section = custom_markdown(catalog)
    assert "### `queries:pg_stat_user_tables`" in section
    assert "| `pg_stat_user_tables_seq_scan` | counter |" in section
    assert "| `pg_database_size_bytes` |" in section  # in the skipped table


def test_strict_custom_makes_a_clash_an_error_with_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(raw={"targets": [TARGET], "queries_files": [str(PE_FILE)], "strict_custom": True}, environ={})
    text = "\n".join(info.value.problems)
    assert "queries_files[0].path:" in text
    assert "metric pg_database_size_bytes is already exported by the built-in collector pg_database_size" in text


def test_postgres_exporter_value_and_label_rules() -> None:
    stamp = datetime(2024, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    assert math.isnan(pe_value(None))  # type: ignore[arg-type]
    assert pe_value(True) == 1 and pe_value(Decimal("2.5")) == 2.5 and pe_value("7") == 7
    assert pe_value(stamp) == 1704164645 and pe_value(stamp.replace(tzinfo=None)) == 1704164645  # whole seconds
    assert pe_value("seven") is None
    assert pe_label(None) == "" and pe_label(False) == "false" and pe_label(stamp) == "1704164645"
    assert pe_label(1.0) == "1" and pe_label(b"x") == "x"
    assert pe_duration_ms("1h2m3.5s") == 3_723_500 and pe_duration_ms("1.9ms") == 1 and pe_duration_ms("0") == 0
    assert pe_duration_ms("-1") is None and pe_duration_ms("00:01:00") is None and pe_duration_ms(5) is None
    assert pe_duration_ms(timedelta(seconds=2)) == 2000
    assert [go_float(v) for v in (1.0, 0.5, 300.0, 1e6, 1234567.0, 123456.0, 1e-5, 0.0001, -2.5, float("inf"))] == [
        "1", "0.5", "300", "1e+06", "1.234567e+06", "123456", "1e-05", "0.0001", "-2.5", "+Inf"]


def test_runonserver_ranges_in_server_version_num() -> None:
    assert parse_semver_range(">=10.0.0 <13.0.0") == [(100000, 130000)]
    assert parse_semver_range(">=9.6.0") == [(90600, VERSION_INFINITY)]
    assert parse_semver_range("<12.0.0 || >=15.0.0") == [(0, 120000), (150000, VERSION_INFINITY)]
    assert parse_semver_range("=15.4.0") == [(150004, 150005)]
    assert isinstance(parse_semver_range(">=ten"), str)


def test_histogram_and_mapped_columns_render_as_postgres_exporter_writes_them(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text(
        "app:\n  query: SELECT 1\n  metrics:\n"
        "    - name: {usage: LABEL, description: n}\n"
        "    - wait: {usage: HISTOGRAM, description: Waits}\n"
        "    - state: {usage: MAPPEDMETRIC, description: State, metric_mapping: {up: 1, down: 0}}\n"
        "    - took: {usage: DURATION, description: Took}\n"
        "    - junk: {usage: DISCARD}\n")
    collector = _catalog(queries_files=[str(path)]).by_name["queries:app"]
    assert [m.name for m in collector.metrics] == [
        "app_wait_bucket", "app_wait_sum", "app_wait_count", "app_state", "app_took_milliseconds"]
    row = {"name": "x", "wait": [1, 2.5], "wait_bucket": [3, 4], "wait_sum": 9.5, "wait_count": 5,
           "state": "down", "took": "1.5s", "junk": 1}
    assert collector.transform is not None
    rows = collector.transform([row], RunContext(target="a", database=None, facts=None, params={}, state={},
                                                 settings=None, timeout=1.0))  # type: ignore[arg-type]
    chunks, count, _ = render_rows(collector.metrics, rows, 'target="a"', 100)
    text = b"".join(chunks.values()).decode()
    assert 'app_wait_bucket{target="a",name="x",le="1"} 3\n' in text
    assert 'app_wait_bucket{target="a",name="x",le="2.5"} 4\n' in text
    assert 'app_wait_bucket{target="a",name="x",le="+Inf"} 5\n' in text
    assert 'app_wait_sum{target="a",name="x"} 9.5\n' in text and 'app_wait_count{target="a",name="x"} 5\n' in text
    assert 'app_state{target="a",name="x"} 0\n' in text
    assert 'app_took_milliseconds{target="a",name="x"} 1500\n' in text
    assert "junk" not in text and count == 7


GOOD_METRIC = "{name: q_value, value: v, help: One.}"
HEAD = f"targets: [{{name: a, dsn: '{TARGET['dsn']}'}}]\n"

# (name, config YAML after the target, queries file text or None, expected fragments of the error output)
BAD_DECLARATIONS = [
    ("no sql", f"custom_collectors:\n  - {{name: q, metrics: [{GOOD_METRIC}]}}\n", None,
     ["custom_collectors[0]: give either `sql` or `variants`"]),
    ("no metrics", "custom_collectors:\n  - {name: q, sql: SELECT 1}\n", None,
     ["custom_collectors[0].metrics: missing"]),
    ("bad kind", "custom_collectors:\n  - {name: q, sql: SELECT 1, metrics: [{name: q_v, kind: summary, "
     "value: v, help: h}]}\n", None, ["custom_collectors[0].metrics[0].kind: Input should be"]),
    ("counter without _total", "custom_collectors:\n  - {name: q, sql: SELECT 1, metrics: [{name: q_v, "
     "kind: counter, value: v, help: h}]}\n", None,
     ["custom_collectors[0].metrics[0].name: counter q_v must end in _total"]),
    ("gauge without value", "custom_collectors:\n  - {name: q, sql: SELECT 1, metrics: [{name: q_v, help: h}]}\n",
     None, ["custom_collectors[0].metrics[0]: a gauge needs `value`"]),
    ("reserved label", "custom_collectors:\n  - {name: q, sql: SELECT 1, metrics: [{name: q_v, value: v, "
     "labels: [target], help: h}]}\n", None,
     ["custom_collectors[0].metrics[0].name: metric q_v has bad or reserved label 'target'"]),
    ("timeout above interval", f"custom_collectors:\n  - {{name: q, sql: SELECT 1, interval: 5s, timeout: 10s, "
     f"metrics: [{GOOD_METRIC}]}}\n", None, ["custom_collectors[0]: timeout (10s) must be shorter"]),
    ("overlapping variants", "custom_collectors:\n  - name: q\n    variants: [{sql: SELECT 1, max_version: 150000},"
     f" {{sql: SELECT 2, min_version: 140000}}]\n    metrics: [{GOOD_METRIC}]\n", None,
     ["custom_collectors[0].variants: variants [0, 150000) and [140000, 1000000000) overlap"]),
    ("built-in collector name", f"custom_collectors:\n  - {{name: pg_settings, sql: SELECT 1, "
     f"metrics: [{GOOD_METRIC}]}}\n", None,
     ["custom_collectors[0].name: collector name 'pg_settings' is a built-in collector's"]),
    ("same metric twice", f"custom_collectors:\n  - {{name: q, sql: SELECT 1, metrics: [{GOOD_METRIC}]}}\n"
     f"  - {{name: r, sql: SELECT 1, metrics: [{GOOD_METRIC}]}}\n", None,
     ["custom_collectors[1].metrics[0].name: metric q_value is already declared by "
      "custom_collectors[0]"]),
    ("bad role", f"custom_collectors:\n  - {{name: q, role: leader, sql: SELECT 1, metrics: [{GOOD_METRIC}]}}\n",
     None, ["custom_collectors[0].role: Input should be"]),
    ("missing queries file", "queries_files: [/nonexistent/queries.yaml]\n", None,
     ["queries_files[0].path: /nonexistent/queries.yaml: cannot read the file"]),
    ("unknown usage", "queries_files: [QFILE]\n",
     "pg_x:\n  query: SELECT 1 AS v\n  metrics:\n    - v:\n        usage: GAUGES\n",
     ["queries_files[0].path: QFILE: pg_x.metrics[0].v.usage: expected one of DISCARD, LABEL"]),
    ("query missing", "queries_files: [QFILE]\n", "pg_x:\n  metrics:\n    - v: {usage: GAUGE}\n",
     ["QFILE: pg_x.query: missing"]),
    ("typo in a query key", "queries_files: [QFILE]\n",
     "pg_x:\n  query: SELECT 1\n  cache_second: 5\n  metrics:\n    - v: {usage: GAUGE}\n",
     ["QFILE: pg_x.cache_second: unknown key"]),
    ("bad runonserver", "queries_files: [QFILE]\n",
     "pg_x:\n  query: SELECT 1\n  runonserver: newest\n  metrics:\n    - v: {usage: GAUGE}\n",
     ["QFILE: pg_x.runonserver: cannot read 'newest'"]),
    ("metrics not a list", "queries_files: [QFILE]\n", "pg_x:\n  query: SELECT 1\n  metrics: {v: {usage: GAUGE}}\n",
     ["QFILE: pg_x.metrics: expected a list"]),
    ("bad metric name in file", "queries_files: [QFILE]\n",
     "pg-x:\n  query: SELECT 1\n  metrics:\n    - v: {usage: GAUGE}\n",
     ["QFILE: pg-x.metrics.v: bad metric name 'pg-x_v'"]),
    ("label a target sets", "custom_collectors:\n  - {name: q, sql: SELECT 1, metrics: [{name: q_v, value: v, "
     "labels: [env], help: h}]}\ntargets: [{name: b, dsn: 'host=x', labels: {env: prod}}]\n", None,
     ["custom_collectors[0].metrics[0].name: metric q_v: label 'env' is a constant label of target 'b'"]),
    ("two statements", f"custom_collectors:\n  - {{name: q, sql: 'SELECT 1 AS v; COMMIT; DELETE FROM t', "
     f"metrics: [{GOOD_METRIC}]}}\n", None,
     ["custom_collectors[0].sql: one statement only: more SQL follows the ';' at character 14"]),
    ("two statements in a queries file", "queries_files: [QFILE]\n",
     "pg_x:\n  query: SELECT 1 AS v; SELECT 2 AS v\n  metrics:\n    - v: {usage: GAUGE}\n",
     ["QFILE: pg_x.query: one statement only"]),
    ("file timeout above interval", "queries_files: [{path: QFILE, interval: 1s, timeout: 2s}]\n",
     "pg_x:\n  query: SELECT 1\n  metrics:\n    - v: {usage: GAUGE}\n",
     ["queries_files[0]: timeout (2s) must be shorter than the interval (1s)"]),
]


@pytest.mark.parametrize(("name", "text", "queries", "expected"), BAD_DECLARATIONS,
                         ids=[b[0] for b in BAD_DECLARATIONS])
def test_bad_custom_declaration_exits_2_naming_the_yaml_path(
    name: str, text: str, queries: str | None, expected: list[str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATA_SOURCE_NAME", raising=False)
    monkeypatch.delenv("PGVITALS_DSN", raising=False)
    queries_file = tmp_path / "queries.yaml"
    if queries is not None:
        queries_file.write_text(queries)
    path = tmp_path / "config.yaml"
    path.write_text(HEAD + text.replace("QFILE", str(queries_file)))
    code = main(["check", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    err = re.sub(r" \(line \d+\)", "", err)
    for fragment in expected:
        assert fragment.replace("QFILE", str(queries_file)) in err, f"{fragment!r} not in:\n{err}"


def test_queries_file_errors_name_the_line_inside_the_file_and_relative_paths_sit_beside_the_config(
    tmp_path: Path,
) -> None:
    (tmp_path / "q.yaml").write_text("pg_x:\n  query: SELECT 1\n  metrics:\n    - v:\n        usage: NOPE\n")
    config = tmp_path / "c.yaml"
    config.write_text(HEAD + "queries_files: [q.yaml]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    assert info.value.problems == [
        f"queries_files[0].path (line 2): {tmp_path / 'q.yaml'}: pg_x.metrics[0].v.usage (line 5): expected one of "
        "DISCARD, LABEL, COUNTER, GAUGE, MAPPEDMETRIC, DURATION, HISTOGRAM, got 'NOPE'"]


def test_cli_process_exits_2_on_a_bad_custom_collector(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(HEAD + "custom_collectors:\n  - name: q\n    sql: SELECT 1 AS v\n    metrics:\n"
                      "      - {name: q_requests, kind: counter, value: v, help: Requests.}\n")
    done = subprocess.run([sys.executable, "-m", "exporter", "check", "-c", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert "custom_collectors[0].metrics[0].name (line 6): counter q_requests must end in _total" in done.stderr
    assert "Traceback" not in done.stderr


def test_docs_with_config_prints_the_custom_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(HEAD + f"queries_files: ['{PGMONITOR_FILE}']\n")
    assert main(["docs", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## Custom")
    assert "| `ccp_data_checksum_failure_count` | gauge |  | target, dbname |" in out


@pytest.mark.parametrize("sql", [
    "SELECT 1",
    "SELECT 1;",
    "SELECT 1;  -- done\n",
    "SELECT ';' AS a, 'it''s; fine' AS b",
    "SELECT E'back\\'slash;' AS a",
    'SELECT 1 AS "odd;name"',
    "SELECT $$;$$ AS a, $tag$ ; $$ ; $tag$ AS b",
    "SELECT 1 /* a; /* nested; */ still; */",
    "SELECT a$b FROM t -- ;\n",
])
def test_one_statement_passes(sql: str) -> None:
    assert statement_problem(sql) is None


@pytest.mark.parametrize(("sql", "message"), [
    ("SELECT 1; COMMIT; DELETE FROM t", "one statement only"),
    ("SELECT 1;\n-- c\nDELETE FROM t", "one statement only"),
    ("SELECT ';'; SELECT 2", "one statement only"),
    ("SELECT $$;$$; SELECT 2", "one statement only"),
    ("SELECT 'open", "unterminated ' quote"),
    ("SELECT $x$ open", "unterminated $x$ quote"),
    ("SELECT 1 /* open", "unterminated /* comment"),
])
def test_more_than_one_statement_is_refused(sql: str, message: str) -> None:
    problem = statement_problem(sql)
    assert problem is not None and message in problem


def test_in_postgres_exporter_naming_their_names_we_derive_win_over_the_file() -> None:
    native = _catalog(queries_files=[str(PE_FILE)])
    compat = _catalog(queries_files=[str(PE_FILE)], metric_names="postgres_exporter")
    both = _catalog(queries_files=[str(PE_FILE)], metric_names="both")
    native_shadowed = {s.name for s in native.shadowed}
    compat_shadowed = {s.name for s in compat.shadowed}
    # Their vacuum columns of pg_stat_user_tables are derived from ours in postgres_exporter naming only:
    # the file's would serve a second series of the same name there.
    assert {"pg_stat_user_tables_last_vacuum", "pg_stat_user_tables_vacuum_count"} <= compat_shadowed - native_shadowed
    assert "pg_stat_user_tables_vacuum_count" in native.metric_names()
    assert compat_shadowed | native_shadowed == {s.name for s in both.shadowed}
