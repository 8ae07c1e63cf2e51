"""Scrape-path benchmark: pgvitals' pre-rendered snapshot vs prometheus_client's generic exposition.

Both render the same synthetic series (default 270,000: 100 targets x 2,700 series), side by side
in one run, so the ratio holds on a noisy machine. Run: python bench/scrape_path.py [--series N]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector as ClientCollector

from exporter import __version__
from exporter.catalog import Collector, SqlVariant, validate
from exporter.collectors._helpers import counter, gauge
from exporter.exposition import label_text, render_rows
from exporter.snapshot import Snapshot

METRICS = (
    counter("bench_calls_total", "Calls.", "calls", ("datname", "usename", "queryid")),
    counter("bench_exec_seconds_total", "Exec time.", "exec", ("datname", "usename", "queryid"), "seconds"),
    gauge("bench_rows", "Rows.", "rows", ("datname", "usename", "queryid")),
)
COLLECTOR = Collector(name="bench", family="bench", help="synthetic", variants=(SqlVariant("SELECT 1"),),
                      metrics=METRICS)


def synthetic_rows(per_target: int) -> list[dict[str, object]]:
    """Rows shaped like pg_stat_statements top-N output."""
    per_metric = per_target // len(METRICS)
    return [
        {"datname": f"db{i % 10}", "usename": f"app{i % 7}", "queryid": str(1234567890123 + i),
         "calls": i * 17, "exec": i * 0.123, "rows": i * 3}
        for i in range(per_metric)
    ]


class GenericCollector(ClientCollector):
    """The same data through prometheus_client's metric families, built at every scrape."""

    def __init__(self, targets: int, rows: list[dict[str, object]]):
        self.targets = targets
        self.rows = rows

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["target", "datname", "usename", "queryid"]
        calls = CounterMetricFamily("bench_calls", "Calls.", labels=labels)
        exec_ = CounterMetricFamily("bench_exec_seconds", "Exec time.", labels=labels)
        rows_ = GaugeMetricFamily("bench_rows", "Rows.", labels=labels)
        for t in range(self.targets):
            target = f"t{t}"
            for row in self.rows:
                values = [target, str(row["datname"]), str(row["usename"]), str(row["queryid"])]
                calls.add_metric(values, float(row["calls"]))  # type: ignore[arg-type]
                exec_.add_metric(values, float(row["exec"]))  # type: ignore[arg-type]
                rows_.add_metric(values, float(row["rows"]))  # type: ignore[arg-type]
        yield calls
        yield exec_
        yield rows_


def timed(fn, repeat: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    """Median wall time of ``repeat`` calls, and the last result."""
    times = []
    result = None
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--series", type=int, default=270_000)
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    per_target = args.series // args.targets
    rows = synthetic_rows(per_target)

    catalog = validate([COLLECTOR])
    snapshot = Snapshot(catalog, __version__)
    prefixes = {}
    for t in range(args.targets):
        name = f"t{t}"
        prefixes[name] = label_text([("target", name)])
        snapshot.add_target(name, prefixes[name])
        snapshot.set_up(name, True)

    def collect_all() -> None:
        for name, prefix in prefixes.items():
            chunks, _, _ = render_rows(METRICS, rows, prefix, limit=10**7)
            snapshot.replace(name, "bench", {"": chunks})

    render_collect, _ = timed(collect_all, 1)
    tracemalloc.start()
    collect_all()  # again under tracemalloc: what the snapshot holds once the old lines are freed
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()

    cached, body = timed(snapshot.render, args.repeat)

    def one_target_changed() -> bytes:
        chunks, _, _ = render_rows(METRICS, rows, prefixes["t0"], limit=10**7)
        snapshot.replace("t0", "bench", {"": chunks})
        return snapshot.render()

    after_update, _ = timed(one_target_changed, args.repeat)

    # /probe?target=t1: one target's lines, cached between its collections; rebuilt after t1 is re-collected.
    snapshot.render_target("t1")
    probe_cached, probe_body = timed(lambda: snapshot.render_target("t1"), args.repeat)

    def probed_target_changed() -> bytes | None:
        chunks, _, _ = render_rows(METRICS, rows, prefixes["t1"], limit=10**7)
        snapshot.replace("t1", "bench", {"": chunks})
        return snapshot.render_target("t1")

    probe_after_update, _ = timed(probed_target_changed, args.repeat)

    registry = CollectorRegistry()
    registry.register(GenericCollector(args.targets, rows))
    generic, generic_body = timed(lambda: generate_latest(registry), max(1, args.repeat // 2))

    assert isinstance(body, bytes) and isinstance(generic_body, bytes)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    print(f"series served: {series:,} ({len(body) / 1e6:.1f} MB); generic body {len(generic_body) / 1e6:.1f} MB")
    print(f"pgvitals: render at collection time, all {args.targets} targets: {render_collect * 1000:.0f} ms "
          f"(spread over collections, not on the scrape path)")
    print(f"pgvitals scrape, nothing changed since last scrape:   {cached * 1000:8.1f} ms")
    print(f"pgvitals scrape, one target re-collected in between: {after_update * 1000:8.1f} ms")
    print(f"pgvitals /probe of one target, nothing changed:      {probe_cached * 1000:8.2f} ms "
          f"({len(probe_body or b'') / 1e3:.0f} kB)")
    print(f"pgvitals /probe of one target, it was re-collected:  {probe_after_update * 1000:8.2f} ms "
          f"(includes rendering its lines, as the collection does)")
    print(f"prometheus_client generate_latest, same series:      {generic * 1000:8.1f} ms")
    print(f"ratio generic / pgvitals (changed): {generic / after_update:.0f}x; (unchanged): {generic / cached:.0f}x")
    print(f"snapshot memory held: {held / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
