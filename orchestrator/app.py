"""Build the Ray Serve application for a fleet: one deployment per model plus the gateway.

The same builder runs locally (``slm serve``) and in a cluster, where a RayService's
``serveConfigV2`` names it as ``import_path: orchestrator.app:build_app`` with the fleet
tree as ``args``::

    applications:
      - name: slm
        import_path: orchestrator.app:build_app
        route_prefix: /
        args: {models: [...], gateway: {...}}
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from orchestrator.engine.args import accelerator
from orchestrator.spec import FleetSpec, ModelSpec, parse_fleet

APP_NAME = "slm"
GATEWAY_DEPLOYMENT = "gateway"


def deployment_name(model_name: str) -> str:
    """A Serve deployment name for a model (Serve names allow fewer characters)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", model_name)
    if safe != model_name:
        safe += "-" + hashlib.sha1(model_name.encode()).hexdigest()[:6]
    return f"model-{safe}"


def replica_options(spec: ModelSpec) -> dict[str, Any]:
    """Ray Serve deployment options for one model's replicas."""
    env = dict(spec.env)
    opts: dict[str, Any] = {
        "name": deployment_name(spec.name),
        # Fixed count for now: the queue-depth autoscaler replaces this.
        "num_replicas": max(spec.autoscaling.min_replicas, 1),
        "max_ongoing_requests": spec.max_ongoing_requests,
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
    }
    actor: dict[str, Any] = {"num_cpus": spec.resources.num_cpus}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    tp = spec.tensor_parallel_size
    if accelerator(spec) == "gpu":
        if tp == 1:
            actor["num_gpus"] = 1
        else:
            # One bundle per GPU, packed on one node; vLLM's Ray executor fills them.
            opts["placement_group_bundles"] = [{"CPU": spec.resources.num_cpus, "GPU": 1}] + [
                {"GPU": 1} for _ in range(tp - 1)
            ]
            opts["placement_group_strategy"] = "STRICT_PACK"
    opts["ray_actor_options"] = actor
    return opts


def build_app(args: dict[str, Any] | FleetSpec):
    """The Serve application for a fleet (a dict as in fleet.yaml, or a FleetSpec)."""
    from ray import serve

    from orchestrator.engine.server import ModelServer
    from orchestrator.gateway.app import Gateway, api

    fleet = args if isinstance(args, FleetSpec) else parse_fleet(args, "serve application args")
    model_deployment = serve.deployment(ModelServer)
    handles = {}
    names = {}
    for spec in fleet.models:
        opts = replica_options(spec)
        names[spec.name] = opts["name"]
        handles[spec.name] = model_deployment.options(**opts).bind(spec.model_dump(mode="json"))
    gateway = serve.deployment(serve.ingress(api)(Gateway)).options(
        name=GATEWAY_DEPLOYMENT,
        num_replicas=fleet.gateway.replicas,
        max_ongoing_requests=100_000,
        ray_actor_options={"num_cpus": 0},
    )
    return gateway.bind(fleet.model_dump(mode="json"), handles, names)
