"""Gateway security and fault tolerance end to end: API keys, per-model access, rate limits
shared by two gateway replicas, request caps, request ids and the audit log; admission
control; a model replica killed under load. Real Ray Serve, real vLLM (CPU) serving the
tiny model, the official `openai` client and raw HTTP."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time

import httpx
import openai
import pytest
import yaml
from conftest import engine_pid, processes, replica_pids, run_stack
from prometheus_client.parser import text_string_to_metric_families
from sse import sse_lines

from orchestrator.devtools.lora import random_adapter

pytestmark = pytest.mark.integration

OPEN, SECRET, BUSY, PAIR = "tiny", "tiny-secret", "tiny-busy", "tiny-pair"
SECRET_LORA = "tiny-secret-lora"  # a LoRA adapter on the fast-lane model
TEAM_KEY = "sk-team-a-0123456789abcdef"
OPS_KEY = "sk-ops-0123456789abcdefgh"
LIMITED_KEY = "sk-limited-0123456789abcd"
LANE_LIMITED_KEY = "sk-lane-limited-0123456789"
BUSY_KEY = "sk-busy-limited-0123456789"
RPM = 6
LANE_RPM = 3
BUSY_RPM = 3
# A pattern xgrammar accepts as a JSON schema but cannot compile (it failed inside the engine, a 500).
BAD_PATTERN = "^(a|aa)*(b|bb)*(a|aa)*c{1,999}$"


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory, tiny_model):

    d = tmp_path_factory.mktemp("security")
    keys = {"keys": [
        {"name": "team-a", "key": TEAM_KEY, "models": ["tiny"]},
        {"name": "ops", "key": OPS_KEY, "admin": True},
        {"name": "limited", "key": LIMITED_KEY, "rpm": RPM},
        {"name": "lane-limited", "key": LANE_LIMITED_KEY, "rpm": LANE_RPM},
        {"name": "busy-limited", "key": BUSY_KEY, "rpm": BUSY_RPM, "models": [BUSY]},
    ]}
    (d / "keys.yaml").write_text(yaml.safe_dump(keys))
    engine = {"max_model_len": 1024, "max_num_seqs": 8, "enforce_eager": True}
    fleet = {
        "models": [
            {"name": OPEN, "source": str(tiny_model), "engine": engine,
             "limits": {"max_tokens": 64, "max_n": 2, "max_messages": 4}},
            {"name": SECRET, "source": str(tiny_model), "engine": engine, "fast_lane": True,
             "adapters": [{"name": SECRET_LORA, "source": str(random_adapter(tiny_model, d / "lora", seed=5))}]},
            {"name": BUSY, "source": str(tiny_model), "engine": {**engine, "max_model_len": 4096},
             "limits": {"max_queue_per_replica": 2}},
            {"name": PAIR, "source": str(tiny_model), "engine": {**engine, "max_model_len": 4096},
             "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
        ],
        "gateway": {"replicas": 2, "auth": {"keys_file": str(d / "keys.yaml")}, "max_body_bytes": 65536,
                    "audit": {"enabled": True, "path": str(d / "audit.jsonl")}},
    }
    with run_stack(d, fleet) as s:
        s.audit_path = d / "audit.jsonl"
        yield s


def client(stack, key):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(secure_stack):
    with httpx.Client(base_url=secure_stack.url, timeout=120) as c:
        yield c


def chat(key_client, model=OPEN, **kw):
    return key_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=kw.pop("max_tokens", 4), **kw)


def test_missing_and_wrong_keys_get_401(secure_stack, http):
    r = http.post("/v1/chat/completions", json={"model": OPEN, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        chat(client(secure_stack, "sk-wrong-0123456789abcdef"))


def test_a_key_sees_and_uses_only_its_models(secure_stack):
    team = client(secure_stack, TEAM_KEY)
    assert [m.id for m in team.models.list().data] == [OPEN]
    assert chat(team).choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError) as e:
        chat(team, model=SECRET)
    assert e.value.body["code"] == "model_not_found"  # the same answer as a model that does not exist
    with pytest.raises(openai.NotFoundError):
        team.models.retrieve(SECRET)
    ops = client(secure_stack, OPS_KEY)
    assert {m.id for m in ops.models.list().data} == {OPEN, SECRET, SECRET_LORA, BUSY, PAIR}


def test_fleet_and_metrics_need_an_admin_key(http):
    assert http.get("/fleet").status_code == 401
    assert http.get("/metrics", headers={"Authorization": f"Bearer {TEAM_KEY}"}).status_code == 403
    assert http.get("/fleet", headers={"Authorization": f"Bearer {OPS_KEY}"}).status_code == 200
    assert http.get("/metrics", headers={"Authorization": f"Bearer {OPS_KEY}"}).status_code == 200
    assert http.get("/health").status_code == 200 and http.get("/ready").status_code == 200  # probes stay open


def test_rate_limit_is_shared_by_both_gateway_replicas(secure_stack, http):
    fleet = http.get("/fleet", headers={"Authorization": f"Bearer {OPS_KEY}"})
    assert fleet.status_code == 200
    body = {"model": OPEN, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {LIMITED_KEY}"}

    def send(_):
        # concurrent, on new connections: Serve's proxy spreads them over both gateway replicas
        return httpx.post(f"{secure_stack.url}/v1/chat/completions", json=body, headers=headers, timeout=60)

    with cf.ThreadPoolExecutor(RPM + 4) as pool:
        responses = list(pool.map(send, range(RPM + 4)))
    statuses = sorted(r.status_code for r in responses)
    last_429 = next(r for r in responses if r.status_code == 429)
    assert statuses.count(200) == RPM, statuses  # per-process limits would have let 2 x RPM through
    assert statuses[RPM:] == [429] * 4
    assert last_429.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(last_429.headers["retry-after"]) >= 1
    assert last_429.headers["x-ratelimit-limit-requests"] == str(RPM)
    assert last_429.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-reset-requests" in last_429.headers
    time.sleep(1)
    audited = [json.loads(line) for line in secure_stack.audit_path.read_text().splitlines()]
    gateways = {x["gateway"] for x in audited if x["key"] == "limited"}
    assert len(gateways) == 2, f"both gateway replicas took the limited key's requests: {gateways}"


def test_request_caps_name_the_limit(secure_stack, http):
    team = client(secure_stack, TEAM_KEY)
    with pytest.raises(openai.BadRequestError, match=r"max_tokens 100 is over this model's limit of 64"):
        chat(team, max_tokens=100)
    with pytest.raises(openai.BadRequestError, match=r"n 3 is over this model's limit of 2"):
        chat(team, n=3)
    with pytest.raises(openai.BadRequestError, match=r"5 messages are over this model's limit of 4"):
        team.chat.completions.create(model=OPEN, max_tokens=2,
                                     messages=[{"role": "user", "content": str(i)} for i in range(5)])
    # Without max_tokens the cap is the default: the answer stops at 64 tokens, not at the context.
    capped = team.chat.completions.create(model=OPEN, messages=[{"role": "user", "content": "go"}],
                                          extra_body={"ignore_eos": True})
    assert capped.usage.completion_tokens == 64 and capped.choices[0].finish_reason == "length"
    r = http.post("/v1/chat/completions", content=b'{"model": "tiny", "x": "' + b"a" * 70000 + b'"}',
                  headers={"Authorization": f"Bearer {TEAM_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413
    assert "gateway.max_body_bytes" in r.json()["error"]["message"]


def test_request_ids_are_returned_and_audited_without_prompts(secure_stack, http):
    headers = {"Authorization": f"Bearer {TEAM_KEY}", "x-request-id": "req-audit-1"}
    r = http.post("/v1/chat/completions", headers=headers,
                  json={"model": OPEN, "messages": [{"role": "user", "content": "secret prompt text"}],
                        "max_tokens": 3})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-audit-1"
    generated = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {TEAM_KEY}"},
                          json={"model": OPEN, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                "stream": True})
    assert len(generated.headers["x-request-id"]) >= 16  # made by Serve's proxy
    denied = http.post("/v1/chat/completions", headers={"x-request-id": "req-denied"}, json={"model": OPEN})
    assert denied.status_code == 401 and denied.headers["x-request-id"] == "req-denied"
    time.sleep(1)
    lines = [json.loads(line) for line in secure_stack.audit_path.read_text().splitlines()]
    mine = next(x for x in lines if x["request_id"] == "req-audit-1")
    assert mine["key"] == "team-a" and mine["model"] == OPEN and mine["status"] == 200
    assert mine["prompt_tokens"] > 0 and mine["completion_tokens"] == 3 and mine["latency_ms"] > 0
    assert "body" not in mine
    streamed = next(x for x in lines if x["request_id"] == generated.headers["x-request-id"])
    assert streamed["stream"] is True and streamed["status"] == 200
    assert next(x for x in lines if x["request_id"] == "req-denied")["status"] == 401
    text = secure_stack.audit_path.read_text() + secure_stack.log_path.read_text(errors="replace")
    assert "secret prompt text" not in text
    assert TEAM_KEY not in text and OPS_KEY not in text  # keys are never logged


# -- the fast lane (SECRET's replicas answer /models/tiny-secret/v1 themselves) ------------------


def lane_url(stack) -> str:
    from orchestrator.names import lane_route_prefix

    return f"{stack.url}{lane_route_prefix(SECRET)}"


def test_fast_lane_serves_the_openai_client_with_the_same_keys(secure_stack, http):
    lane = lane_url(secure_stack)
    assert _ops_view(http, SECRET)["fast_lane"] == "/models/tiny-secret/v1"
    assert _ops_view(http, OPEN)["fast_lane"] is None
    ops = openai.OpenAI(base_url=f"{lane}/v1", api_key=OPS_KEY, max_retries=0, timeout=120)
    assert [m.id for m in ops.models.list().data] == [SECRET, SECRET_LORA]
    stream = ops.chat.completions.create(model=SECRET, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content is not None) >= 1
    assert chunks[-1].usage.completion_tokens == 12
    done = ops.completions.create(model=SECRET, prompt="hello", max_tokens=5, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 5
    # The same key rules as /v1: no key, a wrong key, a key without this model.
    team = openai.OpenAI(base_url=f"{lane}/v1", api_key=TEAM_KEY, max_retries=0, timeout=120)
    assert team.models.list().data == []
    with pytest.raises(openai.NotFoundError) as e:
        chat(team, model=SECRET)
    assert e.value.body["code"] == "model_not_found"
    anonymous = httpx.post(f"{lane}/v1/chat/completions", json={"model": SECRET, "messages": []}, timeout=60)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    # Bad input: the OpenAI envelope, the right status.
    auth = {"Authorization": f"Bearer {OPS_KEY}"}
    bad = httpx.post(f"{lane}/v1/chat/completions", content=b"{nope", headers=auth, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    other = httpx.post(f"{lane}/v1/chat/completions", headers=auth, timeout=60,
                       json={"model": OPEN, "messages": [{"role": "user", "content": "x"}]})
    assert other.status_code == 400 and other.json()["error"]["param"] == "model"
    assert "/v1" in other.json()["error"]["message"]
    wrong_task = httpx.post(f"{lane}/v1/embeddings", headers=auth, json={"model": SECRET, "input": "x"}, timeout=60)
    assert wrong_task.status_code == 400 and wrong_task.json()["error"]["code"] == "model_not_supported"
    # /v1 still serves the model, through the gateway.
    assert chat(client(secure_stack, OPS_KEY), model=SECRET).usage.completion_tokens >= 1


def test_fast_lane_serves_its_model_adapters(secure_stack):
    lane = openai.OpenAI(base_url=f"{lane_url(secure_stack)}/v1", api_key=OPS_KEY, max_retries=0, timeout=120)
    gateway = client(secure_stack, OPS_KEY)
    listed = {m.id: m.model_extra.get("parent") for m in lane.models.list().data}
    assert listed[SECRET_LORA] == SECRET

    def answer(c, model):
        return c.completions.create(model=model, prompt="one two three", max_tokens=8, temperature=0).choices[0].text

    assert answer(lane, SECRET_LORA) == answer(gateway, SECRET_LORA) != answer(lane, SECRET)
    with pytest.raises(openai.NotFoundError):  # a name that is neither the model nor one of its adapters
        answer(lane, "tiny-secret-unknown")


def test_fast_lane_audits_with_request_ids_and_shares_the_rate_limit(secure_stack, http):
    lane = lane_url(secure_stack)
    body = {"model": SECRET, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {LANE_LIMITED_KEY}"}
    via_gateway = [httpx.post(f"{secure_stack.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
                   for _ in range(LANE_RPM - 1)]
    assert [r.status_code for r in via_gateway] == [200] * (LANE_RPM - 1)
    last = httpx.post(f"{lane}/v1/chat/completions", json={**body, "stream": True}, timeout=60,
                      headers={**headers, "x-request-id": "req-lane-1"})
    assert last.status_code == 200 and last.headers["x-request-id"] == "req-lane-1"
    assert last.text.rstrip().endswith("data: [DONE]")
    refused = httpx.post(f"{lane}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert refused.status_code == 429, "the lane and the gateway share one key's budget"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-limit-requests"] == str(LANE_RPM)
    time.sleep(1)
    lines = [json.loads(line) for line in secure_stack.audit_path.read_text().splitlines()]
    mine = next(x for x in lines if x["request_id"] == "req-lane-1")
    assert (mine["key"], mine["model"], mine["status"], mine["stream"]) == ("lane-limited", SECRET, 200, True)
    assert mine["completion_tokens"] is None or mine["completion_tokens"] == 2
    assert [x["status"] for x in lines if x["key"] == "lane-limited"].count(429) == 1


def test_fast_lane_client_disconnect_aborts_the_engine_request(secure_stack, http):
    auth = {"Authorization": f"Bearer {OPS_KEY}"}

    def gauge(name: str) -> float:
        text = http.get("/metrics", headers=auth).text
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and s.labels.get("model_name") == SECRET)

    before = gauge("vllm:generation_tokens_total")
    body = {"model": SECRET, "messages": [{"role": "user", "content": "go"}], "max_tokens": 900, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{lane_url(secure_stack)}/v1/chat/completions",
                                                 json=body, headers=auth) as r:
        assert r.status_code == 200
        got = 0
        for line in sse_lines(r):
            got += line.startswith("data: ")
            if got >= 5:
                break  # leaving the block closes the connection mid-stream
    time.sleep(2.5)  # replicas push their vLLM metrics every second
    deadline = time.monotonic() + 30
    while gauge("vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the engine kept generating after the client left"
        time.sleep(0.5)
    settled = gauge("vllm:generation_tokens_total")
    time.sleep(3)
    assert gauge("vllm:generation_tokens_total") == settled
    assert 1 <= settled - before < 600, f"generated {settled - before} tokens for an abandoned stream"


def _ops_view(http, model):
    models = http.get("/fleet", headers={"Authorization": f"Bearer {OPS_KEY}"}).json()["models"]
    return next(m for m in models if m["name"] == model)


def _stream(url: str, model: str, max_tokens: int) -> dict:
    """A raw SSE stream: whether it ended with [DONE], and whether an error event came."""
    body = {"model": model, "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    out = {"done": False, "error": None, "chunks": 0}
    started = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {OPS_KEY}"}) as r:
        out["status"] = r.status_code
        for line in sse_lines(r):
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    out["error"] = event["error"]
                else:
                    out["chunks"] += 1
    out["elapsed"] = time.monotonic() - started
    return out


def test_admission_control_refuses_quickly_when_the_queue_is_full(secure_stack, http):
    probe = {"model": BUSY, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    with cf.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(_stream, secure_stack.url, BUSY, 2500) for _ in range(6)]
        # The queue fills within seconds; each gateway replica's view of it is at most ~1 s
        # old, so probe until one is refused (the published depth can sit just under 2.0).
        deadline = time.monotonic() + 30
        while True:
            started = time.monotonic()
            r = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {OPS_KEY}"}, json=probe)
            took = time.monotonic() - started
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        seen = _ops_view(http, BUSY)
        results = [f.result() for f in streams]
    assert r.status_code == 503, (r.text, seen, results)
    assert r.json()["error"]["code"] == "model_overloaded"
    assert int(r.headers["retry-after"]) >= 1
    # Streams that arrived once the queue was full were refused too; every admitted one finished.
    admitted = [x for x in results if x["status"] == 200]
    assert admitted and all(x["done"] and x["error"] is None for x in admitted), results
    assert all(x["status"] == 503 for x in results if x["status"] != 200), results
    # Quick: an immediate answer, next to the admitted requests' seconds of work.
    slowest = max(x["elapsed"] for x in admitted)
    assert took < slowest / 2, f"the refusal took {took:.1f}s (admitted streams: {slowest:.1f}s)"
    print(f"admission control: refused in {took * 1000:.0f} ms while admitted streams took up to {slowest:.1f}s")


def _while_full(stack, http, then=None, tokens: int = 2500) -> tuple[httpx.Response, list[dict], object]:
    """Six long streams on BUSY (queue bound 2 per replica); probe (ops key) until a probe is
    refused (or 30 s pass), then run ``then()`` while the queue is still full. Returns the last
    probe, the streams' outcomes and what ``then`` returned."""
    probe = {"model": BUSY, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    ops = {"Authorization": f"Bearer {OPS_KEY}"}
    with cf.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(_stream, stack.url, BUSY, tokens) for _ in range(6)]
        deadline = time.monotonic() + 30
        while True:
            r = http.post("/v1/chat/completions", headers=ops, json=probe)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        done = then() if then is not None and r.status_code == 503 else None
        results = [f.result() for f in streams]
    return r, results, done


def test_admission_refusals_do_not_charge_the_rate_limit(secure_stack, http):
    """Capacity is checked before the key's rate limit: a 503 model_overloaded costs nothing."""
    headers = {"Authorization": f"Bearer {BUSY_KEY}"}
    probe = {"model": BUSY, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}

    def probes():  # more requests than the key's whole minute, while the model is full
        return [http.post("/v1/chat/completions", headers=headers, json=probe).status_code
                for _ in range(BUSY_RPM + 1)]

    r, _, during = _while_full(secure_stack, http, probes)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_overloaded", r.text
    refused, admitted = during.count(503), during.count(200)
    assert refused >= 2 and refused + admitted == BUSY_RPM + 1, during
    # Once the queue is seen drained (the view is averaged over ~2 s), only the admitted ones
    # have been charged: the rest of the key's minute is still there.
    ops = {"Authorization": f"Bearer {OPS_KEY}"}
    deadline = time.monotonic() + 30
    while http.post("/v1/chat/completions", headers=ops, json=probe).status_code == 503:
        assert time.monotonic() < deadline, "BUSY still refused 30 s after its streams ended"
        time.sleep(0.5)
    time.sleep(1.5)  # the other gateway replica's view, refreshed every second
    after = [http.post("/v1/chat/completions", headers=headers, json=probe).status_code
             for _ in range(BUSY_RPM - admitted + 1)]
    assert after == [200] * (BUSY_RPM - admitted) + [429], (during, after)


def test_admission_control_fails_safe_without_the_fleet_state(secure_stack, http):
    """The fleet-state actor frozen (its reads time out): each gateway replica falls back to
    its own in-flight count, says so in a log line and a metric, and keeps refusing what is
    past the bound (it used to read an empty queue and admit everything). Ray may declare the
    frozen actor dead and restart it within seconds; streams arriving over the whole window
    are refused either way, and the log shows the fallback engaged."""
    actors = [pid for pid, _, cmd in processes() if cmd.startswith("ray::FleetState")]
    assert len(actors) == 1, actors
    ops = {"Authorization": f"Bearer {OPS_KEY}"}
    log_start = len(secure_stack.log_path.read_text(errors="replace"))
    os.kill(actors[0], signal.SIGSTOP)
    try:
        with cf.ThreadPoolExecutor(12) as pool:
            futures = []
            for _ in range(12):  # one every 0.75 s: through and past the 5 s staleness bound
                futures.append(pool.submit(_stream, secure_stack.url, BUSY, 3500))
                time.sleep(0.75)
            results = [f.result() for f in futures]
        refused = [x for x in results if x["status"] == 503]
        admitted = [x for x in results if x["status"] == 200]
        assert refused and admitted, results
        assert all(x["done"] and x["error"] is None for x in admitted), results
        seen = []
        for _ in range(6):  # /metrics answers from one gateway replica: ask until one that estimated
            text = http.get("/metrics", headers=ops, timeout=60).text
            seen.append('slm_admission_queue_estimated{model="tiny-busy"}' in text)
            if seen[-1]:
                break
        assert any(seen), "no gateway replica reported slm_admission_queue_estimated for tiny-busy"
    finally:
        os.kill(actors[0], signal.SIGCONT)
    log = secure_stack.log_path.read_text(errors="replace")[log_start:]
    assert "fleet state read failed" in log and "admission control for tiny-busy" in log, log[-3000:]


def test_hostile_values_are_bounded_and_bad_grammars_are_400(secure_stack, http):
    ops = {"Authorization": f"Bearer {OPS_KEY}"}
    long_id = "r" * 5000
    for base in ("/v1", lane_url(secure_stack).removeprefix(secure_stack.url) + "/v1"):
        model = OPEN if base == "/v1" else SECRET
        r = http.post(f"{base}/chat/completions", headers={**ops, "x-request-id": long_id},
                      json={"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert 0 < len(r.headers["x-request-id"]) <= 128, base  # a fresh id, not the client's 5,000 bytes
        schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": BAD_PATTERN}},
                  "required": ["s"]}
        body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 8,
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
        for stream in (False, True):
            r = http.post(f"{base}/chat/completions", headers=ops, json={**body, "stream": stream})
            assert r.status_code == 400, (base, stream, r.text)
            error = r.json()["error"]
            assert error["param"] == "response_format" and "cannot be compiled" in error["message"], error
    huge = "m" * 60_000  # under the stack's 64 KB body limit
    r = http.post("/v1/chat/completions", headers=ops, json={"model": huge, "messages": []})
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 400, r.text[:500]
    message = http.get("/v1/models/" + "x" * 5000, headers=ops).json()["error"]["message"]
    assert "x" * 200 in message and "x" * 201 not in message, message[:300]


def test_killing_a_replica_under_load_loses_no_request(secure_stack, http):
    pids = replica_pids("model-tiny-pair")
    assert len(pids) == 2, pids
    ops = client(secure_stack, OPS_KEY)

    def call(i):
        try:
            reply = ops.chat.completions.create(model=PAIR, messages=[{"role": "user", "content": f"q{i}"}],
                                                max_tokens=2000, extra_body={"ignore_eos": True})
            return reply.usage.completion_tokens
        except openai.APIError as e:
            return e

    with cf.ThreadPoolExecutor(10) as pool:
        calls = [pool.submit(call, i) for i in range(6)]
        streams = [pool.submit(_stream, secure_stack.url, PAIR, 2000) for _ in range(4)]
        time.sleep(3)
        os.kill(pids[0], signal.SIGKILL)
        killed_at = time.monotonic()
        answers = [f.result() for f in calls]
        ended = [f.result() for f in streams]
    lost = [a for a in answers if a != 2000]
    assert lost == [], f"non-streaming requests lost: {lost}"
    unterminated = [s for s in ended if not s["done"]]
    assert unterminated == [], f"streams cut without a terminal event: {unterminated}"
    broken = [s for s in ended if s["error"]]
    for s in broken:
        assert s["error"]["code"] == "model_not_ready"  # a final error event, then [DONE]
    metrics = http.get("/metrics", headers={"Authorization": f"Bearer {OPS_KEY}"}).text
    deadline = time.monotonic() + 300
    while _ops_view(http, PAIR)["replicas"]["running"] < 2 or replica_pids("model-tiny-pair") == pids[1:]:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(2)
    replaced = time.monotonic() - killed_at
    print(f"killed replica: {len(broken)} of 4 streams ended with an error event, "
          f"{6 - len(lost)} of 6 calls answered (retries: {'slm_retries_total' in metrics}), "
          f"replacement running after {replaced:.0f}s")


def test_a_dead_engine_is_retried_elsewhere_and_its_replica_replaced(secure_stack, http):
    pids = replica_pids("model-tiny-pair")
    assert len(pids) == 2, pids
    engine = engine_pid(pids[0])
    assert engine is not None, "no EngineCore process under the replica"
    ops = client(secure_stack, OPS_KEY)

    def call(i):
        try:
            return ops.chat.completions.create(model=PAIR, messages=[{"role": "user", "content": f"e{i}"}],
                                               max_tokens=1500, extra_body={"ignore_eos": True}).usage.completion_tokens
        except openai.APIError as e:
            return e

    with cf.ThreadPoolExecutor(6) as pool:
        calls = [pool.submit(call, i) for i in range(6)]
        time.sleep(3)
        os.kill(engine, signal.SIGKILL)
        killed_at = time.monotonic()
        answers = [f.result() for f in calls]
    assert [a for a in answers if a != 1500] == [], f"requests lost when an engine died: {answers}"
    deadline = time.monotonic() + 300
    while pids[0] in replica_pids("model-tiny-pair") or _ops_view(http, PAIR)["replicas"]["running"] < 2:
        assert time.monotonic() < deadline, "the replica with a dead engine was not replaced"
        time.sleep(2)
    print(f"dead engine: replica replaced after {time.monotonic() - killed_at:.0f}s")
