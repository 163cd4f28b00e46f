"""The plain manifests under ``k8s/``, rendered by the Helm chart so the two never drift.

Clusters without Helm apply ``k8s/`` with kustomize; rendering it from the chart keeps one
source for both. ``k8s/base`` holds what every overlay shares (ServiceAccount,
PodDisruptionBudget); each overlay adds its RayService, rendered by the chart from the
matching scenario values:

    k8s/overlays/dev-cpu  <- helm/slm-orchestrator/ci/dev-cpu-values.yaml
    k8s/overlays/gpu      <- helm/slm-orchestrator/ci/gpu-values.yaml

Labels say ``managed-by: kustomize`` instead of Helm. ``orchestrator.devtools.generate``
writes and checks the files (``make chart-generate``); a unit test compares
``kubectl kustomize`` of each overlay with ``helm template`` of its values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from orchestrator.devtools.chart import CHART, REPO, helm_template

K8S = REPO / "k8s"
OVERLAYS = {
    "dev-cpu": CHART / "ci" / "dev-cpu-values.yaml",
    "gpu": CHART / "ci" / "gpu-values.yaml",
}
NAME = "slm"  # fullnameOverride: resources are named slm, slm-gateway, ...


def normalize(obj: Any) -> Any:
    """Helm's bookkeeping labels replaced: managed-by kustomize, no helm.sh/chart."""
    if isinstance(obj, list):
        return [normalize(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for key, value in obj.items():
        if key == "labels" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "helm.sh/chart"}
            if "app.kubernetes.io/managed-by" in value:
                value["app.kubernetes.io/managed-by"] = "kustomize"
        out[key] = normalize(value)
    return out


def render_overlay(values: Path) -> list[dict[str, Any]]:
    """The chart's objects for one overlay's values, normalized."""
    docs = helm_template([values], set_json={"fullnameOverride": NAME})
    return [normalize(d) for d in docs]


def _header(source: str) -> str:
    return (
        f"# Generated from the Helm chart ({source}) by `make chart-generate`.\n"
        "# Edit the chart or its values, not this file: a test fails when they differ.\n"
    )


def _dump(docs: list[dict[str, Any]]) -> str:
    from orchestrator.k8s.render import to_yaml

    return "---\n".join(to_yaml(d) for d in docs)


def _file_name(doc: dict[str, Any]) -> str:
    return f"{doc['kind'].lower()}.yaml"


def expected_files() -> dict[Path, str]:
    """Every file under k8s/ and the text it should have."""
    files: dict[Path, str] = {}
    shared: list[dict[str, Any]] | None = None
    for overlay, values in OVERLAYS.items():
        docs = render_overlay(values)
        own = [d for d in docs if d["kind"] == "RayService"]
        rest = [d for d in docs if d["kind"] != "RayService"]
        if shared is None:
            shared = rest
        elif rest != shared:
            raise SystemExit(f"overlay {overlay}: its values change more than the RayService; "
                             "the base would differ between overlays")
        rel_values = values.relative_to(REPO)
        directory = K8S / "overlays" / overlay
        files[directory / "rayservice.yaml"] = _header(str(rel_values)) + _dump(own)
        files[directory / "kustomization.yaml"] = _header(str(rel_values)) + to_kustomization(
            ["../../base", "rayservice.yaml"]
        )
    assert shared is not None
    names = []
    for doc in shared:
        name = _file_name(doc)
        files[K8S / "base" / name] = _header("default values") + _dump([doc])
        names.append(name)
    files[K8S / "base" / "kustomization.yaml"] = _header("default values") + to_kustomization(names)
    return files


def to_kustomization(resources: list[str]) -> str:
    body = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources}
    return yaml.safe_dump(body, sort_keys=False)
