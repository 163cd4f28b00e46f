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
METRICS_INTERVAL_S = 0.5
LOOK_BACK_PERIOD_S = 2.0


def deployment_name(model_name: str) -> str:
    """A Serve deployment name for a model (Serve names allow fewer characters)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", model_name)
    if safe != model_name:
        safe += "-" + hashlib.sha1(model_name.encode()).hexdigest()[:6]
    return f"model-{safe}"


def replica_options(spec: ModelSpec) -> dict[str, Any]:
    """Ray Serve deployment options for one model's replicas."""
    env = dict(spec.env)
    scaling = spec.autoscaling
    opts: dict[str, Any] = {
        "name": deployment_name(spec.name),
        "autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "initial_replicas": scaling.min_replicas,
            # Replicas and handles report every half second over a short window, so the
            # policy sees a load step within about a second. Its own delays do the rest.
            "metrics_interval_s": METRICS_INTERVAL_S,
            "look_back_period_s": LOOK_BACK_PERIOD_S,
            # The policy applies the fleet's delays itself; Serve's own are off. Serve's
            # cold-start path (used while no replica runs) reads target_ongoing_requests.
            "upscale_delay_s": 0,
            "downscale_delay_s": 0,
            "target_ongoing_requests": scaling.target_queue_depth,
            "policy": {
                "policy_function": "orchestrator.autoscaling.serve_policy:QueueDepthPolicy",
                "policy_kwargs": {"model": spec.name, "limits": scaling.model_dump(mode="json")},
            },
        },
        "request_router_config": {
            "request_router_class": "orchestrator.serve_router:SlmRequestRouter",
            "request_router_kwargs": {
                "model": spec.name,
                "policy": spec.routing.policy,
                "load_factor": spec.routing.load_factor,
            },
        },
        "max_ongoing_requests": spec.max_ongoing_requests,
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        # Draining: a replica leaving service (scale-down, redeploy) takes no new requests
        # and finishes the ones it has, for up to drain_timeout_s.
        "graceful_shutdown_timeout_s": scaling.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 1,
    }
    actor: dict[str, Any] = {"num_cpus": spec.resources.num_cpus}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    tp = spec.tensor_parallel_size
    if accelerator(spec) == "gpu":
        gpu_type = spec.resources.accelerator_type
        if tp == 1:
            # A share below one GPU lets small models pack onto one card (see `slm plan`).
            actor["num_gpus"] = spec.resources.num_gpus or 1
            if gpu_type:
                actor["accelerator_type"] = gpu_type
        else:
            # One bundle per GPU, packed on one node; vLLM's Ray executor fills them.
            # Ray marks a node's GPU type with the resource accelerator_type:<TYPE>.
            first = {"CPU": spec.resources.num_cpus, "GPU": 1}
            if gpu_type:
                first[f"accelerator_type:{gpu_type}"] = 0.001
            opts["placement_group_bundles"] = [first] + [{"GPU": 1} for _ in range(tp - 1)]
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
