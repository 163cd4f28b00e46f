"""How big a model is: parameters, size class, weight bytes, KV-cache bytes per token, LoRA
slot bytes.

Works from a model's shape (layers, hidden size, heads, KV heads, head dim, MLP size,
vocabulary), read from a Hugging Face ``config.json`` or taken from the built-in catalog of
well-known small language models, so plans need no downloads.

Size classes (parameters): micro 100M-1.4B, small 1.5B-13.9B, medium 14B-30B; below is
``tiny`` (test models), above is ``large`` (not an SLM).

Example::

    shape = catalog_shape("Qwen/Qwen3-0.6B")
    shape.parameters()                      # 596,049,920
    weight_bytes(shape, "bfloat16")         # ~1.19e9
    kv_bytes_per_token(shape, "bfloat16")   # 28 layers x 8 kv heads x 128 x 2 x 2 = 114,688
    lora_slot_bytes(shape, 16, "bfloat16")  # one LoRA slot at max_lora_rank 16: 20,185,088
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

# Bytes per parameter (or per KV element) of a dtype or quantization.
DTYPE_BYTES = {
    "float32": 4.0, "float": 4.0, "fp32": 4.0,
    "bfloat16": 2.0, "float16": 2.0, "half": 2.0, "fp16": 2.0, "bf16": 2.0,
    "fp8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0, "int8": 1.0,
}
# Weight quantization methods of vLLM: bytes per parameter of the quantized linear layers.
QUANT_BYTES = {"fp8": 1.0, "awq": 0.5625, "gptq": 0.5625, "bitsandbytes": 0.5625, "awq_marlin": 0.5625,
               "gptq_marlin": 0.5625, "compressed-tensors": 0.5625}
# llama.cpp quantization types: bits per weight (block size and scales included).
GGUF_BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_1": 6.0, "Q5_K_M": 5.69,
    "Q5_K_S": 5.54, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_0": 4.5,
    "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 2.63, "IQ4_XS": 4.25,
}
SIZE_CLASSES = (  # (name, lowest parameter count)
    ("tiny", 0), ("micro", 100_000_000), ("small", 1_450_000_000), ("medium", 13_950_000_000),
    ("large", 30_500_000_000),
)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The numbers that size a decoder-only transformer."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool = True
    extra_parameters: int = 0  # e.g. a vision tower
    dtype: str = "bfloat16"  # the checkpoint's precision
    max_position_embeddings: int = 32768

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelShape:
        """From a Hugging Face config.json (a multimodal model's ``text_config`` is used)."""
        text = cfg.get("text_config") or cfg
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        head_dim = text.get("head_dim") or hidden // heads
        dtype = str(text.get("torch_dtype") or text.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
        return cls(
            num_layers=int(text["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            intermediate_size=int(text.get("intermediate_size") or 4 * hidden),
            vocab_size=int(text["vocab_size"]),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
            dtype=dtype.replace("torch.", ""),
            max_position_embeddings=int(text.get("max_position_embeddings") or 32768),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelShape:
        return cls.from_hf_config(json.loads((Path(path) / "config.json").read_text()))

    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    def layer_parameters(self) -> int:
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size  # gate, up, down
        norms = 2 * self.hidden_size
        return q + kv + o + mlp + norms

    def parameters(self) -> int:
        return self.embedding_parameters() + self.num_layers * self.layer_parameters() + self.hidden_size + \
            self.extra_parameters


def size_class(parameters: int) -> str:
    """micro, small, medium (the SLM classes), or tiny / large outside them."""
    name = SIZE_CLASSES[0][0]
    for cls_name, lowest in SIZE_CLASSES:
        if parameters >= lowest:
            name = cls_name
    return name


def dtype_bytes(dtype: str | None, default: str = "bfloat16") -> float:
    key = (dtype or default).lower().replace("torch.", "")
    if key == "auto":
        key = default
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r} (one of {', '.join(sorted(DTYPE_BYTES))})")
    return DTYPE_BYTES[key]


def weight_bytes(shape: ModelShape, dtype: str | None = None, quantization: str | None = None) -> int:
    """Bytes of weights in memory: linear layers at the quantization's width, the rest at dtype."""
    width = dtype_bytes(dtype, shape.dtype)
    total = shape.parameters()
    if not quantization:
        return int(total * width)
    q = quantization.lower()
    if q.upper() in GGUF_BITS_PER_WEIGHT:
        return int(total * GGUF_BITS_PER_WEIGHT[q.upper()] / 8)
    if q not in QUANT_BYTES:
        raise ValueError(f"no size known for quantization {quantization!r}")
    linear = shape.num_layers * (shape.layer_parameters() - 2 * shape.hidden_size)
    return int(linear * QUANT_BYTES[q] + (total - linear) * width)


def kv_bytes_per_token(shape: ModelShape, kv_dtype: str | None = None) -> int:
    """KV-cache bytes one token takes: layers x kv_heads x head_dim x 2 (K and V) x dtype bytes."""
    return int(shape.num_layers * shape.num_kv_heads * shape.head_dim * 2 * dtype_bytes(kv_dtype, shape.dtype))


def lora_slot_bytes(shape: ModelShape, rank: int, dtype: str | None = None) -> int:
    """Bytes vLLM allocates for one LoRA slot (``max_loras`` of them) at ``max_lora_rank``
    ``rank``: an A (rank x in) and a B (out x rank) buffer for every LoRA-capable linear layer
    of every decoder layer, whatever an adapter targets. Merged layers keep one A per slice:
    qkv_proj 3 x rank x hidden in and rank x (q + k + v) out; o_proj rank x q in and rank x
    hidden out; gate_up_proj 2 x rank x hidden in and rank x 2 x intermediate out; down_proj
    rank x intermediate in and rank x hidden out (``vllm.lora.layers``)."""
    hidden, inter = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    per_layer = (3 * hidden + q + 2 * kv) + (q + hidden) + (2 * hidden + 2 * inter) + (inter + hidden)
    return int(shape.num_layers * rank * per_layer * dtype_bytes(dtype, shape.dtype))


# ----------------------------------------------------------------------------- catalog

_GEMMA3_VISION = 417_000_000  # SigLIP tower + projector of the 4B multimodal model

CATALOG: dict[str, ModelShape] = {
    # Qwen3 (tied embeddings, head_dim 128, 8 KV heads)
    "Qwen/Qwen3-0.6B": ModelShape(28, 1024, 16, 8, 128, 3072, 151936, True, max_position_embeddings=40960),
    "Qwen/Qwen3-1.7B": ModelShape(28, 2048, 16, 8, 128, 6144, 151936, True, max_position_embeddings=40960),
    "Qwen/Qwen3-4B": ModelShape(36, 2560, 32, 8, 128, 9728, 151936, True, max_position_embeddings=40960),
    # Phi-4-mini-instruct, 3.8B
    "microsoft/Phi-4-mini-instruct": ModelShape(32, 3072, 24, 8, 128, 8192, 200064, True,
                                                max_position_embeddings=131072),
    # Gemma 3 (head_dim 256; the 4B is multimodal)
    "google/gemma-3-1b-it": ModelShape(26, 1152, 4, 1, 256, 6912, 262144, True, max_position_embeddings=32768),
    "google/gemma-3-4b-it": ModelShape(34, 2560, 8, 4, 256, 10240, 262208, True, _GEMMA3_VISION,
                                       max_position_embeddings=131072),
    # Llama 3.2
    "meta-llama/Llama-3.2-1B-Instruct": ModelShape(16, 2048, 32, 8, 64, 8192, 128256, True,
                                                   max_position_embeddings=131072),
    "meta-llama/Llama-3.2-3B-Instruct": ModelShape(28, 3072, 24, 8, 128, 8192, 128256, True,
                                                   max_position_embeddings=131072),
    # SmolLM2
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelShape(30, 576, 9, 3, 64, 1536, 49152, True,
                                                      max_position_embeddings=8192),
    "HuggingFaceTB/SmolLM2-360M-Instruct": ModelShape(32, 960, 15, 5, 64, 2560, 49152, True,
                                                      max_position_embeddings=8192),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": ModelShape(24, 2048, 32, 32, 64, 8192, 49152, True,
                                                      max_position_embeddings=8192),
}
# Base checkpoints share their instruct sibling's shape.
for _name in list(CATALOG):
    for _suffix in ("-Instruct", "-it", "-instruct"):
        if _name.endswith(_suffix):
            CATALOG.setdefault(_name[: -len(_suffix)], CATALOG[_name])
            if _suffix == "-it":
                CATALOG.setdefault(_name[: -len(_suffix)] + "-pt", CATALOG[_name])


def catalog_shape(hf_id: str) -> ModelShape | None:
    """The catalog's shape for a hub id (case-insensitive), or None."""
    lowered = hf_id.lower()
    for name, shape in CATALOG.items():
        if name.lower() == lowered:
            return shape
    return None


# ----------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=64)
def _gguf_info(path: str, mtime: float) -> tuple[ModelShape, str]:
    import gguf

    reader = gguf.GGUFReader(path)

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture", "llama")
    heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    shape = ModelShape(
        num_layers=int(field(f"{arch}.block_count")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(field(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(field(f"{arch}.attention.key_length", hidden // heads)),
        intermediate_size=int(field(f"{arch}.feed_forward_length", 4 * hidden)),
        vocab_size=int(field(f"{arch}.vocab_size", len(tokens.data) if tokens is not None else 0)),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        max_position_embeddings=int(field(f"{arch}.context_length", 32768)),
    )
    file_type = field("general.file_type")
    quant = gguf_quant_name(file_type) if file_type is not None else "unknown"
    return shape, quant


def gguf_quant_name(file_type: int) -> str:
    """llama.cpp's file type number as its usual name: 3 -> Q4_1, 15 -> Q4_K_M."""
    import gguf

    try:
        name = gguf.LlamaFileType(int(file_type)).name
    except ValueError:
        return f"type-{file_type}"
    return name.removeprefix("MOSTLY_").replace("ALL_", "")


def gguf_info(path: str | Path) -> tuple[ModelShape, str]:
    """(shape, quantization type) from a GGUF file's header; read once per file version."""
    p = Path(path)
    return _gguf_info(str(p), p.stat().st_mtime)


def source_shape(source: str) -> ModelShape | None:
    """A model source's shape without loading weights: a local config.json, a GGUF header,
    or the catalog for hub ids; None when none is at hand."""
    from orchestrator import sources

    src = sources.parse_source(source)
    if src.kind == "hf":
        return catalog_shape(src.location)
    try:
        path = sources.local_path(src)
    except FileNotFoundError:
        return None
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_info(path)[0]
    if (path / "config.json").exists():
        return ModelShape.from_dir(path)
    return None


def source_quantization(source: str, engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """What /fleet shows of a source's precision: {"format", "type"} (GGUF: its quant type,
    served dequantized) and the engine's quantization method if any."""
    from orchestrator import sources

    out: dict[str, Any] = {}
    src = sources.parse_source(source)
    if src.is_gguf:
        try:
            out = {"format": "gguf", "type": gguf_info(sources.local_path(src))[1], "served_as": "dequantized"}
        except (FileNotFoundError, ImportError, ValueError, KeyError):
            out = {"format": "gguf", "type": "unknown"}
    if engine and engine.get("quantization"):
        out["method"] = engine["quantization"]
    return out
