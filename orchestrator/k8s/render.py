"""Render a fleet as a Ray Serve config or a complete KubeRay RayService.

The Serve config names the same builder ``slm serve`` runs (``orchestrator.app:build_app``)
and passes the fleet, as written, as the application's ``args``, except LoRA adapters: they
go into the applications' ``deployments[].user_config`` (so changing them reconfigures
running replicas), and the LoRA engine arguments they call for into ``args``
(``orchestrator.app.applications``). Nothing else about the models is translated here.
The RayService around it sizes a head group and worker groups from the fleet: one GPU
worker group per (GPUs per replica, GPU type), whose pods carry ``nvidia.com/gpu`` = the
model's ``tensor_parallel_size``, and one CPU group for CPU models.
Ray's autoscaler adds and removes those pods as Serve adds and removes replicas.

The Helm chart (``helm/slm-orchestrator``) renders the same RayService from its values; a
test renders both for the same fleet and compares them, so the two cannot drift.

Example::

    fleet, data = load_fleet_data("fleet.yaml")
    print(to_yaml(rayservice(fleet, data, ClusterOptions(name="slm", engine="gpu"))))
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal

import yaml

from orchestrator import __version__, ray_compat
from orchestrator.app import applications
from orchestrator.spec import FieldError, FleetSpec, FleetValidationError, ModelSpec

CHART_NAME = "slm-orchestrator"
RAY_VERSION = "2.60.0"
SERVE_PORT = 8000  # KubeRay's serve Service and health checks expect Serve's HTTP port here
IMAGE_REPOSITORY = "ghcr.io/slm-orchestrator/slm-orchestrator"
# Longer than clients' idle keep-alive, so a reused connection is never cut by the proxy
# (`slm serve` sets the same through orchestrator.runtime_env).
HTTP_KEEP_ALIVE_S = 90
HOME = "/home/slm"
MODEL_CACHE = "/models"

# Defaults shared with the chart's values.yaml (the chart/render equality test checks them).
HEAD_RESOURCES = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}
GPU_CPUS_PER_GPU = 8
GPU_MEMORY_GIB_PER_GPU = 48
CPU_WORKER_RESOURCES = {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}}
CPU_WORKER_RAY_CPUS = 4
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
AUTOSCALER_IDLE_TIMEOUT_S = 60
AUTOSCALER_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}}
SHM_SIZE = "8Gi"


@dataclasses.dataclass(frozen=True)
class ClusterOptions:
    """What the RayService needs beyond the fleet (the chart's values with their defaults)."""

    name: str = "slm"  # the RayService's name, the prefix of every resource and the instance label
    namespace: str | None = None
    engine: Literal["gpu", "cpu"] = "gpu"
    image: str | None = None  # default: IMAGE_REPOSITORY:<version>-<engine>
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None  # default: the RayService's name

    @property
    def image_ref(self) -> str:
        return self.image or f"{IMAGE_REPOSITORY}:{__version__}-{self.engine}"


def serve_config(fleet_data: dict[str, Any]) -> dict[str, Any]:
    """The Ray Serve config (serveConfigV2) that builds the fleet with the project's builder."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT, "keep_alive_timeout_s": HTTP_KEEP_ALIVE_S},
        # The gateway's application, then one per fast-lane model (see orchestrator.app).
        "applications": applications(fleet_data),
    }


def labels(opts: ClusterOptions, component: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": CHART_NAME,
        "app.kubernetes.io/instance": opts.name,
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/part-of": CHART_NAME,
        "app.kubernetes.io/managed-by": "slm",
    }
    if component:
        out["app.kubernetes.io/component"] = component
    return out


def _placement(spec: ModelSpec, engine: str) -> str:
    """cpu or gpu, where an ``auto`` model runs on the image's engine build."""
    return engine if spec.resources.accelerator == "auto" else spec.resources.accelerator


@dataclasses.dataclass
class WorkerGroup:
    """One KubeRay worker group and the models whose replicas it hosts."""

    name: str
    gpus: int  # per pod; 0 for the CPU group
    gpu_type: str | None
    min_pods: float = 0.0
    max_pods: float = 0.0
    models: list[str] = dataclasses.field(default_factory=list)

    @property
    def min_replicas(self) -> int:
        return math.ceil(self.min_pods - 1e-6)

    @property
    def max_replicas(self) -> int:
        return math.ceil(self.max_pods - 1e-6)


def worker_groups(fleet: FleetSpec, engine: str) -> list[WorkerGroup]:
    """Worker groups sized from the fleet: a pod per GPU replica (a replica with a GPU share
    below 1 counts as that share of a pod), summed per pod shape."""
    groups: dict[str, WorkerGroup] = {}
    for spec in fleet.models:
        if _placement(spec, engine) == "cpu":
            key, gpus, gpu_type = "cpu", 0, None
        else:
            gpus, gpu_type = spec.tensor_parallel_size, spec.resources.accelerator_type
            key = f"gpu-x{gpus}" + (f"-{gpu_type.lower()}" if gpu_type else "")
        group = groups.setdefault(key, WorkerGroup(key, gpus, gpu_type))
        share = (spec.resources.num_gpus or 1.0) if gpus == 1 else 1.0
        group.min_pods += spec.autoscaling.min_replicas * share
        group.max_pods += spec.autoscaling.max_replicas * share
        group.models.append(spec.name)
    return [groups[k] for k in sorted(groups)]


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _env() -> list[dict[str, Any]]:
    return [
        {"name": "HOME", "value": HOME},
        {"name": "SLM_CACHE_DIR", "value": f"{MODEL_CACHE}/slm"},
        {"name": "HF_HOME", "value": f"{MODEL_CACHE}/huggingface"},
        # Serve's HTTP middleware hook: the gateway bounds what it reflects of x-request-id.
        {"name": ray_compat.HTTP_MIDDLEWARES_VAR, "value": ray_compat.HTTP_MIDDLEWARES},
    ]


def _volumes() -> list[dict[str, Any]]:
    return [
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
        {"name": "models", "emptyDir": {}},
    ]


def _mounts() -> list[dict[str, Any]]:
    return [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home", "mountPath": HOME},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "models", "mountPath": MODEL_CACHE},
    ]


def _pod(opts: ClusterOptions, component: str, container: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    base = {
        "name": "ray-head" if component == "head" else "ray-worker",
        "image": opts.image_ref,
        "imagePullPolicy": opts.image_pull_policy,
        "env": _env(),
        "securityContext": container_security_context(),
        "volumeMounts": _mounts(),
    }
    base.update(container)
    spec = {
        "serviceAccountName": opts.service_account or opts.name,
        "securityContext": pod_security_context(),
        "containers": [base],
        "volumes": _volumes(),
    }
    if component != "head":
        # Only the head pod's autoscaler sidecar talks to the Kubernetes API (KubeRay binds its
        # Role to this ServiceAccount); workers get no token.
        spec["automountServiceAccountToken"] = False
    spec.update(extra)
    return {"metadata": {"labels": labels(opts, component)}, "spec": spec}


def _worker_group(group: WorkerGroup, fleet: FleetSpec, opts: ClusterOptions) -> dict[str, Any]:
    out: dict[str, Any] = {
        "groupName": group.name,
        "replicas": group.min_replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
    }
    if group.gpus:
        cpus = GPU_CPUS_PER_GPU * group.gpus
        memory = f"{GPU_MEMORY_GIB_PER_GPU * group.gpus}Gi"
        if group.gpu_type:
            # Ray's autoscaler learns the group's GPU type before a pod exists from this resource.
            out["resources"] = {f"accelerator_type:{group.gpu_type}": "1"}
        resources = {
            "requests": {"cpu": str(cpus), "memory": memory, "nvidia.com/gpu": str(group.gpus)},
            "limits": {"cpu": str(cpus), "memory": memory, "nvidia.com/gpu": str(group.gpus)},
        }
        extra = {"tolerations": GPU_TOLERATIONS}
    else:
        out["rayStartParams"] = {"num-cpus": str(CPU_WORKER_RAY_CPUS)}
        resources = CPU_WORKER_RESOURCES
        extra = {}
    out["template"] = _pod(opts, "worker", {"resources": resources}, extra)
    return out


def check_fits(fleet: FleetSpec, opts: ClusterOptions, origin: str = "<fleet>") -> None:
    """Raise FleetValidationError for a model whose replica no worker pod could host."""
    errors = []
    for i, spec in enumerate(fleet.models):
        on_cpu = _placement(spec, opts.engine) == "cpu"
        if on_cpu and spec.resources.num_cpus > CPU_WORKER_RAY_CPUS:
            errors.append(FieldError(
                f"models[{i}].resources.num_cpus",
                f"{spec.resources.num_cpus:g} is more than a CPU worker pod offers ({CPU_WORKER_RAY_CPUS})",
            ))
    if errors:
        raise FleetValidationError(origin, errors)


def rayservice(
    fleet: FleetSpec, fleet_data: dict[str, Any], opts: ClusterOptions, origin: str = "<fleet>"
) -> dict[str, Any]:
    """A complete ray.io/v1 RayService for the fleet (``fleet_data``: the tree as written)."""
    check_fits(fleet, opts, origin)
    head_container = {
        "ports": [
            {"name": "gcs-server", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
            {"name": "serve", "containerPort": SERVE_PORT},
            {"name": "metrics", "containerPort": 8080},
        ],
        "resources": HEAD_RESOURCES,
    }
    metadata: dict[str, Any] = {"name": opts.name, "labels": labels(opts, "rayservice")}
    if opts.namespace:
        metadata["namespace"] = opts.namespace
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": to_json(serve_config(fleet_data)),
            "serveService": {
                "metadata": {"name": f"{opts.name}-gateway", "labels": labels(opts, "gateway")},
                "spec": {
                    "type": "ClusterIP",
                    "ports": [{"name": "serve", "port": SERVE_PORT, "targetPort": SERVE_PORT, "protocol": "TCP"}],
                },
            },
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": AUTOSCALER_IDLE_TIMEOUT_S,
                    "resources": AUTOSCALER_RESOURCES,
                    "securityContext": container_security_context(),
                },
                "headGroupSpec": {
                    # num-cpus 0: engines never land on the head; it runs Serve's controller,
                    # the HTTP proxy and the gateway (which reserves no CPU).
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod(opts, "head", head_container, {}),
                },
                "workerGroupSpecs": [_worker_group(g, fleet, opts) for g in worker_groups(fleet, opts.engine)],
            },
        },
    }


def to_json(obj: Any) -> str:
    """Pretty, key-sorted JSON (what Helm's toPrettyJson prints; JSON is also YAML)."""
    return json.dumps(obj, indent=2, sort_keys=True)


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_presenter)


def to_yaml(obj: Any) -> str:
    """YAML for people: block style, multi-line strings (serveConfigV2) as literal blocks."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
