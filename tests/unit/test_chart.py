"""The Helm chart renders valid objects: lint, render, validate against Kubernetes and KubeRay
schemas, refuse bad values, and the plain manifests under k8s/ equal what it renders.

Whether the chart agrees with the Python side (the Serve builder, the fleet spec, `slm render`,
the package pins) is tests/unit/test_chart_sync.py. Uses the real helm v4 and kubectl binaries
from tools/ (``make tools``)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from orchestrator.devtools import k8s_manifests
from orchestrator.devtools.chart import (
    CHART,
    RELEASE,
    REPO,
    ToolError,
    helm_lint,
    helm_template,
    kustomize,
    tool,
    tool_env,
)

SHARED = Path(os.environ.get("SLM_SHARED_DIR", REPO.parent / "shared"))
KUBERAY = SHARED / "third_party" / "kuberay-v1.7.0"
K8S_VERSION = "1.33"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
BUILTIN_GROUPS = {"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1", "rbac.authorization.k8s.io/v1"}


def test_every_ci_scenario_is_present():
    names = {p.name for p in CI_VALUES}
    assert {"dev-cpu-values.yaml", "gpu-values.yaml", "multi-model-values.yaml", "all-on-values.yaml",
            "adapters-values.yaml"} <= names


# ----------------------------------------------------------------------------- schemas


def _strict(node):
    """A CRD schema that rejects unknown fields (what fieldValidation=Strict does on apply)."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayservice_schema():
    path = KUBERAY / "ray.io_rayservices.yaml"
    assert path.exists(), f"{path} is missing (set SLM_SHARED_DIR to the shared folder)"
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def validate_builtin(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def validate_rayservice(doc: dict, crd_schema: dict) -> None:
    jsonschema.validate(doc, crd_schema)
    spec = doc["spec"]
    # The pod templates and the Service inside are core objects: validate them as such.
    cluster = spec["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for i, template in enumerate(templates):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"pod-{i}", **template["metadata"]},
               "spec": template["spec"]}
        validate_builtin(pod)
    service = {"apiVersion": "v1", "kind": "Service", **copy.deepcopy(spec["serveService"])}
    validate_builtin(service)
    # The Serve config is a valid Ray Serve deploy config.
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))


def test_strict_crd_schema_catches_a_misspelt_field(rayservice_schema):
    doc = helm_template()[-1]
    assert doc["kind"] == "RayService"
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(doc, rayservice_schema)


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_strict(values):
    result = helm_lint([values])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_rendered_objects_validate(values, rayservice_schema):
    docs = helm_template([values])
    kinds = [d["kind"] for d in docs]
    assert kinds.count("RayService") == 1
    for doc in docs:
        if doc["apiVersion"] in BUILTIN_GROUPS:
            validate_builtin(doc)
        elif doc["kind"] == "RayService":
            validate_rayservice(doc, rayservice_schema)
        else:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["kind"]


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_helm_template_piped_through_kubernetes_validate_cli(values):
    """The same check as a platform team would run it: `helm template ... | kubernetes-validate --strict -`."""
    helm = subprocess.Popen([str(tool("helm")), "template", RELEASE, str(CHART), "-f", str(values)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION, "-"],
                          stdin=helm.stdout, capture_output=True, text=True)
    helm.stdout.close()
    assert helm.wait() == 0, helm.stderr.read().decode()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed for resource serviceaccount/" in proc.stdout
    if values.name == "all-on-values.yaml":
        for kind in ("ingress", "secret", "configmap", "networkpolicy", "poddisruptionbudget"):
            assert f"passed for resource {kind}/" in proc.stdout


def test_all_on_scenario_renders_every_optional_part():
    docs = helm_template([CHART / "ci" / "all-on-values.yaml"])
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["RayService", "ServiceAccount", "PodDisruptionBudget", "Ingress", "Secret",
                            "ServiceMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy"])
    by_kind = {d["kind"]: d for d in docs}
    rules = by_kind["PrometheusRule"]["spec"]["groups"][0]["rules"]
    alerts = [r["alert"] for r in rules]
    assert alerts.count("SlmQueueDepthHigh") == 2  # one per model, at its own bound
    assert {"SlmErrorRatioHigh", "SlmNoReadyReplica"} <= set(alerts)
    assert 'slm_queue_depth{model="qwen3-1.7b"}) > 64' in rules[0]["expr"]  # 16 x 4 replicas
    dashboard = json.loads(by_kind["ConfigMap"]["data"]["slm-orchestrator.json"])
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for word in ("first token", "per output token", "tokens/s", "Queue depth", "Replicas", "Errors"):
        assert word in titles
    # The API keys Secret is mounted into every Ray pod.
    cluster = by_kind["RayService"]["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        mounts = {m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert "/etc/slm" in mounts
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "slm-models"
    backend = by_kind["Ingress"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "slm-slm-orchestrator-gateway"
    # KubeRay keeps only the serve Service's port named `serve` (from the head's `serve` port):
    # the Ingress and the ServiceMonitor must name that port.
    serve_service = by_kind["RayService"]["spec"]["serveService"]
    assert serve_service["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert head_ports["serve"] == 8000
    assert backend["port"] == {"name": "serve"}
    (endpoint,) = by_kind["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["port"] == "serve" and endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {"name": "slm-slm-orchestrator-api-keys", "key": "metrics-key"}
    sm_selector = by_kind["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert sm_selector.items() <= serve_service["metadata"]["labels"].items()
    # The NetworkPolicy lets the KubeRay operator reach the dashboard (8265) and the gateway port
    # (its proxy health check), and Prometheus the gateway's /metrics on 8000.
    rules = {tuple(p["port"] for p in r.get("ports", [])): r for r in by_kind["NetworkPolicy"]["spec"]["ingress"]}
    operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert rules[(8265,)]["from"] == [operator]
    assert operator in rules[(8000,)]["from"] and monitoring in rules[(8000,)]["from"]
    assert rules[(8080,)]["from"] == [monitoring]
    # Every object carries the app.kubernetes.io labels; the PDB selects the worker pods.
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "slm-orchestrator", doc["kind"]
        assert labels["app.kubernetes.io/instance"] == "slm" and labels["app.kubernetes.io/managed-by"] == "Helm"
    pdb_selector = by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    for group in cluster["workerGroupSpecs"]:
        assert pdb_selector.items() <= group["template"]["metadata"]["labels"].items()
    assert not pdb_selector.items() <= cluster["headGroupSpec"]["template"]["metadata"]["labels"].items()


def test_existing_api_keys_secret_is_used_not_created():
    docs = helm_template(set_json={"apiKeys": {"enabled": True, "existingSecret": "team-keys", "secretKey": "k.yaml"}})
    assert "Secret" not in [d["kind"] for d in docs]
    doc = next(d for d in docs if d["kind"] == "RayService")
    cluster = doc["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["api-keys"]["secret"] == {"secretName": "team-keys",
                                                 "items": [{"key": "k.yaml", "path": "keys.yaml"}]}
    fleet = json.loads(doc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert fleet["gateway"]["auth"] == {"keys_file": "/etc/slm/keys.yaml"}


def test_ray_autoscaler_is_on():
    cluster = helm_template()[-1]["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 60
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] < group["maxReplicas"]  # room for Ray's autoscaler to add GPU pods


def test_alerts_and_dashboard_use_metrics_the_gateway_and_vllm_export():
    """Every metric the PrometheusRule and the Grafana dashboard query is one the code exports."""
    import importlib.util
    import re

    from orchestrator.metrics import GatewayMetrics

    docs = helm_template([CHART / "ci" / "all-on-values.yaml"])
    by_kind = {d["kind"]: d for d in docs}
    exprs = [r["expr"] for r in by_kind["PrometheusRule"]["spec"]["groups"][0]["rules"]]
    dashboard = json.loads(by_kind["ConfigMap"]["data"]["slm-orchestrator.json"])
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exported = set()
    for family in GatewayMetrics().registry.collect():
        exported |= {family.name, family.name + "_total"}
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\bslm_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    vllm_dir = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])
    vllm_names = set(re.findall(r'name="(vllm:[a-z_]+)"', (vllm_dir / "v1" / "metrics" / "loggers.py").read_text()))
    used_vllm = {re.sub(r"_(bucket|sum|count|total)$", "", m) for e in exprs for m in re.findall(r"vllm:[a-z_]+", e)}
    assert used_vllm and used_vllm <= vllm_names, used_vllm - vllm_names


def test_pods_run_restricted():
    cluster = helm_template()[-1]["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        ctx = pod["containers"][0]["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"] == {"drop": ["ALL"]}
    assert cluster["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False
    assert cluster["workerGroupSpecs"][0]["template"]["spec"]["automountServiceAccountToken"] is False


# ----------------------------------------------------------------------------- worker groups


def _groups(values_file):
    doc = next(d for d in helm_template([values_file]) if d["kind"] == "RayService")
    return {g["groupName"]: g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def test_worker_groups_are_sized_from_the_fleet():
    groups = _groups(CHART / "ci" / "multi-model-values.yaml")
    # qwen3-4b TP2 (1-4); phi-4-mini TP4 on A100 (0-2); llama 1B on whole GPUs (2-8) + smollm2 on
    # quarter GPUs (1-4 replicas = 0.25-1 pods) -> 3-9 pods; minilm cpu (1-3)
    assert set(groups) == {"gpu-x2", "gpu-x4-a100", "gpu-x1", "cpu"}
    sizes = {name: (g["minReplicas"], g["maxReplicas"], g["replicas"]) for name, g in groups.items()}
    assert sizes == {"gpu-x2": (1, 4, 1), "gpu-x4-a100": (0, 2, 0), "gpu-x1": (3, 9, 3), "cpu": (1, 3, 1)}
    gpus = {n: g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for n, g in groups.items()}
    assert gpus == {"gpu-x2": "2", "gpu-x4-a100": "4", "gpu-x1": "1", "cpu": None}
    a100 = groups["gpu-x4-a100"]
    assert a100["resources"] == {"accelerator_type:A100": "1"}
    assert a100["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    tolerations = a100["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert {"key": "dedicated", "operator": "Equal", "value": "a100", "effect": "NoSchedule"} in tolerations
    assert groups["gpu-x2"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "16"


def test_dev_cpu_scenario_has_only_a_cpu_group_and_the_cpu_image():
    doc = next(d for d in helm_template([CHART / "ci" / "dev-cpu-values.yaml"]) if d["kind"] == "RayService")
    cluster = doc["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["cpu"]
    cpu = cluster["workerGroupSpecs"][0]
    assert (cpu["minReplicas"], cpu["maxReplicas"]) == (2, 3)  # smollm2 1-2 + minilm 1-1 (spec defaults)
    assert cpu["rayStartParams"] == {"num-cpus": "2"}
    image = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "ghcr.io/slm-orchestrator/slm-orchestrator:0.1.0-cpu"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_adapters_scenario_puts_adapters_in_user_config_only():
    """Adapters reach the replicas and the gateway as deployments[].user_config, never in args
    (Serve hashes args into the code version: an adapter there would restart every replica)."""
    doc = next(d for d in helm_template([CHART / "ci" / "adapters-values.yaml"]) if d["kind"] == "RayService")
    main, lane = json.loads(doc["spec"]["serveConfigV2"])["applications"]
    assert "adapters" not in json.dumps(main["args"]) + json.dumps(lane["args"])
    qwen, llama = main["args"]["models"]
    # Derived LoRA engine arguments: enable_lora, rank 16 (the chart reads no adapter folder)
    # unless the fleet sets it, 4 adapters per batch, 32 kept in host memory.
    assert qwen["engine"] == {"max_model_len": 8192, "gpu_memory_utilization": 0.9, "enable_lora": True,
                              "max_lora_rank": 16, "max_loras": 4, "max_cpu_loras": 32}
    assert llama["engine"]["max_lora_rank"] == 32 and llama["engine"]["enable_lora"] is True
    overrides = {d["name"]: d["user_config"]["adapters"] for d in main["deployments"]}
    assert overrides == {
        "gateway": [
            {"name": "team-a-sql", "base": "qwen2.5-7b-instruct", "limits": {"max_tokens": 512, "max_n": 1}},
            {"name": "team-b-support", "base": "qwen2.5-7b-instruct", "limits": None},
            {"name": "team-c-ticket-triage", "base": "llama-3.2-1b-instruct", "limits": None},
        ],
        "model-qwen2-5-7b-instruct-1c744e": [
            {"name": "team-a-sql", "source": "hf://acme-ml/qwen2.5-7b-team-a-sql-lora@v3",
             "limits": {"max_tokens": 512, "max_n": 1}},
            {"name": "team-b-support", "source": "hf://acme-ml/qwen2.5-7b-team-b-support-lora"},
        ],
    }
    assert lane["deployments"] == [{"name": "model-llama-3-2-1b-instruct-42ab40", "user_config": {"adapters": [
        {"name": "team-c-ticket-triage", "source": "hf://acme-ml/llama-3.2-1b-team-c-ticket-triage-lora"}]}}]
    # vLLM downloads hf:// adapters on the replica with the token from the Secret.
    cluster = doc["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}


def test_changing_adapters_changes_only_user_config():
    """An adapter added to a model that has adapters (LoRA already on), a limit changed, one
    removed: serveConfigV2 differs only in deployments[].user_config, so KubeRay applies it to
    the running cluster and Serve reconfigures the replicas instead of replacing them."""
    base = yaml.safe_load((CHART / "ci" / "adapters-values.yaml").read_text())
    changed = copy.deepcopy(base)
    qwen, llama = changed["fleet"]["models"]
    qwen["adapters"].append({"name": "team-d-summaries", "source": "hf://acme-ml/qwen2.5-7b-team-d-lora"})
    qwen["adapters"][0]["limits"] = {"max_tokens": 1024}
    llama["adapters"] = [{"name": "team-c-ticket-triage-v2", "source": "hf://acme-ml/llama-3.2-1b-team-c-lora@v2"}]

    def rendered(values):
        doc = next(d for d in helm_template(set_json={"fleet": values["fleet"]}) if d["kind"] == "RayService")
        return doc, json.loads(doc["spec"]["serveConfigV2"])

    (before_doc, before), (after_doc, after) = rendered(base), rendered(changed)
    assert before_doc["spec"]["rayClusterConfig"] == after_doc["spec"]["rayClusterConfig"]
    for old, new in zip(before["applications"], after["applications"], strict=True):
        assert {k: v for k, v in old.items() if k != "deployments"} == {k: v for k, v in new.items()
                                                                         if k != "deployments"}
        assert [d["name"] for d in old["deployments"]] == [d["name"] for d in new["deployments"]]
        assert all(set(d) == {"name", "user_config"} for d in new["deployments"])
    assert before != after
    # The first adapter of a model does change args (LoRA engine arguments: a restart).
    first = copy.deepcopy(base)
    first["fleet"]["models"].append({"name": "phi-4-mini", "source": "hf://microsoft/Phi-4-mini-instruct"})
    second = copy.deepcopy(first)
    second["fleet"]["models"][2]["adapters"] = [{"name": "team-e-code", "source": "hf://acme-ml/phi-4-team-e-lora"}]
    args = [rendered(v)[1]["applications"][0]["args"]["models"][2] for v in (first, second)]
    assert "engine" not in args[0] and args[1]["engine"]["enable_lora"] is True


# ----------------------------------------------------------------------------- bad values

GOOD_MODEL = {"name": "m", "source": "hf://org/m"}
GOOD_ADAPTER = {"name": "team-a-sql", "source": "hf://org/m-team-a-sql-lora"}


def test_values_schema_takes_adapters_and_refuses_an_unknown_adapter_field():
    """Adapters are part of the generated fleet schema: name, source and limits, nothing else."""
    values_schema = json.loads((CHART / "values.schema.json").read_text())
    adapters = [{**GOOD_ADAPTER, "limits": {"max_tokens": 512, "max_n": 1}},
                {"name": "team-b-support", "source": "hf://org/m-team-b-lora@v2"}]
    good = {"fleet": {"models": [{**GOOD_MODEL, "adapters": adapters}]}}
    jsonschema.Draft7Validator(values_schema).validate(good)
    for bad_adapter, word in [({**GOOD_ADAPTER, "rank": 8}, "rank"),
                              ({**GOOD_ADAPTER, "limits": {"max_token": 5}}, "max_token"),
                              ({"name": "team-a-sql"}, "source")]:
        bad = {"fleet": {"models": [{**GOOD_MODEL, "adapters": [bad_adapter]}]}}
        with pytest.raises(jsonschema.ValidationError, match=word):
            jsonschema.Draft7Validator(values_schema).validate(bad)
    # Helm itself takes them (the adapters scenario lints; the refusals are in the table below).
    assert helm_lint([CHART / "ci" / "adapters-values.yaml"]).returncode == 0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"fleet": {"models": [{**GOOD_MODEL, "engine": {"tensor_parallel_size": "two"}}]}},
         "tensor_parallel_size"),
        ({"fleet": {"models": [{"source": "hf://org/m"}]}}, "name"),
        ({"fleet": {"models": [{**GOOD_MODEL, "replicas": 2}]}}, "replicas"),
        ({"fleet": {"models": [{**GOOD_MODEL, "autoscaling": {"min_replicas": -1}}]}}, "min_replicas"),
        ({"fleet": {"models": [{**GOOD_MODEL, "routing": {"policy": "random"}}]}}, "policy"),
        ({"fleet": {"models": [{**GOOD_MODEL, "engine": {"gpu_memory_utilization": 1.5}}]}},
         "gpu_memory_utilization"),
        ({"fleet": {"models": []}}, "models"),
        ({"engine": "tpu"}, "engine"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"workers": {"gpu": {"cpusPerGpu": 0}}}, "cpusPerGpu"),
        ({"replicaCount": 3}, "replicaCount"),
        ({"fleet": {"models": [{**GOOD_MODEL, "adapters": [{**GOOD_ADAPTER, "rank": 8}]}]}},
         "additional properties 'rank' not allowed"),
        ({"fleet": {"models": [{**GOOD_MODEL, "adapters": [{"name": "team-a-sql"}]}]}}, "source"),
        ({"fleet": {"models": [{**GOOD_MODEL, "adapters": [{**GOOD_ADAPTER, "limits": {"max_tokens": 0}}]}]}},
         "max_tokens"),
    ],
    ids=["tp-two", "no-name", "unknown-model-field", "negative-min", "bad-policy", "gpu-util>1", "no-models",
         "bad-engine", "bad-pull-policy", "zero-cpus", "unknown-top-key", "unknown-adapter-field",
         "adapter-without-source", "adapter-limit-0"],
)
def test_bad_values_fail_lint_and_template(tmp_path, values, message):
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(yaml.safe_dump(values))
    lint = helm_lint([bad])
    assert lint.returncode != 0
    assert message in lint.stdout + lint.stderr
    with pytest.raises(ToolError) as err:
        helm_template([bad])
    assert message in err.value.stderr


@pytest.mark.parametrize(
    "values, message",
    [
        ({"engine": "cpu", "workers": {"cpu": {"rayCpus": 2}},
          "fleet": {"models": [{**GOOD_MODEL, "resources": {"num_cpus": 4}}]}},
         "fleet.models[0] (m): resources.num_cpus 4 is more than a CPU worker pod offers"),
        ({"apiKeys": {"enabled": True}}, "apiKeys.enabled: give apiKeys.existingSecret"),
    ],
    ids=["cpu-model-too-big", "keys-without-secret"],
)
def test_values_the_templates_refuse_name_the_field(tmp_path, values, message):
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(yaml.safe_dump(values))
    with pytest.raises(ToolError) as err:
        helm_template([bad])
    assert message in err.value.stderr


# ----------------------------------------------------------------------------- plain manifests (k8s/)


@pytest.mark.parametrize("overlay", sorted(k8s_manifests.OVERLAYS))
def test_kustomize_overlay_equals_the_chart_and_validates(overlay, rayservice_schema):
    built = kustomize(REPO / "k8s" / "overlays" / overlay)
    rendered = k8s_manifests.render_overlay(k8s_manifests.OVERLAYS[overlay])
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(built, key=key) == sorted(rendered, key=key)
    for doc in built:
        if doc["kind"] == "RayService":
            validate_rayservice(doc, rayservice_schema)
        else:
            validate_builtin(doc)
