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
from pydantic import Field, ValidationError, field_validator, model_validator

from orchestrator import sources, vllm_args
from orchestrator.spec_parts import (
    CLASSES,
    NAME_PATTERN,
    AdapterSpec,
    AutoscalingSpec,
    ClassesSpec,
    ClassSpec,
    DerivedDraft,
    PriorityClass,
    QueueSpec,
    RequestLimits,
    ResourcesSpec,
    RoutingPolicy,
    RoutingSpec,
    SpeculativeSpec,
    _Strict,
)

__all__ = ["CLASSES", "ClassesSpec", "ClassSpec", "PriorityClass", "QueueSpec",
           "AdapterSpec", "AutoscalingSpec", "DerivedDraft", "RequestLimits", "ResourcesSpec", "RoutingPolicy",
           "RoutingSpec", "SpeculativeSpec", "ModelSpec", "GatewaySpec", "FleetSpec", "AuthSpec", "AuditSpec",
           "FieldError", "FleetValidationError", "field_errors", "parse_fleet", "load_fleet", "read_yaml",
           "parse_yaml", "read_fleet_data", "demo_fleet_path"]

Task = Literal["generate", "embed"]


class ModelSpec(_Strict):
    """One served model: where its weights come from and how its replicas run."""

    name: str = Field(
        ...,
        min_length=1,
        max_length=128,
        pattern=NAME_PATTERN,
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

    queue: QueueSpec = Field(
        default_factory=QueueSpec,
        description="The gateway's fair queue for this model (priority classes, weighted shares between keys).",
    )

    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        description=(
            "LoRA adapters served on this model's replicas, each under its own name (a model id of its own). "
            "Adding, removing or replacing one and re-applying the fleet loads or unloads it on the running "
            "replicas without a restart. Turns on engine.enable_lora; max_lora_rank, max_loras and max_cpu_loras "
            "are derived (set them in engine to override)."
        ),
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
    def priority_scheduling(self) -> bool:
        """Whether the engine schedules by request priority (the derived default for generative
        models; ``engine.scheduling_policy: fcfs`` turns it off)."""
        return self.task == "generate" and self.engine.get("scheduling_policy", "priority") == "priority"

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
    classes: ClassesSpec = Field(
        default_factory=ClassesSpec,
        description="Request classes (interactive > standard > batch): how long each may wait in the fair queue.",
    )


class FleetSpec(_Strict):
    """The whole fleet: models and the gateway in front of them."""

    models: list[ModelSpec] = Field(..., min_length=1, description="Models to serve.")
    gateway: GatewaySpec = Field(default_factory=GatewaySpec, description="Gateway settings.")

    def model(self, name: str) -> ModelSpec | None:
        for model in self.models:
            if model.name == name:
                return model
        return None

    def adapter(self, name: str) -> tuple[ModelSpec, AdapterSpec] | None:
        """(the base model, the adapter) for an adapter's name; None when no adapter has it."""
        for model in self.models:
            for adapter in model.adapters:
                if adapter.name == name:
                    return model, adapter
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


def _name_errors(fleet: FleetSpec) -> list[FieldError]:
    """Every model and adapter name is a model id clients pass: each may appear once."""
    first: dict[str, str] = {}
    errors = []
    for i, model in enumerate(fleet.models):
        named = [(f"models[{i}].name", model.name)]
        named += [(f"models[{i}].adapters[{j}].name", a.name) for j, a in enumerate(model.adapters)]
        for path, name in named:
            if name in first:
                errors.append(FieldError(path, f"{name!r} is already the name of {first[name]}"))
            else:
                first[name] = path
    return errors


def parse_fleet(data: Any, origin: str = "<fleet>") -> FleetSpec:
    """Validate a fleet given as plain data; raise FleetValidationError naming each field."""
    if not isinstance(data, dict):
        raise FleetValidationError(origin, [FieldError("", "the fleet must be a mapping with a `models` list")])
    try:
        fleet = FleetSpec.model_validate(data)
    except ValidationError as e:
        raise FleetValidationError(origin, field_errors(e)) from None
    errors = _name_errors(fleet)
    for i, model in enumerate(fleet.models):
        if model.adapters:
            from orchestrator import adapters

            errors += [FieldError(*problem) for problem in adapters.adapter_problems(model, i)]
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
