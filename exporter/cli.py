"""Command line: run | once | check | demo | docs | dashboards | alerts | kubernetes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from exporter import __version__, catalog
from exporter.config import ConfigError, Settings, load_settings
from exporter.secrets import redact

if TYPE_CHECKING:
    from exporter.engine import TargetRuntime
    from exporter.webconfig import WebConfig

EXIT_CONFIG = 2
EXIT_UNREACHABLE = 1

log = logging.getLogger("pgvitals")


class RedactingFormatter(logging.Formatter):
    """Formats records as text or JSON, with every known secret removed."""

    def __init__(self, json_lines: bool):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        if self.json_lines:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self.formatException(record.exc_info)
            text = json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": message})
        else:
            text = super().format(record)
        return redact(text)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr through the redacting formatter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _settings(args: argparse.Namespace) -> Settings:
    raw = None
    if getattr(args, "dsn", None):
        raw = {"targets": [{"name": args.name, "dsn": args.dsn}]}
    overrides = {"shard": args.shard} if getattr(args, "shard", None) else None
    return load_settings(Path(args.config) if args.config else None, raw=raw, overrides=overrides)


def shard_argument(text: str) -> dict[str, int | str]:
    """``--shard I/N`` (or ``auto/N``: the StatefulSet pod ordinal in the hostname) as the ``shard:`` section."""
    index, sep, count = text.partition("/")
    if not sep or not count.isdigit() or not (index.isdigit() or index == "auto"):
        raise argparse.ArgumentTypeError(f"expected INDEX/COUNT or auto/COUNT, e.g. 1/3, not {text!r}")
    return {"index": "hostname" if index == "auto" else int(index), "count": int(count)}


def _config_failure(error: ConfigError, source: str | None) -> int:
    print(f"pgvitals: invalid configuration{f' in {source}' if source else ''}:", file=sys.stderr)
    for problem in error.problems:
        print(f"  {redact(problem)}", file=sys.stderr)
    return EXIT_CONFIG


def config_source(args: argparse.Namespace) -> Callable[[], tuple[Settings, WebConfig | None]]:
    """Reads the configuration and web config of ``run`` as they are on disk (at the start and at each reload)."""
    from exporter.webconfig import load_web_config

    def load() -> tuple[Settings, WebConfig | None]:
        try:
            settings = _settings(args)
        except ConfigError as error:
            if args.config:  # named in the reload's log lines, as WebConfigError names its file
                error.source = args.config  # type: ignore[attr-defined]
            raise
        web_config_file = Path(args.web_config_file) if args.web_config_file else settings.web_config_file
        return settings, load_web_config(web_config_file) if web_config_file else None

    return load


def cmd_run(args: argparse.Namespace) -> int:
    """Start the daemon."""
    from exporter.daemon import Daemon

    source = config_source(args)
    settings, web = source()  # exit 2 before anything starts
    setup_logging(args.log_level or settings.log.level, settings.log.format)
    Daemon(settings, web=web, source=source, lifecycle=args.web_enable_lifecycle).run_forever()
    return 0


def _probe_all(args: argparse.Namespace) -> tuple[object, int]:
    from exporter.custom import build_catalog
    from exporter.engine import Engine
    from exporter.snapshot import Snapshot

    settings = _settings(args)
    setup_logging(args.log_level or settings.log.level, settings.log.format)
    cat = build_catalog(settings)
    engine = Engine(cat, settings, Snapshot(cat, __version__))
    down = 0
    for runtime in engine.targets.values():
        if not engine.probe(runtime):
            down += 1
    return engine, down


def cmd_once(args: argparse.Namespace) -> int:
    """Run every collector once on every target and print the exposition."""
    from exporter.engine import Engine

    engine, down = _probe_all(args)
    assert isinstance(engine, Engine)
    for runtime in engine.targets.values():
        if runtime.up:
            for eff in engine.applicable(runtime):
                engine.collect(runtime, eff)
    sys.stdout.buffer.write(engine.snapshot.render())
    sys.stdout.flush()
    engine.close()
    return EXIT_UNREACHABLE if down else 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config, connect to each target and say which collectors can run there and why not."""
    from exporter.engine import Engine

    engine, down = _probe_all(args)
    assert isinstance(engine, Engine)
    print(f"configuration OK: {len(engine.targets)} target(s)")
    _print_custom(engine.catalog)
    for runtime in engine.targets.values():
        facts = runtime.facts
        if not runtime.up:
            error = "; ".join(runtime.last_errors.values()) or "connection failed"
            print(f"\n{runtime.name} ({runtime.dsn_text}): UNREACHABLE {error}")
            continue
        if facts is not None:
            roles = ", ".join(sorted(facts.roles)) or "none"
            print(f"\n{runtime.name} ({runtime.dsn_text}): PostgreSQL {facts.version}, "
                  f"{'standby' if facts.in_recovery else 'primary'}, "
                  f"{'superuser' if facts.is_superuser else 'roles: ' + roles}, "
                  f"{len(runtime.databases())} database(s) selected")
        else:
            print(f"\n{runtime.name} ({runtime.dsn_text}): PgBouncer admin console")
        for eff in engine.collectors.values():
            name = eff.collector.name
            if eff.collector.target_kind != ("pgbouncer" if runtime.is_pgbouncer else "postgres"):
                continue
            if not eff.enabled:
                print(f"  {name:<32} disabled in the configuration")
                continue
            started = time.monotonic()
            engine.collect(runtime, eff)
            status = engine.snapshot.status(runtime.name, name)
            took = (time.monotonic() - started) * 1000
            if status is not None and status.skipped:
                print(f"  {name:<32} cannot run here: {SKIP_EXPLANATIONS.get(status.skipped, status.skipped)}"
                      f"{_skip_detail(eff.collector, status.skipped, runtime)}")
            elif status is not None and status.success:
                print(f"  {name:<32} ok ({status.series} series, {took:.0f} ms)")
            else:
                errors = [text for key, text in runtime.last_errors.items() if key.collector == name]
                print(f"  {name:<32} FAILED: {'; '.join(errors) or 'see log'}")
    engine.close()
    return EXIT_UNREACHABLE if down else 0


def _print_custom(cat: catalog.Catalog) -> None:
    """The user's collectors and the custom metrics left to a built-in of the same name (for `check`)."""
    custom = cat.custom_collectors()
    if not custom and not cat.shadowed:
        return
    print(f"custom collectors: {len(custom)} ({sum(len(c.metrics) for c in custom)} metrics)")
    for collector in custom:
        print(f"  {collector.name:<32} {collector.origin}: {', '.join(spec.name for spec in collector.metrics)}")
    if cat.shadowed:
        print(f"custom metrics skipped, a built-in metric has the name ({len(cat.shadowed)}; "
              "strict_custom: true makes this an error):")
        for item in cat.shadowed:
            print(f"  {item.name:<40} from {item.origin}; exported by built-in collector {item.owner}")


#: What `check` says for each reason a collector is skipped (catalog.SKIP_REASONS, all of them).
SKIP_EXPLANATIONS: dict[str, str] = {
    "version": "not available for this version",
    "role": "runs only on a",
    "extension": "extension not installed in this database",
    "preload": "library not in shared_preload_libraries",
    "denied": "the role may not use",
}


def _skip_detail(collector: catalog.Collector, reason: str, runtime: TargetRuntime | None = None) -> str:
    if reason == "role":
        return f" {collector.role}"
    if reason == "extension":
        return f" ({collector.extension}; CREATE EXTENSION {collector.extension})"
    if reason == "preload":
        return f" ({collector.preload})"
    if reason == "version":
        return _version_detail(collector, runtime)
    if reason == "denied" and runtime is not None:
        return f" {', '.join(sorted(runtime.denied(collector)))} (GRANT it, or pg_monitor, to collect this)"
    return ""


def _version_detail(collector: catalog.Collector, runtime: TargetRuntime | None) -> str:
    """Which version the target has and which ones the collector reads (for `check`)."""
    facts = runtime.facts if runtime is not None else None
    by_extension = collector.version_source != "server" and (facts is None
                                                             or facts.version_num >= collector.min_server_version)
    lows = [v.min_version for v in collector.variants]
    highs = [v.max_version for v in collector.variants]
    if not by_extension:
        low, high = collector.min_server_version, catalog.VERSION_INFINITY
        if collector.version_source == "server" and collector.variants:
            low, high = max(low, min(lows)), max(highs)
        have = f"PostgreSQL {facts.version}; " if facts is not None else ""
        upto = " and newer" if high >= catalog.VERSION_INFINITY else f" to {(high - 1) // 10000}"
        return f" ({have}runs on PostgreSQL {low // 10000}{upto})"
    ext = collector.version_source
    installed = None
    if facts is not None and runtime is not None:
        per_db = facts.extensions.get(str(runtime.conns.default_dbname)) or next(iter(facts.extensions.values()), {})
        installed = per_db.get(ext)
    have = f"{ext} {installed[1] // 100}.{installed[1] % 100} installed; " if installed else ""
    low, high = min(lows, default=0), max(highs, default=catalog.VERSION_INFINITY)
    upto = " and newer" if high >= catalog.VERSION_INFINITY else f" up to {(high - 1) // 100}.{(high - 1) % 100}"
    hint = f": ALTER EXTENSION {ext} UPDATE" if installed and installed[1] < low else ""
    return f" ({have}reads {ext} {low // 100}.{low % 100}{upto}{hint})"


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a throwaway PostgreSQL with a small workload and the exporter on it."""
    from exporter.demo import run_demo

    setup_logging(args.log_level or "INFO")
    return run_demo(port=args.port, duration=args.duration)


def cmd_docs(args: argparse.Namespace) -> int:
    """Write docs/metrics.md from the built-in catalog (and docs/compat.md in a checkout, where the mixin data
    is); with --config print the "custom" section instead."""
    from exporter.compat_docs import MIXIN_FILE, compat_markdown, load_mixin
    from exporter.docs import custom_markdown, metrics_markdown

    if args.config:
        from exporter.custom import build_catalog

        sys.stdout.write(custom_markdown(build_catalog(load_settings(Path(args.config)))))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(metrics_markdown(catalog.Catalog.builtin()), encoding="utf-8")
    print(f"wrote {out}")
    if args.compat_out and MIXIN_FILE.exists():
        compat_out = Path(args.compat_out)
        compat_out.write_text(compat_markdown(catalog.load(), load_mixin()), encoding="utf-8")
        print(f"wrote {compat_out}")
    return 0


def _alerts_settings(args: argparse.Namespace) -> Settings:
    """The configuration whose `alerts:` thresholds the generated files use (defaults without --config)."""
    return load_settings(Path(args.config)) if args.config else Settings()


def cmd_dashboards(args: argparse.Namespace) -> int:
    """Write the Grafana dashboards and provisioning files."""
    from exporter.dashboards import write_dashboards

    written = write_dashboards(Path(args.out), _alerts_settings(args).alerts)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    """Write the Prometheus rule file."""
    from exporter.alerts import RULE_FILE, render_rules

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RULE_FILE).write_text(render_rules(_alerts_settings(args)), encoding="utf-8")
    print(f"wrote {out / RULE_FILE}")
    return 0


def cmd_kubernetes(args: argparse.Namespace) -> int:
    """Write the generated Kubernetes manifests (PrometheusRule, dashboard ConfigMaps)."""
    from exporter.kubernetes import generated_files

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in generated_files(_alerts_settings(args)).items():
        (out / name).write_text(text, encoding="utf-8")
        print(f"wrote {out / name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command."""
    parser = argparse.ArgumentParser(prog="pgvitals", description=__doc__ and "PostgreSQL exporter for Prometheus")
    parser.add_argument("--version", action="version", version=f"pgvitals {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_source(p: argparse.ArgumentParser, dsn: bool) -> None:
        p.add_argument("-c", "--config", help="YAML configuration file (see config.example.yaml)")
        if dsn:
            p.add_argument("--dsn", help="monitor one server given by this connection string instead of a config")
            p.add_argument("--name", default="default", help="target name for --dsn (default: default)")
        p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")

    run = sub.add_parser("run", help="run the exporter daemon", description="Run the exporter daemon: collect "
                         "on schedule and serve /metrics, /healthz and /readyz.")
    with_source(run, dsn=True)
    run.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                     help="exporter-toolkit web config (TLS, basic auth, headers); overrides web_config_file")
    run.add_argument("--shard", type=shard_argument, metavar="I/N",
                     help="poll only the configured targets that fall to shard I of N (rendezvous hash of the "
                     "target name); auto/N takes I from the StatefulSet pod ordinal in the hostname; overrides shard:")
    run.add_argument("--web.enable-lifecycle", dest="web_enable_lifecycle", action="store_true",
                     help="accept POST /-/reload (Prometheus' convention)")
    run.set_defaults(func=cmd_run)
    once = sub.add_parser("once", help="collect once and print the metrics", description="Run every collector "
                          "once on every target and print the exposition to stdout. Exit 1 if a target is down.")
    with_source(once, dsn=True)
    once.set_defaults(func=cmd_once)
    check = sub.add_parser("check", help="validate the config and what can run where",
                           description="Validate the configuration, connect to each target and report, per "
                           "collector, whether it runs there and why not.")
    with_source(check, dsn=True)
    check.set_defaults(func=cmd_check)
    demo = sub.add_parser("demo", help="throwaway PostgreSQL + workload + exporter",
                          description="Start a temporary local PostgreSQL with a small workload and the exporter "
                          "on it; Ctrl-C stops and removes everything.")
    demo.add_argument("--port", type=int, default=9839, help="port to serve metrics on (default 9839)")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    demo.add_argument("--log-level", default=None)
    demo.set_defaults(func=cmd_demo)
    docs = sub.add_parser("docs", help="generate docs/metrics.md", description="Write the metric reference "
                          "generated from the collector catalog.")
    docs.add_argument("--out", default="docs/metrics.md")
    docs.add_argument("--compat-out", default="docs/compat.md",
                      help="postgres_exporter name reference (written in a checkout, from tests/data)")
    docs.add_argument("-c", "--config", help="YAML configuration whose custom collectors and queries files to "
                      "document: prints their \"custom\" section to stdout (docs/metrics.md stays built-in only)")
    docs.set_defaults(func=cmd_docs)
    dashboards = sub.add_parser("dashboards", help="generate Grafana dashboards", description="Write the Grafana "
                                "dashboards (JSON) and provisioning files; thresholds from the `alerts:` section "
                                "of --config, defaults without it.")
    dashboards.add_argument("--out", default="dashboards")
    dashboards.add_argument("-c", "--config", help="YAML configuration file whose `alerts:` thresholds to use")
    dashboards.set_defaults(func=cmd_dashboards)
    alerts = sub.add_parser("alerts", help="generate Prometheus alert and recording rules",
                            description="Write the Prometheus rule file; thresholds and `for` durations from the "
                            "`alerts:` section of --config, defaults without it.")
    alerts.add_argument("--out", default="alerts")
    alerts.add_argument("-c", "--config", help="YAML configuration file whose `alerts:` section to use")
    alerts.set_defaults(func=cmd_alerts)
    kubernetes = sub.add_parser("kubernetes", help="generate the Kubernetes PrometheusRule and dashboard ConfigMaps",
                                description="Write deploy/kubernetes/'s generated manifests: the rule file as a "
                                "PrometheusRule and the dashboards as ConfigMaps for Grafana's sidecar; thresholds "
                                "from the `alerts:` section of --config, defaults without it.")
    kubernetes.add_argument("--out", default="deploy/kubernetes")
    kubernetes.add_argument("-c", "--config", help="YAML configuration file whose `alerts:` section to use")
    kubernetes.set_defaults(func=cmd_kubernetes)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pgvitals`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as error:
        return _config_failure(error, str(getattr(error, "source", "")) or getattr(args, "config", None))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
