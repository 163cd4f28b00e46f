"""LoRA adapters in the fleet spec: what ``orchestrator.adapters`` reads from real peft-made
adapter folders (made on the tiny test model), the engine arguments it derives, and the
fleet validation errors naming ``models[i].adapters[j].<field>``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from orchestrator import adapters
from orchestrator.devtools import lora, tiny_model
from orchestrator.spec import FleetValidationError, parse_fleet


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The tiny Llama model, built into the shared cache like the integration tests do."""
    cache = Path(os.environ.get("SLM_CACHE_DIR", Path.home() / ".cache" / "slm-orchestrator"))
    return tiny_model.build(cache / "tiny-llama-2x128")


@pytest.fixture(scope="module")
def made(base, tmp_path_factory) -> dict[str, Path]:
    """Real peft adapters of the tiny model: rank 8 (the default targets) and rank 32 (all
    seven projection kinds)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "r8": lora.random_adapter(base, root / "r8", seed=1, rank=8),
        "r32": lora.random_adapter(base, root / "r32", seed=2, rank=32,
                                   targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj")),
    }


def fleet(base: Path, adapter_list: list[dict], engine: dict | None = None, **model) -> dict:
    return {"models": [{"name": "tiny", "source": str(base), "engine": engine or {}, "adapters": adapter_list,
                        **model}]}


def errors_of(data: dict) -> str:
    with pytest.raises(FleetValidationError) as e:
        parse_fleet(data, "fleet.yaml")
    return str(e.value)


def edited_copy(src: Path, dst: Path, **config) -> Path:
    """A copy of an adapter folder with fields of its adapter_config.json replaced."""
    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dst


# -------------------------------------------------------------------------- reading a folder


def test_a_peft_adapter_folder_reads_as_what_peft_wrote(made, base):
    info = adapters.read_adapter_config(made["r8"])
    assert info.rank == 8
    assert info.target_modules == tuple(sorted(lora.DEFAULT_TARGETS))
    assert info.base_model == str(base)
    assert info.size_bytes == (made["r8"] / "adapter_model.safetensors").stat().st_size > 0
    assert info.alpha == 16.0
    assert adapters.adapter_info(str(made["r8"])) == info


def test_the_base_models_adaptable_modules_come_from_its_safetensors_header(base):
    modules = adapters.base_modules(str(base))
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= modules
    assert adapters.base_modules("hf://Qwen/Qwen3-0.6B") is None  # not read without downloading


@pytest.mark.parametrize("rank, ceiling", [(1, 1), (2, 8), (8, 8), (16, 16), (17, 32), (300, 320), (512, 512)])
def test_rank_ceiling_is_the_smallest_supported_rank_that_holds_it(rank, ceiling):
    assert adapters.rank_ceiling(rank) == ceiling


def test_rank_ceiling_refuses_a_rank_past_vllms_largest():
    with pytest.raises(ValueError, match="512"):
        adapters.rank_ceiling(513)


# -------------------------------------------------------------------------- a good fleet


def test_a_good_adapter_validates_and_derives_the_lora_engine_args(made, base):
    spec = parse_fleet(fleet(base, [{"name": "tiny-sql", "source": str(made["r8"])}]))
    model = spec.models[0]
    assert spec.adapter("tiny-sql")[0] is model
    derived = adapters.lora_engine_args(model)
    assert {k: v for k, (v, _) in derived.items()} == {
        "enable_lora": True, "max_lora_rank": 16, "max_loras": adapters.DEFAULT_SLOTS,
        "max_cpu_loras": adapters.DEFAULT_CPU_CACHE,
    }
    assert all(why for _, why in derived.values())  # each says why
    assert adapters.effective_lora_args(model) == {k: v for k, (v, _) in derived.items()}
    assert adapters.user_config(model) == {"adapters": [{"name": "tiny-sql", "source": str(made["r8"])}]}


def test_a_rank_32_adapter_raises_max_lora_rank_to_32(made, base):
    model = parse_fleet(fleet(base, [{"name": "a", "source": str(made["r8"])},
                                     {"name": "b", "source": str(made["r32"])}])).models[0]
    assert adapters.lora_engine_args(model)["max_lora_rank"][0] == 32


def test_a_model_without_adapters_derives_nothing(base):
    model = parse_fleet(fleet(base, [])).models[0]
    assert adapters.lora_engine_args(model) == {}
    assert adapters.effective_lora_args(model) == {}


@pytest.mark.parametrize("key, value", [("enable_lora", True), ("max_lora_rank", 64), ("max_loras", 2),
                                        ("max_cpu_loras", 8)])
def test_a_lora_arg_set_in_engine_is_not_derived(made, base, key, value):
    model = parse_fleet(fleet(base, [{"name": "a", "source": str(made["r8"])}], engine={key: value})).models[0]
    derived = adapters.lora_engine_args(model)
    assert key not in derived
    assert set(derived) == set(adapters.LORA_ARGS) - {key}
    assert adapters.effective_lora_args(model)[key] == value


def test_max_cpu_loras_covers_every_adapter_and_the_fleets_slots(made, base):
    many = [{"name": f"a{i}", "source": str(made["r8"])} for i in range(40)]
    model = parse_fleet(fleet(base, many)).models[0]
    assert adapters.lora_engine_args(model)["max_cpu_loras"][0] == 40
    model = parse_fleet(fleet(base, many[:1], engine={"max_loras": 48})).models[0]
    assert adapters.effective_lora_args(model)["max_cpu_loras"] == 48  # vLLM wants max_cpu_loras >= max_loras


def test_an_hf_adapter_is_accepted_without_reading_anything(base, monkeypatch):
    def no_reading(*_):
        raise AssertionError("an hf:// adapter was read at validation time")

    monkeypatch.setattr(adapters, "read_adapter_config", no_reading)
    model = parse_fleet(fleet(base, [{"name": "hub", "source": "hf://someone/tiny-lora@main"}])).models[0]
    assert adapters.adapter_info("hf://someone/tiny-lora") is None
    assert adapters.effective_lora_args(model)["max_lora_rank"] == adapters.DEFAULT_RANK



def test_an_hf_adapter_is_fetched_at_its_revision_before_vllm_loads_it(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(repo, revision=None):
        calls.append((repo, revision))
        if repo == "someone/missing":
            raise OSError("404 Client Error: Repository Not Found\nmore detail")
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert adapters.resolve_adapter("hf://someone/tiny-lora@v2") == str(tmp_path / "snapshot")
    assert calls == [("someone/tiny-lora", "v2")]
    refused = "cannot fetch hf://someone/missing: OSError: 404 Client Error: Repository Not Found$"
    with pytest.raises(ValueError, match=refused):
        adapters.resolve_adapter("hf://someone/missing")


# -------------------------------------------------------------------------- refusals


def test_a_missing_folder_is_named(base, tmp_path):
    text = errors_of(fleet(base, [{"name": "a", "source": str(tmp_path / "nowhere")}]))
    assert "models[0].adapters[0].source" in text
    assert "nowhere" in text


def test_a_folder_without_adapter_config_is_named(base, tmp_path):
    (tmp_path / "empty").mkdir()
    text = errors_of(fleet(base, [{"name": "a", "source": str(tmp_path / "empty")}]))
    assert "models[0].adapters[0].source" in text
    assert "no adapter_config.json" in text


def test_a_rank_over_the_engines_max_lora_rank_is_named(made, base):
    text = errors_of(fleet(base, [{"name": "ok", "source": str(made["r8"])},
                                  {"name": "big", "source": str(made["r32"])}], engine={"max_lora_rank": 16}))
    assert "models[0].adapters[1].source: rank 32 is over the model's engine.max_lora_rank 16" in text
    assert "adapters[0]" not in text


def test_a_target_module_the_base_lacks_is_named(made, base, tmp_path):
    odd = edited_copy(made["r8"], tmp_path / "odd", target_modules=["q_proj", "c_attn"])
    text = errors_of(fleet(base, [{"name": "a", "source": str(made["r8"])}, {"name": "b", "source": str(odd)}]))
    assert "models[0].adapters[1].source: target module(s) c_attn not in the base model 'tiny'" in text
    assert "q_proj" in text.split("it has", 1)[1]  # says what the base has
    assert "adapters[0]" not in text


def test_a_target_module_regex_is_left_to_vllm(made, base, tmp_path):
    regex = edited_copy(made["r8"], tmp_path / "regex", target_modules=r".*\.(q_proj|v_proj)")
    model = parse_fleet(fleet(base, [{"name": "a", "source": str(regex)}])).models[0]
    assert adapters.adapter_info(str(regex)).target_modules is None
    assert model.adapters[0].name == "a"


def test_a_non_lora_peft_type_is_named(made, base, tmp_path):
    ia3 = edited_copy(made["r8"], tmp_path / "ia3", peft_type="IA3")
    text = errors_of(fleet(base, [{"name": "a", "source": str(ia3)}]))
    assert "models[0].adapters[0].source" in text
    assert "peft_type 'IA3'; only LORA adapters are served" in text


def test_a_folder_without_adapter_weights_is_named(made, base, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(made["r8"], bare)
    (bare / "adapter_model.safetensors").unlink()
    text = errors_of(fleet(base, [{"name": "a", "source": str(bare)}]))
    assert "models[0].adapters[0].source" in text
    assert "no adapter_model.safetensors" in text


def test_an_unreadable_adapter_config_is_named(made, base, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(made["r8"], broken)
    (broken / "adapter_config.json").write_text("{not json")
    assert "not readable JSON" in errors_of(fleet(base, [{"name": "a", "source": str(broken)}]))


def test_an_adapter_named_like_a_model_is_refused_naming_both(made, base):
    data = fleet(base, [{"name": "other", "source": str(made["r8"])}])
    data["models"].append({"name": "other", "source": str(base)})
    text = errors_of(data)
    assert "models[1].name: 'other' is already the name of models[0].adapters[0].name" in text


def test_an_adapter_named_like_another_models_adapter_is_refused_naming_both(made, base):
    data = fleet(base, [{"name": "shared", "source": str(made["r8"])}])
    data["models"].append({"name": "tiny-2", "source": str(base),
                           "adapters": [{"name": "x", "source": str(made["r8"])},
                                        {"name": "shared", "source": str(made["r32"])}]})
    text = errors_of(data)
    assert "models[1].adapters[1].name: 'shared' is already the name of models[0].adapters[0].name" in text


def test_adapters_on_an_embed_model_are_refused(made, base):
    text = errors_of(fleet(base, [{"name": "a", "source": str(made["r8"])}], task="embed"))
    assert "models[0].adapters: LoRA adapters apply to generative models (task: generate)" in text


def test_a_gguf_adapter_source_is_refused(base, tmp_path):
    text = errors_of(fleet(base, [{"name": "a", "source": str(tmp_path / "lora.gguf")}]))
    assert "models[0].adapters[0].source" in text
    assert "not a .gguf file" in text


def test_every_bad_adapter_of_a_fleet_is_named_at_once(made, base, tmp_path):
    text = errors_of(fleet(base, [{"name": "a", "source": str(tmp_path / "gone")},
                                  {"name": "b", "source": str(made["r8"])},
                                  {"name": "c", "source": str(made["r32"])}], engine={"max_lora_rank": 8}))
    assert "models[0].adapters[0].source" in text
    assert "models[0].adapters[1]" not in text
    assert "models[0].adapters[2].source: rank 32" in text


def test_adapters_on_a_model_with_lora_off_are_refused(base, made):
    spec = fleet(base, [{"name": "a", "source": str(made["r8"])}])
    spec["models"][0]["engine"] = {"enable_lora": False}
    assert "models[0].engine.enable_lora" in errors_of(spec)


def test_an_adapter_cannot_set_the_model_queue_bound(base, made):
    spec = fleet(base, [{"name": "a", "source": str(made["r8"]), "limits": {"max_queue_per_replica": 3}}])
    assert "models[0].adapters[0].limits" in errors_of(spec)
