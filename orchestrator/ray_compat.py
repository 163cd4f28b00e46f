"""Every use of Ray's private APIs and internal environment variables, in one file.

The project pins ``ray[serve]`` (pyproject.toml); what it needs beyond Ray's public API is
here, so a version bump is checked against this file alone:

* the Serve request context's id (the proxy's ``x-request-id``), read by admission;
* handles to a deployment of another application that may not be registered yet;
* building applications the way Serve's controller does, and reading the deployment
  options it keeps on private attributes (tests of the builders and the chart use these);
* ``RAY_SERVE_*`` and ``RAY_*`` variables: Serve's fast path (HAProxy, gRPC handles), its
  private HAProxy files, drain and keep-alive settings, and Ray's own observability.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

# Ray Serve's fast path: HAProxy (bundled with ray[serve]) takes HTTP straight to the
# ingress replicas' own HTTP servers (no Python proxy hop), user code runs on the replica's
# event loop, Serve's request logs are buffered to files, and handles call replicas over
# gRPC (one gRPC stream per request instead of an actor call with its task events). The
# controller's loop runs every 0.5 s instead of 0.1 s: autoscaling decisions here are
# seconds apart, and a faster loop costs CPU the replicas share. Figures: the README.
GRPC_MAX_MESSAGE_VAR = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
# gRPC's 4 MB default refuses large request bodies; requests reach replicas as gRPC messages.
GRPC_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SERVE_FAST_PATH_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                       "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
                       GRPC_MAX_MESSAGE_VAR: str(GRPC_MAX_MESSAGE_BYTES)}
HTTP_KEEP_ALIVE_VAR = "RAY_SERVE_HTTP_KEEP_ALIVE_TIMEOUT_S"
# How long a stopping direct-ingress replica stays open so load balancers can drop it.
DRAINING_PERIOD_VAR = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
# Where Serve's HAProxy keeps its files (fixed paths under /tmp by default) and its stats ports.
HAPROXY_PATH_VARS = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                     "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state"}
HAPROXY_PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# Serve's hook for HTTP middlewares (applied around its own, on every proxy and direct
# ingress): the gateway's request-id bound (orchestrator.gateway.http.BoundRequestId).
HTTP_MIDDLEWARES_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
HTTP_MIDDLEWARES = "orchestrator.gateway.http:serve_middlewares"
# Ray's own observability: system metrics (Serve records several per request), per-call
# task events reported to the GCS (`ray list tasks`), and per-handler event-loop statistics.
LEAN_RAY_ENV = {"RAY_enable_metrics_collection": "0", "RAY_task_events_report_interval_ms": "0",
                "RAY_event_stats": "0"}


def ray_logs_dir() -> str:
    """Where Ray keeps this session's logs (its documented default location)."""
    return os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "session_latest", "logs")


def serve_request_id() -> str:
    """The id Serve's proxy gave the current request (the client's ``x-request-id`` or its
    own), which the proxy echoes itself; "" outside a Serve request."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or ""
    except Exception:  # noqa: BLE001 - outside Serve
        return ""


def deployment_handle(deployment: str, app: str):
    """A handle to ``deployment`` of application ``app``, not checked against the controller:
    that application deploys alongside the caller's and may not be registered yet; calls wait
    for its replicas like any other."""
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app, _check_exists=False)


@dataclasses.dataclass
class BuiltDeployment:
    """What Serve's controller would deploy for one deployment of a built application."""

    name: str
    app_name: str
    class_name: str
    num_replicas: Any
    autoscaling_config: Any
    request_router_config: Any
    ray_actor_options: dict[str, Any]
    placement_group_bundles: list[dict[str, float]] | None
    placement_group_strategy: str | None
    init_args: tuple[Any, ...]
    user_config: Any = None


def build_deployments(app, app_name: str) -> list[BuiltDeployment]:
    """The deployments of a bound Serve application, built as Serve's controller builds them."""
    from ray.serve._private.build_app import build_app as serve_build

    out = []
    for d in serve_build(app, name=app_name).deployments:
        config, replica = d._deployment_config, d._replica_config
        out.append(BuiltDeployment(
            name=d.name, app_name=app_name, class_name=d.func_or_class.__name__,
            num_replicas=config.num_replicas, autoscaling_config=config.autoscaling_config,
            request_router_config=config.request_router_config, ray_actor_options=d.ray_actor_options or {},
            placement_group_bundles=replica.placement_group_bundles,
            placement_group_strategy=replica.placement_group_strategy, init_args=tuple(replica.init_args),
            user_config=config.user_config))
    return out


def build_serve_config(applications: list[dict[str, Any]]) -> dict[str, BuiltDeployment]:
    """Every deployment of a serveConfigV2's applications, by name, built from each entry's
    ``import_path`` and ``args`` the way Serve's controller does."""
    import importlib

    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    out: dict[str, BuiltDeployment] = {}
    for entry in applications:
        module, attr = entry["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attr)
        app = call_user_app_builder_with_args_if_necessary(builder, entry["args"])
        overrides = {o["name"]: o for o in entry.get("deployments") or ()}
        for d in build_deployments(app, entry["name"]):
            if d.name in out:
                raise ValueError(f"{d.name} deployed twice")
            if "user_config" in overrides.get(d.name, {}):
                d = dataclasses.replace(d, user_config=overrides[d.name]["user_config"])
            out[d.name] = d
    return out


def deploy_applications(applications: list[dict[str, Any]]) -> None:
    """Deploy serveConfigV2 application entries the declarative way, as KubeRay does (what
    ``serve deploy`` sends). Unlike ``serve.run``, whose every call gives each deployment a new
    random version (so every replica restarts), a declarative re-deploy with the same args
    only calls ``reconfigure`` on running replicas when just a ``user_config`` changed."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.parse_obj({"applications": applications}))


# Ray's GCS key-value store: small state that must outlive the actor that keeps it (the
# rate limiter's daily token usage). It lives as long as the Ray cluster (longer with GCS
# fault tolerance); the keys carry their application's name.
KV_NAMESPACE = "slm-orchestrator"


def _kv():
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        raise RuntimeError("Ray's key-value store is not reachable from this process (Ray is not initialized)")
    return internal_kv


def kv_get(key: str) -> bytes | None:
    """The value stored under ``key`` in this project's namespace of Ray's GCS key-value store."""
    return _kv()._internal_kv_get(key, namespace=KV_NAMESPACE)


def kv_put(key: str, value: bytes) -> None:
    """Store ``value`` under ``key`` (replacing it) in this project's namespace of Ray's GCS key-value store."""
    _kv()._internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)
