"""Generated dashboards: Grafana 11 models accept them, every query parses and names only exported metrics."""

from __future__ import annotations

import enum
import json
import re
import subprocess
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.alerts import recording_rules
from exporter.config import AlertsConfig
from exporter.dashboards import build_dashboards, generated_files
from exporter.dashboards.grafana import SCHEMA_VERSION
from exporter.dashboards.promql import PromQLSyntaxError, references
from tests.support.promql_check import expand_variables, reference_problems

ROOT = Path(__file__).parent.parent
PROMTOOL = "/usr/bin/promtool"
PANEL_TYPES = {"timeseries", "stat", "table", "bargauge"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

sdk = pytest.importorskip("grafana_foundation_sdk", reason="pip install -e '.[test]' (grafana-foundation-sdk)")
from grafana_foundation_sdk.cog import plugins as sdk_plugins  # noqa: E402
from grafana_foundation_sdk.cog.encoder import JSONEncoder as SdkEncoder  # noqa: E402
from grafana_foundation_sdk.models import dashboard as sdk_dashboard  # noqa: E402

sdk_plugins.register_default_plugins()


@pytest.fixture(scope="module")
def boards() -> dict[str, dict[str, Any]]:
    return build_dashboards()


def panels_of(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def all_exprs(boards: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every panel query and variable query."""
    out = []
    for name, board in boards.items():
        for panel in panels_of(board):
            out.extend((name, panel["title"], target["expr"]) for target in panel["targets"])
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"])
                assert match, variable
                out.append((name, f"variable {variable['name']}", match.group(1)))
    return out


# -- validation against Grafana 11.6's models (grafana-foundation-sdk) ---------------------------------------

def _lost_keys(original: Any, round_trip: Any, path: str) -> list[str]:
    """Keys of ``original`` the model dropped (it does not know them) or values it changed."""
    problems: list[str] = []
    if isinstance(original, dict):
        if not isinstance(round_trip, dict):
            return [f"{path}: the model turned an object into {type(round_trip).__name__}"]
        for key, value in original.items():
            if key not in round_trip:
                problems.append(f"{path}.{key}: unknown to Grafana 11.6's model")
            else:
                problems.extend(_lost_keys(value, round_trip[key], f"{path}.{key}"))
    elif isinstance(original, list):
        if not isinstance(round_trip, list) or len(round_trip) != len(original):
            return [f"{path}: list changed in the round trip"]
        for index, (a, b) in enumerate(zip(original, round_trip, strict=True)):
            problems.extend(_lost_keys(a, b, f"{path}[{index}]"))
    elif original != round_trip:
        problems.append(f"{path}: {original!r} came back as {round_trip!r}")
    return problems


def _is_model(obj: Any) -> bool:
    return type(obj).__module__.startswith("grafana_foundation_sdk.models") and hasattr(obj, "to_json")


def _check_value(value: Any, annotation: Any, path: str) -> list[str]:
    """Problems with ``value`` against the model's type annotation (enums, primitives, nested models)."""
    if value is None:
        return []
    if annotation in (typing.Any, object):  # panel options and field config: decoded per panel type
        return _check_types(value, path) if _is_model(value) else []
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        results = [_check_value(value, arg, path) for arg in args if arg is not type(None)]
        return [] if any(not r for r in results) else results[0]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        return [p for index, item in enumerate(value) for p in _check_value(item, args[0], f"{path}[{index}]")]
    if origin is dict:
        return [] if isinstance(value, dict) else [f"{path}: expected an object, got {value!r}"]
    if origin is typing.Literal:
        return [] if value in args else [f"{path}: {value!r} not one of {args}"]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            annotation(value)
        except ValueError:
            return [f"{path}: {value!r} is not a valid {annotation.__name__} "
                    f"({', '.join(str(m.value) for m in annotation)})"]
        return []
    if annotation is bool:
        return [] if isinstance(value, bool) else [f"{path}: expected a boolean, got {value!r}"]
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected int, got {value!r}"]
    if annotation is float:
        return [] if isinstance(value, int | float) and not isinstance(value, bool) else [
            f"{path}: expected a number, got {value!r}"]
    if annotation is str:
        return [] if isinstance(value, str) else [f"{path}: expected a string, got {value!r}"]
    if isinstance(annotation, type) and hasattr(annotation, "from_json"):
        if isinstance(value, dict):  # fields the parent keeps undecoded (panel links, transformations)
            decoded = annotation.from_json(value)
            round_trip = json.loads(json.dumps(decoded, cls=SdkEncoder))
            return _lost_keys(value, round_trip, path) + _check_types(decoded, path)
        if isinstance(value, annotation):
            return _check_types(value, path)
        return [f"{path}: expected {annotation.__name__}, got {value!r}"]
    if _is_model(value):
        return _check_types(value, path)
    return []


def _check_types(obj: Any, path: str) -> list[str]:
    hints = typing.get_type_hints(type(obj))
    return [p for attr, annotation in hints.items() for p in _check_value(getattr(obj, attr, None), annotation,
                                                                            f"{path}.{attr}")]


def validate_with_sdk(board: dict[str, Any]) -> list[str]:
    """Everything Grafana 11.6's dashboard model does not accept in ``board``."""
    decoded = sdk_dashboard.Dashboard.from_json(board)
    round_trip = json.loads(json.dumps(decoded, cls=SdkEncoder))
    return _lost_keys(board, round_trip, "$") + _check_types(decoded, "$")


def test_the_sdk_validator_catches_mistakes(boards: dict[str, dict[str, Any]]) -> None:
    board = json.loads(json.dumps(boards["locks.json"]))
    panel = panels_of(board)[0]
    panel["span"] = 6  # Grafana < 5 layout
    panel["options"]["legend"]["displayMode"] = "sideways"  # not an enum value
    panel["fieldConfig"]["defaults"]["unitt"] = "s"  # typo
    board["graphTooltip"] = "shared"
    problems = "\n".join(validate_with_sdk(board))
    assert "$.panels[0].span: unknown" in problems
    assert "$.panels[0].fieldConfig.defaults.unitt: unknown" in problems
    assert "'sideways' is not a valid LegendDisplayMode" in problems
    assert "graph_tooltip: 'shared' is not a valid DashboardCursorSync" in problems


@pytest.mark.parametrize("name", sorted(build_dashboards()))
def test_grafana_11_models_accept_the_dashboard(boards: dict[str, dict[str, Any]], name: str) -> None:
    problems = validate_with_sdk(boards[name])
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


# -- our own conventions --------------------------------------------------------------------------------------

def test_dashboard_structure(boards: dict[str, dict[str, Any]]) -> None:
    uids = [board["uid"] for board in boards.values()]
    assert len(uids) == len(set(uids))
    for name, board in boards.items():
        assert board["schemaVersion"] == SCHEMA_VERSION
        assert "pgvitals" in board["tags"]
        assert not {"rows", "style", "sharedCrosshair", "hideControls", "__inputs"} & board.keys(), name
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        target = variables["target"]
        assert target["multi"] and target["includeAll"] and target["allValue"] == ".*"
        exprs = [t["expr"] for p in panels_of(board) for t in p["targets"]]
        if any("$datname" in e for e in exprs):
            assert variables["datname"]["multi"] and variables["datname"]["includeAll"], name
        (link,) = board["links"]
        assert link["type"] == "dashboards" and link["keepTime"] and link["includeVars"]
        assert link["tags"] == ["pgvitals"]
        occupied: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, (name, panel["title"])
            cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                     for y in range(grid["y"], grid["y"] + grid["h"])}
            assert not cells & occupied, f"{name}: {panel['title']} overlaps another panel"
            occupied |= cells
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))


def test_every_panel_has_datasource_unit_description_and_queries(boards: dict[str, dict[str, Any]]) -> None:
    for name, board in boards.items():
        for panel in panels_of(board):
            where = f"{name}: {panel['title']}"
            assert panel["type"] in PANEL_TYPES, where
            assert panel["datasource"] == DATASOURCE, where
            assert len(panel["description"]) > 40, where
            assert panel["fieldConfig"]["defaults"]["unit"], where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE, where
                assert target["expr"].strip(), where
                assert target["range"] is not target["instant"], where
                if panel["type"] == "timeseries":
                    assert target["range"], f"{where}: time series need range queries"
            steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
            assert steps[0]["value"] is None, where
            values = [s["value"] for s in steps[1:]]
            assert values == sorted(values), f"{where}: threshold steps out of order"


def test_every_rate_uses_rate_interval(boards: dict[str, dict[str, Any]]) -> None:
    for name, title, expr in all_exprs(boards):
        for match in re.finditer(r"\b(rate|irate|increase|deriv|delta)\((.*?)\[([^\]]+)\]\)", expr):
            function, window = match.group(1), match.group(3)
            allowed = {"$__rate_interval"} if function in ("rate", "irate") else {"$__rate_interval", "$__range"}
            assert window in allowed, f"{name}: {title}: {function}(...[{window}])"
        assert "[5m]" not in expr and "[1m]" not in expr, f"{name}: {title}: fixed window in {expr}"


def test_links_keep_target_and_time_range(boards: dict[str, dict[str, Any]]) -> None:
    uids = {board["uid"] for board in boards.values()}
    linked = 0
    for name, board in boards.items():
        for panel in panels_of(board):
            for link in panel["fieldConfig"]["defaults"]["links"]:
                uid = re.match(r"/d/([\w-]+)\?", link["url"])
                assert uid and uid.group(1) in uids, f"{name}: {link}"
                assert "var-target=${__field.labels.target}" in link["url"], link
                assert "${__url_time_range}" in link["url"] and "var-datasource=${datasource}" in link["url"]
                linked += 1
    overview_tiles = [p for p in panels_of(boards["overview.json"]) if p["type"] == "stat"]
    assert overview_tiles and all(p["fieldConfig"]["defaults"]["links"] for p in overview_tiles)
    assert linked >= len(overview_tiles)


def _panel(boards: dict[str, dict[str, Any]], file: str, title: str) -> dict[str, Any]:
    (panel,) = [p for p in panels_of(boards[file]) if p["title"] == title]
    return panel


def _threshold_values(panel: dict[str, Any]) -> list[float]:
    return [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]]


def test_thresholds_follow_the_alert_configuration() -> None:
    config = AlertsConfig.model_validate({
        "connections": {"warning": 0.7, "critical": 0.9}, "cache_hit": {"ratio": 0.98},
        "replication_lag": {"warning": "30s", "critical": "2m"}, "lock_wait": {"seconds": 12},
        "long_query": {"seconds": "10m"}, "slot_retained": {"bytes": 123456789},
        "sequences": {"warning": 0.6, "critical": 0.7}, "unused_indexes": {"bytes": 5 << 20},
        "subscription_silent": {"seconds": "3m"}, "restart": {"within": "30m"},
    })
    custom = build_dashboards(config)
    assert _threshold_values(_panel(custom, "connections.json", "Connection slots used")) == [0.7, 0.9]
    assert _threshold_values(_panel(custom, "overview.json", "Connections used")) == [0.7, 0.9]
    assert _threshold_values(_panel(custom, "overview.json", "Cache hit")) == [0.98]
    assert _threshold_values(_panel(custom, "cache.json", "Cache hit by database")) == [0.98]
    assert _threshold_values(_panel(custom, "replication.json", "Standby replay lag (seen on the standby)")) == [
        30, 120]
    assert _threshold_values(_panel(custom, "locks.json", "Oldest lock wait")) == [12]
    assert _threshold_values(_panel(custom, "queries.json", "Longest running query"))[-1] == 600
    assert _threshold_values(_panel(custom, "replication.json", "WAL retained by slots")) == [123456789]
    assert _threshold_values(_panel(custom, "storage.json", "Sequences closest to exhaustion")) == [0.6, 0.7]
    assert _threshold_values(_panel(custom, "storage.json", "Highest sequence use per database")) == [0.6, 0.7]
    assert _threshold_values(_panel(custom, "storage.json", "Unused index space")) == [5 << 20]
    assert _threshold_values(_panel(custom, "replication.json", "Time since the publisher was heard from")) == [180]
    assert _threshold_values(_panel(custom, "target.json", "Uptime")) == [1800]
    defaults = build_dashboards()
    assert _threshold_values(_panel(defaults, "connections.json", "Connection slots used")) == [0.8, 0.95]
    assert _threshold_values(_panel(defaults, "storage.json", "Sequences closest to exhaustion")) == [0.8, 0.95]


def test_family_pages_exist(boards: dict[str, dict[str, Any]]) -> None:
    titles = {board["title"] for board in boards.values()}
    for family in ("Overview", "Target", "Queries", "Locks", "Storage", "Replication", "Connections and pools",
                   "Cache hit"):
        assert f"pgvitals / {family}" in titles


# -- PromQL: parses (promtool) and names only what we export ------------------------------------------------

def check_references(expr: str, where: str) -> list[str]:
    """Problems: metrics we do not export (recording rules count), or matchers on labels a metric lacks."""
    records = frozenset(r.record for r in recording_rules(AlertsConfig()))
    return reference_problems(expr, where, records)


def test_the_tokenizer_finds_metrics_and_only_metrics() -> None:
    expr = ('sum by (target, datname) (rate(pg_a_total{target=~"$target", datname!="x"}[$__rate_interval])) '
            '/ on (target) group_left (pool) max without (state) (pg_b offset 5m) > bool 0.5 '
            'and {__name__=~"pg_c|pg_d"} unless absent(up{job="pgvitals"}) or vector(1) '
            'or count_values("v", label_replace(pg_e, "x", "$1", "y", "(.*)")) @ end()')
    refs = references(expr)
    assert [r.metric for r in refs] == ["pg_a_total", "pg_b", "pg_c", "pg_d", "up", "pg_e"]
    assert refs[0].labels == ("target", "datname")
    with pytest.raises(PromQLSyntaxError):
        references("rat(pg_a[5m])")  # an unknown function would otherwise pass as a metric
    assert check_references("pg_up{datname=\"x\"} + pg_nonexistent_metric", "t") == [
        "t: pg_up has no label ['datname']",
        "t: pg_nonexistent_metric is not exported by pgvitals (pg_up{datname=\"x\"} + pg_nonexistent_metric)"]


def test_every_dashboard_query_names_only_exported_metrics(boards: dict[str, dict[str, Any]]) -> None:
    problems = [p for name, title, expr in all_exprs(boards) for p in check_references(expr, f"{name}: {title}")]
    assert not problems, "\n".join(problems)


def test_every_dashboard_query_parses(boards: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """promtool parses each query, as a recording rule, with Grafana's variables expanded."""
    rules = [{"record": f"pgvitals_panel_{index}", "expr": expand_variables(expr, target="main|replica")}
             for index, (_name, _title, expr) in enumerate(all_exprs(boards))]
    path = tmp_path / "panels.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_rejects_a_broken_panel_query(tmp_path: Path) -> None:
    path = tmp_path / "broken.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "p", "rules": [{"record": "x", "expr": "sum(rate(a[5m])"}]}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


def documented_promql() -> list[tuple[str, str]]:
    """(document, expression) of the PromQL users copy from our docs: ```promql blocks (expressions separated
    by blank lines, # comments removed) and inline code spans that are whole expressions over our metrics."""
    out = []
    for doc in ("README.md", "docs/runbooks.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        for block in re.findall(r"```promql\n(.*?)```", text, re.S):
            lines = [re.sub(r"\s+#.*$|^#.*$", "", line) for line in block.splitlines()]
            for chunk in re.split(r"\n\s*\n", "\n".join(lines)):
                # Several one-line expressions in a row, or one expression over several lines.
                pieces = chunk.strip().splitlines()
                one_per_line = all(not p.strip().startswith(("/", "+", "-", "*", ")", "and", "or", "unless"))
                                   and p.count("(") == p.count(")") for p in pieces)
                out.extend((doc, p.strip()) for p in pieces) if one_per_line else out.append((doc, chunk.strip()))
        prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")  # inline code may wrap lines
        for span in re.findall(r"`([^`]+)`", prose):
            if re.search(r"\b(pg|pgbouncer|pgvitals)_\w+", span) and re.search(r"\b(rate|increase|sum|max)\b", span) \
                    and "(" in span and "..." not in span and span.count("(") == span.count(")"):
                out.append((doc, span))
    return [(doc, expr) for doc, expr in out if expr]


def test_documented_promql_names_only_exported_metrics_and_parses(tmp_path: Path) -> None:
    snippets = documented_promql()
    assert snippets, "no PromQL found in README.md / docs/runbooks.md"
    problems = [p for doc, expr in snippets for p in check_references(expr, doc)]
    assert not problems, "\n".join(problems)
    rules = [{"record": f"pgvitals_doc_{index}", "expr": expr} for index, (_doc, expr) in enumerate(snippets)]
    path = tmp_path / "docs.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "docs", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- committed output -----------------------------------------------------------------------------------------

def test_committed_dashboards_are_up_to_date() -> None:
    expected = generated_files()
    stale = []
    for relative, text in expected.items():
        path = ROOT / "dashboards" / relative
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(relative)
    extra = {p.name for p in (ROOT / "dashboards").glob("*.json")} - set(expected)
    assert not stale and not extra, f"stale {stale}, unexpected {sorted(extra)}: run pgvitals dashboards"


def test_provisioning_points_grafana_at_the_folder() -> None:
    datasource = yaml.safe_load((ROOT / "dashboards/provisioning/datasource.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load((ROOT / "dashboards/provisioning/dashboards.yml").read_text())
    assert provider["providers"][0]["type"] == "file" and provider["providers"][0]["options"]["path"]
