"""The gateway's metrics, and the parsing of vLLM's metrics it merges into ``/metrics``.

Gateway-side (defined here, one registry per gateway process):

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
* ``slm_spec_decode_acceptance_rate{model}``: accepted / drafted tokens of speculative
  decoding over every replica's life, and ``slm_spec_decode_accepted_tokens_per_step{model}``:
  tokens a verification step yields (1 + accepted per draft), both from vLLM's counters;
* ``slm_retries_total{model}``: non-streaming requests retried once after their replica died;
* ``slm_admission_rejected_total{model}``: quick 503s while a model's queue is past its bound;
* ``slm_admission_queue_estimated{model}``: 1 while admission control counts from the gateway
  replica's own in-flight requests because the fleet state is unavailable or stale, and
  ``slm_fleet_state_errors_total``: failed reads of the fleet-state actor;
* ``slm_adapter_replicas{model,adapter,state}``: gauge, a LoRA adapter's live replicas by its
  state there (``loaded``, ``failed``, ``loading``), as ``/fleet`` shows them.

Defined elsewhere, in the process that records them, and exposed by the same ``/metrics``:
``slm_router_picks_total{model,replica,policy}`` and ``slm_router_spills_total{model,policy}``
(``orchestrator.routing.policy``, in the routers running in each gateway replica).

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
        self.tokens = Counter(
            "slm_tokens_total", "Tokens of finished requests by model (an adapter's own name) and kind "
            "(prompt, completion), from each answer's usage (streams: when they ask for it).",
            ["model", "kind"], registry=self.registry,
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
        self.retries = Counter(
            "slm_retries_total", "Non-streaming requests retried on another replica after theirs died.",
            ["model"], registry=self.registry,
        )
        self.rejected = Counter(
            "slm_admission_rejected_total", "Requests refused by admission control (queue past its bound).",
            ["model"], registry=self.registry,
        )
        self.queue_estimated = Gauge(
            "slm_admission_queue_estimated", "1 while admission control for the model counts from this gateway "
            "replica's own in-flight requests, because the fleet state is unavailable or stale.", ["model"],
            registry=self.registry,
        )
        self.fleet_state_errors = Counter(
            "slm_fleet_state_errors_total", "Failed reads of the fleet-state actor (queue depth, start failures).",
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "slm_queue_wait_seconds", "Time requests waited in the gateway's fair queue, by model and class.",
            ["model", "class"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.queued = Gauge(
            "slm_queued_requests", "Requests waiting in this gateway replica's fair queue, by model and class.",
            ["model", "class"], registry=self.registry,
        )
        self.queue_timeouts = Counter(
            "slm_queue_timeouts_total", "Requests that waited past their class's max_wait_s (503).",
            ["model", "class"], registry=self.registry,
        )
        self.key_tokens = Counter(
            "slm_key_tokens_total", "Tokens of finished requests by API key, class and kind (prompt, completion).",
            ["key", "class", "kind"], registry=self.registry,
        )
        self.streams = Counter(
            "slm_streams_total", "Streams by how their body travelled: direct (the replica-to-gateway channel) "
            "or ray (the fallback through the Serve handle).", ["model", "transport"], registry=self.registry,
        )
        self.spec_acceptance = Gauge(
            "slm_spec_decode_acceptance_rate", "Speculative decoding: accepted / drafted tokens.", ["model"],
            registry=self.registry,
        )
        self.adapter_replicas = Gauge(
            "slm_adapter_replicas", "LoRA adapters: the model's live replicas by the adapter's state there "
            "(loaded, failed, loading).", ["model", "adapter", "state"], registry=self.registry,
        )
        self.spec_tokens_per_step = Gauge(
            "slm_spec_decode_accepted_tokens_per_step",
            "Speculative decoding: tokens per verification step (1 + accepted per draft).", ["model"],
            registry=self.registry,
        )


_SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}


def spec_decode_totals(texts: list[str]) -> dict[str, dict[str, float]]:
    """vLLM's speculative-decoding counters summed per model over replicas' metrics texts."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, dict[str, float]] = {}
    for text in texts:
        if "spec_decode" not in text:
            continue
        for family in text_string_to_metric_families(text):
            key = _SPEC_COUNTERS.get(family.name)
            if key is None:
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                model = sample.labels.get("model_name", "")
                per = totals.setdefault(model, {"drafts": 0.0, "draft_tokens": 0.0, "accepted_tokens": 0.0})
                per[key] += sample.value
    return totals


def spec_decode_rates(totals: dict[str, float]) -> dict[str, float | None]:
    """Acceptance rate and tokens per verification step from summed counters."""
    drafts, drafted, accepted = totals.get("drafts", 0), totals.get("draft_tokens", 0), totals.get("accepted_tokens", 0)
    return {
        "acceptance_rate": accepted / drafted if drafted else None,
        "accepted_tokens_per_step": 1 + accepted / drafts if drafts else None,
        "drafts": drafts,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
    }


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
