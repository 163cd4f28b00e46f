"""The serving core end to end: real Ray Serve, real vLLM (CPU), real HTTP, the official
`openai` client, and every answer checked against OpenAI's published schema."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai_schema import check, check_error
from prometheus_client.parser import text_string_to_metric_families
from sse import sse_lines

from loadtests.sse import parse_sse

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
PIRATE = "smollm2-pirate"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order; asserts the framing is right: every event
    ends with a blank line and starts with `data: ` (or is a comment, a keep-alive)."""
    assert text.endswith("\n\n"), "every SSE event ends with a blank line"
    for block in text.strip("\n").split("\n\n"):
        assert block.startswith((":", "data: ")), block
    return [event.data for event in parse_sse(text.encode())]


def metric_samples(http, name: str) -> list:
    text = http.get("/metrics").text
    out = []
    for family in text_string_to_metric_families(text):
        out.extend(s for s in family.samples if s.name == name)
    return out


# -- models ---------------------------------------------------------------------------------


def test_models_list(client, http):
    models = list(client.models.list())
    assert [m.id for m in models] == [CHAT, EMBED, PIRATE]
    assert models[2].model_extra.get("parent") == CHAT  # a LoRA adapter, as vLLM lists one
    check("ListModelsResponse", http.get("/v1/models").json())


def test_the_demo_adapter_changes_the_answers_visibly(client):
    """The demo's LoRA adapter (trained with peft on SmolLM2, shipped as package data)."""
    def answer(model):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name three "
                                               "French cities."}], temperature=0, max_tokens=40)
        return reply.choices[0].message.content

    pirate, base = answer(PIRATE), answer(CHAT)
    assert pirate.startswith("Arr"), pirate
    assert not base.startswith("Arr") and "Paris" in pirate, (base, pirate)


# -- chat -----------------------------------------------------------------------------------


def test_chat_non_stream_answers_sensibly(client):
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=QUESTION, temperature=0, max_tokens=30)
    body = raw.http_response.json()
    check("CreateChatCompletionResponse", body)
    completion = raw.parse()
    assert "Paris" in completion.choices[0].message.content
    assert completion.model == CHAT
    assert completion.usage.completion_tokens > 0


def test_chat_stream_with_usage(client, http):
    stream = client.chat.completions.create(
        model=CHAT, messages=QUESTION, temperature=0, max_tokens=30, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    resp = http.post("/v1/chat/completions", json={
        "model": CHAT, "messages": QUESTION, "temperature": 0, "max_tokens": 12, "stream": True,
        "stream_options": {"include_usage": True}})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        check("CreateChatCompletionStreamResponse", json.loads(event))
    assert "usage" in json.loads(events[-2])


def test_chat_stream_without_usage_has_none(http):
    resp = http.post("/v1/chat/completions", json={
        "model": CHAT, "messages": QUESTION, "temperature": 0, "max_tokens": 5, "stream": True})
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e).get("usage") is None for e in events[:-1])


# -- completions ----------------------------------------------------------------------------


def test_completions_non_stream_and_stream(client, http):
    raw = client.completions.with_raw_response.create(
        model=CHAT, prompt="The capital of France is", temperature=0, max_tokens=8)
    check("CreateCompletionResponse", raw.http_response.json())
    assert raw.parse().choices[0].text.strip()

    pieces = [c.choices[0].text for c in client.completions.create(
        model=CHAT, prompt="The capital of France is", temperature=0, max_tokens=8, stream=True) if c.choices]
    assert "".join(pieces).strip() == raw.parse().choices[0].text.strip()

    resp = http.post("/v1/completions", json={"model": CHAT, "prompt": "Hello", "max_tokens": 4, "stream": True})
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    check("CreateCompletionResponse", chunks[-1])
    for chunk in chunks[:-1]:
        # OpenAI documents completion stream chunks as CreateCompletionResponse, yet its own
        # API sends `finish_reason: null` until the last chunk; we match the wire, so only
        # that one field is exempt here.
        assert chunk["choices"][0].pop("finish_reason") is None
        chunk["choices"][0]["finish_reason"] = "stop"
        check("CreateCompletionResponse", chunk)


# -- embeddings -----------------------------------------------------------------------------


def test_embeddings(client, http):
    resp = http.post("/v1/embeddings", json={"model": EMBED, "input": ["hello world", "bonjour"]})
    check("CreateEmbeddingResponse", resp.json())  # floats, OpenAI's default encoding
    # The official client asks for base64 and decodes it.
    result = client.embeddings.create(model=EMBED, input=["hello world", "bonjour"])
    assert [len(d.embedding) for d in result.data] == [384, 384]
    assert [d.index for d in result.data] == [0, 1]
    assert result.usage.prompt_tokens > 0


def test_similar_texts_embed_closer(client):
    data = client.embeddings.create(model=EMBED, input=["a cat sits on the mat", "a kitten on a rug",
                                                        "quarterly tax filing deadline"]).data
    cat, kitten, tax = (d.embedding for d in data)

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)

    assert cos(cat, kitten) > cos(cat, tax) + 0.2


# -- two models, each answered by its own deployment -------------------------------------


def test_each_model_is_served_by_its_own_deployment(client, http):
    client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=3)
    client.embeddings.create(model=EMBED, input="x")
    # Replicas push their engine metrics every second: wait for both counters to show.
    deadline = time.monotonic() + 10
    while True:
        prompts = {s.labels["model_name"]: s for s in metric_samples(http, "vllm:prompt_tokens_total")}
        counted = set(prompts) == {CHAT, EMBED} and all(s.value > 0 for s in prompts.values())
        if counted or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(prompts) == {CHAT, EMBED}
    assert prompts[CHAT].labels["replica"] != prompts[EMBED].labels["replica"]
    assert prompts[CHAT].value > 0 and prompts[EMBED].value > 0
    fleet = http.get("/fleet").json()
    assert [(m["name"], m["task"], m["replicas"]["running"]) for m in fleet["models"]] == [
        (CHAT, "generate", 1), (EMBED, "embed", 1)]


# -- errors ---------------------------------------------------------------------------------

ERROR_CASES = [
    # (path, body, status, param)
    ("/v1/chat/completions", {"model": "no-such-model", "messages": QUESTION}, 404, "model"),
    ("/v1/chat/completions", b'{"model": "x", "messages": [', 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"messages": QUESTION}, 400, "model"),
    ("/v1/chat/completions", {"model": CHAT, "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": CHAT, "messages": QUESTION, "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": CHAT, "messages": QUESTION, "temperature": 5}, 400, "temperature"),
    ("/v1/chat/completions", {"model": CHAT, "messages": QUESTION, "n": 1000}, 400, "n"),
    ("/v1/chat/completions", {"model": CHAT, "messages": QUESTION, "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": CHAT, "messages": QUESTION, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"model": CHAT, "messages": QUESTION, "max_tokens": 2040}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": CHAT, "messages": QUESTION, "max_tokens": 2040, "stream": True}, 400,
     "max_tokens"),
    ("/v1/completions", {"model": CHAT, "prompt": "word " * 3000, "max_tokens": 4}, 400, None),
    ("/v1/completions", {"model": CHAT, "prompt": "word " * 1000, "max_tokens": 1500}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": EMBED, "messages": QUESTION}, 400, "model"),
    ("/v1/completions", {"model": EMBED, "prompt": "hi"}, 400, "model"),
    ("/v1/embeddings", {"model": CHAT, "input": "hi"}, 400, "model"),
    ("/v1/embeddings", {"model": EMBED}, 400, "input"),
]


@pytest.mark.parametrize("path, body, status, param", ERROR_CASES)
def test_bad_requests_get_the_openai_error_envelope(http, path, body, status, param):
    if isinstance(body, bytes):
        resp = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        resp = http.post(path, json=body)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    payload = resp.json()
    check_error(payload)
    assert payload["error"]["message"]
    if param is not None:
        assert payload["error"]["param"] == param, payload
    assert "Traceback" not in resp.text


def test_context_overflow_is_flagged(http):
    resp = http.post("/v1/chat/completions", json={"model": CHAT, "messages": QUESTION, "max_tokens": 2040})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=CHAT, messages=QUESTION, temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=CHAT, input="x")


def test_unknown_route_and_wrong_method(http):
    resp = http.get("/v1/nothing-here")
    assert resp.status_code == 404
    check_error(resp.json())
    resp = http.get("/v1/chat/completions")
    assert resp.status_code == 405
    check_error(resp.json())


def test_bad_input_left_the_stack_healthy(client, http):
    assert http.get("/ready").status_code == 200
    reply = client.chat.completions.create(model=CHAT, messages=QUESTION, temperature=0, max_tokens=10)
    assert "Paris" in reply.choices[0].message.content


# -- client disconnect ----------------------------------------------------------------------


def _gauge(http, name: str, model: str) -> float:
    return sum(s.value for s in metric_samples(http, name) if s.labels.get("model_name") == model)


def test_client_disconnect_aborts_the_engine_request(stack, http):
    before = _gauge(http, "vllm:generation_tokens_total", CHAT)
    body = {"model": CHAT, "messages": QUESTION, "max_tokens": 1900, "stream": True,
            "ignore_eos": True, "temperature": 1.0}
    with httpx.Client(base_url=stack.url, timeout=60) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        got = 0
        for line in sse_lines(r):
            if line.startswith("data: "):
                got += 1
            if got >= 5:
                break  # leaving the block closes the connection mid-stream
    # The engine must stop: no request running, and the token counter stops growing
    # far short of the 1,900 tokens the request asked for. (Replicas push their vLLM
    # metrics every second: wait for a push made after the disconnect.)
    time.sleep(2.5)
    deadline = time.monotonic() + 30
    while _gauge(http, "vllm:num_requests_running", CHAT) > 0:
        assert time.monotonic() < deadline, "the engine kept generating after the client left"
        time.sleep(0.5)
    settled = _gauge(http, "vllm:generation_tokens_total", CHAT)
    time.sleep(3)
    assert _gauge(http, "vllm:generation_tokens_total", CHAT) == settled
    assert settled - before < 1000, f"generated {settled - before} tokens for an abandoned stream"
    cancelled = [s for s in metric_samples(http, "slm_requests_total")
                 if s.labels.get("status") == "cancelled" and s.labels.get("model") == CHAT]
    assert cancelled and cancelled[0].value >= 1


# -- operations -----------------------------------------------------------------------------


def test_health_ready_and_fleet(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json() == {"status": "ready"}
    fleet = http.get("/fleet").json()
    for model in fleet["models"]:
        assert set(model) >= {"name", "task", "source", "queue_depth", "replicas", "autoscaling", "routing"}
        assert set(model["replicas"]) == {"running", "starting", "draining", "target", "last_error"}
        assert model["replicas"]["last_error"] is None  # every replica of the demo fleet started
        # The demo fleet sets no memory knob: each CPU replica planned its KV cache.
        fp = model["footprint"]
        assert fp["kv_cache_source"] == "memory plan", fp
        assert fp["kv_cache_floor_bytes"] <= fp["kv_cache_bytes"] <= fp["kv_cache_target_bytes"], fp
        assert model["routing"] == {"policy": "least-queue"}
        assert set(model["autoscaling"]) >= {"min_replicas", "max_replicas", "target_queue_depth", "last_decision"}


def test_gateway_metrics(client, http):
    client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=QUESTION, max_tokens=2)
    statuses = {(s.labels["model"], s.labels["status"]) for s in metric_samples(http, "slm_requests_total")}
    assert (CHAT, "200") in statuses
    # This stack streams bodies over the direct channel: no stream fell back to Ray.
    transports = {s.labels["transport"]: s.value for s in metric_samples(http, "slm_streams_total")
                  if s.labels["model"] == CHAT}
    assert transports.get("direct", 0) > 0 and transports.get("ray", 0) == 0, transports
    names = {s.name for f in text_string_to_metric_families(http.get("/metrics").text) for s in f.samples}
    for name in ("slm_request_latency_seconds_count", "slm_time_to_first_token_seconds_count",
                 "slm_requests_in_flight", "vllm:generation_tokens_total", "vllm:num_requests_waiting"):
        assert name in names, name


def test_slm_status_prints_the_fleet_table(stack):
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "--url", stack.url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:7] == ["MODEL", "TASK", "QUEUE", "RUNNING", "STARTING", "DRAINING", "TARGET"]
    for line, (name, task) in zip(lines[1:], [(CHAT, "generate"), (EMBED, "embed")], strict=True):
        cells = line.split()
        assert cells[:2] == [name, task]
        assert float(cells[2]) >= 0  # queue depth: a recent request still shows in the 2 s window
        assert cells[3:9] == ["1", "0", "0", "1", "1-1", "least-queue"]


def test_slm_status_unreachable_gateway():
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "--url", "http://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "cannot reach the gateway" in out.stderr and "Traceback" not in out.stderr


def test_locust_smoke_run_against_the_demo_stack(stack, tmp_path):
    """`make test`'s short headless Locust run (loadtests/locustfile.py): every task kind against
    the demo fleet, an SLO gate that passes, and the LLM entries in the CSV stats."""
    prefix = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless", "--only-summary",
           "-H", stack.url, "-u", "4", "-r", "4", "-t", "25s", "--max-tokens", "16", "--csv", str(prefix),
           "--slo-fail-ratio", "0", "--slo-ttft-p95-ms", "20000"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SLO fail_ratio: 0.0000 <= 0 OK" in out.stdout, out.stdout
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    for kind, name in [("LLM", f"TTFT {CHAT}"), ("LLM", f"TPOT {CHAT}"), ("LLM", f"tokens/s {CHAT}"),
                       ("POST", f"/v1/chat/completions [stream] {CHAT}"), ("POST", f"/v1/embeddings {EMBED}")]:
        row = rows[(kind, name)]
        assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0, (name, row)
    assert float(rows[("LLM", f"TTFT {CHAT}")]["Median Response Time"]) > 0
