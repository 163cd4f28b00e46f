"""The queue-depth policy plugged into Ray Serve's custom autoscaling API.

Serve's controller calls ``QueueDepthPolicy(ctx)`` every control-loop tick with an
``AutoscalingContext``. Replicas report their engine's queue depth (waiting + running
requests, from vLLM's scheduler stats) through ``record_autoscaling_stats``; handles
report requests queued before any replica took them (``total_queued_requests``, which
is what wakes a model at zero). The decision itself is the pure ``policy.decide``.

Configured by ``orchestrator.app.replica_options`` as::

    AutoscalingPolicy(policy_function="orchestrator.autoscaling.serve_policy:QueueDepthPolicy",
                      policy_kwargs={"model": "...", "limits": {...}})
"""

from __future__ import annotations

import logging
import time
from typing import Any

from orchestrator.autoscaling.policy import Limits, Observation, State, decide

log = logging.getLogger("ray.serve")

QUEUE_DEPTH_METRIC = "queue_depth"
_PUBLISH_EVERY_S = 1.0
_LOOKUP_EVERY_S = 5.0
_REFRESH_EVERY_S = 30.0  # the actor may have been recreated (gateway restart)
_WAITING_MAX_AGE_S = 5.0  # an older read of the gateways' queues counts as nothing waiting


class QueueDepthPolicy:
    """A Serve autoscaling policy object: one per model deployment, kept by the controller."""

    def __init__(self, model: str, limits: dict[str, Any], fleet_app: str | None = None):
        self.model = model
        # The application whose fleet-state actor /fleet reads: the gateway's, also for a
        # model deployed in its own fast-lane application.
        self.fleet_app = fleet_app
        self.limits = Limits.from_spec(limits)
        self._actor = None
        self._looked_up_at = 0.0
        self._published_at = 0.0
        self._published_key: tuple | None = None
        self.last_scale: dict[str, Any] | None = None
        self.counts = {"up": 0, "down": 0}
        self._last_target: int | None = None
        self.scale_up_classes = set(limits.get("scale_up_classes") or ("interactive", "standard", "batch"))
        self._waiting: tuple[float, dict[str, int]] = (0.0, {})
        self._waiting_ref = None

    def observe(self, ctx, waiting: dict[str, int] | None = None) -> Observation:
        """What the replicas and handles report, plus ``waiting``: the requests per class in the
        gateways' fair queues (those of ``scale_up_classes`` count; any of them wakes a model at zero)."""
        per_replica = (ctx.aggregated_metrics or {}).get(QUEUE_DEPTH_METRIC) or {}
        queued_at_handles = float(ctx.total_queued_requests or 0)
        if per_replica:
            queue = sum(float(v) for v in per_replica.values()) + queued_at_handles
        else:
            # No replica has reported yet (just started, or none running): Serve's own count.
            queue = float(ctx.total_num_requests or 0)
        waiting = waiting or {}
        queue += sum(float(n) for c, n in waiting.items() if c in self.scale_up_classes)
        running = int(ctx.current_num_replicas)
        starting = max(0, int(ctx.target_num_replicas) - running)
        if running + starting == 0 and any(waiting.values()):
            queue = max(queue, 1.0)  # a batch backlog alone still needs one replica to run on
        return Observation(queue_depth=round(queue, 2), running=running, starting=starting)

    def gateway_waiting(self, app_name: str | None, now: float) -> dict[str, int]:
        """The gateways' fair queues of this model, per class: the answer to the previous tick's
        read of the fleet state (the controller's loop never waits on an actor)."""
        if self._waiting_ref is None:
            actor = self.state_actor(app_name, now)
            if actor is not None:
                try:
                    ref = actor.gateway_queue.remote(self.model)
                    self._waiting_ref = ref
                    ref.future().add_done_callback(self._waiting_read)
                except Exception as e:  # noqa: BLE001
                    log.debug("autoscaler: reading the gateway queue failed: %r", e)
                    self._actor, self._waiting_ref = None, None
        at, waiting = self._waiting
        return waiting if now - at <= _WAITING_MAX_AGE_S else {}

    def _waiting_read(self, future) -> None:
        try:
            self._waiting = (time.time(), dict(future.result()))
        except Exception as e:  # noqa: BLE001 - the actor away: counted as nothing waiting
            log.debug("autoscaler: gateway queue read failed: %r", e)
        self._waiting_ref = None

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time or time.time()
        obs = self.observe(ctx, self.gateway_waiting(self.fleet_app or ctx.app_name, now))
        saved = ctx.policy_state or {}
        state = State(saved.get("want_up_since"), saved.get("want_down_since"), saved.get("last_busy"))
        if self._last_target is not None and ctx.target_num_replicas > self._last_target == 0:
            # Serve scales a model at zero itself, before calling any policy, as soon as a
            # request waits for it (the cold-start fast path); record that decision too.
            self._scaled("up", 0, ctx.target_num_replicas, "requests waiting for a model at zero: cold start", now)
        decision, state = decide(obs, self.limits, state, now)
        if decision.direction != "hold" and decision.target != ctx.target_num_replicas:
            self._scaled(decision.direction, ctx.target_num_replicas, decision.target, decision.reason, now)
        self._last_target = decision.target
        self._publish(ctx, obs, decision, now)
        new_state = {"want_up_since": state.want_up_since, "want_down_since": state.want_down_since,
                     "last_busy": state.last_busy}
        return decision.target, new_state

    # -- visibility ------------------------------------------------------------------------

    def _scaled(self, direction: str, before: int, after: int, reason: str, now: float) -> None:
        self.counts[direction] += 1
        self.last_scale = {"direction": direction, "from": before, "to": after, "reason": reason, "at": now}
        log.info("autoscaler: model %s: %s %d -> %d (%s)", self.model, direction, before, after, reason)

    def _publish(self, ctx, obs: Observation, decision, now: float) -> None:
        key = (decision.target, decision.direction, obs.running, obs.starting)
        if key == self._published_key and now - self._published_at < _PUBLISH_EVERY_S:
            return
        actor = self.state_actor(self.fleet_app or ctx.app_name, now)
        if actor is None:
            return
        snapshot = {
            "queue_depth": obs.queue_depth,
            "replicas": {"running": obs.running, "starting": obs.starting, "target": decision.target},
            "last_decision": {"direction": decision.direction, "target": decision.target,
                              "reason": decision.reason, "at": now},
            "last_scale": self.last_scale,
            "decisions": dict(self.counts),
        }
        try:
            actor.record.remote(self.model, snapshot)
        except Exception as e:  # noqa: BLE001 - visibility must never break scaling
            log.debug("autoscaler: publishing state failed: %r", e)
            self._actor = None
            return
        self._published_key = key
        self._published_at = now

    def state_actor(self, app_name: str | None, now: float):
        """The fleet-state actor (looked up again now and then; None while there is none)."""
        since = now - self._looked_up_at
        if app_name and (since >= _REFRESH_EVERY_S or (self._actor is None and since >= _LOOKUP_EVERY_S)):
            self._looked_up_at = now
            try:
                from orchestrator.autoscaling import state

                self._actor = state.lookup(app_name)
            except Exception as e:  # noqa: BLE001
                log.debug("autoscaler: fleet state lookup failed: %r", e)
        return self._actor
