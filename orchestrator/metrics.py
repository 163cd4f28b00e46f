"""Every metric name, defined once.

Gateway-side (this module, one registry per gateway process):

* ``slm_requests_total{model,endpoint,status}``: finished requests by HTTP status
  (``cancelled`` for clients that went away mid-stream);
* ``slm_time_to_first_token_seconds{model,endpoint}``: histogram, streaming requests;
* ``slm_request_latency_seconds{model,endpoint}``: histogram, end to end;
* ``slm_requests_in_flight{model}``: gauge;
* ``slm_requests_held{model}``: gauge, requests waiting for a model's first ready replica;
* ``slm_queue_depth{model}``: gauge, the engines' waiting + running requests the
  autoscaler last saw (plus requests queued before any replica took them);
* ``slm_replicas{model,state}``: gauge, replicas ``running``, ``starting`` and ``target``;
* ``slm_autoscaler_decisions_total{model,direction}``: scaling decisions (``up``/``down``);
* ``slm_router_picks_total{model,replica,policy}`` and ``slm_router_spills_total{model,policy}``
  (from ``orchestrator.routing``): where the request router sent each request.

Engine-side, vLLM's own metrics from every model replica are appended to ``/metrics``
with a ``replica`` label, among them the per-model token counters
``vllm:prompt_tokens_total`` and ``vllm:generation_tokens_total`` and the scheduler's
``vllm:num_requests_running`` / ``vllm:num_requests_waiting``.
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    """The gateway's metrics in their own registry (so tests and replicas don't collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "slm_requests_total", "Finished requests by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"], registry=self.registry,
        )
        self.ttft = Histogram(
            "slm_time_to_first_token_seconds", "Time from request to the first streamed token.",
            ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.latency = Histogram(
            "slm_request_latency_seconds", "End-to-end request latency.",
            ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge(
            "slm_requests_in_flight", "Requests being answered now.", ["model"], registry=self.registry,
        )
        self.held = Gauge(
            "slm_requests_held", "Requests waiting for the model's first ready replica.", ["model"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "slm_queue_depth", "Waiting plus running requests the autoscaler last saw.", ["model"],
            registry=self.registry,
        )
        self.replicas = Gauge(
            "slm_replicas", "Replicas by state (running, starting, target).", ["model", "state"],
            registry=self.registry,
        )
        self.decisions = DecisionCounts()
        self.registry.register(self.decisions)


class DecisionCounts:
    """``slm_autoscaler_decisions_total``: counts kept by the policy in Serve's controller,
    exposed here as a counter family (set from the fleet state at scrape time)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], float] = {}

    def set(self, model: str, direction: str, value: float) -> None:
        self.counts[(model, direction)] = value

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("slm_autoscaler_decisions", "Scaling decisions by model and direction.",
                                     labels=["model", "direction"])
        for (model, direction), value in sorted(self.counts.items()):
            family.add_metric([model, direction], value)
        yield family


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?(\s.*)$")


def label_samples(text: str, labels: dict[str, str], prefix: str = "") -> str:
    """Keep the families of Prometheus text whose name starts with ``prefix``; add labels."""
    extra = ",".join(f'{k}="{v}"' for k, v in labels.items())
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[2].startswith(prefix):
                out.append(line)
            continue
        m = _SAMPLE.match(line)
        if not m or not m.group(1).startswith(prefix):
            continue
        name, existing, rest = m.groups()
        if existing and existing != "{}":
            out.append(f"{name}{{{extra},{existing[1:]}{rest}")
        else:
            out.append(f"{name}{{{extra}}}{rest}")
    return "\n".join(out) + "\n" if out else ""


def merge_exposition(texts: list[str]) -> str:
    """Merge Prometheus texts so each family's HELP, TYPE and samples stand together once."""
    families: dict[str, dict[str, Any]] = {}
    for text in texts:
        current = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = families.setdefault(parts[2], {"HELP": None, "TYPE": None, "samples": []})
                    current[parts[1]] = current[parts[1]] or line
                continue
            if current is None:
                name = line.split("{", 1)[0].split(" ", 1)[0]
                current = families.setdefault(name, {"HELP": None, "TYPE": None, "samples": []})
            current["samples"].append(line)
    out = []
    for family in families.values():
        out.extend(line for line in (family["HELP"], family["TYPE"]) if line)
        out.extend(family["samples"])
    return "\n".join(out) + "\n" if out else ""
