"""Daily token budgets (``tokens_per_day``) end to end: a key spends its budget and gets 429
with Retry-After until 00:00 UTC and the day headers; the day's usage survives the
rate-limiter actor crashing (Ray restarts it) and the gateway replica that owned it dying
(a new actor is created), because the actor keeps a copy in Ray's GCS key-value store.
Real Ray Serve, real vLLM (CPU) serving the tiny model, the official `openai` client."""

from __future__ import annotations

import os
import signal
import time

import openai
import pytest
import yaml
from conftest import processes, replica_pids, run_stack

from orchestrator.gateway.ratelimit import FLUSH_INTERVAL_S, seconds_to_midnight

pytestmark = pytest.mark.integration

MODEL = "tiny"
DAILY_KEY = "sk-daily-0123456789abcdef"
OTHER_KEY = "sk-other-0123456789abcdef"
BUDGET = 80  # each call reserves about 25 tokens (prompt estimate + max_tokens 16): about 3 calls
OTHER_BUDGET = 100_000
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def budget_stack(tmp_path_factory, tiny_model):
    if seconds_to_midnight(time.time()) < 300:
        pytest.skip("too close to 00:00 UTC: the budgets would reset during the test")
    d = tmp_path_factory.mktemp("budgets")
    keys = {
        "keys": [
            {"name": "daily", "key": DAILY_KEY, "tokens_per_day": BUDGET},
            {"name": "other", "key": OTHER_KEY, "tokens_per_day": OTHER_BUDGET},
        ]
    }
    (d / "keys.yaml").write_text(yaml.safe_dump(keys))
    fleet = {
        "models": [{"name": MODEL, "source": str(tiny_model), "engine": {"max_model_len": 256, "enforce_eager": True}}],
        "gateway": {"replicas": 1, "auth": {"keys_file": str(d / "keys.yaml")}},
    }
    with run_stack(d, fleet) as s:
        yield s


def chat(stack, key):
    c = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=60)
    return c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
    )


def refused(stack) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as e:
        chat(stack, DAILY_KEY)
    return e.value


def limiter_pids() -> set[int]:
    return {pid for pid, _, args in processes() if args.startswith("ray::RateLimitActor")}


def wait_for(what, check, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
        except (openai.APIError, OSError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


STATE = {}


def test_a_spent_budget_is_refused_until_utc_midnight(budget_stack):
    used, served = 0, 0
    for _ in range(10):
        try:
            raw = chat(budget_stack, DAILY_KEY)
        except openai.RateLimitError as e:
            last = e
            break
        served += 1
        used += raw.parse().usage.total_tokens
        time.sleep(0.5)  # the answer is settled as its body ends, maybe just after the client has it
        assert raw.headers["x-ratelimit-limit-tokens-day"] == str(BUDGET)
    else:
        pytest.fail(f"{served} calls and no 429 with a budget of {BUDGET} tokens")
    assert served >= 2, f"only {served} calls fit in {BUDGET} tokens"
    headers = last.response.headers
    assert last.body["code"] == "rate_limit_exceeded" and "daily budget" in last.body["message"]
    assert abs(int(headers["retry-after"]) - seconds_to_midnight(time.time())) <= 5
    assert headers["x-ratelimit-limit-tokens-day"] == str(BUDGET)
    # Every answer was settled with its real usage, not its reservation.
    assert headers["x-ratelimit-remaining-tokens-day"] == str(BUDGET - used)
    assert "x-ratelimit-reset-tokens-day" in headers
    STATE["remaining"] = headers["x-ratelimit-remaining-tokens-day"]
    print(f"budget {BUDGET}: {served} calls served ({used} tokens), then 429 with Retry-After {headers['retry-after']}")


def test_the_days_usage_survives_the_limiter_actor_crashing(budget_stack):
    assert "remaining" in STATE, "the first test did not spend the budget"
    time.sleep(2 * FLUSH_INTERVAL_S)  # the last charges reach the store
    (old,) = limiter_pids()
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    new = wait_for("the limiter actor's restart", lambda: limiter_pids() - {old})
    time.sleep(1)
    e = refused(budget_stack)
    assert e.response.headers["x-ratelimit-remaining-tokens-day"] == STATE["remaining"]
    assert chat(budget_stack, OTHER_KEY).headers["x-ratelimit-limit-tokens-day"] == str(OTHER_BUDGET)
    print(f"limiter actor {old} killed, {new} restarted in {time.monotonic() - killed:.1f}s; key still refused")


def test_the_days_usage_survives_the_gateway_replica_that_owned_the_limiter(budget_stack):
    assert "remaining" in STATE, "the first test did not spend the budget"
    before = limiter_pids()
    (gateway,) = replica_pids("gateway")
    os.kill(gateway, signal.SIGKILL)
    killed = time.monotonic()
    served = wait_for("the gateway to answer again", lambda: chat(budget_stack, OTHER_KEY))
    back = time.monotonic() - killed
    assert served.headers["x-ratelimit-limit-tokens-day"] == str(OTHER_BUDGET)
    assert replica_pids("gateway") not in ([], [gateway])
    # The limiter died with its owner; the new gateway replica created a new one.
    assert limiter_pids() and not (limiter_pids() & before)
    e = refused(budget_stack)
    assert e.response.headers["x-ratelimit-remaining-tokens-day"] == STATE["remaining"]
    assert abs(int(e.response.headers["retry-after"]) - seconds_to_midnight(time.time())) <= 5
    print(f"gateway replica {gateway} killed: answering again after {back:.0f}s; key still refused")
