"""`slm render` and `slm apply`.

`slm apply` runs the real kubernetes client against a fake Kubernetes API server (a small
HTTP server that keeps RayServices in memory): no API server can run on these machines, so
this checks the client calls (create, server-side apply, status reads, errors), not KubeRay."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from orchestrator import cli
from orchestrator.k8s import apply as k8s_apply
from orchestrator.k8s import render
from orchestrator.names import deployment_name
from orchestrator.spec import load_fleet

REPO = Path(__file__).resolve().parents[2]
GPU_FLEET = REPO / "examples" / "fleet-gpu.yaml"
PREFIX = "/apis/ray.io/v1/namespaces/"


class FakeKubeAPI(ThreadingHTTPServer):
    """RayServices in memory; every request recorded as (method, path, query, content type, body)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[dict] = []
        self.forbid = False
        self.ready_after_gets: int | None = None  # become Ready after this many GETs of an object
        self.gets = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeKubeAPI

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                          "reason": reason, "code": code})

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode() if length else ""
        body = yaml.safe_load(raw) if raw else None
        self.server.requests.append({"method": method, "path": url.path, "query": parse_qs(url.query),
                                     "content_type": self.headers.get("Content-Type"), "body": body,
                                     "auth": self.headers.get("Authorization")})
        if self.server.forbid:
            return self._status(403, "Forbidden", 'rayservices.ray.io "slm" is forbidden: User "u" cannot get '
                                                  'resource "rayservices"')
        if not url.path.startswith(PREFIX) or "/rayservices" not in url.path:
            return self._status(404, "NotFound", "the server could not find the requested resource")
        parts = url.path[len(PREFIX):].split("/")
        namespace, name = parts[0], (parts[2] if len(parts) > 2 else None)
        key = (namespace, name)
        if method == "GET":
            if key not in self.server.objects:
                return self._status(404, "NotFound", f'rayservices.ray.io "{name}" not found')
            self.server.gets += 1
            obj = self.server.objects[key]
            if self.server.ready_after_gets is not None and self.server.gets >= self.server.ready_after_gets:
                obj["status"] = {"serviceStatus": "Running", "conditions": [
                    {"type": "Ready", "status": "True", "reason": "RayServiceReady", "message": ""}],
                    "activeServiceStatus": {"rayClusterName": f"{name}-abc", "applicationStatuses": {
                        "slm": {"status": "RUNNING", "serveDeploymentStatuses": {
                            "gateway": {"status": "HEALTHY"}}}}}}
            return self._send(200, obj)
        if method == "POST":
            name = body["metadata"]["name"]
            body["metadata"].update(generation=1, uid="uid-1", resourceVersion="1")
            body["status"] = {"conditions": [{"type": "Ready", "status": "False", "reason": "Initializing",
                                              "message": "waiting for the cluster"}]}
            self.server.objects[(namespace, name)] = body
            return self._send(201, body)
        if method == "PATCH":
            if key not in self.server.objects:
                return self._status(404, "NotFound", f'rayservices.ray.io "{name}" not found')
            obj = self.server.objects[key]
            obj["spec"] = body["spec"]
            obj["metadata"]["labels"] = body["metadata"].get("labels", {})
            obj["metadata"]["generation"] += 1
            return self._send(200, obj)
        return self._status(405, "MethodNotAllowed", method)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PATCH(self):
        self._handle("PATCH")


@pytest.fixture
def kube(tmp_path, monkeypatch):
    server = FakeKubeAPI()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
        "users": [{"name": "u", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u", "namespace": "team-a"}},
                     {"name": "other", "context": {"cluster": "fake", "user": "u", "namespace": "team-b"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield server
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------- render


def test_render_serve_config_names_the_builder_and_passes_the_fleet_as_written(capsys):
    assert cli.main(["render", "-f", str(GPU_FLEET), "--format", "serve-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    (app,) = config["applications"]
    assert app["import_path"] == "orchestrator.app:build_app"
    assert app["args"] == yaml.safe_load(GPU_FLEET.read_text())
    assert config["http_options"]["port"] == 8000


def test_render_serve_config_puts_adapters_in_user_config(tmp_path, capsys):
    fleet = {"models": [{"name": "qwen3-1.7b", "source": "hf://Qwen/Qwen3-1.7B",
                         "adapters": [{"name": "team-a-sql", "source": "hf://acme-ml/qwen3-team-a-sql-lora",
                                       "limits": {"max_tokens": 512}}]}]}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    assert cli.main(["render", "-f", str(path), "--format", "serve-config"]) == 0
    (app,) = yaml.safe_load(capsys.readouterr().out)["applications"]
    (model,) = app["args"]["models"]
    assert "adapters" not in model
    assert model["engine"] == {"enable_lora": True, "max_lora_rank": 16, "max_loras": 4, "max_cpu_loras": 32}
    assert app["deployments"] == [
        {"name": "gateway", "user_config": {"adapters": [
            {"name": "team-a-sql", "base": "qwen3-1.7b", "limits": {"max_tokens": 512}}]}},
        {"name": deployment_name("qwen3-1.7b"), "user_config": {"adapters": [
            {"name": "team-a-sql", "source": "hf://acme-ml/qwen3-team-a-sql-lora", "limits": {"max_tokens": 512}}]}},
    ]


def test_render_rayservice_is_complete(capsys):
    assert cli.main(["render", "-f", str(GPU_FLEET), "--format", "rayservice", "--name", "prod",
                     "--namespace", "ml"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert doc["metadata"] == {**doc["metadata"], "name": "prod", "namespace": "ml"}
    assert json.loads(doc["spec"]["serveConfigV2"])["applications"][0]["args"]["gateway"]["replicas"] == 2
    groups = {g["groupName"] for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups == {"gpu-x1", "gpu-x2", "cpu"}
    assert doc["spec"]["serveService"]["metadata"]["name"] == "prod-gateway"


def test_render_cpu_engine_uses_the_cpu_image_and_group(capsys):
    demo = REPO / "orchestrator" / "demo_fleet.yaml"
    assert cli.main(["render", "-f", str(demo), "--engine", "cpu"]) == 0
    cluster = yaml.safe_load(capsys.readouterr().out)["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["cpu"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0-cpu")


def test_render_on_the_cpu_engine_puts_every_model_in_the_cpu_group(capsys):
    assert cli.main(["render", "-f", str(GPU_FLEET), "--engine", "cpu"]) == 0  # TP 2 runs on CPU too
    cluster = yaml.safe_load(capsys.readouterr().out)["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["cpu"]


@pytest.mark.parametrize(
    "fleet, where",
    [
        ({"models": [{"name": "m", "source": "hf://o/m", "engine": {"tensor_parallel_size": "two"}}]},
         "models[0].engine.tensor_parallel_size"),
        ({"models": [{"source": "hf://o/m"}]}, "models[0].name"),
        ({"models": [{"name": "m", "source": "hf://o/m", "resources": {"accelerator": "cpu", "num_cpus": 16}}]},
         "models[0].resources.num_cpus"),
    ],
)
def test_render_bad_fleet_exits_2_naming_file_and_field(tmp_path, capsys, fleet, where):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    assert cli.main(["render", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {where}" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- apply


def test_apply_creates_then_updates_with_server_side_apply(kube, capsys):
    assert cli.main(["apply", "-f", str(GPU_FLEET)]) == 0
    out = capsys.readouterr().out
    assert "created rayservice/slm in namespace team-a" in out  # the context's namespace
    assert "Ready=False (Initializing) waiting for the cluster" in out
    get, post = kube.requests[:2]
    assert (get["method"], get["path"]) == ("GET", PREFIX + "team-a/rayservices/slm")
    assert (post["method"], post["path"]) == ("POST", PREFIX + "team-a/rayservices")
    assert post["auth"] == "Bearer secret-token"
    assert post["query"]["fieldManager"] == ["slm"]
    expected = render.rayservice(load_fleet(GPU_FLEET),
                                 yaml.safe_load(GPU_FLEET.read_text()), render.ClusterOptions(name="slm"))
    assert post["body"]["spec"] == expected["spec"]
    assert post["body"]["metadata"]["namespace"] == "team-a"

    kube.requests.clear()
    assert cli.main(["apply", "-f", str(GPU_FLEET), "--namespace", "team-a", "--image", "reg/slm:1"]) == 0
    out = capsys.readouterr().out
    assert "updated rayservice/slm in namespace team-a (generation 2)" in out
    patch = kube.requests[1]
    assert patch["method"] == "PATCH"
    assert patch["content_type"] == "application/apply-patch+yaml"
    assert patch["query"] == {"fieldManager": ["slm"], "force": ["true"]}
    head = patch["body"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "reg/slm:1"
    assert kube.objects[("team-a", "slm")]["metadata"]["generation"] == 2


def test_apply_other_context_and_namespace_flag(kube, capsys):
    assert cli.main(["apply", "-f", str(GPU_FLEET), "--context", "other", "--name", "fleet-b"]) == 0
    assert "created rayservice/fleet-b in namespace team-b" in capsys.readouterr().out
    assert ("team-b", "fleet-b") in kube.objects


def test_apply_waits_until_ready(kube):
    lines = []
    kube.ready_after_gets = 3  # the 1st GET is the existence check; ready on the 2nd status poll
    ready = k8s_apply.apply(render.rayservice(
        load_fleet(GPU_FLEET),
        yaml.safe_load(GPU_FLEET.read_text()), render.ClusterOptions()),
        wait_s=30, poll_s=0.05, say=lines.append)
    assert ready is True
    text = "\n".join(lines)
    assert "Ready=True (RayServiceReady)" in text
    assert "active application slm on slm-abc: RUNNING" in text
    assert lines[-1] == "rayservice/slm in namespace team-a is ready"


def test_apply_wait_times_out_with_exit_1(kube, capsys):
    assert cli.main(["apply", "-f", str(GPU_FLEET), "--wait", "0.1"]) == 1
    assert "is not ready after 0.1s" in capsys.readouterr().out


def test_apply_forbidden_is_a_clear_error(kube, capsys):
    kube.forbid = True
    assert cli.main(["apply", "-f", str(GPU_FLEET)]) == 1
    err = capsys.readouterr().err
    assert "slm apply: rayservice/slm in namespace team-a: the API server answered 403" in err
    assert "cannot get resource" in err
    assert "Traceback" not in err


def test_apply_without_a_cluster_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["apply", "-f", str(GPU_FLEET)]) == 1
    err = capsys.readouterr().err
    assert "slm apply: no Kubernetes context" in err


def test_apply_unreachable_api_server(tmp_path, monkeypatch, capsys):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert cli.main(["apply", "-f", str(GPU_FLEET)]) == 1
    err = capsys.readouterr().err
    assert "rayservice/slm in namespace default: cannot reach the API server" in err
