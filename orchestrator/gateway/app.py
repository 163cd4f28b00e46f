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
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator import console_logging, errors, routing, wire
from orchestrator.gateway.admission import Admission
from orchestrator.gateway.admission import RequestContext as _RequestContext
from orchestrator.gateway.admission import request_id as _request_id
from orchestrator.metrics import GatewayMetrics, merge_exposition, spec_decode_rates, spec_decode_totals
from orchestrator.spec import FleetSpec, ModelSpec

log = logging.getLogger("orchestrator.gateway")

_STATUS_CACHE_S = 1.0
# A stream whose replica has not answered within HOLD_NOTICE_S is held: the gateway sends
# the response head and an SSE comment every KEEPALIVE_S until a replica takes it.
HOLD_NOTICE_S = 1.0
KEEPALIVE_S = 5.0
CALL_END_GRACE_S = 10.0  # a direct stream's call may end this long after its body did
# How often a held non-streaming request re-checks its model's readiness.
HOLD_CHECK_S = 1.0
COLD_START_RETRY_AFTER_S = 10

api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = errors.to_envelope(exc)
    if status >= 500 and not isinstance(exc, errors.OrchestratorError):
        log.error("unhandled error: %r", exc, exc_info=exc)
    return JSONResponse(body, status_code=status, headers=headers)


@api.exception_handler(errors.OrchestratorError)
async def _orchestrator_error(request: Request, exc: errors.OrchestratorError) -> JSONResponse:
    response = error_response(exc)
    ctx = getattr(request.state, "ctx", None)
    if ctx is not None and ctx.echo_id:
        response.headers["x-request-id"] = ctx.request_id
    return response


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


def _is_replica_death(exc: BaseException) -> bool:
    """The replica's process died or became unreachable: a request it had not answered
    produced nothing, so it is safe to send once more to another replica."""
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError))


def _error_event(exc: errors.OrchestratorError) -> bytes:
    """An error inside an SSE stream (the status line is already sent): OpenAI's envelope
    as a data event, then ``[DONE]``. The openai SDK raises it as an ``APIError``."""
    _, body, _ = errors.to_envelope(exc)
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


async def _drain_call(gen) -> None:
    """Run a streaming call to its end (a direct stream's call yields nothing after its status)."""
    async for _ in gen:
        pass


class _GuardedStream(StreamingResponse):
    """A stream response whose ``abandoned`` callback runs if its body never started.

    Cancelled before its first step (the client left while the response head was being
    sent), an async generator is dropped without running its ``finally``, which is where a
    stream cancels its call (vLLM would otherwise generate the whole answer for nobody)
    and releases its bookkeeping (the routers' in-flight count, which would otherwise
    keep that replica looking one request busier for good)."""

    def __init__(self, content, ctx: _RequestContext, abandoned, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._ctx = ctx
        self._abandoned = abandoned

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._ctx.body_started:
                self._abandoned()


def _app_name() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside a Serve replica
        return None


def _replica_id() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve
        return None


# Serve's replica states of a replica on its way to RUNNING.
STARTING_STATES = ("STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")
# A failure recorded before a request began waiting ends that wait only once nothing has
# been starting for this long (Serve retries, or starts a replica for the new demand).
STALE_FAILURE_GRACE_S = 10.0


def start_failure_applies(failure: dict[str, Any] | None, waiting_since: float, waited_s: float,
                          starting: int) -> bool:
    """Whether a held request should end with a model's last start failure: one recorded
    while it waited (``waiting_since``, wall clock), or an older one while no replica has
    been starting for STALE_FAILURE_GRACE_S of its wait (Serve gave up)."""
    if not failure:
        return False
    if float(failure.get("at") or 0) >= waiting_since:
        return True
    return starting == 0 and waited_s >= STALE_FAILURE_GRACE_S


class _Hold:
    """A request waiting for a replica: counts it in ``slm_requests_held`` while its model has
    no ready replica, and says when waiting must end (cold start or request timeout)."""

    def __init__(self, gateway: Gateway, spec: ModelSpec, started: float):
        self.gateway, self.spec, self.started = gateway, spec, started
        self.held = False

    async def check(self) -> errors.OrchestratorError | None:
        elapsed = time.perf_counter() - self.started
        name = self.spec.name
        if elapsed >= self.gateway.timeout_s:
            return errors.UpstreamTimeout(f"The model '{name}' did not answer within {self.gateway.timeout_s:.0f}s")
        if await self.gateway._has_ready_replica(name):
            return None
        if not self.held:
            self.held = True
            self.gateway.metrics.held.labels(name).inc()
        failure = await self.gateway._start_failure(name)
        states = (await self.gateway._replica_states()).get(name, {})
        starting = sum(states.get(k, 0) for k in STARTING_STATES)
        if start_failure_applies(failure, time.time() - elapsed, elapsed, starting):
            return errors.ModelStartFailed(
                f"The model '{name}' cannot start: {failure.get('error')} ({failure.get('advice')})")
        if elapsed >= self.spec.autoscaling.cold_start_timeout_s:
            return errors.NoReadyReplica(
                f"The model '{name}' has no ready replica after {self.spec.autoscaling.cold_start_timeout_s:g}s "
                "(cold start); retry later",
                retry_after_s=COLD_START_RETRY_AFTER_S,
            )
        return None

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gateway.metrics.held.labels(self.spec.name).dec()


class Gateway:
    """The ingress deployment. ``handles`` maps model name to its deployment's handle;
    ``lanes`` maps each fast-lane model to the application its deployment is in."""

    def __init__(self, fleet: dict[str, Any], handles: dict[str, Any], deployment_names: dict[str, str],
                 lanes: dict[str, str] | None = None):
        console_logging()
        self.fleet = FleetSpec.model_validate(fleet)
        self.handles = dict(handles)
        self._model_apps = dict(lanes or {})  # models deployed outside this application
        if self._model_apps:
            from ray import serve

            for model, app in self._model_apps.items():
                # Not checked against the controller: that application deploys alongside this
                # one and may not be registered yet; calls wait for its replicas like any other.
                self.handles[model] = serve.get_deployment_handle(deployment_names[model], app_name=app,
                                                                  _check_exists=False)
        self.stream_handles = {name: h.options(stream=True) for name, h in self.handles.items()}
        self.metrics = GatewayMetrics()
        self.timeout_s = self.fleet.gateway.request_timeout_s
        self._created = int(time.time())
        self._status_cache: tuple[float, dict[str, dict[str, int]]] | None = None
        self._deployment_names = dict(deployment_names)
        self._app_name = _app_name()
        self._state_actor = None
        self._state_cache: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._static_views: dict[str, dict[str, Any]] | None = None
        self._replica = _replica_id()
        self.admission = Admission(self.fleet, self._app_name, self._replica)
        self._refresher: asyncio.Future | None = None
        self._inbox = wire.Inbox() if wire.enabled() else None
        self._inbox_starting: asyncio.Future | None = None
        self._ensure_state_actor()

    def _finish(self, ctx: _RequestContext) -> None:
        """Release the stream in the routers' view, then the request's admission bookkeeping."""
        routing.IN_FLIGHT.finished(ctx.track)
        self.admission.finish(ctx)

    # -- OpenAI endpoints -------------------------------------------------------------

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        key = self.admission.authenticate(request)
        data = [
            {"id": m.name, "object": "model", "created": self._created, "owned_by": "slm-orchestrator",
             "task": m.task}
            for m in self.fleet.models if key is None or key.allows(m.name)
        ]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/v1/models/{model:path}")
    async def get_model(self, model: str, request: Request) -> JSONResponse:
        key = self.admission.authenticate(request)
        if self.fleet.model(model) is None or (key is not None and not key.allows(model)):
            raise errors.UnknownModel(model)
        return JSONResponse({"id": model, "object": "model", "created": self._created,
                             "owned_by": "slm-orchestrator", "task": self.fleet.model(model).task})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward(request, "completions")

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self._forward(request, "embeddings")

    async def _check_queue(self, spec: ModelSpec) -> None:
        """Admission control: a quick 503 while the model's queue is past its bound, so the
        requests already admitted keep a bounded latency."""
        bound = spec.limits.max_queue_per_replica or self.fleet.gateway.limits.max_queue_per_replica
        if bound is None:
            return
        # Never wait on the control plane here: read the views a background task of this
        # gateway replica refreshes every _STATUS_CACHE_S (so they are at most ~1 s old, also
        # on a replica that has been idle), fetching them inline only on the very first call.
        if self._state_cache is None or self._status_cache is None:
            await asyncio.gather(self._autoscaler_state(), self._replica_states())
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.ensure_future(self._refresh_views())
        snapshot = self._state_cache[1].get(spec.name) or {}
        running = self._status_cache[1].get(spec.name, {}).get("RUNNING", 0)
        queue = snapshot.get("queue_depth", 0.0)
        if running and queue >= bound * running:
            self.metrics.rejected.labels(spec.name).inc()
            raise errors.Overloaded(f"The model '{spec.name}' is at capacity ({queue:g} requests queued for "
                                    f"{running} replicas, limit {bound} each); retry shortly")

    async def _refresh_views(self) -> None:
        """Keep the cached fleet views fresh for admission control (runs for the replica's life)."""
        while True:
            await asyncio.sleep(_STATUS_CACHE_S)
            try:
                await asyncio.gather(self._autoscaler_state(max_age=0), self._replica_states(max_age=0))
            except Exception as e:  # noqa: BLE001 - keep the last views and try again
                log.warning("fleet status refresh failed: %r", e)

    async def _forward(self, request: Request, endpoint: str) -> Response:
        started = time.perf_counter()
        ctx = _RequestContext(*_request_id(request), endpoint, started)
        request.state.ctx = ctx
        try:
            ctx.key = self.admission.authenticate(request)
            payload, spec, stream = await self.admission.read(request, endpoint, ctx.key)
            ctx.model, ctx.stream = spec.name, stream
            if self.admission.audit is not None and self.admission.audit.include_prompts:
                ctx.body = payload
            await self.admission.admit(ctx, payload)
            await self._check_queue(spec)
        except errors.OrchestratorError as e:
            ctx.status = e.status
            self._finish(ctx)
            raise
        if ctx.echo_id:
            ctx.headers["x-request-id"] = ctx.request_id
        return await self._serve(ctx, endpoint, payload, spec, stream, request)

    async def _serve(self, ctx: _RequestContext, endpoint: str, payload: dict[str, Any], spec: ModelSpec,
                     stream: bool, request: Request) -> Response:
        started = ctx.started
        model = spec.name
        key = routing.route_key(spec.routing.policy, endpoint, payload, request.headers, spec.routing.prefix_chars)
        self.metrics.in_flight.labels(model).inc()
        handed_off = False
        status: int | str = 500
        inbox: wire.InboxStream | None = None
        try:
            if not stream:
                status, answer = await self._call(spec, endpoint, payload, key, started)
                ctx.note_usage(answer)
                return Response(answer, status_code=status, media_type="application/json", headers=ctx.headers)
            inbox = await self._open_inbox_stream()
            ctx.track = uuid.uuid4().hex
            gen = self.stream_handles[model].stream.remote(endpoint, payload, route_key=key,
                                                           reply_to=inbox.reply_to if inbox else None, track=ctx.track)
            first = asyncio.ensure_future(gen.__anext__())
            try:
                done, _ = await asyncio.wait({first}, timeout=HOLD_NOTICE_S)
            except asyncio.CancelledError:  # the client left before the stream began
                first.cancel()
                gen.cancel()
                raise
            if not done:
                # No replica has taken it yet (cold model, or all replicas busy): answer
                # now and keep the connection alive while it waits.
                handed_off = True
                return _GuardedStream(
                    self._held_stream(first, gen, spec, endpoint, started, ctx, inbox), ctx,
                    lambda: self._abandon(ctx, model, endpoint, gen, inbox, first),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **ctx.headers},
                )
            try:
                status, media_type, body_inbox = self._started(model, first.result(), inbox)
                if media_type != "text/event-stream":
                    answer = await asyncio.wait_for(gen.__anext__(), self.timeout_s)
                    return Response(answer, status_code=status, media_type=media_type, headers=ctx.headers)
            except asyncio.TimeoutError as e:
                gen.cancel()
                raise errors.UpstreamTimeout(f"The model '{model}' did not answer within {self.timeout_s:.0f}s") from e
            except Exception as e:
                gen.cancel()
                raise self._upstream_error(model, e) from e
            handed_off = True
            return _GuardedStream(
                self._relay(gen, model, endpoint, started, ctx, body_inbox), ctx,
                lambda: self._abandon(ctx, model, endpoint, gen, body_inbox),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **ctx.headers},
            )
        except errors.OrchestratorError as e:
            status = e.status
            e.headers = {**e.headers, **ctx.headers}
            raise
        finally:
            if not handed_off:
                self._end_request(ctx, model, endpoint, status, inbox)

    async def _call(self, spec: ModelSpec, endpoint: str, payload: dict[str, Any], key: str | None,
                    started: float) -> tuple[int, bytes]:
        """A non-streaming request, held while its model has no ready replica; retried once
        on another replica if its replica dies before answering (nothing was sent yet, so the
        client sees one answer). Serve's router drops a dead replica when a call to it fails."""
        for attempt in (1, 2):
            track = uuid.uuid4().hex
            response = self.handles[spec.name].call.remote(endpoint, payload, route_key=key, track=track)
            task = asyncio.ensure_future(response)
            try:
                status, answer = await self._await_held(task, spec, started)
                if attempt == 1 and status == 503 and b'"engine_unavailable"' in answer:
                    log.warning("model %s: engine dead before answering; retrying once", spec.name)
                    self.metrics.retries.labels(spec.name).inc()
                    continue
                return status, answer
            except errors.OrchestratorError:
                raise
            except Exception as e:
                if attempt == 1 and _is_replica_death(e):
                    log.warning("model %s: replica died before answering; retrying once: %r", spec.name, e)
                    self.metrics.retries.labels(spec.name).inc()
                    continue
                raise self._upstream_error(spec.name, e) from e
            finally:
                routing.IN_FLIGHT.finished(track)
                if not task.done():
                    task.cancel()
                    response.cancel()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _await_held(self, task: asyncio.Future, spec: ModelSpec, started: float):
        """``task``'s result; 503 once cold_start_timeout_s passes with no ready replica, 504
        at request_timeout_s."""
        hold = _Hold(self, spec, started)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=HOLD_CHECK_S)
                if done:
                    return task.result()
                failure = await hold.check()
                if failure is not None:
                    raise failure
        finally:
            hold.release()

    async def _held_stream(self, first: asyncio.Future, gen, spec: ModelSpec, endpoint: str, started: float,
                           ctx: _RequestContext, inbox: wire.InboxStream | None):
        """A stream waiting for a replica: SSE comments until it starts, then the stream."""
        ctx.body_started = True
        model = spec.name
        relayed = False
        status = "200"
        hold = _Hold(self, spec, started)
        try:
            yield f": waiting for a replica of '{model}'\n\n".encode()
            while not first.done():
                done, _ = await asyncio.wait({first}, timeout=KEEPALIVE_S)
                if done:
                    break
                failure = await hold.check()
                if failure is not None:
                    status = str(failure.status)
                    first.cancel()
                    gen.cancel()
                    yield _error_event(failure)
                    return
                yield f": waiting for a replica of '{model}' ({time.perf_counter() - started:.0f}s)\n\n".encode()
            hold.release()
            try:
                code, media_type, body_inbox = self._started(model, first.result(), inbox)
                if media_type != "text/event-stream":
                    body = await asyncio.wait_for(gen.__anext__(), self.timeout_s)
                    status = str(code)
                    yield b"data: " + body + b"\n\ndata: [DONE]\n\n"
                    return
            except Exception as e:  # noqa: BLE001 - becomes an error event
                gen.cancel()
                failure = e if isinstance(e, errors.OrchestratorError) else self._upstream_error(model, e)
                status = str(failure.status)
                yield _error_event(failure)
                return
            relayed = True
            async for chunk in self._relay(gen, model, endpoint, started, ctx, body_inbox):
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            hold.release()
            if not first.done():
                first.cancel()
                gen.cancel()
            if not relayed:
                self._end_request(ctx, model, endpoint, status, inbox)

    def _abandon(self, ctx: _RequestContext, model: str, endpoint: str, gen, inbox: wire.InboxStream | None,
                 first: asyncio.Future | None = None) -> None:
        """What a stream's generator does as it ends, for one that never started."""
        if first is not None and not first.done():
            first.cancel()
        gen.cancel()
        self._end_request(ctx, model, endpoint, "cancelled", inbox)

    def _end_request(self, ctx: _RequestContext, model: str, endpoint: str, status: int | str,
                     inbox: wire.InboxStream | None = None) -> None:
        """A served request's end, however it ended: its inbox stream closed, its metrics
        counted (``status``: an HTTP code or "cancelled"), its bookkeeping released."""
        if inbox is not None:
            inbox.close()
        self.metrics.in_flight.labels(model).dec()
        self.metrics.requests.labels(model, endpoint, str(status)).inc()
        self.metrics.latency.labels(model, endpoint).observe(time.perf_counter() - ctx.started)
        ctx.status = status
        self._finish(ctx)

    def _upstream_error(self, model: str, exc: BaseException) -> errors.OrchestratorError:
        if _is_replica_failure(exc):
            log.warning("model %s: replica unavailable: %r", model, exc)
            return errors.NoReadyReplica(f"The model '{model}' has no replica able to answer now; retry shortly")
        log.error("model %s: upstream error: %r", model, exc)
        return errors.OrchestratorError("The server had an error while processing your request.")

    def _started(self, model: str, first: tuple[int, str, bool], inbox: wire.InboxStream | None
                 ) -> tuple[int, str, wire.InboxStream | None]:
        """A stream call's first item: (status, media type, the inbox its body comes to, or
        None when it comes through Ray). Counts the stream by its transport."""
        status, media_type, direct = first
        if media_type == "text/event-stream":
            self.metrics.streams.labels(model, "direct" if direct else "ray").inc()
        if not direct and inbox is not None:
            inbox.close()  # the replica streams through Ray (fallback)
            inbox = None
        return status, media_type, inbox

    async def _open_inbox_stream(self) -> wire.InboxStream | None:
        """A stream in this replica's inbox (started on first use), or None to take bodies
        through Ray (``SLM_STREAM_TRANSPORT=ray``, or the inbox could not start)."""
        if self._inbox is None:
            return None
        if not self._inbox.started:
            if self._inbox_starting is None:
                self._inbox_starting = asyncio.ensure_future(self._inbox.start())
            try:
                address = await asyncio.shield(self._inbox_starting)
                log.info("stream inbox listening on %s", address)
            except OSError as e:
                log.error("stream inbox could not start (%r); stream bodies go through Ray", e)
                self._inbox = None
                return None
        return self._inbox.open()

    @staticmethod
    async def _direct_body(gen, inbox: wire.InboxStream):
        """A stream's body from the inbox; the Ray call (``gen``) is watched so that a replica
        that dies before its END frame ends the stream with an error, not a hang."""
        def finished(call: asyncio.Future) -> None:
            if not call.cancelled():
                inbox.call_finished(call.exception())

        watcher = asyncio.ensure_future(_drain_call(gen))
        watcher.add_done_callback(finished)
        ended = False
        try:
            while (data := await inbox.read()) is not None:
                yield data
            ended = True
        finally:
            if not watcher.done():
                if ended:
                    # The body is complete and its call ends right after it: let it end
                    # (cancelling would count a finished request as cancelled in Serve and
                    # cost both replicas a cancellation); only a call that hangs is cut.
                    asyncio.get_running_loop().call_later(CALL_END_GRACE_S, watcher.cancel)
                else:
                    watcher.cancel()

    async def _relay(self, gen, model: str, endpoint: str, started: float, ctx: _RequestContext,
                     inbox: wire.InboxStream | None = None):
        """Pass the replica's SSE bytes through (from the inbox when the replica streams
        directly, else from the Ray call); on a mid-stream failure, end cleanly."""
        ctx.body_started = True
        status = "200"
        first = True
        try:
            async for chunk in (self._direct_body(gen, inbox) if inbox is not None else gen):
                if first:
                    self.metrics.ttft.labels(model, endpoint).observe(time.perf_counter() - started)
                    first = False
                ctx.note_usage(chunk)
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            gen.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - the replica died mid-stream
            status = "503"
            log.warning("model %s: stream broke: %r", model, e)
            yield _error_event(errors.NoReadyReplica("The model server stopped while streaming; retry the request."))
        finally:
            self._end_request(ctx, model, endpoint, status, inbox)

    # -- operations -------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def _replica_states(self, max_age: float = _STATUS_CACHE_S) -> dict[str, dict[str, int]]:
        """Replica counts by state per model, from Serve's controller (cached briefly)."""
        now = time.monotonic()
        if self._status_cache and now - self._status_cache[0] < max_age:
            return self._status_cache[1]
        from ray import serve

        def read() -> dict[str, dict[str, int]]:
            status = serve.status()
            own = serve.get_replica_context().app_name
            out: dict[str, dict[str, int]] = {}
            for model, dep_name in self._deployment_names.items():
                app = status.applications.get(self._model_apps.get(model, own))
                dep = app.deployments.get(dep_name) if app else None
                states = {str(getattr(k, "value", k)): v for k, v in (dep.replica_states if dep else {}).items()}
                out[model] = states
            return out

        states = await asyncio.to_thread(read)
        self._status_cache = (now, states)
        return states

    async def _has_ready_replica(self, model: str) -> bool:
        states = await self._replica_states()
        return states.get(model, {}).get("RUNNING", 0) > 0

    async def _start_failure(self, model: str) -> dict[str, Any] | None:
        """Why ``model``'s last replica start failed, while no replica of it has started since."""
        return (await self._autoscaler_state()).get(model, {}).get("start_failure")

    def _ensure_state_actor(self):
        if self._state_actor is None and self._app_name:
            try:
                from orchestrator.autoscaling import state

                self._state_actor = state.get_or_create(self._app_name)
            except Exception as e:  # noqa: BLE001 - visibility only
                log.warning("fleet state actor unavailable: %r", e)
        return self._state_actor

    async def _autoscaler_state(self, max_age: float = _STATUS_CACHE_S) -> dict[str, dict[str, Any]]:
        """What each model's autoscaling policy last published (cached briefly)."""
        now = time.monotonic()
        if self._state_cache and now - self._state_cache[0] < max_age:
            return self._state_cache[1]
        snapshot: dict[str, dict[str, Any]] = {}
        actor = self._ensure_state_actor()
        if actor is not None:
            try:
                snapshot = await asyncio.wait_for(actor.snapshot.remote(), 2)
            except Exception as e:  # noqa: BLE001 - recreate it next time
                log.warning("fleet state read failed: %r", e)
                self._state_actor = None
        self._state_cache = (now, snapshot)
        return snapshot

    def _describe_models(self) -> dict[str, dict[str, Any]]:
        """What /fleet shows of each model that does not change while it runs: engine
        parallelism and precision, size (from its config, GGUF header or the catalog)."""
        from orchestrator import footprint
        from orchestrator.app import lane_route_prefix
        from orchestrator.engine.args import engine_choices

        out = {}
        for m in self.fleet.models:
            shape = None
            try:
                shape = footprint.source_shape(m.source)
            except Exception as e:  # noqa: BLE001 - a description must not break /fleet
                log.debug("no shape for %s: %r", m.name, e)
            view: dict[str, Any] = {
                "engine": {
                    "tensor_parallel_size": m.tensor_parallel_size,
                    "quantization": footprint.source_quantization(m.source, m.engine) or None,
                },
                "footprint": None,
                # Where the model's replicas answer HTTP themselves (None: only through /v1).
                "fast_lane": f"{lane_route_prefix(m.name)}/v1" if m.fast_lane else None,
            }
            if shape is not None:
                params = shape.parameters()
                dtype = m.engine.get("dtype") or engine_choices(m).get("dtype")  # as served
                view["footprint"] = {
                    "dtype": dtype or shape.dtype,
                    "parameters": params,
                    "size_class": footprint.size_class(params),
                    "weight_bytes": footprint.weight_bytes(shape, dtype, m.engine.get("quantization")),
                    "kv_bytes_per_token": footprint.kv_bytes_per_token(shape, m.engine.get("kv_cache_dtype") or dtype),
                }
            out[m.name] = view
        return out

    @staticmethod
    def _kv_view(m: ModelSpec, footprint: dict[str, Any] | None, planned: dict[str, Any] | None) -> dict[str, Any]:
        """A replica's KV-cache space and where it comes from: what the replica planned (the
        fleet's memory plan, or the fleet's own setting), else vLLM's own sizing."""
        if planned:
            return {k: planned.get(k) for k in ("kv_cache_bytes", "kv_cache_tokens", "kv_cache_source",
                                                "kv_cache_floor_bytes", "kv_cache_target_bytes")}
        explicit = m.engine.get("kv_cache_memory_bytes")
        per_token = (footprint or {}).get("kv_bytes_per_token")
        return {"kv_cache_bytes": explicit, "kv_cache_source": "engine.kv_cache_memory_bytes" if explicit else "vllm",
                "kv_cache_tokens": explicit // per_token if explicit and per_token else None}

    async def _model_views(self, engine_texts: list[str] | None = None) -> list[dict[str, Any]]:
        if self._static_views is None:
            self._static_views = await asyncio.to_thread(self._describe_models)
        speculating = any(m.speculative for m in self.fleet.models)
        if engine_texts is None and speculating:
            engine_texts = await self._engine_metrics()
        spec_totals = spec_decode_totals(engine_texts or []) if speculating else {}
        states, scaler = await asyncio.gather(self._replica_states(), self._autoscaler_state())
        views = []
        for m in self.fleet.models:
            s = states.get(m.name, {})
            snap = scaler.get(m.name) or {}
            static = self._static_views.get(m.name, {})
            running = s.get("RUNNING", 0)
            starting = sum(s.get(k, 0) for k in STARTING_STATES)
            target = (snap.get("replicas") or {}).get("target", m.autoscaling.min_replicas)
            if running == 0:
                # Serve starts a model at zero without consulting the policy (cold start).
                target = max(target, starting)
            a = m.autoscaling
            views.append({
                "name": m.name,
                "task": m.task,
                "source": m.source,
                "queue_depth": snap.get("queue_depth", 0.0),
                "replicas": {
                    "running": running,
                    "starting": starting,
                    "draining": s.get("STOPPING", 0),
                    "target": target,
                    # Why the last replica start failed (cause, advice, log), until one starts.
                    "last_error": snap.get("start_failure"),
                },
                "autoscaling": {
                    "min_replicas": a.min_replicas,
                    "max_replicas": a.max_replicas,
                    "target_queue_depth": a.target_queue_depth,
                    "last_decision": snap.get("last_decision"),
                    "last_scale": snap.get("last_scale"),
                    "decisions": snap.get("decisions", {"up": 0, "down": 0}),
                },
                "routing": {"policy": m.routing.policy},
                **static,
                "footprint": {**(static.get("footprint") or {}),
                              **self._kv_view(m, static.get("footprint"), snap.get("memory"))},
                "speculative": self._speculative_view(m, spec_totals.get(m.name, {})),
            })
        return views

    @staticmethod
    def _speculative_view(m: ModelSpec, totals: dict[str, float]) -> dict[str, Any] | None:
        s = m.speculative
        if s is None:
            return None
        draft = s.draft.model_dump() if hasattr(s.draft, "model_dump") else s.draft
        return {"method": s.method_name, "draft": draft, "num_speculative_tokens": s.num_speculative_tokens,
                **spec_decode_rates(totals)}

    @api.get("/ready")
    async def ready(self) -> JSONResponse:
        """200 when every model can answer: a ready replica, or scaled to zero by design."""
        states = await self._replica_states()
        waiting = [m.name for m in self.fleet.models
                   if states.get(m.name, {}).get("RUNNING", 0) < 1 and m.autoscaling.min_replicas > 0]
        if waiting:
            body = errors.envelope(f"Models without a ready replica: {', '.join(waiting)}", 503,
                                   code="model_not_ready")
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready"})

    @api.get("/fleet")
    async def fleet_status(self, request: Request) -> JSONResponse:
        self.admission.authenticate(request, admin=True)
        return JSONResponse({"models": await self._model_views()})

    async def _engine_metrics(self) -> list[str]:
        """vLLM's metrics of every replica (pushed to the fleet state every few seconds);
        without that actor, of one replica per model, asked directly."""
        actor = self._ensure_state_actor()
        if actor is not None:
            try:
                texts = await asyncio.wait_for(actor.engine_metrics.remote(), 5)
                if texts:
                    return texts
            except Exception as e:  # noqa: BLE001
                log.warning("engine metrics from the fleet state failed: %r", e)

        async def engine_text(name: str) -> str:
            try:
                return await asyncio.wait_for(self.handles[name].metrics_text.remote(), 5)
            except Exception as e:  # noqa: BLE001 - a replica starting or gone: skip it
                log.debug("metrics of %s unavailable: %r", name, e)
                return ""

        return list(await asyncio.gather(*(engine_text(m.name) for m in self.fleet.models)))

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.admission.authenticate(request, admin=True)
        engine_texts = await self._engine_metrics()
        for view in await self._model_views(engine_texts):
            name = view["name"]
            spec = view.get("speculative") or {}
            if spec.get("acceptance_rate") is not None:
                self.metrics.spec_acceptance.labels(name).set(spec["acceptance_rate"])
                self.metrics.spec_tokens_per_step.labels(name).set(spec["accepted_tokens_per_step"])
            self.metrics.queue_depth.labels(name).set(view["queue_depth"])
            for state in ("running", "starting", "draining", "target"):
                self.metrics.replicas.labels(name, state).set(view["replicas"][state])
            for direction, count in view["autoscaling"]["decisions"].items():
                self.metrics.decisions.set(name, direction, count)
        parts = [generate_latest(self.metrics.registry).decode(), generate_latest(routing.REGISTRY).decode()]

        parts.append(merge_exposition(engine_texts))
        return Response("".join(parts), media_type=CONTENT_TYPE_LATEST)
