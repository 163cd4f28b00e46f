"""Daily token budgets per key (``tokens_per_day``): reserve then settle, refusals until the
next UTC midnight, the day's reset, changed budgets, the export/import hook the actor
persists with, and the actor's load and flush against a fake store. Fake clocks, no Ray."""

from __future__ import annotations

import json
import threading

import pytest

from orchestrator.gateway.ratelimit import DAY_S, RateLimitActor, RateLimiter, format_reset, state_key

DAY = 20_000  # 2024-10-05, as days since 1970-01-01 (UTC)
NOON = DAY * DAY_S + 12 * 3600.0


class Clocks:
    """A monotonic clock and a wall clock (Unix time) that move together."""

    def __init__(self, wall: float = NOON):
        self.mono = 1000.0
        self.wall = wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clocks():
    return Clocks()


@pytest.fixture
def limiter(clocks):
    return RateLimiter(clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall)


def take(limiter, tokens, budget=1000, key="k", tpm=None, rpm=None):
    return limiter.acquire(key, rpm, tpm, tokens, tokens_per_day=budget)


def test_reserve_then_settle_gives_back_and_overcharges(limiter):
    first = take(limiter, 300)
    assert first.allowed
    assert first.headers["x-ratelimit-limit-tokens-day"] == "1000"
    assert first.headers["x-ratelimit-remaining-tokens-day"] == "700"
    limiter.reconcile("k", None, reserved=300, actual=120, tokens_per_day=1000)  # used less: 180 back
    assert limiter.used_today("k") == 120
    take(limiter, 100)
    limiter.reconcile("k", None, reserved=100, actual=250, tokens_per_day=1000)  # used more: 150 charged
    assert limiter.used_today("k") == 370
    assert take(limiter, 0).headers["x-ratelimit-remaining-tokens-day"] == "630"


def test_settling_never_goes_below_zero(limiter):
    limiter.reconcile("k", None, reserved=500, actual=0, tokens_per_day=1000)  # nothing reserved today
    assert limiter.used_today("k") == 0
    take(limiter, 10)
    limiter.reconcile("k", None, reserved=400, actual=0, tokens_per_day=1000)
    assert limiter.used_today("k") == 0


def test_an_exhausted_budget_waits_until_utc_midnight(limiter, clocks):
    assert take(limiter, 900).allowed
    refused = take(limiter, 200)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(12 * 3600)  # noon to midnight
    assert "daily budget of 1000 tokens" in refused.reason and "00:00 UTC" in refused.reason
    assert refused.headers["x-ratelimit-remaining-tokens-day"] == "100"
    assert refused.headers["x-ratelimit-reset-tokens-day"] == format_reset(12 * 3600) == "720m0s"
    assert limiter.used_today("k") == 900  # the refused request took nothing
    assert take(limiter, 100).allowed  # what is left still fits exactly
    clocks.advance(6 * 3600 - 0.5)
    late = take(limiter, 1)
    assert not late.allowed and late.retry_after_s == pytest.approx(6 * 3600 + 0.5)
    assert take(limiter, 1, key="other").allowed  # keys are separate


def test_the_budget_resets_at_utc_midnight(limiter, clocks):
    clocks.wall = (DAY + 1) * DAY_S - 1  # 23:59:59
    assert take(limiter, 1000).allowed
    refused = take(limiter, 1)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(1)
    clocks.advance(1)  # 00:00:00 UTC
    fresh = take(limiter, 1000)
    assert fresh.allowed and fresh.headers["x-ratelimit-remaining-tokens-day"] == "0"
    assert fresh.headers["x-ratelimit-reset-tokens-day"] == format_reset(DAY_S)


def test_a_request_larger_than_the_whole_budget_is_refused_for_good(limiter):
    decision = take(limiter, 1001)
    assert not decision.allowed and decision.retry_after_s == 0
    assert "over the key's daily budget of 1000 tokens" in decision.reason
    assert decision.headers["x-ratelimit-remaining-tokens-day"] == "1000"
    assert limiter.used_today("k") == 0


def test_a_changed_budget_applies_at_once_to_the_days_usage(limiter):
    assert take(limiter, 600).allowed
    lowered = take(limiter, 100, budget=500)  # the keys file reloaded with a lower budget
    assert not lowered.allowed and lowered.retry_after_s > 0
    assert lowered.headers["x-ratelimit-remaining-tokens-day"] == "0"
    raised = take(limiter, 100, budget=2000)
    assert raised.allowed and raised.headers["x-ratelimit-remaining-tokens-day"] == "1300"


def test_export_import_restores_the_same_days_usage_and_ignores_an_old_day(clocks, limiter):
    take(limiter, 400, key="a")
    take(limiter, 50, key="b")
    state = json.loads(json.dumps(limiter.export_day()))  # what the store keeps
    assert state == {"day": DAY, "used": {"a": 400, "b": 50}}

    restarted = RateLimiter(clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall)
    assert restarted.import_day(state)
    assert restarted.used_today("a") == 400 and restarted.used_today("b") == 50
    assert take(restarted, 700, key="a").retry_after_s > 0  # 400 + 700 > 1000

    clocks.advance(DAY_S)  # the next day: yesterday's usage is not today's
    tomorrow = RateLimiter(clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall)
    assert not tomorrow.import_day(state)
    assert tomorrow.used_today("a") == 0
    assert not tomorrow.import_day({"day": DAY + 1, "used": "garbage"}) and not tomorrow.import_day(None)


def test_import_keeps_the_larger_usage(limiter):
    take(limiter, 300, key="a")
    limiter.import_day({"day": DAY, "used": {"a": 100, "b": 70}})
    assert limiter.used_today("a") == 300 and limiter.used_today("b") == 70


def test_a_request_refused_by_tpm_takes_nothing_from_the_day(limiter):
    assert take(limiter, 800, tpm=1000, budget=10_000).allowed
    refused = take(limiter, 300, tpm=1000, budget=10_000)  # the minute's tokens are short, the day's are not
    assert not refused.allowed and refused.retry_after_s == pytest.approx(6.0)  # 100 missing at 1000/60 per s
    assert "tokens per minute" in refused.reason
    assert limiter.used_today("k") == 800
    over_tpm = take(limiter, 150, tpm=100, budget=10_000)  # larger than the minute's limit
    assert not over_tpm.allowed and limiter.used_today("k") == 800


def test_a_request_refused_by_the_day_takes_nothing_from_the_minute(limiter, clocks):
    take(limiter, 950, tpm=5000, rpm=10)
    refused = take(limiter, 100, tpm=5000, rpm=10)
    assert not refused.allowed and "daily budget" in refused.reason
    assert refused.headers["x-ratelimit-remaining-requests"] == "9"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "4050"


def test_reconcile_settles_the_minute_and_the_day(limiter):
    take(limiter, 600, tpm=1000)
    limiter.reconcile("k", 1000, reserved=600, actual=100, tokens_per_day=1000)
    assert limiter.used_today("k") == 100
    allowed = take(limiter, 500, tpm=1000)
    assert allowed.allowed and allowed.headers["x-ratelimit-remaining-tokens"] == "400"  # 1000 - 600 + 500 - 500
    assert allowed.headers["x-ratelimit-remaining-tokens-day"] == "400"  # 1000 - 100 - 500


def test_keys_without_a_budget_are_untouched(limiter):
    decision = limiter.acquire("k", None, 1000, 100)
    assert decision.allowed and not any(h.endswith("-day") for h in decision.headers)
    limiter.reconcile("k", 1000, 100, 50)
    assert limiter.used_today("k") == 0


class Store:
    """A stand-in for Ray's GCS key-value store."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.puts = 0
        self.fail = False
        self.written = threading.Event()

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        if self.fail:
            raise ConnectionError("GCS unavailable")
        self.data[key] = value
        self.puts += 1
        self.written.set()


def actor(store, clocks, interval=3600.0):
    limiter = RateLimiter(clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall)
    return RateLimitActor("app", kv=(store.get, store.put), limiter=limiter, flush_interval_s=interval)


def test_the_actor_saves_changes_and_a_new_one_carries_on(clocks):
    store = Store()
    first = actor(store, clocks)
    assert not first.flush()  # nothing changed: no write
    assert first.acquire("k", None, None, 700, 1000).allowed
    assert first.flush() and not first.flush()
    assert json.loads(store.data[state_key("app")]) == {"day": DAY, "used": {"k": 700}}
    first.close()

    second = actor(store, clocks)  # the restarted actor (or one created again by another replica)
    refused = second.acquire("k", None, None, 400, 1000)
    assert not refused.allowed and refused.headers["x-ratelimit-remaining-tokens-day"] == "300"
    second.close()
    assert store.puts == 1


def test_the_actor_flushes_in_the_background_and_survives_store_errors(clocks):
    store = Store()
    store.fail = True
    a = actor(store, clocks, interval=0.05)
    a.acquire("k", None, None, 10, 1000)
    assert not store.written.wait(0.3)  # failing writes are retried, the limiter keeps serving
    assert a.acquire("k", None, None, 10, 1000).allowed
    store.fail = False
    assert store.written.wait(5)
    a.close()
    assert json.loads(store.data[state_key("app")])["used"] == {"k": 20}


def test_an_unreadable_saved_state_starts_from_nothing(clocks):
    store = Store()
    store.data[state_key("app")] = b"not json"
    a = actor(store, clocks)
    assert a.acquire("k", None, None, 1000, 1000).allowed
    a.close()
