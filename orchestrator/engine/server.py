"""The model worker: one Ray Serve replica owning one vLLM ``AsyncLLM`` engine.

Requests arrive from the gateway as the decoded JSON object and go through vLLM's own OpenAI
serving layer (``OpenAIServingChat``, ``OpenAIServingCompletion``, ``ServingEmbedding``),
so chat templates, stop strings, logprobs, response_format and tools behave exactly as in
``vllm serve``. Answers leave as bytes ready for the wire: the gateway relays them
without decoding.

Two entry points:

* ``call(endpoint, payload) -> (status, body_bytes)`` for non-streaming requests;
* ``stream(endpoint, payload, reply_to=...)``, an async generator that yields
  ``(status, media_type, direct)`` first, then either one error body or the SSE body. With
  ``direct`` the body goes straight to the gateway replica's inbox (``orchestrator.wire``:
  one pooled TCP connection, every stream's chunks of a loop tick in one write) and the
  generator returns when the body has ended; without it (no ``reply_to``, or the inbox
  cannot be reached) the SSE bytes are yielded through Ray, chunks produced while the
  previous one was in flight joined into one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from orchestrator import console_logging, errors, metrics, sources, startup, wire
from orchestrator.engine import openai_compat, speculative
from orchestrator.engine.args import accelerator, build_vllm_args, engine_environment
from orchestrator.spec import ModelSpec

log = logging.getLogger("orchestrator.engine")

JSON = "application/json"
SSE = "text/event-stream"

# OpenAI's documented parameter ranges that vLLM does not enforce itself.
_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "n": (1, 128),
    "max_tokens": (1, None),
    "max_completion_tokens": (1, None),
    "top_logprobs": (0, 20),
}


class EngineLoad:
    """The engine's queue as its scheduler last reported it, plus requests in this replica.

    vLLM reports ``SchedulerStats`` (running and waiting requests, KV-cache use) after each
    engine step through its stat-logger interface; ``logger_factory`` plugs this object in.
    An idle engine stops stepping, so when no request is in flight here the queue is 0
    whatever the last report said.
    """

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.in_flight = 0
        self.started = 0  # requests ever started here (tells the metrics push what changed)

    def record(self, scheduler_stats) -> None:
        if scheduler_stats is None:
            return
        self.running = scheduler_stats.num_running_reqs
        self.waiting = scheduler_stats.num_waiting_reqs + getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
        self.kv_cache_usage = scheduler_stats.kv_cache_usage

    @property
    def queue_depth(self) -> int:
        if self.in_flight == 0:
            return 0
        # Requests still being rendered/tokenized are not in the scheduler yet.
        return max(self.running + self.waiting, self.in_flight)

    def stats(self) -> dict[str, float]:
        busy = self.in_flight > 0
        return {
            "queue_depth": float(self.queue_depth),
            "running": float(self.running if busy else 0),
            "waiting": float(self.waiting if busy else 0),
            "in_flight": float(self.in_flight),
            "kv_cache_usage": float(self.kv_cache_usage if busy else 0.0),
        }

    def logger_factory(self):
        """A vLLM ``StatLoggerFactory`` whose loggers feed this object."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        load = self

        class _LoadLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                load.record(scheduler_stats)

            def log_engine_initialized(self):
                pass

        return _LoadLogger


def _check_ranges(payload: dict[str, Any]) -> None:
    for key, (low, high) in _RANGES.items():
        value = payload.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise errors.InvalidRequest(f"'{key}' must be {bound}; got {value}", param=key)


def _pydantic_error(exc: Exception) -> errors.InvalidRequest:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "tagged-union"))]
        # Unions report the member class as the first location part; drop it.
        loc = [p for p in loc if not re.fullmatch(r"[A-Z]\w*Request", p)]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        where = f"'{param}': " if param else ""
        return errors.InvalidRequest(f"Invalid request: {where}{msg}", param=param)
    return errors.InvalidRequest(f"Invalid request: {exc}")


def _error_field(body: bytes, status: int) -> dict[str, Any]:
    """The ``error`` object of a vLLM error body, or a stand-in when it has none."""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict):
            return {**error, "code": error.get("code") or status}
    except (ValueError, AttributeError):
        pass
    return {"message": "error", "code": status}


def _error_body(exc: BaseException) -> tuple[int, bytes]:
    status, body, _ = errors.to_envelope(exc)
    return status, json.dumps(body).encode()


def _node_cpus() -> float | None:
    """Logical CPUs (Ray's CPU resource) of the node this replica runs on."""
    try:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == node_id:
                return float(node.get("Resources", {}).get("CPU", 0)) or None
    except Exception:  # noqa: BLE001 - outside Ray: plan as if every replica shares the node
        return None
    return None


class ModelServer:
    """A replica of one model. Built by ``orchestrator.app`` as a Ray Serve deployment."""

    async def __init__(self, model: dict[str, Any], fleet_app: str | None = None,
                       memory_peers: list[dict[str, Any]] | None = None):
        """``memory_peers``: the CPU models this replica may share its node with (see
        ``orchestrator.memory.plan_inputs``); a CPU replica plans its KV cache from them."""
        self.spec = ModelSpec.model_validate(model)
        self._memory: dict[str, Any] = {}
        self._fleet_app = fleet_app  # whose fleet-state actor gets the metrics (default: this app's)
        console_logging()
        logs = startup.own_logs()
        log_path = next(reversed(logs), None)  # stderr's, where Ray's own errors go too
        try:
            await self._start(memory_peers)
        except Exception as e:  # noqa: BLE001 - summarised, then raised without the wrappers
            cause, advice = startup.diagnose(e, logs)
            failure = {"error": cause, "advice": advice, "log": log_path, "at": time.time()}
            log.error("model %s: failed to start: %s (%s; full log: %s)", self.spec.name, cause, failure["advice"],
                      log_path or "the replica's Ray worker log")
            engine = getattr(self, "engine", None)
            if engine is not None:
                with contextlib.suppress(Exception):
                    engine.shutdown()
                self.engine = None
            await self._report_start(failure)
            raise errors.ModelStartFailed(
                f"model '{self.spec.name}' failed to start: {cause} -- {failure['advice']} "
                f"(full log: {log_path or 'the replica Ray worker log'})") from None
        # In the background: a replica that starts before the gateway need not wait for it.
        self._start_report = asyncio.get_running_loop().create_task(self._report_start(None))

    async def _start(self, memory_peers: list[dict[str, Any]] | None) -> None:
        kv_cache_bytes = None
        if memory_peers and accelerator(self.spec) == "cpu":
            kv_cache_bytes = await asyncio.to_thread(self._plan_kv_cache, memory_peers)
        for key, value in engine_environment(self.spec).items():
            if key not in os.environ:  # the fleet's env (Ray sets it before this runs) wins
                os.environ[key] = value
                log.info("model %s: chose %s=%s (set env.%s in the fleet to override)", self.spec.name, key, value, key)
        path, revision = await asyncio.to_thread(sources.resolve, self.spec.source)
        draft = await asyncio.to_thread(speculative.resolve_draft, self.spec, path)
        engine_args, frontend_args, choices = build_vllm_args(self.spec, path, revision, draft, kv_cache_bytes)
        for key, value in choices.items():
            shown = f"{value!r} ({value / 2**30:.2f} GiB, the fleet's memory plan)" \
                if key == "kv_cache_memory_bytes" else repr(value)
            log.info("model %s: chose %s=%s (set engine.%s in the fleet to override)", self.spec.name, key, shown, key)
        self._engine_args = engine_args
        self.load = EngineLoad()
        self._outbox = wire.Outbox()
        self.engine = await self._start_engine(engine_args)
        await self._init_serving(engine_args, frontend_args)
        self._replica_id = self._make_replica_id()
        self._metrics_task = asyncio.get_running_loop().create_task(self._push_metrics())
        log.info("model %s: engine ready (%s)", self.spec.name, accelerator(self.spec))

    # -- start-up -------------------------------------------------------------------------

    def _plan_kv_cache(self, peers: list[dict[str, Any]]) -> int | None:
        """This CPU replica's KV bytes from the fleet's memory plan on its node (None: the
        fleet set its own, or the model's size is unknown); raises memory.PlanError when the
        replicas that may share the node cannot fit."""
        from orchestrator import memory

        specs = [ModelSpec.model_validate(p) for p in peers]
        if all(s.name != self.spec.name for s in specs):
            specs.append(ModelSpec.model_validate(memory.plan_inputs(self.spec)))
        plan = memory.plan_cpu(specs, memory.node_memory(), is_cpu=lambda m: accelerator(m) == "cpu",
                               node_cpus=_node_cpus())
        kv = plan.kv_cache_bytes(self.spec.name)
        need = plan.needs.get(self.spec.name)
        if need is not None:
            # Per replica (all its engine workers together).
            self._memory = {"kv_cache_bytes": need.kv, "kv_cache_tokens": need.kv_tokens,
                            "kv_cache_source": need.fixed_how or "memory plan",
                            "kv_cache_floor_bytes": need.floor, "kv_cache_target_bytes": need.target}
            for line in plan.shortfalls(self.spec.name):
                log.warning("%s", line)
        return kv

    async def _report_start(self, failure: dict[str, Any] | None) -> None:
        """Tell the fleet state how this start went (the gateway shows it in /fleet and
        answers requests held for a model that cannot start); never fails the start."""
        from orchestrator.autoscaling import state

        try:
            from ray import serve

            app = self._fleet_app or serve.get_replica_context().app_name
            # The gateway creates the actor when it starts (an actor created here would die
            # with this replica); give it a few seconds to appear.
            actor = None
            for _ in range(10 if failure else 60):
                actor = await asyncio.to_thread(state.lookup, app)
                if actor is not None:
                    break
                await asyncio.sleep(1)
            if actor is not None:
                await asyncio.wait_for(actor.record_start.remote(self.spec.name, failure, self._memory or None), 5)
        except Exception as e:  # noqa: BLE001 - visibility only
            log.debug("model %s: start report failed: %r", self.spec.name, e)

    async def _start_engine(self, engine_args):
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.executor.abstract import Executor

        self._bind_cpu_ranks()

        def create():
            config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
            if accelerator(self.spec) == "gpu" and self.spec.tensor_parallel_size > 1:
                import ray.util

                config.parallel_config.placement_group = ray.util.get_current_placement_group()
            return config

        config = await asyncio.to_thread(create)
        return AsyncLLM(
            vllm_config=config,
            executor_class=Executor.get_class(config),
            log_requests=False,
            log_stats=not engine_args.disable_log_stats,
            stat_loggers=[self.load.logger_factory()],
        )

    def _bind_cpu_ranks(self) -> None:
        """Tensor parallelism on CPU: vLLM binds each rank's threads to its own cores, and on a
        single NUMA node it needs the split spelled out (VLLM_CPU_OMP_THREADS_BIND="0-3|4-7").
        Split the cores this process may use into one contiguous group per rank, unless the
        fleet set the variable in the model's env."""
        tp = self.spec.tensor_parallel_size
        if accelerator(self.spec) != "cpu" or tp < 2 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
            return
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < tp:
            raise RuntimeError(f"tensor_parallel_size {tp} on CPU needs {tp} cores; this replica may use "
                               f"{len(cores)}")
        size = len(cores) // tp
        groups = [cores[r * size:(r + 1) * size] for r in range(tp)]
        binding = "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
        log.info("model %s: tensor parallelism on CPU, ranks bound to cores %s (set VLLM_CPU_OMP_THREADS_BIND "
                 "in the model's env to override)", self.spec.name, binding)

    async def _init_serving(self, engine_args, frontend_args) -> None:
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        state = State()
        ns = argparse.Namespace(**(vars(frontend_args) | vars(engine_args)))
        supported = await self.engine.get_supported_tasks()
        await init_app_state(self.engine, state, ns, supported_tasks=supported)
        self._chat = getattr(state, "openai_serving_chat", None)
        self._completion = getattr(state, "openai_serving_completion", None)
        for serving in (self._chat, self._completion):
            if serving is not None:
                enforce_context_limit(serving)
        self._embedding = getattr(state, "serving_embedding", None)
        self._state = state

    @staticmethod
    def _make_replica_id() -> str:
        try:
            from ray import serve

            return serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (unit use)
            return f"pid{os.getpid()}"

    # -- requests -------------------------------------------------------------------------

    @staticmethod
    def _parse(endpoint: str, payload: dict[str, Any]):
        """vLLM's request model for a JSON object the gateway already decoded."""
        from pydantic import TypeAdapter, ValidationError
        from vllm.exceptions import VLLMClientError

        _check_ranges(payload)
        try:
            if endpoint == "chat":
                from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

                return ChatCompletionRequest.model_validate(payload)
            if endpoint == "completions":
                from vllm.entrypoints.openai.completion.protocol import CompletionRequest

                return CompletionRequest.model_validate(payload)
            from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

            return TypeAdapter(EmbeddingRequest).validate_python(payload)
        except ValidationError as e:
            raise _pydantic_error(e) from e
        except VLLMClientError as e:  # vLLM's own validators (e.g. top_logprobs without logprobs)
            message = e.args[0] if e.args else str(e)
            raise errors.InvalidRequest(f"Invalid request: {message}", param=getattr(e, "parameter", None)) from e
        except (ValueError, TypeError) as e:
            raise errors.InvalidRequest(f"Invalid request: {e}") from e

    def _serving(self, endpoint: str):
        serving = {"chat": self._chat, "completions": self._completion, "embeddings": self._embedding}.get(endpoint)
        if serving is None:
            raise errors.WrongTask(
                f"The model '{self.spec.name}' does not support the {endpoint} endpoint (task: {self.spec.task})",
                param="model",
            )
        return serving

    async def _run(self, endpoint: str, payload: dict[str, Any]):
        """Validate and submit a request; returns vLLM's result (response, error or generator)."""
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        request = self._parse(endpoint, payload)
        serving = self._serving(endpoint)
        try:
            if endpoint == "chat":
                return await serving.create_chat_completion(request, None)
            if endpoint == "completions":
                return await serving.create_completion(request, None)
            return await serving(request, None)
        except errors.OrchestratorError:
            raise
        except Exception as e:  # noqa: BLE001 - vLLM raises plain exceptions for bad input
            return create_error_response(e)

    @staticmethod
    def _is_error(result: Any) -> bool:
        return type(result).__name__ == "ErrorResponse"

    def _error_result(self, result: Any) -> tuple[int, bytes]:
        status, body = errors.from_vllm_error(result.error.model_dump())
        if status >= 500:
            log.error("model %s: engine error: %s", self.spec.name, result.error.message)
        return status, json.dumps(body).encode()

    async def call(self, endpoint: str, payload: dict[str, Any], route_key: str | None = None,
                   track: str | None = None) -> tuple[int, bytes]:
        """A non-streaming request: (HTTP status, response body bytes).

        ``route_key`` is read by the gateway's request router (``orchestrator.routing``), and
        ``track`` by its in-flight view (``routing.InFlight``); both are unused here.
        """
        self.load.in_flight += 1
        self.load.started += 1
        try:
            result = await self._run(endpoint, payload)
            if self._is_error(result):
                return self._engine_dead() or self._error_result(result)
            if hasattr(result, "body") and hasattr(result, "status_code"):  # a Starlette response
                if result.status_code != 200:
                    if dead := self._engine_dead():
                        return dead
                    status, error = errors.from_vllm_error(_error_field(bytes(result.body), result.status_code))
                    return status, json.dumps(error).encode()
                return 200, openai_compat.clean_json_bytes(bytes(result.body))
            if isinstance(result, AsyncIterator):
                # Defensive: the gateway routes only `stream: false` here.
                await result.aclose()
                raise errors.InvalidRequest("'stream' must be a boolean", param="stream")
            return 200, openai_compat.dump(result)
        except errors.OrchestratorError as e:
            return _error_body(e)
        except Exception as e:  # noqa: BLE001 - never a traceback to the client
            if dead := self._engine_dead():
                return dead
            log.exception("model %s: request failed", self.spec.name)
            return _error_body(e)
        finally:
            self.load.in_flight -= 1

    def _engine_dead(self) -> tuple[int, bytes] | None:
        """When vLLM's engine process has died (its serving layer reports that as a generic
        500), this replica can answer nothing again: it ends its own process at once. Its
        callers then see the replica die, which Serve's routers act on immediately (no
        request routed to it any more) and the gateway retries unanswered calls once on
        another replica; Serve starts a replacement. Returns None while the engine is alive."""
        engine = getattr(self, "engine", None)
        if engine is None or not getattr(engine, "errored", False):
            return None
        log.error("model %s: the engine process died; ending this replica so Serve replaces it", self.spec.name)
        logging.shutdown()
        os._exit(70)

    async def stream(self, endpoint: str, payload: dict[str, Any], route_key: str | None = None,
                     reply_to: dict[str, str] | None = None, track: str | None = None):
        """A streaming request: yields ``(status, media_type, direct)`` first, then body bytes.

        An error (or a request vLLM answered without streaming) is one JSON body;
        a stream is SSE chunks ending with ``data: [DONE]``, sent to ``reply_to`` when
        ``direct`` (see the module's docstring).
        """
        self.load.in_flight += 1
        self.load.started += 1
        try:
            async for item in self._stream(endpoint, payload, reply_to):
                yield item
        finally:
            self.load.in_flight -= 1

    async def _stream(self, endpoint: str, payload: dict[str, Any], reply_to: dict[str, str] | None = None):
        try:
            result = await self._run(endpoint, payload)
        except Exception as e:  # noqa: BLE001 - OrchestratorError and anything else
            if not isinstance(e, errors.OrchestratorError):
                log.exception("model %s: request failed", self.spec.name)
            status, body = _error_body(e)
            yield status, JSON, False
            yield body
            return
        if self._is_error(result):
            status, body = self._error_result(result)
            yield status, JSON, False
            yield body
            return
        if not isinstance(result, AsyncIterator):
            yield 200, JSON, False
            yield openai_compat.dump(result)
            return
        conn, sid = await self._direct_connection(reply_to)
        if conn is None:
            yield 200, SSE, False
            async for chunk in coalesce(result):
                yield chunk
            return
        # Start generating before the status goes back through Ray: the first token does
        # not wait for that hop (the gateway's inbox holds frames that arrive first).
        sending = asyncio.ensure_future(send_direct(result, conn, sid))
        try:
            yield 200, SSE, True
            await sending
        finally:
            if not sending.done():  # the call was cancelled: the client left
                sending.cancel()
                with contextlib.suppress(BaseException):
                    await sending

    async def _direct_connection(self, reply_to: dict[str, str] | None):
        """The pooled connection to the gateway replica's inbox, or (None, None) to stream
        through Ray instead."""
        target = wire.parse_reply_to(reply_to)
        if target is None:
            return None, None
        address, token, sid = target
        try:
            return await self._outbox.connection(address, token), sid
        except (OSError, asyncio.TimeoutError) as e:
            log.warning("model %s: cannot reach the gateway's stream inbox at %s (%r); streaming through Ray",
                        self.spec.name, address, e)
            return None, None

    # -- health and metrics ---------------------------------------------------------------

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaling hook: the engine's queue depth feeds ``QueueDepthPolicy``."""
        return self.load.stats()

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy."""
        await self.engine.check_health()

    async def _push_metrics(self) -> None:
        """Send this replica's vLLM metrics to the fleet-state actor every few seconds."""
        from orchestrator.autoscaling import state

        actor = None
        pushed_at, pushed_started, pushed_busy = 0.0, -1, True
        while True:
            await asyncio.sleep(state.ENGINE_METRICS_PUSH_S)
            self._engine_dead()  # an engine that died while idle: do not wait for the health check
            busy, started, now = self.load.in_flight > 0, self.load.started, time.monotonic()
            if (not busy and not pushed_busy and started == pushed_started
                    and now - pushed_at < state.ENGINE_METRICS_IDLE_PUSH_S):
                continue  # idle since the last push: nothing changed, a heartbeat now and then
            try:
                if actor is None:
                    from ray import serve

                    app = self._fleet_app or serve.get_replica_context().app_name
                    actor = await asyncio.to_thread(state.lookup, app)
                if actor is not None:
                    await actor.record_engine_metrics.remote(self._replica_id, self.metrics_text())
                    pushed_at, pushed_started, pushed_busy = now, started, busy
            except Exception as e:  # noqa: BLE001 - metrics must never hurt serving
                log.debug("model %s: metrics push failed: %r", self.spec.name, e)
                actor = None

    def metrics_text(self) -> str:
        """vLLM's own engine metrics from this replica, labelled with the replica id."""
        from prometheus_client import REGISTRY, generate_latest

        text = generate_latest(REGISTRY).decode()
        return metrics.label_samples(text, {"replica": self._replica_id}, prefix="vllm:")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001
                pass


def enforce_context_limit(serving) -> None:
    """Refuse (400) prompts whose tokens plus the requested output exceed max_model_len.

    vLLM quietly shortens ``max_tokens`` to fit; OpenAI answers such a request with a
    400, and clients rely on that to notice truncation. The check runs on the prompt
    vLLM has already rendered and tokenized, so nothing is tokenized twice.
    """
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    max_model_len = serving.model_config.max_model_len
    chat_render = getattr(serving, "render_chat_request", None)
    completion_render = getattr(serving, "render_completion_request", None)

    def check(request, engine_inputs) -> ErrorResponse | None:
        requested = getattr(request, "max_completion_tokens", None) or getattr(request, "max_tokens", None)
        if requested is None or getattr(request, "truncate_prompt_tokens", None) is not None:
            return None
        for engine_input in engine_inputs:
            prompt_len = serving._extract_prompt_len(engine_input)
            if prompt_len + requested > max_model_len:
                return create_error_response(
                    f"This model's maximum context length is {max_model_len} tokens. However, you "
                    f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                    f"{requested} for the completion). Please reduce the prompt or max_tokens.",
                    param="max_tokens",
                )
        return None

    if chat_render is not None:
        async def render_chat_request(request):
            result = await chat_render(request)
            if isinstance(result, ErrorResponse):
                return result
            return check(request, result[1]) or result

        serving.render_chat_request = render_chat_request
    elif completion_render is not None:
        async def render_completion_request(request):
            result = await completion_render(request)
            if isinstance(result, ErrorResponse):
                return result
            return check(request, result) or result

        serving.render_completion_request = render_completion_request


async def send_direct(source: AsyncIterator[str], conn, sid: bytes) -> None:
    """Write ``source``'s chunks to a gateway inbox connection, then the END frame.

    Cancelled (the client went away), or failing, it closes vLLM's generator, which aborts
    the request; a failure also tells the gateway with a FAIL frame.
    """
    try:
        async for chunk in source:
            conn.send(sid, wire.DATA, chunk.encode())
            if conn.paused:
                await conn.drain()
        conn.send(sid, wire.END)
        conn.flush()
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.warning("stream failed mid-way: %r", e)
        with contextlib.suppress(ConnectionError):
            conn.send(sid, wire.FAIL, b"The model server stopped while streaming; retry the request.")
            conn.flush()
        raise
    finally:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(BaseException):
                await aclose()


async def coalesce(source: AsyncIterator[str]) -> AsyncIterator[bytes]:
    """Relay ``source`` as bytes, joining whatever piled up while the consumer was busy.

    The first chunk goes out as soon as it exists; later chunks that arrive while the
    previous send is in flight are joined into one. Closing this generator (the client
    went away) cancels the pump, which closes vLLM's generator and aborts the request.
    """
    pending: list[str] = []
    ready = asyncio.Event()
    finished = False
    failure: BaseException | None = None

    async def pump() -> None:
        nonlocal finished, failure
        try:
            async for chunk in source:
                pending.append(chunk)
                ready.set()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            failure = e
        finally:
            finished = True
            ready.set()

    task = asyncio.create_task(pump())
    try:
        while True:
            await ready.wait()
            ready.clear()
            if pending:
                data = "".join(pending).encode()
                pending.clear()
                yield data
            if finished and not pending:
                break
        if failure is not None and not isinstance(failure, asyncio.CancelledError):
            raise failure
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001
                pass
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except BaseException:  # noqa: BLE001
                pass
