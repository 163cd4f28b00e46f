"""LoRA adapters: what a PEFT adapter folder says about itself, the checks against its base
model, and the vLLM engine arguments a model's adapters call for.

An adapter folder in PEFT layout holds ``adapter_config.json`` (rank ``r``, ``target_modules``,
``base_model_name_or_path``) and ``adapter_model.safetensors``. Local folders (and ``pkg://``)
are read at validation time; ``hf://`` adapters are checked by vLLM when a replica loads
them (a failure is reported in ``/fleet`` and answers 503, see ``orchestrator.engine.server``).

Example::

    info = read_adapter_config("/adapters/team-a-sql")   # AdapterInfo(rank=16, ...)
    lora_engine_args(model)                              # {"enable_lora": True, "max_lora_rank": 16, ...}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from pathlib import Path
from typing import Any

from orchestrator import sources

# vLLM's accepted max_lora_rank values (vllm.config.lora.MaxLoRARanks).
SUPPORTED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Derived defaults, chosen to stay put while adapters come and go: a changed engine argument
# restarts the model's replicas, so these change only when the adapter set outgrows them.
DEFAULT_RANK = 16
DEFAULT_SLOTS = 4  # max_loras: adapters one batch can mix
DEFAULT_CPU_CACHE = 32  # max_cpu_loras: adapters kept loaded in host memory
LLAMA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                           "embed_tokens", "lm_head"})
LORA_ARGS = ("enable_lora", "max_lora_rank", "max_loras", "max_cpu_loras")


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What an adapter's folder says: its rank, the modules it adapts, the base it was made
    for, and the size of its weights on disk."""

    rank: int
    target_modules: tuple[str, ...] | None  # None: a regex (PEFT allows one), not checked here
    base_model: str | None
    size_bytes: int | None
    alpha: float | None = None


def local_folder(source: str) -> Path | None:
    """The adapter's folder for a local or pkg:// source; None for hf://."""
    parsed = sources.parse_source(source)
    if parsed.kind == "hf":
        return None
    try:
        return sources.local_path(parsed)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


def resolve_adapter(source: str) -> str:
    """The local folder vLLM loads for an adapter source. An ``hf://`` adapter is downloaded
    here (its revision honoured; the hub cache makes a second call free), not by vLLM inside
    its engine loop, where a download would stall every running request."""
    parsed = sources.parse_source(source)
    if parsed.kind == "hf":
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(parsed.location, revision=parsed.revision)
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access: the adapter fails
            raise ValueError(f"cannot fetch {source}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return str(sources.local_path(parsed))


def read_adapter_config(folder: str | Path) -> AdapterInfo:
    """An adapter folder's AdapterInfo; ValueError saying what is missing or wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder (an adapter is a folder in PEFT layout)")
    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder} has no adapter_config.json (expected a PEFT adapter folder)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"{config_path}: peft_type {peft_type!r}; only LORA adapters are served")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{config_path}: `r` (the rank) is {rank!r}, not a positive integer")
    targets = config.get("target_modules")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        target_modules: tuple[str, ...] | None = tuple(sorted(targets))
    elif isinstance(targets, str):
        target_modules = None  # a regex over module names
    else:
        raise ValueError(f"{config_path}: `target_modules` is {targets!r}, not a list of module names")
    weights = [folder / name for name in ("adapter_model.safetensors", "adapter_model.bin")]
    size = next((w.stat().st_size for w in weights if w.is_file()), None)
    if size is None:
        raise ValueError(f"{folder} has no adapter_model.safetensors")
    alpha = config.get("lora_alpha")
    return AdapterInfo(rank, target_modules, config.get("base_model_name_or_path"), size,
                       float(alpha) if isinstance(alpha, int | float) else None)


def adapter_info(source: str) -> AdapterInfo | None:
    """AdapterInfo for a local or pkg:// source; None for hf:// (vLLM checks those when it
    loads them). Raises ValueError for a local folder that is not a usable adapter."""
    folder = local_folder(source)
    return None if folder is None else read_adapter_config(folder)


def rank_ceiling(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds ``rank``; ValueError past its largest."""
    for supported in SUPPORTED_RANKS:
        if supported >= rank:
            return supported
    raise ValueError(f"rank {rank} is over vLLM's largest max_lora_rank ({SUPPORTED_RANKS[-1]})")


def _known_ranks(model) -> list[int]:
    ranks = []
    for adapter in model.adapters:
        try:
            info = adapter_info(adapter.source)
        except ValueError:
            continue  # reported by adapter_problems
        if info is not None:
            ranks.append(info.rank)
    return ranks


def lora_engine_args(model) -> dict[str, tuple[Any, str]]:
    """The LoRA engine arguments a model's adapters call for, each with why, for the keys the
    fleet did not set in ``engine`` ({} for a model without adapters)."""
    if not model.adapters:
        return {}
    ranks = _known_ranks(model)
    count = len(model.adapters)
    largest = max(ranks, default=0)
    try:
        rank = max(DEFAULT_RANK, rank_ceiling(largest)) if largest else DEFAULT_RANK
    except ValueError:
        rank = SUPPORTED_RANKS[-1]  # adapter_problems refuses the fleet
    slots = model.engine.get("max_loras", DEFAULT_SLOTS)
    derived: dict[str, tuple[Any, str]] = {
        "enable_lora": (True, f"the model has {count} adapter(s)"),
        "max_lora_rank": (rank, f"the largest adapter rank is {largest or 'unknown'}; at least {DEFAULT_RANK} so "
                                "a new adapter of up to that rank loads without a restart"),
        "max_loras": (DEFAULT_SLOTS, f"{DEFAULT_SLOTS} adapters can share one batch"),
        "max_cpu_loras": (max(DEFAULT_CPU_CACHE, count, slots if isinstance(slots, int) else 0),
                          f"every adapter stays loaded in host memory ({count} now)"),
    }
    return {key: value for key, value in derived.items() if key not in model.engine}


def effective_lora_args(model) -> dict[str, Any]:
    """The LoRA engine arguments a model's replicas run with: the fleet's, else derived."""
    out = {key: model.engine[key] for key in LORA_ARGS if key in model.engine}
    out.update({key: value for key, (value, _) in lora_engine_args(model).items()})
    return out


@functools.lru_cache(maxsize=32)
def _safetensors_names(folder: str) -> frozenset[str]:
    """Tensor names in a model folder's safetensors files (headers only)."""
    names: set[str] = set()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        names.update(k for k in header if k != "__metadata__")
    return frozenset(names)


def base_modules(source: str) -> frozenset[str] | None:
    """Names of the base model's adaptable modules (``q_proj``...), or None when not known
    without loading it (hub models, non-Llama GGUF files)."""
    try:
        parsed = sources.parse_source(source)
        if parsed.kind == "hf":
            return None
        path = sources.local_path(parsed)
        if path.suffix.lower() == ".gguf":
            parsed = sources.Source("gguf", str(path))
        if parsed.kind == "gguf" or path.suffix.lower() == ".gguf":
            from orchestrator import footprint

            shape = footprint.source_shape(source)
            return LLAMA_MODULES if shape is not None and _gguf_is_llama(path) else None
        names = _safetensors_names(str(path))
    except (OSError, ValueError, struct.error):
        return None
    modules = {name.rsplit(".", 2)[-2] for name in names if name.endswith(".weight") and name.count(".") >= 1}
    return frozenset(modules) or None


def _gguf_is_llama(path: Path) -> bool:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.architecture")
        return field is not None and bytes(field.parts[field.data[0]]).decode() == "llama"
    except Exception:  # noqa: BLE001 - unknown: not checked here
        return False


def adapter_problems(model, i: int) -> list[tuple[str, str]]:
    """Validation of a model's adapters against themselves and their base: (field path
    ``models[i].adapters[j].<field>``, problem) pairs."""
    errors: list[tuple[str, str]] = []
    if model.engine.get("enable_lora") is False:
        return [(f"models[{i}].engine.enable_lora", "false, but the model has adapters (remove it or the adapters)")]
    if model.task != "generate":
        return [(f"models[{i}].adapters", "LoRA adapters apply to generative models (task: generate)")]
    limit = model.engine.get("max_lora_rank")
    modules = None
    for j, adapter in enumerate(model.adapters):
        where = f"models[{i}].adapters[{j}]"
        try:
            info = adapter_info(adapter.source)
        except ValueError as e:
            errors.append((f"{where}.source", str(e)))
            continue
        if info is None:
            continue
        if isinstance(limit, int) and info.rank > limit:
            errors.append((f"{where}.source", f"rank {info.rank} is over the model's engine.max_lora_rank "
                                                        f"{limit}"))
        elif info.rank > SUPPORTED_RANKS[-1]:
            errors.append((f"{where}.source", f"rank {info.rank} is over vLLM's largest max_lora_rank "
                                                        f"({SUPPORTED_RANKS[-1]})"))
        if info.target_modules:
            if modules is None:
                modules = base_modules(model.source) or frozenset()
            missing = [t for t in info.target_modules if modules and t not in modules]
            if missing:
                errors.append((f"{where}.source",
                                         f"target module(s) {', '.join(missing)} not in the base model "
                                         f"{model.name!r} (it has {', '.join(sorted(modules - {'lm_head'}))})"))
    return errors


def user_config(model) -> dict[str, Any]:
    """A model deployment's ``user_config``: its adapters (what ``reconfigure`` loads)."""
    return {"adapters": [a.model_dump(mode="json", exclude_none=True) for a in model.adapters]}
