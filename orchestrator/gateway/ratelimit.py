"""Per-key rate limits: requests and tokens per minute (token buckets) and a daily token
budget (a fixed window per UTC day).

Each per-minute limit is a bucket holding up to one minute's allowance, refilled
continuously. A request takes one from the request bucket and its reserved tokens (prompt
estimate + ``max_tokens``) from the token bucket; when the answer's real usage is known the
difference is given back (or charged). A key's ``tokens_per_day`` works the same way against
the tokens it used since 00:00 UTC: the estimate is reserved, the real usage settled, and a
request that does not fit waits until the next UTC midnight. The state lives in one place for
all gateway replicas: ``RateLimitActor``, a named Ray actor, wraps ``RateLimiter`` and keeps a
copy of the day's usage in Ray's GCS key-value store, so a restarted actor (or one created
again after the gateway replica that owned it died) carries on with the same day's usage.

The clocks are injectable, so the arithmetic is tested without waiting::

    limiter = RateLimiter(clock=fake.now, wall_clock=fake.wall)
    decision = limiter.acquire("team-a", rpm=60, tpm=None, tokens=120, tokens_per_day=100_000)
    decision.allowed, decision.headers["x-ratelimit-remaining-tokens-day"]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

NAMESPACE = "serve"
DAY_S = 86400
# How often the actor writes a changed day's usage to the GCS (the most a crash can lose).
FLUSH_INTERVAL_S = 1.0

log = logging.getLogger("orchestrator.gateway")


def actor_name(app_name: str | None) -> str:
    return f"slm-ratelimit-{app_name or 'default'}"


def state_key(app_name: str | None) -> str:
    """Where the app's daily usage is kept in the GCS key-value store."""
    return f"{actor_name(app_name)}/tokens-per-day"


def utc_day(wall: float) -> int:
    """The UTC day of a Unix time, as days since 1970-01-01."""
    return int(wall // DAY_S)


def seconds_to_midnight(wall: float) -> float:
    """Seconds until the next 00:00 UTC (a full day at midnight itself)."""
    return DAY_S - wall % DAY_S


@dataclasses.dataclass
class _Bucket:
    capacity: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + (now - self.at) * rate)
        self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 if it is now)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / (self.capacity / 60.0)


@dataclasses.dataclass
class Decision:
    allowed: bool
    retry_after_s: float
    headers: dict[str, str]
    reason: str = ""


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 1m30s."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s" if seconds < 1 else f"{math.ceil(seconds)}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


class RateLimiter:
    """Buckets per (key, kind) and tokens used per key today; limits may change between calls
    (a reloaded keys file), and a changed daily budget applies at once to the day's usage.

    ``export_day()`` / ``import_day(state)`` hand the day's usage to a store and back;
    ``day_version`` moves whenever it changes, so a writer knows when to save."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        self.clock = clock
        self.wall_clock = wall_clock
        self.buckets: dict[tuple[str, str], _Bucket] = {}
        self.day: int | None = None
        self.day_used: dict[str, int] = {}
        self.day_version = 0

    def _bucket(self, key: str, kind: str, limit: int, now: float) -> _Bucket:
        bucket = self.buckets.get((key, kind))
        if bucket is None or bucket.capacity != limit:
            level = limit if bucket is None else min(bucket.level, limit)
            bucket = _Bucket(float(limit), float(level), now)
            self.buckets[(key, kind)] = bucket
        bucket.refill(now)
        return bucket

    def _today(self, wall: float) -> dict[str, int]:
        """Tokens used per key today; a new UTC day starts from nothing."""
        day = utc_day(wall)
        if day != self.day:
            if self.day_used:
                self.day_version += 1  # the store's copy is an old day's now
            self.day, self.day_used = day, {}
        return self.day_used

    def _charge_day(self, key: str, amount: int, wall: float) -> None:
        used = self._today(wall)
        new = max(0, used.get(key, 0) + amount)
        if new != used.get(key, 0):
            if new:
                used[key] = new
            else:
                used.pop(key, None)
            self.day_version += 1

    def acquire(
        self, key: str, rpm: int | None, tpm: int | None, tokens: int, tokens_per_day: int | None = None
    ) -> Decision:
        """Take one request and ``tokens`` tokens for ``key``, or say how long to wait."""
        now = self.clock()
        wall = self.wall_clock()
        req = self._bucket(key, "requests", rpm, now) if rpm else None
        tok = self._bucket(key, "tokens", tpm, now) if tpm else None
        used = self._today(wall).get(key, 0) if tokens_per_day else 0

        def headers() -> dict[str, str]:
            out = self._headers(req, tok, rpm, tpm)
            if tokens_per_day:
                out.update(self._day_headers(tokens_per_day, used, wall))
            return out

        if tok is not None and tokens > tok.capacity:
            return Decision(
                False,
                0.0,
                headers(),
                f"this request needs {tokens} tokens, over the key's limit of {tpm} tokens per minute",
            )
        if tokens_per_day and tokens > tokens_per_day:
            return Decision(
                False,
                0.0,
                headers(),
                f"this request needs {tokens} tokens, over the key's daily budget of {tokens_per_day} tokens",
            )
        minute_wait = max(req.wait_for(1) if req is not None else 0.0, tok.wait_for(tokens) if tok is not None else 0.0)
        day_wait = seconds_to_midnight(wall) if tokens_per_day and used + tokens > tokens_per_day else 0.0
        if day_wait > 0:
            return Decision(
                False,
                day_wait,
                headers(),
                f"daily budget of {tokens_per_day} tokens reached ({used} used today, {tokens} asked; "
                "it resets at 00:00 UTC)",
            )
        if minute_wait > 0:
            which = "requests" if req is not None and req.wait_for(1) > 0 else "tokens"
            limit = rpm if which == "requests" else tpm
            return Decision(False, minute_wait, headers(), f"rate limit of {limit} {which} per minute reached")
        # Allowed by every limit: only now is anything taken.
        if req is not None:
            req.level -= 1
        if tok is not None:
            tok.level -= tokens
        if tokens_per_day:
            self._charge_day(key, tokens, wall)
            used += tokens
        return Decision(True, 0.0, headers())

    def reconcile(
        self, key: str, tpm: int | None, reserved: int, actual: int, tokens_per_day: int | None = None
    ) -> None:
        """Give back (or charge) the difference between reserved and actual tokens."""
        if tpm:
            bucket = self._bucket(key, "tokens", tpm, self.clock())
            bucket.level = min(bucket.capacity, bucket.level + (reserved - actual))
        if tokens_per_day:
            # A request reserved before midnight and settled after it settles against the new
            # day (never below 0): the difference, not the reservation, moves.
            self._charge_day(key, actual - reserved, self.wall_clock())

    def used_today(self, key: str) -> int:
        return self._today(self.wall_clock()).get(key, 0)

    def export_day(self) -> dict[str, Any]:
        """Today's usage, JSON-ready: ``{"day": <days since 1970-01-01, UTC>, "used": {key: tokens}}``."""
        used = self._today(self.wall_clock())
        return {"day": self.day, "used": dict(used)}

    def import_day(self, state: Any) -> bool:
        """Take a saved usage back if it is today's (an older day's is ignored); a key keeps the
        larger of its current and saved usage. Whether anything was taken."""
        if not isinstance(state, dict) or not isinstance(state.get("used"), dict):
            return False
        used = self._today(self.wall_clock())
        if state.get("day") != self.day:
            return False
        for key, tokens in state["used"].items():
            if isinstance(key, str) and isinstance(tokens, int) and tokens > used.get(key, 0):
                used[key] = tokens
                self.day_version += 1
        return True

    @staticmethod
    def _headers(req: _Bucket | None, tok: _Bucket | None, rpm: int | None, tpm: int | None) -> dict[str, str]:
        out = {}
        if req is not None:
            out["x-ratelimit-limit-requests"] = str(rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, math.floor(req.level)))
            out["x-ratelimit-reset-requests"] = format_reset(req.wait_for(req.capacity))
        if tok is not None:
            out["x-ratelimit-limit-tokens"] = str(tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(tok.level)))
            out["x-ratelimit-reset-tokens"] = format_reset(tok.wait_for(tok.capacity))
        return out

    @staticmethod
    def _day_headers(budget: int, used: int, wall: float) -> dict[str, str]:
        return {
            "x-ratelimit-limit-tokens-day": str(budget),
            "x-ratelimit-remaining-tokens-day": str(max(0, budget - used)),
            "x-ratelimit-reset-tokens-day": format_reset(seconds_to_midnight(wall)),
        }


class RateLimitActor:
    """The limiter shared by every gateway replica of an app (a named Ray actor).

    The day's usage is loaded from the GCS key-value store when the actor starts and written
    back by a background thread within ``FLUSH_INTERVAL_S`` of a change, so requests never
    wait on the store; a crash loses at most the last second's charges. ``kv`` is the store's
    (get, put) pair (default: ``ray_compat.kv_get``, ``ray_compat.kv_put``)."""

    def __init__(
        self,
        app_name: str | None = None,
        kv: tuple[Callable[[str], bytes | None], Callable[[str, bytes], None]] | None = None,
        limiter: RateLimiter | None = None,
        flush_interval_s: float = FLUSH_INTERVAL_S,
    ):
        if kv is None:
            from orchestrator import ray_compat

            kv = (ray_compat.kv_get, ray_compat.kv_put)
        self._get, self._put = kv
        self._key = state_key(app_name)
        self.limiter = limiter or RateLimiter()
        self._lock = threading.Lock()  # the limiter, between Ray's call thread and the flusher
        self._stop = threading.Event()
        try:
            raw = self._get(self._key)
            if raw and self.limiter.import_day(json.loads(raw)):
                log.info("rate limiter: today's token usage restored for %d keys", len(self.limiter.day_used))
        except Exception as e:  # noqa: BLE001 - an unreadable store must not stop the limiter
            log.warning("rate limiter: could not read the saved daily usage (%r); starting from none", e)
        self._saved = self.limiter.day_version
        self._flusher = threading.Thread(
            target=self._flush_loop, args=(flush_interval_s,), daemon=True, name="ratelimit-flush"
        )
        self._flusher.start()

    def acquire(
        self, key: str, rpm: int | None, tpm: int | None, tokens: int, tokens_per_day: int | None = None
    ) -> Decision:
        with self._lock:
            return self.limiter.acquire(key, rpm, tpm, tokens, tokens_per_day)

    def reconcile(
        self, key: str, tpm: int | None, reserved: int, actual: int, tokens_per_day: int | None = None
    ) -> None:
        with self._lock:
            self.limiter.reconcile(key, tpm, reserved, actual, tokens_per_day)

    def flush(self) -> bool:
        """Write the day's usage to the store if it changed since the last write; whether it wrote."""
        with self._lock:
            state = self.limiter.export_day()
            version = self.limiter.day_version
        if version == self._saved:
            return False
        self._put(self._key, json.dumps(state).encode())
        self._saved = version
        return True

    def close(self) -> None:
        """Stop the flusher after a last write."""
        self._stop.set()
        self._flusher.join()

    def _flush_loop(self, interval_s: float) -> None:
        failing = False
        while True:
            stopping = self._stop.wait(interval_s)
            try:
                self.flush()
                failing = False
            except Exception as e:  # noqa: BLE001 - kept dirty, tried again next interval
                if not failing:
                    log.warning("rate limiter: could not save the daily usage (%r); retrying every %gs", e, interval_s)
                failing = True
            if stopping:
                return


def get_or_create(app_name: str | None):
    import ray

    return (
        ray.remote(num_cpus=0, max_restarts=-1)(RateLimitActor)
        .options(
            name=actor_name(app_name),
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime=None,
        )
        .remote(app_name)
    )
