"""A replica's engine load: what admission control (fast lane) and the autoscaler read."""

from __future__ import annotations


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
        """A vLLM stat-logger factory whose loggers feed this object."""
        from orchestrator.engine import vllm_compat

        return vllm_compat.stat_logger_factory(self.record)
