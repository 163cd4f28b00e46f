"""A request admitted at ``/v1``, from its model's replicas back to the client: hold it while
the model has no ready replica, retry once a call whose replica died before answering, and
relay a stream's bytes as they come (from the replica's direct channel, ``orchestrator.wire``,
or through Ray), ending a broken stream with an SSE error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from fastapi.responses import Response

from orchestrator import errors, wire
from orchestrator.gateway.admission import RequestContext
from orchestrator.gateway.fleet_view import FleetView
from orchestrator.gateway.http import SSE, GuardedStream, error_event
from orchestrator.gateway.queueing import Queues
from orchestrator.metrics import GatewayMetrics
from orchestrator.routing import policy as routing
from orchestrator.spec import ModelSpec

log = logging.getLogger("orchestrator.gateway")

# A stream whose replica has not answered within HOLD_NOTICE_S is held: the gateway sends
# the response head and an SSE comment every KEEPALIVE_S until a replica takes it.
HOLD_NOTICE_S = 1.0
KEEPALIVE_S = 5.0
CALL_END_GRACE_S = 10.0  # a direct stream's call may end this long after its body did
# How often a held non-streaming request re-checks its model's readiness.
HOLD_CHECK_S = 1.0
COLD_START_RETRY_AFTER_S = 10
# A failure recorded before a request began waiting ends that wait only once nothing has
# been starting for this long (Serve retries, or starts a replica for the new demand).
STALE_FAILURE_GRACE_S = 10.0


def _replica_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(errors meaning the replica failed, not the request: worth a 503; errors meaning its
    process died or became unreachable: a request it had not answered produced nothing, so
    it is safe to send once more to another replica)."""
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    except ImportError:  # pragma: no cover
        return (), ()
    death = (RayActorError, ActorDiedError, ActorUnavailableError)
    return death + (BackPressureError, DeploymentUnavailableError), death


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


class Hold:
    """A request waiting for a replica: counts it in ``slm_requests_held`` while its model has
    no ready replica, and says when waiting must end (cold start or request timeout)."""

    def __init__(self, relay: Relay, spec: ModelSpec, started: float):
        self.relay, self.spec, self.started = relay, spec, started
        self.held = False

    async def check(self) -> errors.OrchestratorError | None:
        elapsed = time.perf_counter() - self.started
        name, timeout_s = self.spec.name, self.relay.timeout_s
        if elapsed >= timeout_s:
            return errors.UpstreamTimeout(f"The model '{name}' did not answer within {timeout_s:.0f}s")
        try:
            return await self._check_replicas(elapsed)
        except Exception as e:  # noqa: BLE001 - the control plane slow or away: keep waiting
            log.warning("model %s: readiness check failed (%r); still waiting", name, e)
            return None

    async def _check_replicas(self, elapsed: float) -> errors.OrchestratorError | None:
        name, view = self.spec.name, self.relay.view
        if await view.has_ready_replica(name):
            return None
        if not self.held:
            self.held = True
            self.relay.metrics.held.labels(name).inc()
        failure = await view.start_failure(name)
        if start_failure_applies(failure, time.time() - elapsed, elapsed, await view.starting_replicas(name)):
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
            self.relay.metrics.held.labels(self.spec.name).dec()


def retry_headers(headers: dict[str, str], status: int) -> dict[str, str]:
    """A replica's 503 (an adapter still loading, or failed) with the ``Retry-After`` every
    503 of the gateway carries."""
    if status == 503 and "Retry-After" not in headers:
        return {**headers, "Retry-After": "2"}
    return headers


class Relay:
    """Serves admitted requests through the models' deployment handles. ``finish`` releases a
    request's admission bookkeeping once it ended, however it ended."""

    def __init__(self, handles: dict[str, Any], view: FleetView, metrics: GatewayMetrics, timeout_s: float,
                 finish: Callable[[RequestContext], None], queues: Queues | None = None):
        self.queues = queues
        self.handles = handles
        self.stream_handles = {name: h.options(stream=True) for name, h in handles.items()}
        self.view = view
        self.metrics = metrics
        self.timeout_s = timeout_s
        self._finish = finish
        self.in_flight: Counter[str] = Counter()  # per model, for admission control's fallback
        self._failure_errors, self._death_errors = _replica_errors()
        self._inbox = wire.Inbox() if wire.enabled() else None
        self._inbox_starting: asyncio.Future | None = None

    async def serve(self, ctx: RequestContext, endpoint: str, payload: dict[str, Any], spec: ModelSpec,
                    stream: bool, route_key: str | None) -> Response:
        started = ctx.started
        model = spec.name  # the deployment; metrics use the requested name (a LoRA adapter's own)
        self.metrics.in_flight.labels(ctx.model or model).inc()
        self.in_flight[model] += 1
        handed_off = False
        status: int | str = 500
        inbox: wire.InboxStream | None = None
        try:
            waiting = ctx.ticket is not None and ctx.ticket.state == "waiting"
            if waiting and stream and not await self.queues.wait(model, ctx.ticket, HOLD_NOTICE_S):
                # Its model is full: answer now and keep the connection alive while it waits.
                handed_off = True
                return GuardedStream(self._queued_stream(ctx, spec, endpoint, payload, route_key), ctx,
                                     lambda: self._end_request(ctx, model, endpoint, "cancelled"), ctx.headers)
            if waiting and not stream:
                await self._queued(ctx, spec)
            if not stream:
                status, answer = await self._call(spec, endpoint, payload, route_key, started)
                ctx.note_usage(answer)
                return Response(answer, status_code=status, media_type="application/json",
                                headers=retry_headers(ctx.headers, status))
            inbox = await self._open_inbox_stream()
            ctx.track = uuid.uuid4().hex
            gen = self.stream_handles[model].stream.remote(endpoint, payload, route_key=route_key,
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
                return GuardedStream(self._held_stream(first, gen, spec, endpoint, started, ctx, inbox), ctx,
                                     lambda: self._abandon(ctx, model, endpoint, gen, inbox, first), ctx.headers)
            try:
                status, media_type, body_inbox = self._started(ctx.model or model, first.result(), inbox)
                if media_type != SSE:
                    answer = await asyncio.wait_for(gen.__anext__(), self.timeout_s)
                    return Response(answer, status_code=status, media_type=media_type,
                                    headers=retry_headers(ctx.headers, status))
            except asyncio.TimeoutError as e:
                gen.cancel()
                raise errors.UpstreamTimeout(f"The model '{model}' did not answer within {self.timeout_s:.0f}s") from e
            except Exception as e:
                gen.cancel()
                raise self._upstream_error(model, e) from e
            handed_off = True
            return GuardedStream(self._relay(gen, model, endpoint, started, ctx, body_inbox), ctx,
                                 lambda: self._abandon(ctx, model, endpoint, gen, body_inbox), ctx.headers)
        except errors.OrchestratorError as e:
            status = e.status
            e.headers = {**e.headers, **ctx.headers}
            raise
        except asyncio.CancelledError:  # the client left (waiting in the queue, or for the answer)
            status = "cancelled"
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
                return await self._await_held(task, spec, started)
            except errors.OrchestratorError:
                raise
            except Exception as e:
                if attempt == 1 and isinstance(e, self._death_errors):
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

    async def _queued(self, ctx: RequestContext, spec: ModelSpec, step_s: float = HOLD_CHECK_S) -> None:
        """Wait in the model's fair queue for a slot (raises 503 past the class's max_wait_s,
        or as a held request at a cold model would)."""
        hold = Hold(self, spec, ctx.started)
        try:
            while not await self.queues.wait(spec.name, ctx.ticket, step_s):
                failure = await hold.check()
                if failure is not None:
                    raise failure
        finally:
            hold.release()

    async def _queued_stream(self, ctx: RequestContext, spec: ModelSpec, endpoint: str, payload: dict[str, Any],
                             route_key: str | None):
        """A stream waiting in its model's fair queue: SSE comments until it has a slot, then
        the stream (held further if no replica is ready)."""
        ctx.body_started = True
        model = spec.name
        hold = Hold(self, spec, ctx.started)
        granted, status = False, "cancelled"
        try:
            if self.view.running_replicas(model) == 0:  # a cold model: its queue waits for a replica
                yield f": waiting for a replica of '{model}' (queued, {ctx.cls})\n\n".encode()
            else:
                yield f": waiting in the queue of '{model}' ({ctx.cls})\n\n".encode()
            last = time.perf_counter()
            while True:
                try:
                    if await self.queues.wait(model, ctx.ticket, HOLD_CHECK_S):
                        break
                    failure = await hold.check()
                except errors.OrchestratorError as e:
                    failure = e
                if failure is not None:
                    status = str(failure.status)
                    yield error_event(failure)
                    return
                if time.perf_counter() - last >= KEEPALIVE_S:
                    last = time.perf_counter()
                    yield f": waiting in the queue of '{model}' ({last - ctx.started:.0f}s)\n\n".encode()
            try:
                inbox = await self._open_inbox_stream()
                ctx.track = uuid.uuid4().hex
                gen = self.stream_handles[model].stream.remote(endpoint, payload, route_key=route_key,
                                                               reply_to=inbox.reply_to if inbox else None,
                                                               track=ctx.track)
                first = asyncio.ensure_future(gen.__anext__())
            except Exception as e:  # noqa: BLE001 - becomes an error event
                failure = self._upstream_error(model, e)
                status = str(failure.status)
                yield error_event(failure)
                return
            granted = True  # from here _held_stream ends the request
        finally:
            hold.release()
            if not granted:
                self._end_request(ctx, model, endpoint, status)
        async for chunk in self._held_stream(first, gen, spec, endpoint, ctx.started, ctx, inbox):
            yield chunk

    async def _await_held(self, task: asyncio.Future, spec: ModelSpec, started: float):
        """``task``'s result; 503 once cold_start_timeout_s passes with no ready replica, 504
        at request_timeout_s."""
        hold = Hold(self, spec, started)
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
                           ctx: RequestContext, inbox: wire.InboxStream | None):
        """A stream waiting for a replica: SSE comments until it starts, then the stream."""
        ctx.body_started = True
        model = spec.name
        relayed = False
        status = "200"
        hold = Hold(self, spec, started)
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
                    yield error_event(failure)
                    return
                yield f": waiting for a replica of '{model}' ({time.perf_counter() - started:.0f}s)\n\n".encode()
            hold.release()
            try:
                code, media_type, body_inbox = self._started(model, first.result(), inbox)
                if media_type != SSE:
                    body = await asyncio.wait_for(gen.__anext__(), self.timeout_s)
                    status = str(code)
                    yield b"data: " + body + b"\n\ndata: [DONE]\n\n"
                    return
            except Exception as e:  # noqa: BLE001 - becomes an error event
                gen.cancel()
                failure = e if isinstance(e, errors.OrchestratorError) else self._upstream_error(model, e)
                status = str(failure.status)
                yield error_event(failure)
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
        async def drain() -> None:  # a direct stream's call yields nothing after its status
            async for _ in gen:
                pass

        def finished(call: asyncio.Future) -> None:
            if not call.cancelled():
                inbox.call_finished(call.exception())

        watcher = asyncio.ensure_future(drain())
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

    async def _relay(self, gen, model: str, endpoint: str, started: float, ctx: RequestContext,
                     inbox: wire.InboxStream | None = None):
        """Pass the replica's SSE bytes through (from the inbox when the replica streams
        directly, else from the Ray call); on a mid-stream failure, end cleanly."""
        ctx.body_started = True
        status = "200"
        first = True
        try:
            async for chunk in (self._direct_body(gen, inbox) if inbox is not None else gen):
                if first:
                    self.metrics.ttft.labels(ctx.model or model, endpoint).observe(time.perf_counter() - started)
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
            yield error_event(errors.NoReadyReplica("The model server stopped while streaming; retry the request."))
        finally:
            self._end_request(ctx, model, endpoint, status, inbox)

    def _abandon(self, ctx: RequestContext, model: str, endpoint: str, gen, inbox: wire.InboxStream | None,
                 first: asyncio.Future | None = None) -> None:
        """What a stream's generator does as it ends, for one that never started."""
        if first is not None and not first.done():
            first.cancel()
        gen.cancel()
        self._end_request(ctx, model, endpoint, "cancelled", inbox)

    def _end_request(self, ctx: RequestContext, model: str, endpoint: str, status: int | str,
                     inbox: wire.InboxStream | None = None) -> None:
        """A served request's end, however it ended: its inbox stream closed, its metrics
        counted (``status``: an HTTP code or "cancelled"), its bookkeeping released."""
        if inbox is not None:
            inbox.close()
        if self.queues is not None:
            self.queues.release(model, ctx.ticket)
        label = ctx.model or model
        self.metrics.in_flight.labels(label).dec()
        self.in_flight[model] -= 1
        self.metrics.requests.labels(label, endpoint, str(status)).inc()
        self.metrics.latency.labels(label, endpoint).observe(time.perf_counter() - ctx.started)
        for kind in ("prompt", "completion"):
            used = (ctx.usage or {}).get(f"{kind}_tokens")
            if isinstance(used, int) and used > 0:
                self.metrics.tokens.labels(label, kind).inc(used)
                self.metrics.key_tokens.labels(ctx.key.name if ctx.key else "anonymous", ctx.cls, kind).inc(used)
        ctx.status = status
        routing.IN_FLIGHT.finished(ctx.track)
        self._finish(ctx)

    def _upstream_error(self, model: str, exc: BaseException) -> errors.OrchestratorError:
        if isinstance(exc, self._failure_errors):
            log.warning("model %s: replica unavailable: %r", model, exc)
            return errors.NoReadyReplica(f"The model '{model}' has no replica able to answer now; retry shortly")
        log.error("model %s: upstream error: %r", model, exc)
        return errors.OrchestratorError("The server had an error while processing your request.")

    def _started(self, model: str, first: tuple[int, str, bool], inbox: wire.InboxStream | None
                 ) -> tuple[int, str, wire.InboxStream | None]:
        """A stream call's first item: (status, media type, the inbox its body comes to, or
        None when it comes through Ray). Counts the stream by its transport."""
        status, media_type, direct = first
        if media_type == SSE:
            self.metrics.streams.labels(model, "direct" if direct else "ray").inc()
        if not direct and inbox is not None:
            inbox.close()  # the replica streams through Ray (fallback)
            inbox = None
        return status, media_type, inbox
