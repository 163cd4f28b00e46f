"""API keys (hashing, lookup, globs, file validation) and the per-key rate limiter,
with a fake clock."""

import pytest
import yaml

from orchestrator.gateway import auth
from orchestrator.gateway.ratelimit import RateLimiter, format_reset
from orchestrator.spec import FleetValidationError

KEYS = {"keys": [
    {"name": "team-a", "key": "sk-team-a-0123456789", "models": ["smollm2-*"], "rpm": 2, "tpm": 1000},
    {"name": "ops", "key": "sk-ops-0123456789abcd", "admin": True},
]}


def test_keys_are_hashed_and_matched():
    store = auth.parse_keys(KEYS, "keys.yaml")
    assert len(store) == 2
    assert all(b"sk-" not in r.digest and len(r.salt) == 16 for r in store.records)
    assert "sk-team-a" not in repr(store.records)
    assert store.authenticate("sk-team-a-0123456789").name == "team-a"
    assert store.authenticate("sk-ops-0123456789abcd").admin
    assert store.authenticate("sk-team-a-012345678") is None
    assert store.authenticate("") is None and store.authenticate(None) is None


def test_model_globs():
    store = auth.parse_keys(KEYS, "keys.yaml")
    team = store.authenticate("sk-team-a-0123456789")
    assert team.allows("smollm2-135m") and not team.allows("qwen3-0.6b")
    assert store.authenticate("sk-ops-0123456789abcd").allows("anything")  # default: every model


@pytest.mark.parametrize("header, key", [
    ("Bearer sk-x", "sk-x"), ("bearer   sk-x ", "sk-x"), ("Basic abc", None), ("Bearer", None), (None, None),
])
def test_bearer(header, key):
    assert auth.bearer(header) == key


@pytest.mark.parametrize(
    "data, where",
    [
        ({"keys": [{"name": "a", "key": "short"}]}, "keys[0].key: invalid key"),
        ({"keys": [{"key": "sk-0123456789abcdef"}]}, "keys[0].name: Field required"),
        ({"keys": [{"name": "a", "key": "sk-0123456789abcdef", "rpm": 0}]}, "keys[0].rpm"),
        ({"keys": [{"name": "a", "key": "sk-0123456789abcdef", "role": "x"}]}, "keys[0].role: unknown field"),
        ({"keys": [{"name": "a", "key": "sk-0123456789abcdef"}, {"name": "a", "key": "sk-0123456789abcdeg"}]},
         "keys: key name 'a' appears twice"),
        ({"keys": []}, "keys"),
        ([], "expected a mapping"),
    ],
)
def test_bad_keys_files_name_the_field_and_never_echo_the_key(data, where):
    with pytest.raises(FleetValidationError) as e:
        auth.parse_keys(data, "keys.yaml")
    assert f"keys.yaml: {where}" in str(e.value) or where in str(e.value)
    assert "sk-0123456789abcde" not in str(e.value)


def test_keys_from_file_and_env(tmp_path, monkeypatch):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(KEYS))
    assert auth.load_keys_file(path).authenticate("sk-ops-0123456789abcd").name == "ops"
    monkeypatch.setenv("SLM_API_KEYS", yaml.safe_dump(KEYS))
    assert auth.load_keys_env("SLM_API_KEYS").authenticate("sk-team-a-0123456789").name == "team-a"
    with pytest.raises(FleetValidationError, match="cannot read the keys file"):
        auth.load_keys_file(tmp_path / "missing.yaml")
    monkeypatch.delenv("SLM_API_KEYS")
    with pytest.raises(FleetValidationError, match=r"\$SLM_API_KEYS: the variable is not set"):
        auth.load_keys_env("SLM_API_KEYS")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_requests_per_minute_refill_continuously():
    clock = Clock()
    limiter = RateLimiter(clock)
    assert limiter.acquire("k", rpm=2, tpm=None, tokens=0).allowed
    second = limiter.acquire("k", rpm=2, tpm=None, tokens=0)
    assert second.allowed and second.headers["x-ratelimit-remaining-requests"] == "0"
    third = limiter.acquire("k", rpm=2, tpm=None, tokens=0)
    assert not third.allowed
    assert third.retry_after_s == pytest.approx(30.0)  # 2 per minute: one every 30 s
    assert third.headers["x-ratelimit-limit-requests"] == "2"
    assert "requests per minute" in third.reason
    clock.t += 30
    assert limiter.acquire("k", rpm=2, tpm=None, tokens=0).allowed
    assert limiter.acquire("other", rpm=2, tpm=None, tokens=0).allowed  # keys are separate


def test_tokens_per_minute_reserve_then_reconcile():
    clock = Clock()
    limiter = RateLimiter(clock)
    first = limiter.acquire("k", rpm=None, tpm=1000, tokens=600)
    assert first.allowed and first.headers["x-ratelimit-remaining-tokens"] == "400"
    blocked = limiter.acquire("k", rpm=None, tpm=1000, tokens=600)
    assert not blocked.allowed and blocked.retry_after_s == pytest.approx(12.0)  # 200 missing at 1000/60 per s
    limiter.reconcile("k", 1000, reserved=600, actual=100)  # the answer used far less
    assert limiter.acquire("k", rpm=None, tpm=1000, tokens=600).allowed


def test_a_request_larger_than_the_token_limit_is_refused_for_good():
    decision = RateLimiter(Clock()).acquire("k", rpm=None, tpm=100, tokens=500)
    assert not decision.allowed and decision.retry_after_s == 0
    assert "over the key's limit of 100 tokens per minute" in decision.reason


def test_a_refused_request_takes_nothing():
    clock = Clock()
    limiter = RateLimiter(clock)
    limiter.acquire("k", rpm=1, tpm=1000, tokens=900)
    assert not limiter.acquire("k", rpm=1, tpm=1000, tokens=50).allowed  # requests exhausted
    clock.t += 60
    ok = limiter.acquire("k", rpm=1, tpm=1000, tokens=950)  # the refused request took no tokens
    assert ok.allowed


@pytest.mark.parametrize("seconds, text", [(0.25, "0.25s"), (1, "1s"), (59.2, "60s"), (90, "1m30s"), (360, "6m0s")])
def test_reset_format(seconds, text):
    assert format_reset(seconds) == text


def test_token_estimate_and_usage_sniffing():
    from orchestrator.gateway.admission import DEFAULT_RESERVED_OUTPUT_TOKENS, RequestContext, estimate_tokens

    chat = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    assert 100 <= estimate_tokens(chat) - 50 <= 130
    assert estimate_tokens({"prompt": "abcd" * 10}) == 11 + DEFAULT_RESERVED_OUTPUT_TOKENS
    assert estimate_tokens({"input": "abcd" * 10}) == 11  # embeddings produce no tokens
    ctx = RequestContext("id", False, "chat", 0.0)
    ctx.note_usage(b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n')
    assert ctx.usage is None
    ctx.note_usage(b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, '
                   b'"total_tokens": 7}}\n\ndata: [DONE]\n\n')
    assert ctx.usage == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    ctx.note_usage(b'{"id": "x", "usage": {"prompt_tokens": 1, "total_tokens": 9}}')
    assert ctx.usage["total_tokens"] == 9


def test_an_unwritable_audit_path_fails_the_gateway_but_a_lane_replica_logs_to_stdout(tmp_path, capsys):
    from orchestrator.gateway.admission import Admission
    from orchestrator.spec import parse_fleet

    fleet = parse_fleet({"models": [{"name": "m", "source": "/models/m"}],
                         "gateway": {"audit": {"enabled": True, "path": str(tmp_path / "missing" / "audit.jsonl")}}})
    with pytest.raises(OSError):
        Admission(fleet, "slm", "gw-1")
    lane = Admission(fleet, "slm", "replica-1", audit_fallback=True)
    lane.audit.write({"request_id": "r1", "status": 200})
    assert '"request_id":"r1"' in capsys.readouterr().out
