"""Run the Helm chart and kubectl from the project's tools folder (``make tools``).

Used by the chart tests and by ``orchestrator.devtools.k8s_manifests`` (which renders the
plain manifests under ``k8s/`` from the chart). Helm keeps its cache and config inside the
tools folder, so nothing outside the project is touched.

Example::

    docs = helm_template(values_files=["helm/slm-orchestrator/ci/gpu-values.yaml"])
    rayservice = next(d for d in docs if d["kind"] == "RayService")
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "slm-orchestrator"
TOOLS = REPO / "tools"
RELEASE = "slm"


class ToolError(RuntimeError):
    """helm or kubectl failed; the message carries its stderr."""

    def __init__(self, cmd: list[str], returncode: int, stderr: str):
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(cmd[:3])} ... exited {returncode}: {stderr.strip()}")


def tool(name: str) -> Path:
    """The helm or kubectl binary: $SLM_HELM / $SLM_KUBECTL, else tools/bin/<name>."""
    path = Path(os.environ.get(f"SLM_{name.upper()}", TOOLS / "bin" / name))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make tools` to fetch helm and kubectl")
    return path


def tool_env() -> dict[str, str]:
    """The environment helm and kubectl run in: Helm's cache, config and data inside tools/."""
    env = dict(os.environ)
    home = TOOLS / "helm-home"
    for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
        env[var] = str(home / sub)
    return env


def run(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(tool(name)), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(), timeout=120)
    if check and proc.returncode != 0:
        raise ToolError(cmd, proc.returncode, proc.stderr)
    return proc


def helm_template(
    values_files: list[str | Path] = (),
    set_json: dict[str, Any] | None = None,
    release: str = RELEASE,
    chart: Path = CHART,
) -> list[dict[str, Any]]:
    """``helm template`` of the chart as parsed documents (empty documents dropped)."""
    args = ["template", release, str(chart)]
    for f in values_files:
        args += ["-f", str(f)]
    for key, value in (set_json or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    out = run("helm", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def helm_lint(values_files: list[str | Path] = (), chart: Path = CHART) -> subprocess.CompletedProcess:
    args = ["lint", "--strict", str(chart)]
    for f in values_files:
        args += ["-f", str(f)]
    return run("helm", *args, check=False)


def kustomize(directory: str | Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIR`` as parsed documents."""
    out = run("kubectl", "kustomize", str(directory)).stdout
    return [d for d in yaml.safe_load_all(out) if d]
