"""The OpenAI-compatible gateway: one ingress that routes each request by its "model".

The gateway decodes a request once, admits it (``orchestrator.gateway.admission``), then
hands the object to that model's deployment and relays the answer's bytes as they come
(``orchestrator.gateway.relay``). All errors leave as OpenAI's envelope
(``orchestrator.gateway.http``).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``, ``GET /health``, ``GET /ready``, ``GET /metrics``, ``GET /fleet``
(the last three from ``orchestrator.gateway.fleet_view``).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from orchestrator import console_logging, errors, ray_compat
from orchestrator.gateway import capacity
from orchestrator.gateway.admission import Admission
from orchestrator.gateway.fleet_view import FleetView
from orchestrator.gateway.http import openai_api
from orchestrator.gateway.queueing import Queues
from orchestrator.gateway.relay import Relay
from orchestrator.metrics import GatewayMetrics
from orchestrator.routing import policy as routing
from orchestrator.spec import FleetSpec, ModelSpec

api = openai_api()


def _replica_context() -> tuple[str | None, str | None]:
    """(this replica's application, its replica id); (None, None) outside Serve."""
    try:
        from ray import serve

        context = serve.get_replica_context()
        return context.app_name, context.replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Serve replica
        return None, None


class Gateway:
    """The ingress deployment. ``handles`` maps model name to its deployment's handle;
    ``deployments`` model name to its deployment's name; ``lanes`` each fast-lane model to
    the application its deployment is in."""

    def __init__(self, fleet: dict[str, Any], handles: dict[str, Any], deployments: dict[str, str],
                 lanes: dict[str, str] | None = None):
        console_logging()
        self.fleet = FleetSpec.model_validate(fleet)
        self.handles = dict(handles)
        lanes = dict(lanes or {})
        for model, app in lanes.items():
            self.handles[model] = ray_compat.deployment_handle(deployments[model], app)
        app_name, replica = _replica_context()
        self.metrics = GatewayMetrics()
        self._created = int(time.time())
        self.admission = Admission(self.fleet, app_name, replica)
        self.view = FleetView(self.fleet, self.handles, deployments, lanes, app_name, self.metrics)
        self.view.state_actor()
        self.queues = Queues(self.fleet, self.metrics, self.view.running_replicas,
                             lambda stats: self.view.report_queue(replica, stats), self.admission.interactive_keys)
        self.relay = Relay(self.handles, self.view, self.metrics, self.fleet.gateway.request_timeout_s,
                           self.admission.finish, self.queues)

    def reconfigure(self, config: dict[str, Any] | None) -> None:
        """Serve's ``user_config`` hook: the fleet's LoRA adapters (``{"adapters": [{"name",
        "base", "limits"}]}``), updated live when the fleet's adapters change."""
        entries = (config or {}).get("adapters") or []
        self.admission.set_adapters(entries)
        self.view.set_adapters(entries)

    # -- OpenAI endpoints -------------------------------------------------------------

    def _model_object(self, name: str) -> dict[str, Any] | None:
        """A model's (or an adapter's, with its ``parent``) /v1/models entry; None if not served."""
        served = self.admission.resolve(name)
        if served is None:
            return None
        spec = served[0]
        entry = {"id": name, "object": "model", "created": self._created, "owned_by": "slm-orchestrator",
                 "task": spec.task}
        if name != spec.name:
            entry["parent"] = spec.name  # as vLLM lists a LoRA adapter
        return entry

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        key = self.admission.authenticate(request)
        names = [m.name for m in self.fleet.models] + list(self.admission.adapters)
        data = [self._model_object(n) for n in names if key is None or key.allows(n)]
        return JSONResponse({"object": "list", "data": [d for d in data if d is not None]})

    @api.get("/v1/models/{model:path}")
    async def get_model(self, model: str, request: Request) -> JSONResponse:
        key = self.admission.authenticate(request)
        entry = self._model_object(model)
        if entry is None or (key is not None and not key.allows(model)):
            raise errors.UnknownModel(model)
        return JSONResponse(entry)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward(request, "completions")

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self._forward(request, "embeddings")

    async def _capacity(self, spec: ModelSpec) -> None:
        """Admission control from the cached fleet views (never waits on the control plane)."""
        limit = capacity.bound(self.fleet, spec)
        if limit is None:
            return
        seen = self.view.queue_estimate(spec.name, self.relay.in_flight[spec.name])
        if seen is None:  # the first second of this replica's life: no replica states yet
            return
        try:
            capacity.check(spec.name, *seen, limit)
        except errors.Overloaded:
            self.metrics.rejected.labels(spec.name).inc()
            raise

    async def _forward(self, request: Request, endpoint: str) -> Response:
        ctx, payload, spec, stream = await self.admission.enter(request, endpoint, self._capacity)
        adapter = ctx.model if ctx.model != spec.name and spec.routing.adapter_affinity else None
        key = routing.route_key(spec.routing.policy, endpoint, payload, request.headers, spec.routing.prefix_chars,
                                adapter)
        ctx.ticket = self.queues.enter(spec.name, ctx.key.name if ctx.key else "", ctx.cls, ctx.cost,
                                       ctx.key.weight if ctx.key else 1.0)
        return await self.relay.serve(ctx, endpoint, payload, spec, stream, key)

    # -- operations -------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @api.get("/ready")
    async def ready(self) -> JSONResponse:
        """200 when every model can answer: a ready replica, or scaled to zero by design."""
        waiting = await self.view.not_ready()
        if waiting:
            body = errors.envelope(f"Models without a ready replica: {', '.join(waiting)}", 503,
                                   code="model_not_ready")
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready"})

    @api.get("/fleet")
    async def fleet_status(self, request: Request) -> JSONResponse:
        self.admission.authenticate(request, admin=True)
        return JSONResponse({"models": await self.view.models()})

    @api.get("/metrics")
    async def metrics_endpoint(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        self.admission.authenticate(request, admin=True)
        return Response(await self.view.metrics_text(routing.REGISTRY), media_type=CONTENT_TYPE_LATEST)
