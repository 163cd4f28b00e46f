"""Gateway security end to end: API keys, per-model access, rate limits shared by two
gateway replicas, request caps, request ids and the audit log. Real Ray Serve, real vLLM
(CPU) serving the tiny model, the official `openai` client and raw HTTP."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import openai
import pytest
import yaml

pytestmark = pytest.mark.integration

OPEN, SECRET = "tiny", "tiny-secret"
TEAM_KEY = "sk-team-a-0123456789abcdef"
OPS_KEY = "sk-ops-0123456789abcdefgh"
LIMITED_KEY = "sk-limited-0123456789abcd"
RPM = 6


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory, tiny_model):
    from conftest import run_stack

    d = tmp_path_factory.mktemp("security")
    keys = {"keys": [
        {"name": "team-a", "key": TEAM_KEY, "models": ["tiny"]},
        {"name": "ops", "key": OPS_KEY, "admin": True},
        {"name": "limited", "key": LIMITED_KEY, "rpm": RPM},
    ]}
    (d / "keys.yaml").write_text(yaml.safe_dump(keys))
    engine = {"max_model_len": 1024, "max_num_seqs": 8, "enforce_eager": True}
    fleet = {
        "models": [
            {"name": OPEN, "source": str(tiny_model), "engine": engine,
             "limits": {"max_tokens": 64, "max_n": 2, "max_messages": 4}},
            {"name": SECRET, "source": str(tiny_model), "engine": engine},
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
    assert {m.id for m in ops.models.list().data} == {OPEN, SECRET}


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
