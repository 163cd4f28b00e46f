"""Build the Ray Serve applications for a fleet: one deployment per model plus the gateway,
and for each model with ``fast_lane`` an application of its own whose replicas answer HTTP.

The same builder runs locally (``slm serve``) and in a cluster, where a RayService's
``serveConfigV2`` names it as ``import_path: orchestrator.app:build_app`` with the fleet
tree as ``args``::

    applications:
      - name: slm
        import_path: orchestrator.app:build_app
        route_prefix: /
        args: {models: [...], gateway: {...}}

A model with ``fast_lane: true`` is deployed in its own application instead
(``applications(fleet)`` lists them all): its replicas are that application's ingress, so
HAProxy proxies ``/models/<name>/v1/...`` straight to them, while the gateway reaches the same
deployment for ``/v1`` through a handle across applications.

LoRA adapters travel as each deployment's ``user_config`` (the model's adapters to its
replicas, every adapter's name, base and limits to the gateway), never in ``args``: Serve
hashes an application's args into its code version, so an adapter in them would restart
every replica, while a changed ``user_config`` only calls ``reconfigure`` on the running
ones. ``applications`` therefore writes the adapters into each application's
``deployments`` overrides and the LoRA engine arguments they call for into ``args``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from orchestrator import adapters
from orchestrator.engine.args import accelerator
from orchestrator.names import (
    APP_IMPORT_PATH,
    APP_NAME,
    GATEWAY_DEPLOYMENT,
    LANE_IMPORT_PATH,
    deployment_name,
    lane_app_name,
    lane_route_prefix,
)
from orchestrator.spec import FleetSpec, ModelSpec, parse_fleet

METRICS_INTERVAL_S = 0.5
LOOK_BACK_PERIOD_S = 2.0

log = logging.getLogger("orchestrator.app")


def gateway_user_config(fleet: FleetSpec) -> dict[str, Any]:
    """The gateway's ``user_config``: every adapter's name, base model and request limits."""
    return {"adapters": [{"name": a.name, "base": m.name, "limits": a.limits.model_dump(mode="json", exclude_none=True)
                          if a.limits else None} for m in fleet.models for a in m.adapters]}


def without_adapters(fleet_data: dict[str, Any], fleet: FleetSpec) -> dict[str, Any]:
    """``fleet_data`` as application args: adapters taken out, the LoRA engine arguments they
    call for written into each such model's engine (so a replica starts with LoRA on)."""
    data = copy.deepcopy(fleet_data)
    for model, spec in zip(data.get("models") or (), fleet.models, strict=True):
        if not isinstance(model, dict) or "adapters" not in model:
            continue
        derived = adapters.lora_engine_args(spec)
        if derived:
            model["engine"] = {**(model.get("engine") or {}), **{k: v for k, (v, _) in derived.items()}}
        del model["adapters"]
    return data


def log_lora_choices(fleet: FleetSpec, say=None) -> None:
    """Say once, at apply time, which LoRA engine arguments were derived and why."""
    for model in fleet.models:
        for key, (value, why) in adapters.lora_engine_args(model).items():
            line = f"model {model.name}: chose {key}={value!r} ({why}; set engine.{key} in the fleet to override)"
            (say or log.info)(line)


def applications(fleet_data: dict[str, Any]) -> list[dict[str, Any]]:
    """The fleet's Serve applications as serveConfigV2 entries: the gateway's, then one per
    fast-lane model (each built from the whole fleet, for its keys and limits). Adapters go
    into each application's ``deployments`` overrides as ``user_config``."""
    fleet = parse_fleet(fleet_data, "fleet")
    args = without_adapters(fleet_data, fleet)
    main = [{"name": GATEWAY_DEPLOYMENT, "user_config": gateway_user_config(fleet)}]
    main += [{"name": deployment_name(m.name), "user_config": adapters.user_config(m)}
             for m in fleet.models if not m.fast_lane]
    apps = [{"name": APP_NAME, "route_prefix": "/", "import_path": APP_IMPORT_PATH, "args": args,
             "deployments": main}]
    for model in fleet.models:
        if model.fast_lane:
            apps.append({"name": lane_app_name(model.name), "route_prefix": lane_route_prefix(model.name),
                         "import_path": LANE_IMPORT_PATH, "args": {"fleet": args, "model": model.name},
                         "deployments": [{"name": deployment_name(model.name),
                                          "user_config": adapters.user_config(model)}]})
    return apps


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
                "policy_kwargs": {"model": spec.name, "limits": scaling.model_dump(mode="json"),
                                  "fleet_app": APP_NAME},
            },
        },
        "request_router_config": {
            "request_router_class": "orchestrator.routing.serve_router:SlmRequestRouter",
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


def memory_peers(fleet: FleetSpec) -> list[dict[str, Any]]:
    """What each CPU replica plans its KV cache from (``orchestrator.memory``): the memory
    fields of every CPU model of the fleet, the models it may share a node with."""
    from orchestrator import memory

    return [memory.plan_inputs(m) for m in fleet.models if accelerator(m) == "cpu"]


def build_app(args: dict[str, Any] | FleetSpec):
    """The Serve application for a fleet (a dict as in fleet.yaml, or a FleetSpec)."""
    from ray import serve

    from orchestrator.engine.server import ModelServer
    from orchestrator.gateway.ingress import Gateway, api

    fleet = args if isinstance(args, FleetSpec) else parse_fleet(args, "serve application args")
    fleet = _with_lora_args(fleet)
    peers = memory_peers(fleet)
    model_deployment = serve.deployment(ModelServer)
    handles = {}
    names = {}
    lanes = {}
    for spec in fleet.models:
        opts = replica_options(spec)
        names[spec.name] = opts["name"]
        if spec.fast_lane:
            lanes[spec.name] = lane_app_name(spec.name)  # deployed by build_lane_app
        else:
            handles[spec.name] = model_deployment.options(**opts, user_config=adapters.user_config(spec)).bind(
                _init_model(spec), None, peers if accelerator(spec) == "cpu" else None)
    gateway = serve.deployment(serve.ingress(api)(Gateway)).options(
        name=GATEWAY_DEPLOYMENT,
        num_replicas=fleet.gateway.replicas,
        max_ongoing_requests=100_000,
        ray_actor_options={"num_cpus": 0},
        user_config=gateway_user_config(fleet),
    )
    return gateway.bind(_init_fleet(fleet), handles, names, lanes)


def _with_lora_args(fleet: FleetSpec) -> FleetSpec:
    """The fleet with each adapter model's derived LoRA engine arguments written in (args
    given with adapters inside, e.g. a hand-written serveConfigV2)."""
    fleet = fleet.model_copy(deep=True)
    for model in fleet.models:
        model.engine.update({k: v for k, (v, _) in adapters.lora_engine_args(model).items()})
    return fleet


def _init_model(spec: ModelSpec) -> dict[str, Any]:
    """A model's init args: its spec without adapters (they come through user_config)."""
    return spec.model_dump(mode="json", exclude={"adapters"})


def _init_fleet(fleet: FleetSpec) -> dict[str, Any]:
    return {**fleet.model_dump(mode="json"), "models": [_init_model(m) for m in fleet.models]}


def build_lane_app(args: dict[str, Any]):
    """A fast-lane model's application: its deployment as the ingress. ``args``:
    ``{"fleet": <the fleet tree>, "model": <name>}``."""
    from ray import serve

    from orchestrator.gateway.lane import LaneServer

    if not isinstance(args, dict) or "fleet" not in args or "model" not in args:
        raise ValueError("build_lane_app args: {fleet: <the fleet>, model: <a model name in it>}")
    fleet = _with_lora_args(parse_fleet(args["fleet"], "serve application args.fleet"))
    spec = fleet.model(args["model"])
    if spec is None or not spec.fast_lane:
        raise ValueError(f"build_lane_app: {args['model']!r} is not a fast-lane model of the fleet")
    opts = replica_options(spec)
    # Serve refuses a custom request router on an ingress behind HAProxy (HAProxy balances
    # HTTP by least connections); the gateway's /v1 calls to it use Serve's default router.
    opts.pop("request_router_config")
    return serve.deployment(LaneServer).options(**opts, user_config=adapters.user_config(spec)).bind(
        _init_model(spec), _init_fleet(fleet), APP_NAME,
        memory_peers(fleet) if accelerator(spec) == "cpu" else None)
