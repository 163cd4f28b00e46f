"""Admission control's capacity rule, for every front door: a quick 503 ``model_overloaded``
while a model's queue is past ``max_queue_per_replica`` per running replica, so the requests
already admitted keep a bounded latency.

The bound is the model's ``limits.max_queue_per_replica``, else the gateway's (``bound``; the
request caps fall back the same way, ``limit``).
What counts as the queue depends on where the request enters: the fleet's queue as the
autoscaler last saw it, over the running replicas (the gateway, ``FleetView.queue_estimate``),
or one replica's own engine queue (a fast lane).
"""

from __future__ import annotations

from orchestrator import errors
from orchestrator.spec import FleetSpec, ModelSpec, RequestLimits


def limit(fleet: FleetSpec, spec: ModelSpec, name: str, adapter: RequestLimits | None = None) -> int | None:
    """A limit ``name``: the adapter's own (``adapters[].limits.<name>``) when the request names
    an adapter that sets it, else the model's (``limits.<name>``), else the gateway's."""
    for limits in (adapter, spec.limits, fleet.gateway.limits):
        value = getattr(limits, name) if limits is not None else None
        if value is not None:
            return value
    return None


def bound(fleet: FleetSpec, spec: ModelSpec) -> int | None:
    """Requests a model may queue per running replica (None: no admission control)."""
    return limit(fleet, spec, "max_queue_per_replica")


def check(model: str, queue: float, replicas: int, limit: int | None, where: str = "") -> None:
    """Raise 503 ``model_overloaded`` when ``queue`` is at ``limit`` x ``replicas`` (no running
    replica: nothing to compare, the request waits for one instead)."""
    if limit is None or replicas <= 0 or queue < limit * replicas:
        return
    what = f"{replicas} replicas" if replicas > 1 or not where else where
    raise errors.Overloaded(f"The model '{model}' is at capacity ({queue:g} requests queued for {what}, "
                            f"limit {limit} each); retry shortly")
