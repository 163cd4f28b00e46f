"""What a gateway replica knows of the fleet, cached: replica states (Serve's controller),
what the autoscaling policy and the replicas published (the fleet-state actor), and the
bodies of ``/ready``, ``/fleet`` and ``/metrics``.

Request paths never wait on the control plane: a background task refreshes the views every
``REFRESH_S`` and admission control reads what it last saw. When the fleet state cannot be
read (its actor gone or slow), admission control counts from this gateway replica's own
in-flight requests instead (``queue_estimate``), logs it once and sets
``slm_admission_queue_estimated``, rather than reading an empty queue and admitting all.

LoRA adapters: each model replica reports its adapters' states to the fleet-state actor
(after each change and every 30 s); the snapshot the refresh reads carries them, and
``/fleet`` folds them per adapter over the model's live replicas (``adapter_views``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from orchestrator import footprint, names
from orchestrator.gateway.queueing import queue_view
from orchestrator.metrics import GatewayMetrics, merge_exposition, spec_decode_rates, spec_decode_totals
from orchestrator.spec import FleetSpec, ModelSpec

log = logging.getLogger("orchestrator.gateway")

REFRESH_S = 1.0
# A fleet-state snapshot older than this no longer counts for admission control.
STATE_STALE_S = 5.0
STATE_READ_TIMEOUT_S = 2.0
STATUS_READ_TIMEOUT_S = 10.0
# Serve's replica states of a replica on its way to RUNNING. UPDATING is a running replica
# in ``reconfigure`` (LoRA adapters changing): it counts as running (see ``replica_states``).
STARTING_STATES = ("STARTING", "RECOVERING", "PENDING_MIGRATION")
# Serve's router for a deployment that is an ingress behind HAProxy (it refuses a custom one).
SERVE_DEFAULT_ROUTER = "serve-default"
# A replica's adapter report older than this no longer counts (it reports every 30 s).
ADAPTER_REPORT_MAX_AGE_S = 120.0
ADAPTER_STATES = ("loaded", "failed", "loading")


class FleetView:
    """The fleet as one gateway replica sees it. ``deployments``: model -> Serve deployment
    name; ``model_apps``: models deployed in an application of their own (fast lanes)."""

    def __init__(self, fleet: FleetSpec, handles: dict[str, Any], deployments: dict[str, str],
                 model_apps: dict[str, str], app_name: str | None, metrics: GatewayMetrics):
        self.fleet = fleet
        self.handles = handles
        self.metrics = metrics
        self._deployments = dict(deployments)
        self._model_apps = dict(model_apps)
        self._app_name = app_name
        self._status: tuple[float, dict[str, dict[str, int]]] | None = None
        self._state: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._state_ok_at: float | None = None  # when the fleet state was last read
        self._state_failing = False
        self._estimated: set[str] = set()
        self._state_actor = None
        self._static: dict[str, dict[str, Any]] | None = None
        self._refresher: asyncio.Future | None = None
        self._refresh_started: float | None = None
        self._status_read: asyncio.Future | None = None
        # Adapter name -> its base model, from the gateway's user_config (set_adapters); None:
        # not told, the fleet's own adapters and what the replicas report are shown.
        self._adapter_bases: dict[str, str] | None = None
        self._adapter_static: dict[str, dict[str, Any]] | None = None
        self._adapter_gauges: set[tuple[str, str, str]] = set()

    # -- background refresh -----------------------------------------------------------

    def keep_fresh(self) -> None:
        """Start (or restart) the background refresh of the cached views; never waits."""
        if self._refresher is None or self._refresher.done():
            self._refresh_started = time.monotonic()
            self._refresher = asyncio.ensure_future(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await asyncio.gather(self.autoscaler_state(max_age=0), self.replica_states(max_age=0))
            except Exception as e:  # noqa: BLE001 - keep the last views and try again
                log.warning("fleet status refresh failed: %r", e)
            await asyncio.sleep(REFRESH_S)

    def seed(self, states: dict[str, dict[str, int]], snapshot: dict[str, dict[str, Any]],
             snapshot_age_s: float | None, refreshing_for_s: float | None = None) -> None:
        """Set the cached views as if just read: replica ``states``, the fleet-state
        ``snapshot``, read ``snapshot_age_s`` ago (None: never read), the background refresh
        running for ``refreshing_for_s``."""
        now = time.monotonic()
        self._refresh_started = None if refreshing_for_s is None else now - refreshing_for_s
        self._status = (now, states)
        self._state = (now, snapshot)
        self._state_ok_at = None if snapshot_age_s is None else now - snapshot_age_s

    # -- admission control's reading ----------------------------------------------------

    def queue_estimate(self, model: str, local_in_flight: int) -> tuple[float, int] | None:
        """(queue depth, running replicas) of ``model`` for admission control, from the cached
        views only; None (admit) until the background refresh has read them once. Without a fresh fleet-state
        snapshot of the model, the queue is this replica's in-flight requests times the number
        of gateway replicas (they share the traffic)."""
        self.keep_fresh()
        if self._status is None:
            return None
        running = self._status[1].get(model, {}).get("RUNNING", 0)
        now = time.monotonic()
        ok_at, started = self._state_ok_at, self._refresh_started
        if (ok_at is None or (started is not None and ok_at < started)) and not self._state_failing \
                and started is not None and now - started <= STATE_STALE_S:
            # The refresh has just started (the first request with a queue bound): not read
            # yet, not failing; admit for that second rather than judge from an old snapshot.
            return None
        fresh = ok_at is not None and now - ok_at <= STATE_STALE_S
        snapshot = (self._state[1].get(model) if fresh and self._state else None) or {}
        # The policy publishes every second while it runs: an older entry means it stopped
        # (the controller stuck, or writing to an actor that was replaced). Wall clocks of two
        # nodes: twice the bound as margin.
        if time.time() - float(snapshot.get("received_at") or 0) > 2 * STATE_STALE_S:
            snapshot = {}
        if "queue_depth" in snapshot:
            if model in self._estimated:
                self._estimated.discard(model)
                self.metrics.queue_estimated.labels(model).set(0)
                log.warning("admission control for %s counts the fleet's queue again", model)
            return float(snapshot["queue_depth"]), running
        if model not in self._estimated:
            self._estimated.add(model)
            self.metrics.queue_estimated.labels(model).set(1)
            why = "no fresh fleet state" if not fresh else "no recent queue depth from its autoscaling policy"
            log.warning("admission control for %s: %s; counting this gateway replica's in-flight requests x %d "
                        "gateway replicas until it is back", model, why, self.fleet.gateway.replicas)
        return float(local_in_flight * max(1, self.fleet.gateway.replicas)), running

    # -- control-plane reads (cached) ---------------------------------------------------

    async def replica_states(self, max_age: float = REFRESH_S) -> dict[str, dict[str, int]]:
        """Replica counts by state per model, from Serve's controller (cached briefly)."""
        now = time.monotonic()
        if self._status and now - self._status[0] < max_age:
            return self._status[1]
        from ray import serve

        def read() -> dict[str, dict[str, int]]:
            status = serve.status()
            own = serve.get_replica_context().app_name
            out: dict[str, dict[str, int]] = {}
            for model, dep_name in self._deployments.items():
                app = status.applications.get(self._model_apps.get(model, own))
                dep = app.deployments.get(dep_name) if app else None
                counts = {str(getattr(k, "value", k)): v for k, v in (dep.replica_states if dep else {}).items()}
                if "UPDATING" in counts:  # reconfiguring (adapters): still a serving replica
                    counts["RUNNING"] = counts.get("RUNNING", 0) + counts.pop("UPDATING")
                out[model] = counts
            return out

        # One read at a time: a slow controller must not pile up blocked threads.
        if self._status_read is None or self._status_read.done():
            self._status_read = asyncio.ensure_future(asyncio.to_thread(read))
        states = await asyncio.wait_for(asyncio.shield(self._status_read), STATUS_READ_TIMEOUT_S)
        self._status = (now, states)
        return states

    def running_replicas(self, model: str) -> int | None:
        """``model``'s running replicas as last read (None: not read yet); never waits."""
        self.keep_fresh()
        return None if self._status is None else self._status[1].get(model, {}).get("RUNNING", 0)

    def report_queue(self, replica: str | None, stats: dict[str, Any]) -> None:
        """Send this gateway replica's fair queues to the fleet state (fire and forget)."""
        actor = self.state_actor()
        if actor is not None and replica:
            actor.record_gateway_queue.remote(replica, stats)

    async def has_ready_replica(self, model: str) -> bool:
        return (await self.replica_states()).get(model, {}).get("RUNNING", 0) > 0

    async def starting_replicas(self, model: str) -> int:
        states = (await self.replica_states()).get(model, {})
        return sum(states.get(k, 0) for k in STARTING_STATES)

    async def start_failure(self, model: str) -> dict[str, Any] | None:
        """Why ``model``'s last replica start failed, while no replica of it has started since."""
        return (await self.autoscaler_state()).get(model, {}).get("start_failure")

    def state_actor(self):
        """The fleet-state actor, created when missing (the gateway creates it as it starts:
        replicas and the autoscaling policy look it up, and one created by a replica would die
        with it); None while it cannot be reached."""
        if self._state_actor is None and self._app_name:
            try:
                from orchestrator.autoscaling import state

                self._state_actor = state.get_or_create(self._app_name)
            except Exception as e:  # noqa: BLE001 - counted and retried on the next read
                self._state_failed(f"fleet state actor unavailable: {e!r}")
        return self._state_actor

    def _state_failed(self, reason: str) -> None:
        self.metrics.fleet_state_errors.inc()
        if not self._state_failing:
            self._state_failing = True
            log.warning("%s; admission control falls back to each gateway replica's own count", reason)

    async def autoscaler_state(self, max_age: float = REFRESH_S) -> dict[str, dict[str, Any]]:
        """What each model's autoscaling policy and replicas last published (cached briefly;
        the last good snapshot while the actor cannot be read)."""
        now = time.monotonic()
        if self._state and now - self._state[0] < max_age:
            return self._state[1]
        snapshot = self._state[1] if self._state else {}
        actor = self.state_actor()
        if actor is not None:
            try:
                snapshot = await asyncio.wait_for(actor.snapshot.remote(), STATE_READ_TIMEOUT_S)
                self._state_ok_at = now
                if self._state_failing:
                    self._state_failing = False
                    log.warning("fleet state readable again")
            except Exception as e:  # noqa: BLE001 - recreate it next time
                self._state_failed(f"fleet state read failed: {e!r}")
                self._state_actor = None
        self._state = (now, snapshot)
        return snapshot

    async def engine_metrics(self) -> list[str]:
        """vLLM's metrics of every replica (pushed to the fleet state every few seconds);
        without that actor, of one replica per model, asked directly."""
        actor = self.state_actor()
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

    # -- /fleet, /ready, /metrics ---------------------------------------------------------

    def _describe_models(self) -> dict[str, dict[str, Any]]:
        """What /fleet shows of each model that does not change while it runs: engine
        parallelism and precision, size (from its config, GGUF header or the catalog)."""
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
                "fast_lane": f"{names.lane_route_prefix(m.name)}/v1" if m.fast_lane else None,
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
    def kv_view(m: ModelSpec, shape: dict[str, Any] | None, planned: dict[str, Any] | None) -> dict[str, Any]:
        """A replica's KV-cache space and where it comes from: what the replica planned (the
        fleet's memory plan, or the fleet's own setting), else vLLM's own sizing."""
        if planned:
            return {k: planned.get(k) for k in ("kv_cache_bytes", "kv_cache_tokens", "kv_cache_source",
                                                "kv_cache_floor_bytes", "kv_cache_target_bytes")}
        explicit = m.engine.get("kv_cache_memory_bytes")
        per_token = (shape or {}).get("kv_bytes_per_token")
        return {"kv_cache_bytes": explicit, "kv_cache_source": "engine.kv_cache_memory_bytes" if explicit else "vllm",
                "kv_cache_tokens": explicit // per_token if explicit and per_token else None}

    @staticmethod
    def routing_view(m: ModelSpec) -> dict[str, Any]:
        """The routing in force: a fast-lane model's deployment is its application's ingress,
        where Serve allows only its default router (power of two choices) for ``/v1``, and
        HAProxy balances the lane by least connections."""
        if m.fast_lane:
            return {"policy": SERVE_DEFAULT_ROUTER, "lane": "haproxy-leastconn"}
        return {"policy": m.routing.policy}

    async def models(self, engine_texts: list[str] | None = None) -> list[dict[str, Any]]:
        """``/fleet``'s models."""
        if self._static is None:
            self._static = await asyncio.to_thread(self._describe_models)
        if self._adapter_static is None:
            self._adapter_static = await asyncio.to_thread(self._describe_adapters)
        speculating = any(m.speculative for m in self.fleet.models)
        if engine_texts is None and speculating:
            engine_texts = await self.engine_metrics()
        spec_totals = spec_decode_totals(engine_texts or []) if speculating else {}
        states, scaler = await asyncio.gather(self.replica_states(), self.autoscaler_state())
        read_age = time.monotonic() - self._state[0] if self._state else 0.0
        views = []
        for m in self.fleet.models:
            s = states.get(m.name, {})
            snap = scaler.get(m.name) or {}
            static = self._static.get(m.name, {})
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
                "routing": self.routing_view(m),
                "queue": queue_view(m, snap.get("gateway_queue")),
                **static,
                "footprint": {**(static.get("footprint") or {}),
                              **self.kv_view(m, static.get("footprint"), snap.get("memory"))},
                "speculative": self._speculative_view(m, spec_totals.get(m.name, {})),
                "adapters": self.adapter_views(m, snap.get("adapter_reports") or {}, running + starting +
                                               s.get("STOPPING", 0), read_age),
            })
        return views

    # -- LoRA adapters ------------------------------------------------------------------

    def set_adapters(self, entries: list[dict[str, Any]]) -> None:
        """The fleet's adapters as the gateway's user_config lists them (``[{"name", "base",
        ...}]``): what ``/fleet`` shows for each model from now on."""
        self._adapter_bases = {str(e["name"]): str(e["base"]) for e in entries}

    def _describe_adapters(self) -> dict[str, dict[str, Any]]:
        """Source, rank and size of the adapters in the fleet spec, read from local folders."""
        from orchestrator import adapters

        out = {}
        for m in self.fleet.models:
            for a in m.adapters:
                try:
                    info = adapters.adapter_info(a.source)
                except Exception as e:  # noqa: BLE001 - the replicas report what they found
                    log.debug("no adapter info for %s: %r", a.name, e)
                    info = None
                out[a.name] = {"source": a.source, "rank": info.rank if info else None,
                               "size_bytes": info.size_bytes if info else None}
        return out

    def adapter_views(self, m: ModelSpec, reports: dict[str, dict[str, Any]], live: int,
                      read_age_s: float = 0.0) -> list[dict[str, Any]]:
        """``/fleet``'s adapters of model ``m`` from its replicas' ``reports`` (the fleet
        state's ``adapter_reports``: replica -> {"states", "age_s", "seen_s"}), counting only
        reports under ``ADAPTER_REPORT_MAX_AGE_S`` old from the ``live`` replicas Serve has of
        the model (running, starting, draining): the ones heard from most recently, so a
        replica that left drops out once its successor reports.

        Per adapter: ``state`` "loaded" when every live replica that reported has it loaded,
        "failed" when one failed it (``reason``: why), "loading" otherwise ("idle" with no
        replica running); ``replicas``: how many replicas have it loaded, failed, loading."""
        fresh = [(r, rep) for r, rep in reports.items()
                 if float(rep.get("age_s", 0.0)) + read_age_s <= ADAPTER_REPORT_MAX_AGE_S]
        fresh.sort(key=lambda x: (float(x[1].get("seen_s", x[1].get("age_s", 0.0))), x[0]))
        counted = sorted(fresh[:max(0, live)])
        if self._adapter_bases is not None:
            names = [n for n, base in self._adapter_bases.items() if base == m.name]
        else:
            names = [a.name for a in m.adapters]
            names += sorted({n for _, rep in counted for n in rep.get("states") or {}} - set(names))
        static = self._adapter_static or {}
        views = []
        for name in names:
            known = dict(static.get(name) or {"source": None, "rank": None, "size_bytes": None})
            counts = dict.fromkeys(ADAPTER_STATES, 0)
            reason = None
            for _, rep in counted:
                state = (rep.get("states") or {}).get(name)
                if state is None:  # not told of it yet (its reconfigure is on the way)
                    counts["loading"] += 1
                    continue
                kind = state.get("state") if state.get("state") in ADAPTER_STATES else "loading"
                counts[kind] += 1
                if kind == "failed" and reason is None:
                    reason = state.get("reason") or "failed to load"
                for key in ("source", "rank", "size_bytes"):
                    if state.get(key) is not None:
                        known[key] = state[key]  # what the replica loaded
            if counts["failed"]:
                overall = "failed"
            elif counted and counts["loaded"] == len(counted):
                overall = "loaded"
            else:
                overall = "loading" if live > 0 else "idle"
            views.append({"name": name, **known, "state": overall, "reason": reason, "replicas": counts})
        return views

    def _export_adapter_gauges(self, model: str, views: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        exported = set()
        for view in views:
            for state in ADAPTER_STATES:
                self.metrics.adapter_replicas.labels(model, view["name"], state).set(view["replicas"][state])
                exported.add((model, view["name"], state))
        return exported

    @staticmethod
    def _speculative_view(m: ModelSpec, totals: dict[str, float]) -> dict[str, Any] | None:
        s = m.speculative
        if s is None:
            return None
        draft = s.draft.model_dump() if hasattr(s.draft, "model_dump") else s.draft
        return {"method": s.method_name, "draft": draft, "num_speculative_tokens": s.num_speculative_tokens,
                **spec_decode_rates(totals)}

    async def not_ready(self) -> list[str]:
        """Models without a ready replica that should have one (not scaled to zero by design)."""
        states = await self.replica_states()
        return [m.name for m in self.fleet.models
                if states.get(m.name, {}).get("RUNNING", 0) < 1 and m.autoscaling.min_replicas > 0]

    async def metrics_text(self, router_registry) -> str:
        """``/metrics``: the gateway's registry (its gauges brought up to date), the routers',
        then every replica's vLLM metrics."""
        from prometheus_client import generate_latest

        engine_texts = await self.engine_metrics()
        exported: set[tuple[str, str, str]] = set()
        for view in await self.models(engine_texts):
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
            exported |= self._export_adapter_gauges(name, view["adapters"])
        for labels in self._adapter_gauges - exported:  # an adapter that left the fleet
            self.metrics.adapter_replicas.remove(*labels)
        self._adapter_gauges = exported
        parts = [generate_latest(self.metrics.registry).decode(), generate_latest(router_registry).decode()]
        parts.append(merge_exposition(engine_texts))
        return "".join(parts)
