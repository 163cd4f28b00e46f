"""The gateway's fair queue, live: while a model's replicas run their concurrency bound,
admitted requests wait here instead of in vLLM's first-come-first-served queue, and leave in
the order of ``orchestrator.gateway.fairqueue`` (class, then weighted share, then FIFO).

The bound of one gateway replica is its share of the model's: ``running replicas x
queue.max_concurrency_per_replica / gateway.replicas`` (rounded up). Each gateway replica
orders its own waiting requests; Serve's proxy spreads requests over the gateway replicas,
so each key's traffic, and with it each key's share, splits the same way over them. No
request pays a round trip to a shared actor. Of each share, ``interactive_reserve`` slots
per replica are kept for interactive requests.

A waiting request ends one of four ways: a slot frees up (``Slot.wait`` returns), its class's
``max_wait_s`` passes (503 ``model_overloaded`` with Retry-After), its client leaves (the
caller's ``release`` takes it out at once), or the model has no ready replica and cold-start
holding gives up (``Hold``, the same checks as for a request held at a cold model: at zero
replicas the queue's bound is 0, so a cold model's requests wait here, in class order).

Every second while it has requests waiting or running, each gateway replica reports its
queue per class to the fleet-state actor: the autoscaling policy adds the waiting requests of the model's
``scale_up_classes`` to the engine queue it scales on, and ``/fleet`` shows them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from orchestrator import errors
from orchestrator.engine.args import accelerator
from orchestrator.gateway.fairqueue import FairQueue, Ticket
from orchestrator.metrics import GatewayMetrics
from orchestrator.spec import CLASSES, FleetSpec, ModelSpec

log = logging.getLogger("orchestrator.gateway")

REPORT_S = 1.0
OVERLOADED_RETRY_AFTER_S = 5


class ModelQueue:
    """One model's waiting requests and dispatched slots at this gateway replica."""

    def __init__(self, spec: ModelSpec, gateways: int, metrics: GatewayMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self.gateways = max(1, gateways)
        self.metrics = metrics
        self.fair = FairQueue(clock)
        self.per_replica = spec.queue.bound(spec.engine, accelerator(spec))
        self.reserve_per_replica = spec.queue.reserve(self.per_replica)
        self.limit: int | None = None  # None: replicas not known yet, no bound
        self.reserve = 0
        # Whether any API key is interactive: the default reserve holds slots only for requests
        # that can exist (an explicit queue.interactive_reserve always applies).
        self.interactive_keys = True
        self.in_flight = 0
        self.cold = False  # no running replica: waits are the cold start's, not max_wait_s's
        self._futures: dict[Ticket, asyncio.Future] = {}

    def set_running(self, running: int | None) -> None:
        """The model's running replicas changed (None: not known): recompute the bound, dispatch."""
        self.cold = running == 0
        if running is None:
            self.limit, self.reserve = None, 0
        elif running == 0:
            # One request per gateway replica goes on to Serve's handle, which wakes the model
            # itself (and holds it) even when the queue reports cannot reach the autoscaler;
            # the rest wait here, in class order.
            self.limit, self.reserve = 1, 0
        else:
            self.limit = math.ceil(running * self.per_replica / self.gateways)
            reserve = self.reserve_per_replica
            if self.spec.queue.interactive_reserve is None and not self.interactive_keys:
                reserve = 0
            self.reserve = min(math.ceil(running * reserve / self.gateways), max(0, self.limit - 1))
        self.dispatch()

    def allowed(self) -> tuple[str, ...]:
        """The classes that may take a slot now."""
        if self.limit is None or self.in_flight < self.limit - self.reserve:
            return CLASSES
        if self.in_flight < self.limit:
            return ("interactive",)
        return ()

    def push(self, t: Ticket) -> bool:
        """Queue ``t``; True when it got a slot at once."""
        self.fair.push(t)
        self._futures[t] = asyncio.get_running_loop().create_future()
        self.dispatch()
        if t.state == "granted":
            return True
        self._gauge(t.cls)
        return False

    def dispatch(self) -> None:
        while (allowed := self.allowed()) and (t := self.fair.pop(allowed)) is not None:
            self.in_flight += 1
            future = self._futures.pop(t, None)
            if future is not None and not future.done():
                future.set_result(True)
            if self.metrics is not None:
                self.metrics.queue_wait.labels(self.spec.name, t.cls).observe(t.waited_s)
            self._gauge(t.cls)

    def release(self, t: Ticket) -> None:
        """``t`` ended, however it ended: its slot freed, or taken out of the queue."""
        if t.state == "granted":
            t.state = "done"
            self.in_flight -= 1
            self.dispatch()
        elif self.fair.remove(t):
            self._futures.pop(t, None)
            self._gauge(t.cls)
        if self.in_flight == 0:
            self.fair.idle()

    async def wait(self, t: Ticket, timeout_s: float) -> bool:
        """Up to ``timeout_s`` for ``t``'s slot; True once it has it."""
        future = self._futures.get(t)
        if t.state == "granted" or future is None:
            return t.state == "granted"
        await asyncio.wait({future}, timeout=timeout_s)  # neither cancels it nor hides a cancellation
        return t.state == "granted"

    def _gauge(self, cls: str) -> None:
        if self.metrics is not None:
            self.metrics.queued.labels(self.spec.name, cls).set(len(self.fair.classes[cls]))


class Queues:
    """Every model's queue at this gateway replica, the waits of its requests, and the reports
    to the fleet state. ``running(model)``: the model's running replicas as last seen (None:
    not known yet); ``report(stats)``: sends ``{model: {class: {queued, oldest_wait_s}}}``."""

    def __init__(self, fleet: FleetSpec, metrics: GatewayMetrics | None, running: Callable[[str], int | None],
                 report: Callable[[dict[str, Any]], None] | None = None,
                 interactive_keys: Callable[[], bool] | None = None):
        """``interactive_keys()``: whether any API key is interactive now (default: assume so)."""
        self.fleet = fleet
        self._running = running
        self._interactive_keys = interactive_keys
        self._report = report
        self.max_wait_s = {c: getattr(fleet.gateway.classes, c).max_wait_s for c in CLASSES}
        self.queues = {m.name: ModelQueue(m, fleet.gateway.replicas, metrics) for m in fleet.models
                       if m.queue.enabled}
        self.metrics = metrics
        self._reporter: asyncio.Future | None = None
        self._reported_busy = False

    def running(self, model: str) -> int | None:
        """``model``'s running replicas (as last seen), noting whether interactive keys exist."""
        if self._interactive_keys is not None and model in self.queues:
            self.queues[model].interactive_keys = self._interactive_keys()
        return self._running(model)

    def enter(self, model: str, key: str, cls: str, cost: float, weight: float) -> Ticket | None:
        """Queue a request (None: the model has no fair queue); ``ticket.state`` is "granted"
        when it may go at once."""
        queue = self.queues.get(model)
        if queue is None:
            return None
        queue.set_running(self.running(model))
        t = Ticket(key, cls, max(1.0, float(cost)), weight)
        queue.push(t)
        self._keep_reporting()
        return t

    async def wait(self, model: str, t: Ticket, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for ``t``'s slot: True once granted; raises 503
        ``model_overloaded`` (``t`` taken out) once it waited past its class's ``max_wait_s``."""
        queue = self.queues[model]
        queue.set_running(self.running(model))
        cold, began = queue.cold, queue.fair.clock()
        left = self.max_wait_s[t.cls] - (began - t.arrived - t.cold_s)
        if await queue.wait(t, timeout_s if cold else max(0.0, min(timeout_s, left))):
            return True
        if cold:  # waiting for a replica to start: the cold start's timeout applies (Hold)
            t.cold_s += queue.fair.clock() - began
            return False
        if queue.fair.clock() - t.arrived - t.cold_s >= self.max_wait_s[t.cls]:
            queue.release(t)
            if self.metrics is not None:
                self.metrics.queue_timeouts.labels(model, t.cls).inc()
            raise errors.Overloaded(
                f"The model '{model}' is at capacity: this {t.cls} request waited {t.waited_s:.0f}s for a slot "
                f"(gateway.classes.{t.cls}.max_wait_s); retry shortly", retry_after_s=OVERLOADED_RETRY_AFTER_S)
        return False

    def release(self, model: str, t: Ticket | None) -> None:
        if t is not None and model in self.queues:
            self.queues[model].release(t)

    def stats(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per model with a fair queue: per class ``queued`` and ``oldest_wait_s``, plus ``in_flight``."""
        return {m: {**q.fair.stats(), "in_flight": q.in_flight, "limit": q.limit} for m, q in self.queues.items()}

    def _keep_reporting(self) -> None:
        if self._report is not None and (self._reporter is None or self._reporter.done()):
            self._reporter = asyncio.ensure_future(self._report_loop())

    async def _report_loop(self) -> None:
        """Every REPORT_S while anything waits or runs (and once after): recheck the bounds
        (replicas started or left) and report the queues."""
        while True:
            busy = False
            for model, queue in self.queues.items():
                queue.set_running(self.running(model))
                busy = busy or len(queue.fair) > 0 or queue.in_flight > 0
            try:
                self._report(self.stats())
            except Exception as e:  # noqa: BLE001 - visibility and scaling hints only
                log.debug("queue report failed: %r", e)
            if not busy:
                return
            await asyncio.sleep(REPORT_S)


def queue_view(spec: ModelSpec, reported: dict[str, Any] | None) -> dict[str, Any]:
    """``/fleet``'s fair queue of a model: its bound and, summed over the gateway replicas that
    reported in the last seconds, what waits per class and the oldest wait."""
    per_replica = spec.queue.bound(spec.engine, accelerator(spec))
    reported = reported or {}
    return {
        "enabled": spec.queue.enabled,
        "max_concurrency_per_replica": per_replica,
        "interactive_reserve": spec.queue.reserve(per_replica),
        "classes": {c: {"queued": int((reported.get(c) or {}).get("queued", 0)),
                        "oldest_wait_s": float((reported.get(c) or {}).get("oldest_wait_s", 0.0))} for c in CLASSES},
        "scale_up_classes": list(spec.autoscaling.scale_up_classes),
        # What the gateway replicas that reported have dispatched, and the sum of their bounds.
        "in_flight": int(reported.get("in_flight", 0)),
        "limit": int(reported.get("limit", 0)),
        "gateways_reporting": int(reported.get("gateways", 0)),
    }
