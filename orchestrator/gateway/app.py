"""The OpenAI-compatible gateway: one ingress that routes each request by its "model".

The gateway decodes a request once, checks only what it must (``model``, ``stream``), then
hands the object to that model's deployment and relays the answer's bytes as they come.
All errors leave through one function as OpenAI's envelope.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``, ``GET /health``, ``GET /ready``, ``GET /metrics``, ``GET /fleet``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator import errors
from orchestrator.metrics import GatewayMetrics, merge_exposition
from orchestrator.spec import FleetSpec

log = logging.getLogger("orchestrator.gateway")

MAX_BODY_BYTES = 8 * 1024 * 1024
_TASK_OF_ENDPOINT = {"chat": "generate", "completions": "generate", "embeddings": "embed"}
_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}
_STATUS_CACHE_S = 1.0

api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = errors.to_envelope(exc)
    if status >= 500 and not isinstance(exc, errors.OrchestratorError):
        log.error("unhandled error: %r", exc, exc_info=exc)
    return JSONResponse(body, status_code=status, headers=headers)


@api.exception_handler(errors.OrchestratorError)
async def _orchestrator_error(_: Request, exc: errors.OrchestratorError) -> JSONResponse:
    return error_response(exc)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return error_response(errors.NotFound(f"No route for {request.method} {request.url.path}"))
    if exc.status_code == 405:
        return error_response(errors.MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}"))
    body = errors.envelope(str(exc.detail), exc.status_code)
    return JSONResponse(body, status_code=exc.status_code)


@api.exception_handler(Exception)
async def _any_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def _is_replica_failure(exc: BaseException) -> bool:
    """Errors that mean the replica (not the request) failed: worth a 503, not a 500."""
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError,
                            BackPressureError, DeploymentUnavailableError))


class Gateway:
    """The ingress deployment. ``handles`` maps model name to its deployment's handle."""

    def __init__(self, fleet: dict[str, Any], handles: dict[str, Any], deployment_names: dict[str, str]):
        self.fleet = FleetSpec.model_validate(fleet)
        self.handles = handles
        self.stream_handles = {name: h.options(stream=True) for name, h in handles.items()}
        self.metrics = GatewayMetrics()
        self.timeout_s = self.fleet.gateway.request_timeout_s
        self._created = int(time.time())
        self._status_cache: tuple[float, dict[str, dict[str, int]]] | None = None
        self._deployment_names = dict(deployment_names)

    # -- OpenAI endpoints -------------------------------------------------------------

    @api.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        data = [
            {"id": m.name, "object": "model", "created": self._created, "owned_by": "slm-orchestrator"}
            for m in self.fleet.models
        ]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/v1/models/{model:path}")
    async def get_model(self, model: str) -> JSONResponse:
        if self.fleet.model(model) is None:
            raise errors.UnknownModel(model)
        return JSONResponse({"id": model, "object": "model", "created": self._created,
                             "owned_by": "slm-orchestrator"})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward(request, "completions")

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self._forward(request, "embeddings")

    async def _read(self, request: Request, endpoint: str) -> tuple[dict[str, Any], str, bool]:
        """The decoded body, model name and stream flag; raises the right 4xx for bad input."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise errors.RequestTooLarge(f"The request body is over {MAX_BODY_BYTES} bytes")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise errors.RequestTooLarge(f"The request body is over {MAX_BODY_BYTES} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise errors.InvalidRequest(f"We could not parse the JSON body of your request: {e}") from e
        if not isinstance(payload, dict):
            raise errors.InvalidRequest("The request body must be a JSON object")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise errors.InvalidRequest("You must provide a model parameter", param="model")
        spec = self.fleet.model(model)
        if spec is None:
            raise errors.UnknownModel(model)
        if spec.task != _TASK_OF_ENDPOINT[endpoint]:
            what = "an embedding model" if spec.task == "embed" else "a generative model"
            raise errors.WrongTask(
                f"The model '{model}' is {what} and does not support {_PATHS[endpoint]}", param="model"
            )
        stream = payload.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise errors.InvalidRequest("'stream' must be a boolean", param="stream")
        if endpoint == "embeddings":
            stream = False
        return payload, model, stream

    async def _forward(self, request: Request, endpoint: str) -> Response:
        started = time.perf_counter()
        payload, model, stream = await self._read(request, endpoint)
        gauge = self.metrics.in_flight.labels(model)
        gauge.inc()
        handed_off = False
        status: int | str = 500
        try:
            if not stream:
                try:
                    status, answer = await asyncio.wait_for(
                        self.handles[model].call.remote(endpoint, payload), self.timeout_s
                    )
                except asyncio.TimeoutError as e:
                    raise errors.UpstreamTimeout(
                        f"The model '{model}' did not answer within {self.timeout_s:.0f}s"
                    ) from e
                except Exception as e:
                    raise self._upstream_error(model, e) from e
                return Response(answer, status_code=status, media_type="application/json")
            gen = self.stream_handles[model].stream.remote(endpoint, payload)
            try:
                status, media_type = await asyncio.wait_for(gen.__anext__(), self.timeout_s)
                if media_type != "text/event-stream":
                    answer = await gen.__anext__()
                    return Response(answer, status_code=status, media_type=media_type)
            except asyncio.TimeoutError as e:
                gen.cancel()
                raise errors.UpstreamTimeout(f"The model '{model}' did not answer within {self.timeout_s:.0f}s") from e
            except errors.OrchestratorError:
                raise
            except Exception as e:
                gen.cancel()
                raise self._upstream_error(model, e) from e
            handed_off = True
            return StreamingResponse(
                self._relay(gen, model, endpoint, started),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        except errors.OrchestratorError as e:
            status = e.status
            raise
        finally:
            if not handed_off:
                gauge.dec()
                self.metrics.requests.labels(model, endpoint, str(status)).inc()
                self.metrics.latency.labels(model, endpoint).observe(time.perf_counter() - started)

    def _upstream_error(self, model: str, exc: BaseException) -> errors.OrchestratorError:
        if _is_replica_failure(exc):
            log.warning("model %s: replica unavailable: %r", model, exc)
            return errors.NoReadyReplica(f"The model '{model}' has no replica able to answer now; retry shortly")
        log.error("model %s: upstream error: %r", model, exc)
        return errors.OrchestratorError("The server had an error while processing your request.")

    async def _relay(self, gen, model: str, endpoint: str, started: float):
        """Pass the replica's SSE bytes through; on a mid-stream failure, end cleanly."""
        status = "200"
        first = True
        try:
            async for chunk in gen:
                if first:
                    self.metrics.ttft.labels(model, endpoint).observe(time.perf_counter() - started)
                    first = False
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            gen.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - the replica died mid-stream
            status = "503"
            log.warning("model %s: stream broke: %r", model, e)
            error = errors.envelope("The model server stopped while streaming; retry the request.", 503)
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        finally:
            self.metrics.in_flight.labels(model).dec()
            self.metrics.requests.labels(model, endpoint, status).inc()
            self.metrics.latency.labels(model, endpoint).observe(time.perf_counter() - started)

    # -- operations -------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def _replica_states(self) -> dict[str, dict[str, int]]:
        """Replica counts by state per model, from Serve's controller (cached briefly)."""
        now = time.monotonic()
        if self._status_cache and now - self._status_cache[0] < _STATUS_CACHE_S:
            return self._status_cache[1]
        from ray import serve

        def read() -> dict[str, dict[str, int]]:
            status = serve.status()
            app_name = serve.get_replica_context().app_name
            app = status.applications.get(app_name)
            out: dict[str, dict[str, int]] = {}
            for model, dep_name in self._deployment_names.items():
                dep = app.deployments.get(dep_name) if app else None
                states = {str(getattr(k, "value", k)): v for k, v in (dep.replica_states if dep else {}).items()}
                out[model] = states
            return out

        states = await asyncio.to_thread(read)
        self._status_cache = (now, states)
        return states

    @api.get("/ready")
    async def ready(self) -> JSONResponse:
        states = await self._replica_states()
        waiting = [m.name for m in self.fleet.models
                   if states.get(m.name, {}).get("RUNNING", 0) < 1 and m.autoscaling.min_replicas > 0]
        if waiting:
            body = errors.envelope(f"Models without a ready replica: {', '.join(waiting)}", 503,
                                   code="model_not_ready")
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready"})

    @api.get("/fleet")
    async def fleet_status(self) -> JSONResponse:
        states = await self._replica_states()
        models = []
        for m in self.fleet.models:
            s = states.get(m.name, {})
            models.append({
                "name": m.name,
                "task": m.task,
                "source": m.source,
                "replicas": {
                    "running": s.get("RUNNING", 0),
                    "starting": s.get("STARTING", 0) + s.get("UPDATING", 0) + s.get("RECOVERING", 0),
                    "target": max(m.autoscaling.min_replicas, 1),
                },
                "routing": {"policy": m.routing.policy},
            })
        return JSONResponse({"models": models})

    @api.get("/metrics")
    async def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        parts = [generate_latest(self.metrics.registry).decode()]

        async def engine_text(name: str) -> str:
            try:
                return await asyncio.wait_for(self.handles[name].metrics_text.remote(), 5)
            except Exception as e:  # noqa: BLE001 - a replica starting or gone: skip it
                log.debug("metrics of %s unavailable: %r", name, e)
                return ""

        texts = await asyncio.gather(*(engine_text(m.name) for m in self.fleet.models))
        parts.append(merge_exposition(texts))
        return Response("".join(parts), media_type=CONTENT_TYPE_LATEST)
