"""The Ray Serve request router for every model deployment (see ``orchestrator.routing.policy``).

Serve pickles this module by value into each handle's process, so it holds no state of
its own at module level: metrics and choice logic live in ``orchestrator.routing.policy``.
"""

from __future__ import annotations

import itertools
from typing import Any

from ray.serve.request_router import FIFOMixin, RequestRouter

from orchestrator.routing import policy as routing


class SlmRequestRouter(FIFOMixin, RequestRouter):
    """One router for all four policies; ``request_router_kwargs`` pick the policy.

    ``FIFOMixin``: Serve gives each replica chosen to the oldest pending request. In two
    runs here without it (each choice kept for the request it was made for), a burst of
    12 was routed a few requests at a time, so its load never built up enough to spill
    over; with it, all 12 were routed at once."""

    def initialize_state(self, model: str = "", policy: str = "least-queue", load_factor: float = 1.25,
                         **_: Any) -> None:
        self.model = model
        self.policy = policy
        self.load_factor = load_factor
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {rid: float(routing.IN_FLIGHT.load(rid)) for rid in by_id}
        key = pending_request.kwargs.get("route_key") if pending_request is not None else None
        order, spilled = routing.rank(self.policy, loads, key, self.load_factor, next(self._turn))
        if spilled:
            routing.SPILLS.labels(self.model, self.policy).inc()
        replicas = [by_id[rid] for rid in order]
        track = pending_request.kwargs.get("track") if pending_request is not None else None
        if track:
            # Count it now: the next choice of a burst must see it.
            routing.IN_FLIGHT.routed(track, order[0])
        # The chosen replica first; if it cannot take the request (full), the rest.
        return [replicas[:1], replicas[1:]] if len(replicas) > 1 else [replicas]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        # Count client requests only, not the gateway's own calls (metrics_text).
        if pending_request.metadata.call_method in ("call", "stream"):
            routing.PICKS.labels(self.model, replica_id.unique_id, self.policy).inc()
            track = pending_request.kwargs.get("track")
            if track:
                routing.IN_FLIGHT.moved(track, replica_id.unique_id)
