"""deploy/kubernetes/, validated offline: no cluster runs here (see the README).

Core kinds against Kubernetes' own schemas (kubernetes-validate), the PrometheusRule's spec with promtool,
the kustomize build with kubectl where it is installed, and the generated files against `pgvitals kubernetes`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import bcrypt
import kubernetes_validate
import pytest
import yaml

from exporter.config import Settings, load_settings
from exporter.kubernetes import DASHBOARDS, PROMETHEUS_RULE, generated_files
from exporter.webconfig import load_web_config

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
PROMTOOL = "/usr/bin/promtool"
#: prometheus-operator's kinds: custom resources, which Kubernetes' schemas do not describe.
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((BASE / name).read_text(encoding="utf-8")) if doc]


def every_document() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(BASE.glob("*.yaml")) for doc in documents(path.name)]


def by_kind(kind: str) -> dict[str, Any]:
    (found,) = [doc for _name, doc in every_document() if doc["kind"] == kind]
    return found


def test_generated_manifests_are_up_to_date() -> None:
    for name, text in generated_files(Settings()).items():
        assert (BASE / name).read_text(encoding="utf-8") == text, f"{name} is stale: run `pgvitals kubernetes`"


@pytest.mark.parametrize(("name", "document"), [
    pytest.param(name, doc, id=f"{name}:{doc['metadata']['name']}") for name, doc in every_document()
    if doc["kind"] not in OPERATOR_KINDS and doc["kind"] != "Kustomization"
])
def test_core_kinds_match_the_kubernetes_schema(name: str, document: dict[str, Any]) -> None:
    # Strict: a misspelt or misplaced field is an error, not silently dropped by the API server.
    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_the_prometheus_rule_is_the_rule_file_and_promtool_accepts_it(tmp_path: Path) -> None:
    rule = documents(PROMETHEUS_RULE)[0]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    committed = yaml.safe_load((ROOT / "alerts" / "pgvitals.rules.yml").read_text(encoding="utf-8"))
    assert rule["spec"] == committed
    spec = tmp_path / "spec.rules.yml"
    spec.write_text(yaml.safe_dump(rule["spec"]), encoding="utf-8")
    result = subprocess.run([PROMTOOL, "check", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: \d+ rules found", result.stdout)


def test_the_dashboards_are_config_maps_for_grafanas_sidecar() -> None:
    maps = documents(DASHBOARDS)
    boards = (ROOT / "dashboards").glob("*.json")
    committed = {path.name: json.loads(path.read_text(encoding="utf-8")) for path in boards}
    assert {name: json.loads(text) for cm in maps for name, text in cm["data"].items()} == committed
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        # kubectl apply keeps the whole object in an annotation limited to 256 KiB.
        assert len(json.dumps(cm)) < 200_000


def test_the_statefulset_shards_by_ordinal_runs_unprivileged_and_probes_health() -> None:
    sts = by_kind("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert f"--shard=auto/{sts['spec']['replicas']}" in container["args"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile_user = re.search(r"^USER (\d+)$", (ROOT / "Dockerfile").read_text(encoding="utf-8"), re.M)
    assert dockerfile_user and pod["securityContext"]["runAsUser"] == int(dockerfile_user.group(1))
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    service = by_kind("Service")
    assert service["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == service["metadata"]["name"]
    # The job name Prometheus gives the scrapes (the Service name) is the one the generated rules select.
    assert service["metadata"]["name"] == Settings().alerts.job


def test_the_shipped_config_and_web_config_load(tmp_path: Path) -> None:
    config = yaml.safe_load(documents("configmap.yaml")[0]["data"]["config.yaml"])
    secret = by_kind("Secret")["stringData"]
    settings = load_settings(raw=config, environ=secret)
    assert settings.targets
    web = tmp_path / "web.yml"
    web.write_text(secret["web.yml"], encoding="utf-8")
    users = load_web_config(web).users
    assert bcrypt.checkpw(secret["scrape-password"].encode(), users[secret["scrape-username"]])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_base() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text(encoding="utf-8"))["resources"]
    assert len(built) == sum(len(documents(name)) for name in listed)
    sts = next(doc for doc in built if doc["kind"] == "StatefulSet")
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"].startswith("registry.example.org/pgvitals:")
