"""Speculative decoding as a typed fleet field: validation, the mapping onto vLLM's
speculative_config, drafts derived from the target's own layers, the tokenizer check,
the acceptance metrics, and tensor-parallel validation against the model's heads."""

import json
import shutil

import pytest
from safetensors import safe_open

from orchestrator.devtools.tiny_model import build
from orchestrator.engine import speculative
from orchestrator.metrics import spec_decode_rates, spec_decode_totals
from orchestrator.spec import FleetValidationError, ModelSpec, parse_fleet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("models") / "tiny-4x128", layers=4, hidden=128)


@pytest.fixture(scope="module")
def other_vocab(tiny, tmp_path_factory):
    """The tiny model with two tokens' ids swapped: same size, another tokenizer."""
    out = tmp_path_factory.mktemp("models") / "tiny-swapped"
    shutil.copytree(tiny, out)
    tok = json.loads((out / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    return out


@pytest.fixture(scope="module")
def other_size(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny-bigger-vocab"
    shutil.copytree(tiny, out)
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] += 64
    (out / "config.json").write_text(json.dumps(config))
    return out


def fleet(**model):
    return {"models": [{"name": "m", "source": "hf://Qwen/Qwen3-1.7B", **model}]}


def errors_of(data):
    with pytest.raises(FleetValidationError) as e:
        parse_fleet(data, "fleet.yaml")
    return str(e.value)


@pytest.mark.parametrize(
    "speculative, path, message",
    [
        ({"method": "draft_model"}, "models[0].speculative", "draft_model needs `draft`"),
        ({"method": "ngram", "draft": "hf://Qwen/Qwen3-0.6B"}, "models[0].speculative", "ngram takes no `draft`"),
        ({"draft": "hf://Qwen/Qwen3-0.6B", "prompt_lookup_max": 4}, "models[0].speculative", "ngram only"),
        ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "models[0].speculative",
         "prompt_lookup_min (5) is above prompt_lookup_max (2)"),
        ({"draft": "s3://bucket/draft"}, "models[0].speculative.draft", "unsupported source scheme"),
        ({"draft": {"derive_layers": 0}}, "models[0].speculative.draft", "greater than or equal to 1"),
        ({"draft": {"layers": 2}}, "models[0].speculative.draft", ""),
        ({"method": "eagle", "draft": "hf://x/y"}, "models[0].speculative.method", "'draft_model' or 'ngram'"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "models[0].speculative.num_speculative_tokens",
         "greater than or equal to 1"),
        ({"draft": {"derive_layers": 28}}, "models[0].speculative.draft.derive_layers",
         "the model has 28 decoder layers"),
    ],
)
def test_bad_speculative_blocks_name_the_field(speculative, path, message):
    text = errors_of(fleet(speculative=speculative))
    assert f"fleet.yaml: {path}" in text
    assert message in text


def test_speculative_and_a_raw_speculative_config_are_exclusive():
    text = errors_of(fleet(speculative={"method": "ngram"}, engine={"speculative_config": {"method": "ngram"}}))
    assert "models[0].engine.speculative_config: set `speculative` or engine.speculative_config, not both" in text


def test_embedding_models_do_not_speculate():
    assert "models[0].speculative: embedding models do not decode" in errors_of(
        fleet(task="embed", speculative={"method": "ngram"}))


@pytest.mark.parametrize(
    "block, expected",
    [
        ({"draft": "hf://Qwen/Qwen3-0.6B", "num_speculative_tokens": 5},
         {"method": "draft_model", "num_speculative_tokens": 5, "model": "DRAFT"}),
        ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4},
         {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}),
        ({"draft": {"derive_layers": 2}}, {"method": "draft_model", "num_speculative_tokens": 4, "model": "DRAFT"}),
    ],
)
def test_maps_onto_vllms_speculative_config(block, expected):
    spec = parse_fleet(fleet(speculative=block)).models[0]
    assert speculative.speculative_config(spec, "DRAFT") == expected


def test_derived_draft_keeps_the_first_layers_embeddings_and_head(tiny, tmp_path):
    draft = speculative.derive_draft(tiny, 2, root=tmp_path)
    config = json.loads((draft / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    with safe_open(str(draft / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    with safe_open(str(next(tiny.glob("*.safetensors"))), framework="pt") as f:
        target = set(f.keys())
        layer0 = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert {n for n in names if ".layers." in n} == {n for n in target if ".layers.0." in n or ".layers.1." in n}
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    with safe_open(str(draft / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").equal(layer0)
    assert (draft / "tokenizer.json").exists()
    speculative.check_compatible(tiny, draft)  # the same tokenizer
    again = speculative.derive_draft(tiny, 2, root=tmp_path)  # built once, reused
    assert again == draft


def test_derive_layers_must_be_fewer_than_the_target_has(tiny, tmp_path):
    with pytest.raises(speculative.DraftError, match="the target has 4 decoder layers; use 1 to 3"):
        speculative.derive_draft(tiny, 4, root=tmp_path)


def test_a_draft_with_another_tokenizer_is_refused(tiny, other_vocab, other_size):
    with pytest.raises(speculative.DraftError, match=r"the draft's tokenizer differs from the target's \(token id 3"):
        speculative.check_compatible(tiny, other_vocab)
    with pytest.raises(speculative.DraftError, match="vocabulary has .* entries, the target's"):
        speculative.check_compatible(tiny, other_size)


def test_resolve_draft_checks_local_drafts(tiny, other_vocab, monkeypatch, tmp_path):
    monkeypatch.setenv("SLM_CACHE_DIR", str(tmp_path))
    bad = ModelSpec.model_validate({"name": "m", "source": str(tiny), "speculative": {"draft": str(other_vocab)}})
    with pytest.raises(speculative.DraftError):
        speculative.resolve_draft(bad, str(tiny))
    derived = ModelSpec.model_validate({"name": "m", "source": str(tiny),
                                        "speculative": {"draft": {"derive_layers": 1}}})
    path = speculative.resolve_draft(derived, str(tiny))
    assert path.startswith(str(tmp_path / "drafts"))
    ngram = ModelSpec.model_validate({"name": "m", "source": str(tiny), "speculative": {"method": "ngram"}})
    assert speculative.resolve_draft(ngram, str(tiny)) is None


def test_derived_layers_are_checked_against_a_local_config(tiny):
    text = errors_of({"models": [{"name": "m", "source": str(tiny), "speculative": {"draft": {"derive_layers": 9}}}]})
    assert "models[0].speculative.draft.derive_layers: 9: the model has 4 decoder layers" in text


@pytest.mark.parametrize(
    "source, tp, message",
    [
        ("hf://Qwen/Qwen3-1.7B", 3, "3 does not divide the model's 16 attention heads"),
        ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", 2, "2 does not divide the model's 9 attention heads"),
        ("hf://Qwen/Qwen3-0.6B", 16, "16 does not divide the model's 8 KV heads"),
    ],
)
def test_tensor_parallel_size_must_divide_heads(source, tp, message):
    text = errors_of({"models": [{"name": "m", "source": source, "engine": {"tensor_parallel_size": tp},
                                  "resources": {"accelerator": "gpu"}}]})
    assert f"models[0].engine.tensor_parallel_size: {message}" in text


def test_tensor_parallel_size_checked_against_a_local_config(tiny):
    text = errors_of({"models": [{"name": "m", "source": str(tiny), "engine": {"tensor_parallel_size": 4},
                                  "resources": {"accelerator": "gpu"}}]})
    assert "4 does not divide the model's 2 attention heads" in text
    parse_fleet({"models": [{"name": "m", "source": str(tiny), "engine": {"tensor_parallel_size": 2},
                             "resources": {"accelerator": "gpu"}}]})


def test_gpu_share_rules():
    assert "a GPU share on a cpu model" in errors_of(fleet(resources={"accelerator": "cpu", "num_gpus": 0.5}))
    assert "TP takes whole GPUs" in errors_of(fleet(resources={"num_gpus": 0.5},
                                                    engine={"tensor_parallel_size": 2}))
    # A share needs a matching vLLM memory fraction, else the engine claims more than its share.
    assert ("models[0].engine.gpu_memory_utilization: 0.9 (vLLM's default; unset) is more than the replica's "
            "GPU share resources.num_gpus 0.25") in errors_of(fleet(resources={"num_gpus": 0.25}))
    assert "0.5 is more than the replica's GPU share" in errors_of(
        fleet(resources={"num_gpus": 0.25}, engine={"gpu_memory_utilization": 0.5}))
    parse_fleet(fleet(resources={"num_gpus": 0.25}, engine={"gpu_memory_utilization": 0.25}))


def test_slm_serve_preflight_refuses_a_draft_with_another_tokenizer(tiny, other_vocab, monkeypatch, tmp_path):
    """`slm serve` checks drafts before starting anything, naming the model's draft field."""
    from orchestrator import cli

    monkeypatch.setenv("SLM_CACHE_DIR", str(tmp_path))
    data = {"models": [{"name": "ok", "source": str(tiny), "speculative": {"draft": {"derive_layers": 1}}},
                       {"name": "bad", "source": str(tiny), "speculative": {"draft": str(other_vocab)}}]}
    with pytest.raises(FleetValidationError) as e:
        cli.resolve_sources(parse_fleet(data), "fleet.yaml")
    text = str(e.value)
    assert "fleet.yaml: models[1].speculative.draft: the draft's tokenizer differs from the target's" in text
    assert "models[0]" not in text
    assert list((tmp_path / "drafts").glob("tiny-4x128-first1-*"))  # the derived draft was built


METRICS = """# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{replica="r1",engine="0",model_name="m"} 100.0
# HELP vllm:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{replica="r1",engine="0",model_name="m"} 400.0
# HELP vllm:spec_decode_num_accepted_tokens_total Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{replica="r1",engine="0",model_name="m"} 150.0
"""


def test_acceptance_metrics_sum_replicas():
    second = METRICS.replace('"r1"', '"r2"')
    totals = spec_decode_totals([METRICS, second, "vllm:other_total 3\n"])
    assert totals == {"m": {"drafts": 200.0, "draft_tokens": 800.0, "accepted_tokens": 300.0}}
    rates = spec_decode_rates(totals["m"])
    assert rates["acceptance_rate"] == pytest.approx(0.375)
    assert rates["accepted_tokens_per_step"] == pytest.approx(2.5)
    assert spec_decode_rates({})["acceptance_rate"] is None
