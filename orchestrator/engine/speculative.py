"""Speculative decoding: the fleet's typed ``speculative`` block turned into vLLM's
``speculative_config``, drafts derived from the target's own first layers, and the check
that a draft speaks the target's vocabulary.

Forms (under a model in the fleet)::

    speculative: {draft: hf://Qwen/Qwen3-0.6B, num_speculative_tokens: 4}   # a small sibling
    speculative: {draft: {derive_layers: 4}}       # the target's embeddings, first 4 layers, head
    speculative: {method: ngram, num_speculative_tokens: 3, prompt_lookup_max: 4}

A derived draft is built once into the model cache (``$SLM_CACHE_DIR/drafts``), keyed by the
target's config and weight files and the layer count; replicas on one node share it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from orchestrator import sources
from orchestrator.spec import ModelSpec

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.|\.layers\.(\d+)\.")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json", "added_tokens.json")


class DraftError(ValueError):
    """A draft that cannot serve this target; the message says why."""


def _target_layers(config: dict[str, Any]) -> int:
    return int((config.get("text_config") or config)["num_hidden_layers"])


def _fingerprint(target: Path, layers: int) -> str:
    h = hashlib.sha256(f"layers={layers}".encode())
    h.update((target / "config.json").read_bytes())
    for f in sorted(target.glob("*.safetensors")):
        stat = f.stat()
        h.update(f"{f.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return h.hexdigest()[:16]


def derive_draft(target: str | Path, layers: int, root: Path | None = None) -> Path:
    """A draft model from the target's embeddings, first ``layers`` decoder layers, final
    norm and LM head, written once as a safetensors folder; return its path."""
    target = Path(target)
    config = json.loads((target / "config.json").read_text())
    total = _target_layers(config)
    if not 1 <= layers < total:
        raise DraftError(f"derive_layers {layers}: the target has {total} decoder layers; use 1 to {total - 1}")
    weights = sorted(target.glob("*.safetensors"))
    if not weights:
        raise DraftError(f"{target} has no .safetensors weights to derive a draft from")
    out = (root or sources.cache_dir()) / "drafts" / f"{target.name}-first{layers}-{_fingerprint(target, layers)}"
    return sources.build_once(out, lambda tmp: _write_draft(target, config, total, layers, weights, tmp),
                              f"deriving a {layers}-layer draft of {target.name} ({total} layers)")


def _write_draft(target: Path, config: dict[str, Any], total: int, layers: int, weights: list[Path],
                 out: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    kept = {}
    for file in weights:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                m = _LAYER.search(name)
                index = int(m.group(1) or m.group(2)) if m else None
                if index is None or index < layers:
                    kept[name] = f.get_tensor(name)
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    draft_config = json.loads(json.dumps(config))
    text = draft_config.get("text_config") or draft_config
    text["num_hidden_layers"] = layers
    for key, value in list(text.items()):  # per-layer lists (layer_types, ...) keep the first entries
        if isinstance(value, list) and len(value) == total:
            text[key] = value[:layers]
    draft_config.setdefault("_slm_derived_from", {"target": str(target), "layers": layers})
    (out / "config.json").write_text(json.dumps(draft_config, indent=2))
    for name in _TOKENIZER_FILES:
        if (target / name).exists():
            shutil.copy2(target / name, out / name)


def _vocab(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).get_vocab()


def check_compatible(target: str | Path, draft: str | Path) -> None:
    """Raise DraftError unless the draft's vocabulary is the target's (same tokens, same ids)."""
    target, draft = Path(target), Path(draft)
    sizes = [json.loads((p / "config.json").read_text()) for p in (target, draft)]
    vocab_sizes = [int((c.get("text_config") or c).get("vocab_size", 0)) for c in sizes]
    if vocab_sizes[0] != vocab_sizes[1]:
        raise DraftError(f"the draft's vocabulary has {vocab_sizes[1]} entries, the target's {vocab_sizes[0]}: "
                         "a draft must use the target's tokenizer")
    tv, dv = _vocab(target), _vocab(draft)
    if tv != dv:
        by_id_t = {i: t for t, i in tv.items()}
        by_id_d = {i: t for t, i in dv.items()}
        first = next((i for i in sorted(set(by_id_t) | set(by_id_d)) if by_id_t.get(i) != by_id_d.get(i)), None)
        raise DraftError(f"the draft's tokenizer differs from the target's (token id {first}: "
                         f"{by_id_d.get(first)!r} in the draft, {by_id_t.get(first)!r} in the target)")


def resolve_draft(spec: ModelSpec, target_path: str) -> str | None:
    """The local path (or hub id) of the model's draft, building a derived one if needed;
    checked against the target's tokenizer when both are local. None without a draft."""
    s = spec.speculative
    if s is None or s.method_name != "draft_model":
        return None
    target_local = Path(target_path).is_dir()
    if isinstance(s.draft, str):
        draft_path, _ = sources.resolve(s.draft)
    else:
        if not target_local:
            raise DraftError("derive_layers needs the target's weights on local disk; serve the target from a "
                             "local folder, .gguf or pkg:// source")
        draft_path = str(derive_draft(target_path, s.draft.derive_layers))
    if target_local and Path(draft_path).is_dir():
        check_compatible(target_path, draft_path)
    return draft_path


def speculative_config(spec: ModelSpec, draft_path: str | None) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` for the model's ``speculative`` block (None without one)."""
    s = spec.speculative
    if s is None:
        return None
    out: dict[str, Any] = {"method": s.method_name, "num_speculative_tokens": s.num_speculative_tokens}
    if s.method_name == "draft_model":
        out["model"] = draft_path
    else:
        if s.prompt_lookup_min is not None:
            out["prompt_lookup_min"] = s.prompt_lookup_min
        if s.prompt_lookup_max is not None:
            out["prompt_lookup_max"] = s.prompt_lookup_max
    return out
