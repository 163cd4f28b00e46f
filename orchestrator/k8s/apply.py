"""``slm apply``: create or update the fleet's RayService in the current kube context.

Creates the RayService when it does not exist; otherwise updates it with a server-side apply
(field manager ``slm``), so fields this tool set earlier and no longer renders are removed,
while fields other managers own (e.g. KubeRay's status) stay. Then it reports the
RayService's status, and with ``wait_s`` polls until it is Ready.

Needs the KubeRay operator in the cluster and RBAC to get, create and patch
``rayservices.ray.io`` in the namespace.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
FIELD_MANAGER = "slm"


class ApplyError(RuntimeError):
    """The cluster could not be reached or refused the RayService; the message says why."""


def _client(context: str | None):
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    namespace = None
    # Read $KUBECONFIG now: the client reads it once, when it is imported.
    config_file = os.environ.get("KUBECONFIG") or None
    try:
        config.load_kube_config(config_file=config_file, context=context)
        contexts, active = config.list_kube_config_contexts(config_file=config_file)
        if context:
            active = next((c for c in contexts if c["name"] == context), active)
        namespace = (active or {}).get("context", {}).get("namespace")
    except (ConfigException, FileNotFoundError) as e:
        try:
            config.load_incluster_config()
        except ConfigException:
            raise ApplyError(f"no Kubernetes context: {e} (set KUBECONFIG or run inside a pod)") from None
    return client.CustomObjectsApi(), namespace


def _reason(e: Exception) -> str:
    body = getattr(e, "body", None)
    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError):
        message = None
    status = getattr(e, "status", None)
    return f"{status} {message or getattr(e, 'reason', '') or e}".strip()


def status_lines(obj: dict[str, Any]) -> list[str]:
    """A RayService's status in a few lines: readiness, the Serve application, its deployments."""
    status = obj.get("status") or {}
    lines = []
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready")
    if ready:
        lines.append(f"Ready={ready.get('status')} ({ready.get('reason', '')}) {ready.get('message', '')}".rstrip())
    upgrading = conditions.get("UpgradeInProgress")
    if upgrading and upgrading.get("status") == "True":
        lines.append(f"upgrade in progress: {upgrading.get('message', '')}".rstrip())
    if status.get("serviceStatus"):
        lines.append(f"service status: {status['serviceStatus']}")
    for side in ("activeServiceStatus", "pendingServiceStatus"):
        apps = (status.get(side) or {}).get("applicationStatuses") or {}
        cluster = (status.get(side) or {}).get("rayClusterName")
        for app_name, app in apps.items():
            where = f" on {cluster}" if cluster else ""
            lines.append(f"{side.replace('ServiceStatus', '')} application {app_name}{where}: {app.get('status')}")
            for dep_name, dep in (app.get("serveDeploymentStatuses") or {}).items():
                msg = f" ({dep['message']})" if dep.get("message") else ""
                lines.append(f"  {dep_name}: {dep.get('status')}{msg}")
    return lines or ["no status yet (is the KubeRay operator running?)"]


def is_ready(obj: dict[str, Any]) -> bool:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return (obj.get("status") or {}).get("serviceStatus") == "Running"


def apply(
    body: dict[str, Any],
    namespace: str | None = None,
    *,
    context: str | None = None,
    wait_s: float = 0,
    poll_s: float = 5,
    say: Callable[[str], None] = print,
    api: Any = None,
) -> bool:
    """Create or update ``body`` (a RayService); report its status; True when it is Ready."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError as TransportError

    default_ns = None
    if api is None:
        api, default_ns = _client(context)
    ns = namespace or body.get("metadata", {}).get("namespace") or default_ns or "default"
    name = body["metadata"]["name"]
    body = json.loads(json.dumps(body))
    body["metadata"]["namespace"] = ns
    where = f"rayservice/{name} in namespace {ns}"
    try:
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            exists = True
        except ApiException as e:
            if e.status != 404:
                raise
            exists = False
        if exists:
            obj = api.patch_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, name, body,
                field_manager=FIELD_MANAGER, force=True, _content_type="application/apply-patch+yaml",
            )
            say(f"updated {where} (generation {obj.get('metadata', {}).get('generation', '?')})")
        else:
            obj = api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body, field_manager=FIELD_MANAGER)
            say(f"created {where}")
    except ApiException as e:
        hint = " (is the KubeRay operator and its CRDs installed?)" if e.status == 404 else ""
        raise ApplyError(f"{where}: the API server answered {_reason(e)}{hint}") from None
    except (OSError, TransportError) as e:  # connection refused, DNS, TLS
        reason = getattr(e, "reason", None) or e
        raise ApplyError(f"{where}: cannot reach the API server: {reason}") from None

    deadline = time.monotonic() + wait_s
    last: list[str] = []
    while True:
        lines = status_lines(obj)
        if lines != last:
            for line in lines:
                say(f"  {line}")
            last = lines
        if is_ready(obj):
            say(f"{where} is ready")
            return True
        if time.monotonic() >= deadline:
            if wait_s:
                say(f"{where} is not ready after {wait_s:g}s")
            return False
        time.sleep(poll_s)
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except (ApiException, OSError, TransportError) as e:
            say(f"  cannot read the status: {_reason(e)}")
