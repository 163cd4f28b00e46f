"""The queue-depth autoscaling policy, a pure function of (metrics, spec, replicas, time).

It imports no Ray (``serve_policy`` plugs it into Serve); its limits and their defaults are
the fields of the fleet spec's ``AutoscalingSpec``.

Desired replicas = ceil(total queue depth / target_queue_depth), clamped to
[min_replicas, max_replicas]. Replicas already starting count toward capacity, so a
burst asks once for what it needs instead of doubling while replicas boot. Scaling up
waits ``upscale_delay_s`` of sustained demand, down ``downscale_delay_s``; a model with
``min_replicas: 0`` goes to zero only after ``idle_timeout_s`` without any request.

Example::

    limits = Limits.from_spec(model.autoscaling)      # target_queue_depth 8, max_replicas >= 5
    decision, state = decide(Observation(queue_depth=40, running=1, starting=0), limits, state, now)
    decision.target, decision.reason   # after upscale_delay_s of this: (5, "queue 40 at target 8/replica needs 5; ...")
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from orchestrator.spec import AutoscalingSpec


def _default(name: str) -> Any:
    return AutoscalingSpec.model_fields[name].default


@dataclasses.dataclass(frozen=True)
class Limits:
    """The autoscaling fields of a model's spec that the policy reads, with the spec's defaults."""

    min_replicas: int = _default("min_replicas")
    max_replicas: int = _default("max_replicas")
    target_queue_depth: float = _default("target_queue_depth")
    upscale_delay_s: float = _default("upscale_delay_s")
    downscale_delay_s: float = _default("downscale_delay_s")
    idle_timeout_s: float = _default("idle_timeout_s")
    # Scale up only when the queue exceeds current capacity by more than this fraction:
    # reports from replicas and handles are sampled at different instants, and a queue
    # sitting exactly at N x target must not flap between N and N+1 replicas.
    tolerance: float = 0.1

    @classmethod
    def from_spec(cls, autoscaling: Any) -> Limits:
        """The limits of a model's ``autoscaling`` block (an AutoscalingSpec or its dict)."""
        get = autoscaling.get if isinstance(autoscaling, dict) else lambda k: getattr(autoscaling, k)
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "tolerance"]
        return cls(**{name: get(name) for name in fields})


@dataclasses.dataclass(frozen=True)
class Observation:
    """What the replicas reported: waiting + running requests summed over all replicas."""

    queue_depth: float
    running: int
    starting: int = 0


@dataclasses.dataclass(frozen=True)
class State:
    """What the policy remembers between calls (kept by the caller, e.g. Serve's policy_state)."""

    want_up_since: float | None = None
    want_down_since: float | None = None
    last_busy: float | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    target: int
    direction: Literal["up", "down", "hold"]
    reason: str


def desired_replicas(queue_depth: float, limits: Limits) -> int:
    """Replicas the queue needs, clamped; at least 1 while any request is queued."""
    need = math.ceil(max(queue_depth, 0.0) / limits.target_queue_depth)
    if queue_depth > 0:
        need = max(need, 1)
    return max(limits.min_replicas, min(limits.max_replicas, need))


def decide(obs: Observation, limits: Limits, state: State, now: float) -> tuple[Decision, State]:
    """One autoscaling step: the new target and its reason, and the state to keep."""
    current = obs.running + obs.starting
    # A policy that has never seen traffic (fresh start, controller restart) counts as busy
    # now, so an idle timeout runs from its start rather than firing at once.
    last_busy = now if obs.queue_depth > 0 or state.last_busy is None else state.last_busy
    need = desired_replicas(obs.queue_depth, limits)
    per = f"queue {obs.queue_depth:g} at target {limits.target_queue_depth:g}/replica needs {need}"
    have = f"{obs.running} running + {obs.starting} starting"

    if need > current and current > 0 and obs.queue_depth <= current * limits.target_queue_depth * (
            1 + limits.tolerance) and limits.min_replicas <= current:
        return (Decision(current, "hold", f"{per}; within {limits.tolerance:.0%} of {current} x target, holding"),
                State(None, None, last_busy))

    if need > current:
        since = state.want_up_since if state.want_up_since is not None else now
        new_state = State(want_up_since=since, want_down_since=None, last_busy=last_busy)
        if current == 0 or now - since >= limits.upscale_delay_s:
            return Decision(need, "up", f"{per}; have {have}"), dataclasses.replace(new_state, want_up_since=None)
        waited = f"{now - since:.1f}/{limits.upscale_delay_s:g}s"
        return Decision(current, "hold", f"{per}; waiting {waited} to scale up"), new_state

    if need < current:
        if need == 0:
            idle_for = now - last_busy
            if idle_for >= limits.idle_timeout_s:
                return (Decision(0, "down", f"idle {idle_for:.0f}s >= idle_timeout_s {limits.idle_timeout_s:g}s"),
                        State(None, None, last_busy))
            if current <= 1:
                return (Decision(current, "hold", f"idle {idle_for:.0f}/{limits.idle_timeout_s:g}s before zero"),
                        State(None, None, last_busy))
            need = 1  # keep one replica until the idle timeout; shed the others as usual
        since = state.want_down_since if state.want_down_since is not None else now
        new_state = State(want_up_since=None, want_down_since=since, last_busy=last_busy)
        if now - since >= limits.downscale_delay_s:
            return Decision(need, "down", f"{per}; have {have}"), dataclasses.replace(new_state, want_down_since=None)
        waited = now - since
        return (Decision(current, "hold", f"{per}; waiting {waited:.0f}/{limits.downscale_delay_s:g}s to scale down"),
                new_state)

    return Decision(current, "hold", f"{per}; have {have}"), State(None, None, last_busy)
