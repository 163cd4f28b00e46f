"""The Helm chart agrees with the Python side: the Serve application builds from the
serveConfigV2 it renders, its generated files (fleet schema, values table, k8s/) are current,
`slm render` gives the same RayService, and its pins follow the package's.

Rendering and validating the chart alone is tests/unit/test_chart.py. Uses the real helm v4
binary from tools/ (``make tools``)."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from orchestrator.devtools import chart_docs, generate
from orchestrator.devtools.chart import CHART, REPO, helm_template
from orchestrator.k8s import render, schema

# ----------------------------------------------------------------------------- the real builder


def build(serve_config_v2: str, monkeypatch, engine_build: str):
    """Build the Serve applications of a serveConfigV2 the way Serve's controller does."""
    import orchestrator.engine.args as engine_args
    from orchestrator.ray_compat import build_serve_config

    monkeypatch.setattr(engine_args, "installed_vllm_build", lambda: engine_build)
    return build_serve_config(yaml.safe_load(serve_config_v2)["applications"])


def test_serve_config_builds_the_deployments_the_fleet_asks_for(monkeypatch):
    """On the GPU image: serveConfigV2 from the chart -> the real builder -> Serve deployments."""
    doc = next(d for d in helm_template([CHART / "ci" / "multi-model-values.yaml"]) if d["kind"] == "RayService")
    deployments = build(doc["spec"]["serveConfigV2"], monkeypatch, "gpu")
    from orchestrator.app import deployment_name

    expected = {
        "qwen3-4b": dict(min=1, max=4, target=24, gpus=2, gpu_type=None),
        "phi-4-mini": dict(min=0, max=2, target=8, gpus=4, gpu_type="A100"),
        "llama-3.2-1b-instruct": dict(min=2, max=8, target=32, gpus=1, gpu_type=None),
        "smollm2-360m-instruct": dict(min=1, max=4, target=8, gpus=0.25, gpu_type=None),
        "all-minilm-l6-v2": dict(min=1, max=3, target=8, gpus=0, gpu_type=None),
    }
    assert set(deployments) == {"gateway"} | {deployment_name(n) for n in expected}
    for model, want in expected.items():
        dep = deployments[deployment_name(model)]
        scaling = dep.autoscaling_config
        assert (scaling.min_replicas, scaling.max_replicas) == (want["min"], want["max"]), model
        assert scaling.target_ongoing_requests == want["target"], model
        assert scaling.policy.policy_kwargs["model"] == model
        actor = dep.ray_actor_options
        bundles = dep.placement_group_bundles
        if want["gpus"] == 0:
            assert "num_gpus" not in actor and not bundles, model
            assert actor["num_cpus"] == 2
        elif want["gpus"] <= 1:
            assert actor["num_gpus"] == want["gpus"] and not bundles, model
        else:
            assert sum(b.get("GPU", 0) for b in bundles) == want["gpus"], model
            assert dep.placement_group_strategy == "STRICT_PACK"
            if want["gpu_type"]:
                assert bundles[0][f"accelerator_type:{want['gpu_type']}"] > 0
    assert deployments["gateway"].num_replicas == 2
    # The fast-lane model is its own application's ingress; the others are in the gateway's.
    lane = deployment_name("llama-3.2-1b-instruct")
    assert {n: d.app_name for n, d in deployments.items() if d.app_name != "slm"} == {
        lane: "slm-lane-llama-3.2-1b-instruct"}
    assert deployments[lane].class_name == "LaneServer"
    assert deployments[lane].autoscaling_config.policy.policy_kwargs["fleet_app"] == "slm"
    # Serve refuses a custom request router on an ingress behind HAProxy.
    assert deployments[lane].request_router_config.request_router_class != \
        deployments[deployment_name("qwen3-4b")].request_router_config.request_router_class


def test_dev_cpu_serve_config_builds_cpu_replicas(monkeypatch):
    doc = next(d for d in helm_template([CHART / "ci" / "dev-cpu-values.yaml"]) if d["kind"] == "RayService")
    deployments = build(doc["spec"]["serveConfigV2"], monkeypatch, "cpu")
    smol = deployments["model-smollm2-135m-instruct"]
    assert smol.autoscaling_config.max_replicas == 2
    assert "num_gpus" not in smol.ray_actor_options
    # No memory knob in the values: each CPU replica plans its KV cache at start from the
    # memory fields of the CPU models it may share a node with.
    assert "runtime_env" not in smol.ray_actor_options
    peers = smol.init_args[2]
    assert {p["name"] for p in peers} == {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    assert next(p for p in peers if p["name"] == "smollm2-135m-instruct")["autoscaling"]["max_replicas"] == 2


def test_adapters_serve_config_overrides_only_deployments_its_applications_have(monkeypatch):
    """Serve refuses a deployments override naming a deployment its application does not
    build: every user_config the chart renders lands on one, and the replicas start with
    LoRA on (the derived engine arguments are in args) but no adapter (they come by user_config)."""
    doc = next(d for d in helm_template([CHART / "ci" / "adapters-values.yaml"]) if d["kind"] == "RayService")
    apps = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    deployments = build(doc["spec"]["serveConfigV2"], monkeypatch, "gpu")
    for app in apps:
        built = {name for name, d in deployments.items() if d.app_name == app["name"]}
        assert {o["name"] for o in app["deployments"]} <= built, app["name"]
    from orchestrator.app import deployment_name

    for model in ("qwen2.5-7b-instruct", "llama-3.2-1b-instruct"):
        init = deployments[deployment_name(model)].init_args[0]
        assert init["engine"]["enable_lora"] is True and init["engine"]["max_loras"] == 4, model
        assert "adapters" not in init, model
    assert deployments[deployment_name("llama-3.2-1b-instruct")].app_name == "slm-lane-llama-3.2-1b-instruct"


# ----------------------------------------------------------------------------- sync


def test_fleet_schema_and_defaults_are_generated_from_the_spec():
    assert generate.GENERATORS["fleet-schema"].stale() == [], "run make chart-generate"


def test_schema_drift_is_detected(tmp_path):
    chart = tmp_path / "chart"
    (chart / "files").mkdir(parents=True)
    values_schema = json.loads((CHART / "values.schema.json").read_text())
    del values_schema["properties"]["fleet"]["properties"]["models"]["items"]["properties"]["routing"]
    (chart / "values.schema.json").write_text(schema.dumps(values_schema))
    (chart / "files" / "fleet-defaults.json").write_text((CHART / "files" / "fleet-defaults.json").read_text())
    assert generate.stale(generate.fleet_schema_files(chart)) == [chart / "values.schema.json"]


def test_chart_readme_values_table_is_current():
    values, missing = chart_docs.documented_values()
    assert missing == [], f"values without a `# --` description: {missing}"
    readme = (CHART / "README.md").read_text()
    assert chart_docs.render_readme(readme, values) == readme, "run make chart-generate"
    assert {"fleet", "engine", "workers.gpu.acceleratorTypes", "apiKeys.existingSecret"} <= {v.path for v in values}


def test_undocumented_value_is_reported(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("# -- documented\na: 1\nb:\n  # -- nested\n  c: 2\n  d: 3\n\n# a section\ne:\n  # -- x\n  f: 4\n")
    docs, missing = chart_docs.documented_values(values)
    assert [v.path for v in docs] == ["a", "b.c", "e.f"]
    assert missing == ["b", "b.d"]  # b: a section without its heading comment; b.d: no description


def hub_adapters_only(data: dict) -> None:
    """The chart cannot read adapter folders (it derives max_lora_rank 16 where `slm render`
    reads a local adapter's rank), so the fleets compared here name hub adapters only."""
    for model in data["models"]:
        for adapter in model.get("adapters") or ():
            assert adapter["source"].startswith("hf://"), adapter


@pytest.mark.parametrize("fleet_file", [CHART / "values.yaml", REPO / "examples" / "fleet-gpu.yaml",
                                        CHART / "ci" / "multi-model-values.yaml",
                                        CHART / "ci" / "adapters-values.yaml"], ids=lambda p: p.name)
def test_slm_render_matches_the_chart(fleet_file):
    """`slm render --format rayservice` and the chart (default values) give the same RayService."""
    data = yaml.safe_load(fleet_file.read_text())
    data = data.get("fleet", data)
    hub_adapters_only(data)
    from orchestrator.spec import parse_fleet

    ours = render.rayservice(parse_fleet(data), data, render.ClusterOptions(name="slm"))
    chart_doc = next(d for d in helm_template(set_json={"fleet": data, "fullnameOverride": "slm"})
                     if d["kind"] == "RayService")

    def norm(obj):
        if isinstance(obj, dict):
            out = {k: norm(v) for k, v in obj.items() if k not in ("helm.sh/chart", "app.kubernetes.io/managed-by")}
            if "serveConfigV2" in out:
                out["serveConfigV2"] = json.loads(out["serveConfigV2"])
            return out
        if isinstance(obj, list):
            return [norm(x) for x in obj]
        return obj

    assert norm(ours) == norm(chart_doc)


def test_fast_lane_applications_match_between_the_chart_and_slm_render():
    """Model names may hold '/' and ':'; both sides must derive the same lane names."""
    data = {"models": [
        {"name": "org/tiny:v1", "source": "hf://org/tiny", "fast_lane": True},
        {"name": "plain", "source": "hf://org/plain", "fast_lane": True,
         "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
        {"name": "via-gateway", "source": "hf://org/other"},
    ]}
    from orchestrator.app import lane_route_prefix
    from orchestrator.spec import parse_fleet

    ours = json.loads(render.rayservice(parse_fleet(data), data, render.ClusterOptions(name="slm"))["spec"][
        "serveConfigV2"])
    chart_doc = next(d for d in helm_template(set_json={"fleet": data, "fullnameOverride": "slm"})
                     if d["kind"] == "RayService")
    theirs = json.loads(chart_doc["spec"]["serveConfigV2"])
    assert ours["applications"] == theirs["applications"]
    lanes = [(a["name"], a["route_prefix"], a["args"]["model"]) for a in ours["applications"][1:]]
    digest = hashlib.sha1(b"org/tiny:v1").hexdigest()[:6]
    assert lanes == [(f"slm-lane-org-tiny-v1-{digest}", f"/models/org-tiny-v1-{digest}", "org/tiny:v1"),
                     ("slm-lane-plain", "/models/plain", "plain")]
    assert lane_route_prefix("org/tiny:v1") == f"/models/org-tiny-v1-{digest}"


def _applications(data: dict) -> tuple[list, list]:
    """serveConfigV2's applications from `slm render` and from the chart, for one fleet."""
    from orchestrator.spec import parse_fleet

    ours = json.loads(render.rayservice(parse_fleet(data), data, render.ClusterOptions(name="slm"))["spec"][
        "serveConfigV2"])["applications"]
    chart_doc = next(d for d in helm_template(set_json={"fleet": data, "fullnameOverride": "slm"})
                     if d["kind"] == "RayService")
    return ours, json.loads(chart_doc["spec"]["serveConfigV2"])["applications"]


def test_adapter_applications_match_between_the_chart_and_slm_render():
    """The corners of moving adapters into user_config and deriving LoRA engine arguments:
    limits unset, null, empty or with null fields; engine setting some LoRA arguments (a
    max_loras above the CPU cache raises it), all of them, or none; more adapters than the
    default CPU cache; an empty adapter list; names the deployment slug hashes; fast lanes."""
    many = [{"name": f"tenant-{i:02d}", "source": f"hf://acme-ml/tenant-{i:02d}-lora"} for i in range(40)]
    data = {"models": [
        {"name": "org/base:v1", "source": "hf://org/base", "engine": {"max_loras": 64, "max_model_len": 4096},
         "adapters": [
             {"name": "team-a-sql", "source": "hf://acme-ml/team-a-sql@v2", "limits": {"max_tokens": 256}},
             {"name": "team-b-chat", "source": "hf://acme-ml/team-b-chat", "limits": None},
             {"name": "team-b-chat-empty", "source": "hf://acme-ml/team-b-chat", "limits": {}},
             {"name": "team-b-chat-nulls", "source": "hf://acme-ml/team-b-chat",
              "limits": {"max_tokens": None, "max_n": 2}},
         ]},
        {"name": "all-set", "source": "hf://org/all-set", "adapters": [{"name": "x-1", "source": "hf://o/x-1"}],
         "engine": {"enable_lora": True, "max_lora_rank": 64, "max_loras": 2, "max_cpu_loras": 8}},
        {"name": "tenants", "source": "hf://org/tenants", "adapters": many},
        {"name": "lane.1", "source": "hf://org/lane", "fast_lane": True, "engine": {"max_lora_rank": 128},
         "adapters": [{"name": "lane-adapter", "source": "hf://o/lane-adapter", "limits": {"max_n": 1}}]},
        {"name": "plain-lane", "source": "hf://org/plain-lane", "fast_lane": True},
        {"name": "no-adapters", "source": "hf://org/none", "adapters": []},
        {"name": "never-had", "source": "hf://org/never"},
    ]}
    hub_adapters_only(data)
    ours, theirs = _applications(data)
    assert ours == theirs
    models = {m["name"]: m for m in ours[0]["args"]["models"]}
    assert models["org/base:v1"]["engine"]["max_cpu_loras"] == 64
    assert models["tenants"]["engine"]["max_cpu_loras"] == 40
    assert models["all-set"]["engine"] == {"enable_lora": True, "max_lora_rank": 64, "max_loras": 2,
                                           "max_cpu_loras": 8}
    assert "engine" not in models["no-adapters"] and "engine" not in models["never-had"]
    assert [len(a["deployments"]) for a in ours] == [1 + 5, 1, 1]  # gateway + the five models outside a lane


def test_chart_cannot_read_a_local_adapter_rank(tmp_path):
    """`slm render` reads a local adapter's rank (here 64) and derives max_lora_rank from it; the
    chart cannot and derives 16: a fleet with such adapters sets engine.max_lora_rank (the
    chart README says so), and then both agree."""
    folder = tmp_path / "team-a-sql"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 64, "lora_alpha": 128, "target_modules": ["q_proj", "v_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    model = {"name": "base", "source": "hf://org/base", "adapters": [{"name": "team-a-sql", "source": str(folder)}]}
    ours, theirs = _applications({"models": [model]})
    assert ours[0]["args"]["models"][0]["engine"]["max_lora_rank"] == 64
    assert theirs[0]["args"]["models"][0]["engine"]["max_lora_rank"] == 16
    ours, theirs = _applications({"models": [{**model, "engine": {"max_lora_rank": 64}}]})
    assert ours == theirs


def test_k8s_manifests_are_generated_from_the_chart():
    assert generate.GENERATORS["k8s-manifests"].stale() == [], "run make chart-generate"



def test_chart_pins_match_the_package():
    """The chart's Ray version and the Dockerfile's vLLM base follow pyproject's pins."""
    pyproject = (REPO / "pyproject.toml").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f'"ray[serve]=={values["rayService"]["rayVersion"]}"' in pyproject
    assert values["rayService"]["rayVersion"] == render.RAY_VERSION
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    from orchestrator import __version__

    assert chart["appVersion"] == __version__
    dockerfile = (REPO / "Dockerfile").read_text()
    vllm_pin = next(line for line in pyproject.splitlines() if '"vllm==' in line).split("==")[1].split('"')[0]
    assert f"ARG BASE_IMAGE=vllm/vllm-openai:v{vllm_pin}" in dockerfile
    assert f"v.startswith('{vllm_pin.rsplit('.', 1)[0]}.')" in dockerfile
    assert values["image"]["repository"] == render.IMAGE_REPOSITORY
    for copied in ("pyproject.toml", "README.md", "orchestrator"):
        assert (REPO / copied).exists()
