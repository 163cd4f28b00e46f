"""vLLM's own engine and frontend arguments, as the installed vLLM defines them.

A model's ``engine`` block in the fleet holds vLLM argument names. This module knows which
names exist (``AsyncEngineArgs`` and the API server's ``FrontendArgs``), checks keys and
value types against them, splits a block into engine and frontend kwargs, and turns nested
config dicts into vLLM's config objects. vLLM is imported on first use, not at import.

Example::

    engine_arg_problems({"max_model_lenn": 2048})
    # [("max_model_lenn", "unknown vLLM engine argument (did you mean 'max_model_len'?)")]
    engine_kwargs, frontend_kwargs = split_engine_args(spec.engine)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import types
import typing
from typing import Any, NamedTuple

from pydantic import TypeAdapter, ValidationError

log = logging.getLogger(__name__)

# Engine keys the orchestrator sets itself from other fields of the spec.
_OWNED_ENGINE_KEYS = {
    "model": "set the model with `source`",
    "served_model_name": "clients use the model's `name`",
}
# vLLM frontend (API server) arguments that belong to the gateway, not to a worker.
_GATEWAY_FRONTEND_KEYS = {
    "host", "port", "grpc_port", "uds", "api_key", "ssl_keyfile", "ssl_certfile",
    "ssl_ca_certs", "enable_ssl_refresh", "ssl_cert_reqs", "ssl_ciphers", "root_path",
    "middleware", "allowed_origins", "allow_credentials", "allowed_methods",
    "allowed_headers", "uvicorn_log_level", "disable_uvicorn_access_log",
    "data_parallel_supervisor_port", "dp_supervisor_probe_interval_s",
    "dp_supervisor_probe_timeout_s", "dp_supervisor_probe_failure_threshold",
    "disable_access_log_for_endpoints", "h11_max_incomplete_event_size",
    "h11_max_header_count", "enable_offline_docs", "disable_fastapi_docs",
}

# JSON-schema types of the most used vLLM engine arguments. Validation in Python checks every
# engine key against the installed vLLM; this table lets tools that only see the exported JSON
# schema (the Helm chart's values.schema.json, editors) catch the common mistakes too.
ENGINE_ARG_SCHEMA: dict[str, dict[str, Any]] = {
    "tensor_parallel_size": {"type": "integer", "minimum": 1, "description": "GPUs per replica."},
    "pipeline_parallel_size": {"type": "integer", "minimum": 1},
    "max_model_len": {"type": "integer", "minimum": 1, "description": "Longest prompt plus output."},
    "max_num_seqs": {"type": "integer", "minimum": 1, "description": "Sequences batched at once."},
    "max_num_batched_tokens": {"type": "integer", "minimum": 1},
    "gpu_memory_utilization": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "dtype": {"type": "string", "enum": ["auto", "half", "float16", "bfloat16", "float", "float32"]},
    "quantization": {"type": ["string", "null"]},
    "kv_cache_dtype": {"type": "string"},
    "block_size": {"type": "integer", "minimum": 1},
    "seed": {"type": ["integer", "null"]},
    "enforce_eager": {"type": "boolean"},
    "enable_prefix_caching": {"type": ["boolean", "null"]},
    "trust_remote_code": {"type": "boolean"},
}


class ArgFields(NamedTuple):
    """vLLM's argument fields by name: the engine's, and the frontend's a worker may take."""

    engine: dict[str, dataclasses.Field]
    frontend: dict[str, dataclasses.Field]


@functools.cache
def arg_fields() -> ArgFields | None:
    """The installed vLLM's engine and frontend argument fields (None when vLLM is absent)."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.cli_args import FrontendArgs
    except ImportError:  # pragma: no cover - vLLM is a hard dependency
        log.warning("vLLM is not importable; engine arguments are not checked")
        return None
    engine = {f.name: f for f in dataclasses.fields(AsyncEngineArgs)}
    frontend = {
        f.name: f
        for f in dataclasses.fields(FrontendArgs)
        if f.name not in engine and f.name not in _GATEWAY_FRONTEND_KEYS
    }
    return ArgFields(engine, frontend)


@functools.cache
def _adapter(tp: Any) -> TypeAdapter | None:
    try:
        return TypeAdapter(tp)
    except Exception:  # noqa: BLE001 - some vLLM annotations have no pydantic schema
        return None


def _check_value(field: dataclasses.Field, value: Any) -> str | None:
    adapter = _adapter(field.type) if not isinstance(field.type, str) else None
    if adapter is None:
        return None
    try:
        adapter.validate_python(value, strict=False)
    except ValidationError as e:
        first = e.errors()[0]
        return f"invalid value {value!r}: {first['msg']}"
    except Exception:  # noqa: BLE001 - a validator of vLLM's own that needs more context
        return None
    return None


def engine_arg_problems(engine: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, problem) for each ``engine`` key that vLLM does not take from a fleet: unknown
    names (with the closest known one), keys the orchestrator or the gateway owns, and, where
    vLLM's annotation allows a check, values of the wrong type. Empty without vLLM."""
    fields = arg_fields()
    if fields is None:
        return []
    known = {**fields.engine, **fields.frontend}
    problems = []
    for key, value in engine.items():
        if key in _OWNED_ENGINE_KEYS:
            problems.append((key, f"not allowed here: {_OWNED_ENGINE_KEYS[key]}"))
        elif key in _GATEWAY_FRONTEND_KEYS:
            problems.append((key, "a server setting of vLLM's; the gateway owns it"))
        elif key not in known:
            hint = difflib.get_close_matches(key, list(known), n=1)
            more = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append((key, f"unknown vLLM engine argument{more}"))
        elif problem := _check_value(known[key], value):
            problems.append((key, problem))
    return problems


def split_engine_args(engine: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a model's ``engine`` block into vLLM engine kwargs and frontend kwargs."""
    fields = arg_fields()
    if fields is None:
        return dict(engine), {}
    eng = {k: v for k, v in engine.items() if k in fields.engine}
    front = {k: v for k, v in engine.items() if k in fields.frontend}
    return eng, front


def _config_type(annotation: Any) -> type | None:
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _config_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if found := _config_type(arg):
                return found
    return None


def config_objects(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine kwargs with nested config dicts (e.g. speculative_config) made vLLM's config
    objects, as its CLI does."""
    fields = arg_fields()
    if fields is None:
        return dict(engine_kwargs)
    out = dict(engine_kwargs)
    for key, value in engine_kwargs.items():
        field = fields.engine.get(key)
        if field is None or not isinstance(value, dict):
            continue
        config_type = _config_type(field.type)
        if config_type is not None:
            out[key] = TypeAdapter(config_type).validate_python(value)
    return out
