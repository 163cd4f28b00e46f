"""The fleet's live autoscaling state, shared between the controller and the gateway.

The autoscaling policy runs inside Ray Serve's controller, the gateway in its own replicas.
A small named actor (no CPU reserved) carries what the policy saw and decided, so ``GET
/fleet``, ``slm status`` and ``/metrics`` can show queue depth and the last decision with
its reason. Model replicas also push their vLLM metrics here every few seconds, so the
gateway's ``/metrics`` covers every replica, not only the one a handle call reaches, and
their LoRA adapters' states (``record_adapters``), which ``/fleet`` shows per adapter.
Losing the actor loses only that view: the gateway recreates it and the policy and
replicas find it again on their next report.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "serve"
ENGINE_METRICS_PUSH_S = 1.0
ENGINE_METRICS_IDLE_PUSH_S = 5.0  # an idle replica's metrics do not change: a heartbeat only
ENGINE_METRICS_MAX_AGE_S = 15.0  # then the replica is gone (or stuck)
# A replica reports its adapters after each change and every 30 s; an older report is dropped.
ADAPTER_REPORT_MAX_AGE_S = 120.0
# A gateway replica reports its fair queues every second while they are not empty.
GATEWAY_QUEUE_MAX_AGE_S = 5.0


def actor_name(app_name: str) -> str:
    return f"slm-fleet-state-{app_name}"


class FleetState:
    """Per model: the latest snapshot the policy published (see ``QueueDepthPolicy``)."""

    def __init__(self) -> None:
        self._models: dict[str, dict[str, Any]] = {}
        self._engine_metrics: dict[str, tuple[float, str]] = {}
        self._start_failures: dict[str, dict[str, Any]] = {}
        self._memory: dict[str, dict[str, Any]] = {}
        self._adapters: dict[str, tuple[float, str, dict[str, dict[str, Any]]]] = {}  # replica -> (at, model, states)
        self._gateway_queues: dict[str, tuple[float, dict[str, Any]]] = {}  # gateway replica -> (at, stats)

    def record(self, model: str, snapshot: dict[str, Any]) -> None:
        snapshot = dict(snapshot)
        snapshot["received_at"] = time.time()
        self._models[model] = snapshot

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per model: the policy's snapshot, and ``start_failure`` while its replicas fail to start."""
        out = {m: dict(s) for m, s in self._models.items()}
        for model, failure in self._start_failures.items():
            out.setdefault(model, {})["start_failure"] = failure
        for model, memory in self._memory.items():
            out.setdefault(model, {})["memory"] = memory
        for model, reports in self.adapter_reports().items():
            out.setdefault(model, {})["adapter_reports"] = reports
        for model, queue in self.gateway_queues().items():
            out.setdefault(model, {})["gateway_queue"] = queue
        return out

    def record_gateway_queue(self, replica: str, stats: dict[str, Any]) -> None:
        """A gateway replica's fair queues (``{model: {class: {"queued", "oldest_wait_s"}, ...}}``),
        every second while anything waits there and once when it empties."""
        if not isinstance(stats, dict):
            raise TypeError(f"record_gateway_queue: stats is a {type(stats).__name__}, not a dict")
        self._gateway_queues[str(replica)] = (time.time(), stats)

    def gateway_queues(self, max_age_s: float = GATEWAY_QUEUE_MAX_AGE_S) -> dict[str, dict[str, Any]]:
        """Per model, summed over the gateway replicas heard from within ``max_age_s``: per class
        ``queued`` and the ``oldest_wait_s``, and ``gateways`` (how many reported)."""
        now = time.time()
        out: dict[str, dict[str, Any]] = {}
        for replica, (at, stats) in list(self._gateway_queues.items()):
            if now - at > max_age_s:
                del self._gateway_queues[replica]
                continue
            for model, classes in stats.items():
                view = out.setdefault(model, {"gateways": 0, "in_flight": 0, "limit": 0})
                view["gateways"] += 1
                view["in_flight"] += int(classes.get("in_flight") or 0)
                view["limit"] += int(classes.get("limit") or 0)
                for cls, s in classes.items():
                    if not isinstance(s, dict):
                        continue
                    mine = view.setdefault(cls, {"queued": 0, "oldest_wait_s": 0.0})
                    mine["queued"] += int(s.get("queued") or 0)
                    mine["oldest_wait_s"] = max(mine["oldest_wait_s"], float(s.get("oldest_wait_s") or 0.0))
        return out

    def gateway_queue(self, model: str) -> dict[str, int]:
        """Requests of ``model`` waiting in the gateways' fair queues, per class (the policy's read)."""
        view = self.gateway_queues().get(model, {})
        return {c: int(s["queued"]) for c, s in view.items() if isinstance(s, dict)}

    def record_adapters(self, replica_id: str, model: str, states: dict[str, dict[str, Any]]) -> None:
        """A replica's LoRA adapter states, after each change and as a heartbeat: adapter name ->
        ``{"state": "loaded"|"failed"|"loading", "reason", "rank", "size_bytes", "source", "at"}``
        (``at``: when the adapter reached that state). Replaces the replica's previous report."""
        if not isinstance(states, dict):
            raise TypeError(f"record_adapters: states is a {type(states).__name__}, not a dict")
        kept = {str(name): dict(s) for name, s in states.items() if isinstance(s, dict)}
        self._adapters[str(replica_id)] = (time.time(), str(model), kept)

    def adapter_reports(self, max_age_s: float = ADAPTER_REPORT_MAX_AGE_S) -> dict[str, dict[str, dict[str, Any]]]:
        """Per model, per replica: its last adapter report (``states``), ``age_s`` since it came,
        and ``seen_s`` since the replica was last heard from at all (an adapter report or an
        engine-metrics push, at least every few seconds while it runs). Reports over
        ``max_age_s`` old are dropped (the replica left)."""
        now = time.time()
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for replica, (at, model, states) in list(self._adapters.items()):
            if now - at > max_age_s:
                del self._adapters[replica]
                continue
            seen = max(at, self._engine_metrics.get(replica, (0.0, ""))[0])
            out.setdefault(model, {})[replica] = {"states": {n: dict(s) for n, s in states.items()},
                                                  "age_s": now - at, "seen_s": now - seen}
        return out

    def record_start(self, model: str, failure: dict[str, Any] | None, memory: dict[str, Any] | None = None) -> None:
        """A replica of ``model`` started (``failure`` None: clears the last failure) or failed;
        ``memory``: the KV-cache space it planned (shown in /fleet)."""
        if failure is None:
            self._start_failures.pop(model, None)
        else:
            self._start_failures[model] = failure
        if memory:
            self._memory[model] = memory

    def record_engine_metrics(self, replica: str, text: str) -> None:
        """A replica's vLLM metrics (Prometheus text, already labelled with the replica)."""
        self._engine_metrics[replica] = (time.time(), text)

    def engine_metrics(self, max_age_s: float = ENGINE_METRICS_MAX_AGE_S) -> list[str]:
        """The latest metrics text of every replica heard from within ``max_age_s``."""
        now = time.time()
        for replica, (at, _) in list(self._engine_metrics.items()):
            if now - at > max_age_s:
                del self._engine_metrics[replica]  # a replica that left
        return [text for _, text in self._engine_metrics.values()]


def get_or_create(app_name: str):
    """The fleet-state actor of an app, created if missing (called by the gateway)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1)(FleetState).options(
        name=actor_name(app_name), namespace=NAMESPACE, get_if_exists=True, lifetime=None,
    ).remote()


def lookup(app_name: str):
    """The fleet-state actor of an app, or None when there is none yet."""
    import ray

    try:
        return ray.get_actor(actor_name(app_name), namespace=NAMESPACE)
    except ValueError:
        return None
