"""Panel, variable and link builders on top of grafanalib, and the pass that turns its JSON into Grafana 11 JSON.

grafanalib 0.7 emits keys from Grafana 5-8 (``span``, ``intervalFactor``, old bar gauge ``fieldOptions``,
``rows``, ``schemaVersion: 12`` ...). :func:`modernize` removes what current Grafana no longer reads and
sets ``schemaVersion`` to Grafana 11.0's, so Grafana loads the dashboards without migrating them; the tests
check the result against the grafana-foundation-sdk models of a Grafana 11 build.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grafanalib.core as G
from grafanalib._gen import DashboardEncoder

from exporter.dashboards.promql import has_label, m, referenced_metrics, spec

#: Grafana 11.0's dashboard schema version (11.x reads it natively; newer minors migrate it losslessly).
SCHEMA_VERSION = 39
TAG = "pgvitals"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Prometheus' own metrics and alert series are described here, not in the catalog.
BUILTIN_HELP = {
    "ALERTS": "Prometheus' series of pending and firing alerts (needs the pgvitals rule file loaded).",
    "up": "Prometheus' scrape health of the pgvitals exporter.",
}
UNITS = {"seconds": "s", "bytes": "bytes", "ratio": "percentunit", "": "short"}

GREEN, YELLOW, ORANGE, RED, BLUE = "green", "#EAB839", "orange", "red", "blue"

# Keys grafanalib emits that Grafana 11 ignores or that only older versions read.
_LEGACY_PANEL_KEYS = {"editable", "error", "height", "minSpan", "span", "columns", "fontSize", "mappings", "color",
                      "maxDataPoints", "timeFrom", "timeShift", "cacheTimeout", "hideTimeOverride", "interval"}
_LEGACY_TARGET_KEYS = {"query", "target", "metric", "step", "intervalFactor", "interval", "hide"}
_LEGACY_DASHBOARD_KEYS = {"__inputs", "gnetId", "hideControls", "rows", "sharedCrosshair", "style", "id"}


# -- selectors -----------------------------------------------------------------------------------------------

def sel(name: str, **matchers: str) -> str:
    """Catalog metric ``name`` filtered by the dashboard's ``target`` (and ``datname``, where it has one)."""
    filters = {"target": "~$target"} if has_label(name, "target") else {}
    if has_label(name, "datname"):
        filters["datname"] = "~$datname"
    filters.update(matchers)
    return m(name, **filters)


def rate(name: str, **matchers: str) -> str:
    """Per-second rate of a catalog counter over Grafana's $__rate_interval."""
    return f"rate({sel(name, **matchers)}[$__rate_interval])"


# -- thresholds and units -------------------------------------------------------------------------------------

def steps(*levels: tuple[float, str], base: str = GREEN) -> list[dict[str, Any]]:
    """Threshold steps: ``base`` below the first level, then each (value, color)."""
    return [{"color": base, "value": None}, *({"color": color, "value": value} for value, color in levels)]


def rising(warning: float, critical: float | None = None) -> list[dict[str, Any]]:
    """Green, then yellow at ``warning`` and red at ``critical``: higher is worse."""
    levels = [(warning, YELLOW)] + ([(critical, RED)] if critical is not None else [])
    return steps(*levels)


def alarm(level: float) -> list[dict[str, Any]]:
    """Green, then red from ``level`` (an alert threshold)."""
    return steps((level, RED))


def falling(good_from: float) -> list[dict[str, Any]]:
    """Red below ``good_from``, green from it: lower is worse (cache hit)."""
    return steps((good_from, GREEN), base=RED)


def unit_of(expr: str) -> str:
    """Grafana unit of the first catalog metric in ``expr`` (``short`` when it has none)."""
    for name in sorted(referenced_metrics(expr)):
        if name in BUILTIN_HELP:
            continue
        return UNITS.get(spec(name).unit, "short")
    return "short"


def metric_help(exprs: Iterable[str]) -> str:
    """One line per metric the expressions use, from the catalog's help texts."""
    names = sorted({name for expr in exprs for name in referenced_metrics(expr)})
    lines = []
    for name in names:
        text = BUILTIN_HELP.get(name) or spec(name).help
        lines.append(f"- `{name}`: {text}")
    return "\n".join(lines)


# -- panels -----------------------------------------------------------------------------------------------------

@dataclass
class Query:
    """One panel query."""

    expr: str
    legend: str = ""
    instant: bool = False
    table: bool = False


@dataclass
class PanelSpec:
    """What a panel shows; turned into a grafanalib panel by :func:`build_panel`."""

    kind: str  # timeseries | stat | table | bargauge
    title: str
    about: str
    queries: Sequence[Query]
    unit: str = ""
    thresholds: list[dict[str, Any]] | None = None
    width: int = 12
    height: int = 8
    min: float | None = None
    max: float | None = None
    links: list[dict[str, str]] = field(default_factory=list)
    mappings: list[dict[str, Any]] = field(default_factory=list)
    stack: bool = False
    no_value: str | None = None
    decimals: int | None = None
    transformations: list[dict[str, Any]] = field(default_factory=list)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    threshold_lines: bool = True


def _targets(panel: PanelSpec) -> list[G.Target]:
    out = []
    for index, query in enumerate(panel.queries):
        out.append(G.Target(
            expr=query.expr, legendFormat=query.legend or "__auto", refId=chr(ord("A") + index),
            instant=query.instant or panel.kind != "timeseries",
            format="table" if query.table else "time_series", datasource=DATASOURCE,
        ))
    return out


def _field_defaults(panel: PanelSpec) -> dict[str, Any]:
    unit = panel.unit or unit_of(panel.queries[0].expr)
    defaults: dict[str, Any] = {"unit": unit, "mappings": panel.mappings, "links": panel.links}
    if panel.thresholds is not None:
        defaults["thresholds"] = {"mode": "absolute", "steps": panel.thresholds}
    else:
        defaults["thresholds"] = {"mode": "absolute", "steps": steps()}
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    if panel.no_value is not None:
        defaults["noValue"] = panel.no_value
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    return defaults


def build_panel(panel: PanelSpec, grid: G.GridPos) -> G.Panel:
    """A grafanalib panel for ``panel`` at ``grid``."""
    description = panel.about.strip() + "\n\n" + metric_help(q.expr for q in panel.queries)
    common: dict[str, Any] = {
        "title": panel.title, "description": description, "dataSource": DATASOURCE, "targets": _targets(panel),
        "gridPos": grid, "transformations": panel.transformations,
    }
    defaults = _field_defaults(panel)
    extra: dict[str, Any] = {"fieldConfig": {"defaults": defaults, "overrides": panel.overrides}}
    result: G.Panel
    if panel.kind == "timeseries":
        custom = {"thresholdsStyle": {"mode": "line+area" if panel.thresholds and panel.threshold_lines else "off"},
                  "fillOpacity": 10, "showPoints": "never", "spanNulls": False,
                  "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"}}
        extra["fieldConfig"]["defaults"]["custom"] = custom
        extra["fieldConfig"]["defaults"]["color"] = {"mode": "palette-classic"}
        extra["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                                       "calcs": ["lastNotNull", "max"]},
                            "tooltip": {"mode": "multi", "sort": "desc"}}
        result = G.TimeSeries(**common, extraJson=extra)
    elif panel.kind == "stat":
        extra["fieldConfig"]["defaults"]["color"] = {"mode": "thresholds"}
        extra["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "background", "graphMode": "none", "textMode": "value_and_name",
                            "justifyMode": "auto", "orientation": "auto", "wideLayout": True,
                            "showPercentChange": False}
        result = G.Stat(**common, extraJson=extra)
    elif panel.kind == "bargauge":
        extra["fieldConfig"]["defaults"]["color"] = {"mode": "thresholds"}
        extra["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True,
                            "valueMode": "color", "namePlacement": "auto", "sizing": "auto", "minVizWidth": 8,
                            "minVizHeight": 16, "maxVizHeight": 300}
        result = G.BarGauge(**common, extraJson=extra)
    elif panel.kind == "table":
        extra["fieldConfig"]["defaults"]["custom"] = {"align": "auto", "cellOptions": {"type": "auto"},
                                                      "filterable": True}
        extra["fieldConfig"]["defaults"]["color"] = {"mode": "thresholds"}
        extra["options"] = {"showHeader": True, "cellHeight": "sm",
                            "footer": {"show": False, "reducer": ["sum"], "countRows": False}}
        result = G.Table(**common, extraJson=extra)
    else:
        raise ValueError(f"unknown panel kind {panel.kind!r}")
    return result


def layout(panels: Sequence[PanelSpec | str]) -> list[G.Panel]:
    """Place panels left to right in rows of 24 columns; a string starts a titled row."""
    out: list[G.Panel] = []
    x = y = row_height = 0
    for item in panels:
        if isinstance(item, str):
            y += row_height
            x = row_height = 0
            out.append(G.RowPanel(title=item, gridPos=G.GridPos(h=1, w=24, x=0, y=y)))
            y += 1
            continue
        if x + item.width > 24:
            y += row_height
            x = row_height = 0
        out.append(build_panel(item, G.GridPos(h=item.height, w=item.width, x=x, y=y)))
        x += item.width
        row_height = max(row_height, item.height)
    return out


# -- variables and links ------------------------------------------------------------------------------------------

def datasource_variable() -> dict[str, Any]:
    """The Prometheus data source picker."""
    return {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
            "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
            "regex": "", "skipUrlSync": False}


def query_variable(name: str, label: str, query: str, multi: bool = True) -> dict[str, Any]:
    """A label_values() variable with multi-select and "All" (which matches every value, new ones included)."""
    return {
        "type": "query", "name": name, "label": label, "datasource": DATASOURCE,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if multi else {},
        "multi": multi, "includeAll": multi, "allValue": ".*" if multi else None, "refresh": 2, "sort": 1,
        "hide": 0, "regex": "", "options": [], "skipUrlSync": False,
    }


def target_variable() -> dict[str, Any]:
    """Every monitored target: PostgreSQL servers and PgBouncers."""
    return query_variable("target", "Target", 'label_values({__name__=~"pg_up|pgbouncer_up"}, target)')


def datname_variable() -> dict[str, Any]:
    """Databases of the selected targets."""
    return query_variable("datname", "Database",
                          f'label_values({m("pg_stat_database_numbackends", target="~$target")}, datname)')


def link_to(uid: str, title: str, label_source: str = "${__field.labels.target}") -> dict[str, str]:
    """A data link to another pgvitals dashboard for the clicked target, keeping time range and data source."""
    return {"title": title, "url": f"/d/{uid}?var-datasource=${{datasource}}&var-target={label_source}"
            "&${__url_time_range}"}


def dashboard_links() -> list[G.DashboardLink]:
    """The pgvitals dashboards as links that keep the selected variables and the time range."""
    return [G.DashboardLink(title="pgvitals", type="dashboards", tags=[TAG], asDropdown=False, includeVars=True,
                            keepTime=True, icon="external link", tooltip="", uri="", targetBlank=False)]


# -- dashboard ---------------------------------------------------------------------------------------------------

def dashboard(uid: str, title: str, description: str, panels: Sequence[PanelSpec | str],
              variables: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A whole dashboard as Grafana 11 JSON."""
    board = G.Dashboard(
        title=title, uid=uid, description=description, tags=[TAG], panels=layout(panels),
        templating=G.Templating(list=[]), links=dashboard_links(), timezone="browser", refresh="30s",
        time=G.Time("now-1h", "now"), graphTooltip=1,
    )
    raw = _encode(board)
    raw["templating"] = {"list": list(variables)}
    return modernize(raw)


def _encode(obj: Any) -> dict[str, Any]:
    import json

    data: dict[str, Any] = json.loads(json.dumps(obj.to_json_data(), cls=DashboardEncoder))
    return data


def _drop_nulls(value: Any, keep_null_keys: frozenset[str] = frozenset({"value"})) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None or k in keep_null_keys}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def modernize(raw: dict[str, Any]) -> dict[str, Any]:
    """grafanalib's JSON with the legacy keys removed and Grafana 11 structure."""
    board = {k: v for k, v in raw.items() if k not in _LEGACY_DASHBOARD_KEYS}
    board["schemaVersion"] = SCHEMA_VERSION
    board["version"] = 1
    board["editable"] = True
    board["fiscalYearStartMonth"] = 0
    board["liveNow"] = False
    board["weekStart"] = ""
    board["timepicker"] = {}
    board["annotations"] = {"list": [{
        "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
    }]}
    panels = []
    for index, panel in enumerate(board.get("panels", []), start=1):
        panel = {k: v for k, v in panel.items() if k not in _LEGACY_PANEL_KEYS}
        panel["id"] = index
        if panel.get("type") == "row":
            panel = {"type": "row", "title": panel["title"], "id": index, "gridPos": panel["gridPos"],
                     "collapsed": False, "panels": []}
        else:
            panel["targets"] = [{k: v for k, v in target.items() if k not in _LEGACY_TARGET_KEYS} | {
                "range": not target.get("instant", False), "editorMode": "code"} for target in panel["targets"]]
            options = panel.get("options", {})
            options.pop("fieldOptions", None)  # grafanalib's pre-7 bar gauge layout
            options.pop("showThresholdLabels", None)
            options.pop("showThresholdMarkers", None)
            for key in ("repeat", "repeatDirection", "maxPerRow"):
                if panel.get(key) is None:
                    panel.pop(key, None)
        panels.append(panel)
    board["panels"] = panels
    return dict(_drop_nulls(board))
