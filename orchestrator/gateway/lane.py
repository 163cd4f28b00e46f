"""A model's fast lane: its replicas answer OpenAI HTTP themselves, at ``/models/<name>/v1``.

Through the gateway (``/v1``) every streamed token crosses one more process: the model
replica sends it to a gateway replica, which writes it to the client's connection. That hop
costs CPU per token (the README's benchmarks measure it). A fast-lane model's deployment is the
ingress of its own Serve application (``orchestrator.app.build_lane_app``), so Ray Serve's
HAProxy ingress proxies the client's connection straight to one of its replicas (least
connections first), and the replica streams the tokens itself.

What applies here as on ``/v1`` (``orchestrator.gateway.admission``): API keys and the models
each key may use, request caps, body size, rate limits (the gateway's limiter actor, so a
key's budget is shared by both entry points), request ids, the audit log, OpenAI error
envelopes, client-disconnect aborts, admission control (``max_queue_per_replica``, checked
against this replica's own engine queue), and request classes as vLLM's request priority, in
the same sequence (``Admission.enter``).

What only ``/v1`` does: the fair queue (waiting by class and key weight, ``max_wait_s``),
least-queue and prefix-aware routing (HAProxy balances by open connections instead),
holding requests while a model has no ready replica (so a fast lane needs
``min_replicas >= 1``), retrying a request whose replica died before answering, and the
gateway's own request metrics (vLLM's engine metrics still count every request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from orchestrator import errors
from orchestrator.engine.server import SSE, ModelServer
from orchestrator.gateway import capacity
from orchestrator.gateway.admission import Admission, RequestContext
from orchestrator.gateway.http import GuardedStream, error_event, openai_api
from orchestrator.gateway.relay import retry_headers
from orchestrator.spec import FleetSpec, ModelSpec

log = logging.getLogger("orchestrator.lane")

lane_api = openai_api()


@serve.ingress(lane_api)
class LaneServer(ModelServer):
    """A model replica that is also its application's HTTP ingress (see the module's docstring).

    The gateway keeps calling it through its handle (``call``, ``stream``) for ``/v1``."""

    async def __init__(self, model: dict[str, Any], fleet: dict[str, Any], fleet_app: str,
                       memory_peers: list[dict[str, Any]] | None = None):
        await super().__init__(model, fleet_app, memory_peers)
        self.fleet = FleetSpec.model_validate(fleet)
        self.admission = Admission(self.fleet, fleet_app, self._replica_id, audit_fallback=True)
        self._created = int(time.time())
        self._queue_bound = capacity.bound(self.fleet, self.spec)

    async def reconfigure(self, config: dict[str, Any] | None) -> None:
        """Load the lane's adapters (``ModelServer.reconfigure``), then admit requests for them."""
        await super().reconfigure(config)
        self.admission.set_adapters([{"name": a["name"], "base": self.spec.name, "limits": a.get("limits")}
                                     for a in (config or {}).get("adapters") or ()])

    @lane_api.get("/v1/models")
    async def lane_models(self, request: Request) -> JSONResponse:
        key = self.admission.authenticate(request)
        data = []
        for name in [self.spec.name, *self.admission.adapters]:
            if key is None or key.allows(name):
                entry = {"id": name, "object": "model", "created": self._created, "owned_by": "slm-orchestrator",
                         "task": self.spec.task}
                data.append(entry if name == self.spec.name else {**entry, "parent": self.spec.name})
        return JSONResponse({"object": "list", "data": data})

    @lane_api.post("/v1/chat/completions")
    async def lane_chat(self, request: Request) -> Response:
        return await self._lane(request, "chat")

    @lane_api.post("/v1/completions")
    async def lane_completions(self, request: Request) -> Response:
        return await self._lane(request, "completions")

    @lane_api.post("/v1/embeddings")
    async def lane_embeddings(self, request: Request) -> Response:
        return await self._lane(request, "embeddings")

    async def _capacity(self, spec: ModelSpec) -> None:
        capacity.check(spec.name, self.load.queue_depth, 1, self._queue_bound, "this replica")

    async def _lane(self, request: Request, endpoint: str) -> Response:
        ctx, payload, _, stream = await self.admission.enter(request, endpoint, self._capacity, serves=self.spec.name)
        if not stream:
            try:
                ctx.status, body = await self.call(endpoint, payload)
            except asyncio.CancelledError:  # the client left: vLLM aborts the request
                ctx.status = "cancelled"
                self.admission.finish(ctx)
                raise
            ctx.note_usage(body)
            self.admission.finish(ctx)
            return Response(body, status_code=ctx.status, media_type="application/json",
                            headers=retry_headers(ctx.headers, ctx.status))
        gen = self.stream(endpoint, payload)
        try:
            status, media_type, _ = await gen.__anext__()
            if media_type != SSE:  # an error, or an answer vLLM gave without streaming
                body = await gen.__anext__()
                await gen.aclose()
                ctx.status = status
                self.admission.finish(ctx)
                return Response(body, status_code=status, media_type=media_type,
                                headers=retry_headers(ctx.headers, status))
        except BaseException as e:  # the client left before the stream began, or a failure
            with contextlib.suppress(BaseException):
                await gen.aclose()
            ctx.status = "cancelled" if isinstance(e, asyncio.CancelledError) else 500
            self.admission.finish(ctx)
            raise
        return GuardedStream(self._relay(gen, ctx), ctx, lambda: self._abandon(gen, ctx), ctx.headers)

    async def _relay(self, gen, ctx: RequestContext):
        """The stream's body. Cancelled (the client left), it closes ``gen``, which aborts the
        engine's request."""
        ctx.body_started = True
        ctx.status = "200"
        try:
            async for chunk in gen:
                ctx.note_usage(chunk)
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            ctx.status = "cancelled"
            raise
        except Exception as e:  # noqa: BLE001 - the status line is sent: an error event
            log.error("model %s: stream failed: %r", self.spec.name, e)
            ctx.status = "500"
            yield error_event(errors.OrchestratorError("The model server stopped while streaming; retry the request."))
        finally:
            with contextlib.suppress(BaseException):
                await gen.aclose()
            self.admission.finish(ctx)

    def _abandon(self, gen, ctx: RequestContext) -> None:
        """The client left before the stream's body started."""
        asyncio.ensure_future(gen.aclose())
        ctx.status = "cancelled"
        self.admission.finish(ctx)
