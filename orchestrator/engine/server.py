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

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from orchestrator import console_logging, errors, metrics, sources, startup, wire
from orchestrator.engine import openai_compat, speculative, vllm_compat
from orchestrator.engine.args import accelerator, build_vllm_args, engine_environment
from orchestrator.engine.load import EngineLoad
from orchestrator.engine.lora import REPORT_EVERY_S, AdapterSet
from orchestrator.engine.streaming import coalesce, send_direct
from orchestrator.spec import ModelSpec

log = logging.getLogger("orchestrator.engine")

SCHEMA_CHECK_S = 5.0  # longest a JSON schema pre-check may take before the request goes on without it

JSON = "application/json"
SSE = "text/event-stream"

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
        # Another backend than xgrammar (or auto, which picks it) compiles schemas its own way.
        self._check_schemas = vllm_compat.structured_backend(engine_args) in ("auto", "xgrammar")
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
        self._bind_cpu_ranks()
        placement_group = None
        if accelerator(self.spec) == "gpu" and self.spec.tensor_parallel_size > 1:
            import ray.util

            placement_group = ray.util.get_current_placement_group()
        return await vllm_compat.start_engine(engine_args, self.load.record, placement_group)

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
        self._servings = await vllm_compat.init_serving(self.engine, engine_args, frontend_args)
        self.adapters = AdapterSet(self.spec.name, self._servings.get("models"))

    # -- adapters -------------------------------------------------------------------------

    async def reconfigure(self, config: dict[str, Any] | None) -> None:
        """Serve's ``user_config`` hook: load and unload LoRA adapters live (``{"adapters":
        [...]}``). Serve calls it on a new replica before it takes traffic, and on every
        running replica when the deployment's user_config changes; the engine keeps running."""
        await self.adapters.apply(config)
        await self._report_adapters()

    async def _report_adapters(self) -> None:
        """Tell the fleet state this replica's adapter states (``/fleet`` shows them)."""
        from orchestrator.autoscaling import state

        try:
            from ray import serve

            actor = await asyncio.to_thread(state.lookup, self._fleet_app or serve.get_replica_context().app_name)
            if actor is not None:
                await asyncio.wait_for(actor.record_adapters.remote(self._replica_id, self.spec.name,
                                                                    self.adapters.report()), 5)
        except Exception as e:  # noqa: BLE001 - visibility only
            log.debug("model %s: adapter report failed: %r", self.spec.name, e)

    @staticmethod
    def _make_replica_id() -> str:
        try:
            from ray import serve

            return serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (unit use)
            return f"pid{os.getpid()}"

    # -- requests -------------------------------------------------------------------------

    def _serving(self, endpoint: str):
        serving = self._servings.get(endpoint)
        if serving is None:
            raise errors.WrongTask(
                f"The model '{self.spec.name}' does not support the {endpoint} endpoint (task: {self.spec.task})",
                param="model",
            )
        return serving

    async def _run(self, endpoint: str, payload: dict[str, Any]):
        """Validate and submit a request; returns vLLM's result (response, error or generator)."""
        openai_compat.check_ranges(payload)
        self.adapters.check(payload.get("model"))
        request = vllm_compat.parse_request(endpoint, payload)
        serving = self._serving(endpoint)
        if self._check_schemas and (schema := vllm_compat.json_schema_of(request)) is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(vllm_compat.check_json_schema, schema), SCHEMA_CHECK_S)
            except asyncio.TimeoutError:
                pass  # slow to compile, not refused: vLLM's own limits apply
        return await vllm_compat.run(serving, endpoint, request)

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
            if vllm_compat.is_error(result):
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
        if vllm_compat.is_error(result):
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
        reported_at = time.monotonic()
        while True:
            await asyncio.sleep(state.ENGINE_METRICS_PUSH_S)
            if self.adapters.states and time.monotonic() - reported_at > REPORT_EVERY_S:
                reported_at = time.monotonic()
                await self._report_adapters()
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


