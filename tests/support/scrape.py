"""Our own reading of a text exposition (strict about split families and duplicates) and scrapes over HTTP."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Callable

from exporter.localpg import wait_until


def parse_exposition(body: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a text exposition keyed by (name, labels); checks families are never split."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    seen_types: set[str] = set()
    current: str | None = None
    finished: set[str] = set()
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert name not in seen_types, f"family {name} declared twice"
            seen_types.add(name)
            if current:
                finished.add(current)
            current = name
            continue
        if not line or line.startswith("#"):
            continue
        match = line_re.match(line)
        assert match, f"bad exposition line: {line!r}"
        name, labels, value = match.groups()
        family = current or name
        assert family not in finished, f"samples of {family} are split"
        key = (name, frozenset(label_re.findall(labels or "")))
        assert key not in samples, f"duplicate series {line}"
        samples[key] = float(value)
    return samples


class Metrics:
    """A parsed scrape with convenient look-ups."""

    def __init__(self, body: str):
        self.body = body
        self.samples = parse_exposition(body)

    def find(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of ``name`` whose labels include ``labels``."""
        out = []
        for (sample_name, sample_labels), value in self.samples.items():
            if sample_name == name:
                as_dict = dict(sample_labels)
                if all(as_dict.get(k) == v for k, v in labels.items()):
                    out.append((as_dict, value))
        return out

    def value(self, name: str, **labels: str) -> float | None:
        """The one value of ``name`` with ``labels`` (None when absent; error when ambiguous)."""
        found = self.find(name, **labels)
        assert len(found) <= 1, f"{name} {labels} is ambiguous: {found}"
        return found[0][1] if found else None

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


def scrape(port: int, path: str = "/metrics") -> Metrics:
    """GET /metrics from an exporter on localhost."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return Metrics(response.read().decode())


def http_status(port: int, path: str) -> tuple[int, str]:
    """Status code and body of a GET."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for_metric(port: int, name: str, predicate: Callable[[float], bool] = lambda v: True,
                    timeout: float = 30.0, **labels: str) -> Metrics:
    """Scrape until ``name`` with ``labels`` has a value satisfying ``predicate``."""
    def check() -> Metrics | None:
        metrics = scrape(port)
        value = metrics.value(name, **labels)
        return metrics if value is not None and predicate(value) else None

    result: Metrics = wait_until(check, timeout=timeout, interval=0.2)
    return result
