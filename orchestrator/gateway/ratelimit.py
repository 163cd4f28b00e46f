"""Per-key rate limits: requests per minute and tokens per minute, as token buckets.

Each limit is a bucket holding up to one minute's allowance, refilled continuously. A
request takes one from the request bucket and its reserved tokens (prompt estimate +
``max_tokens``) from the token bucket; when the answer's real usage is known the
difference is given back (or charged). The state lives in one place for all gateway
replicas: ``RateLimitActor``, a named Ray actor, wraps ``RateLimiter``.

The clock is injectable, so the arithmetic is tested without waiting::

    limiter = RateLimiter(clock=fake.now)
    decision = limiter.acquire("team-a", rpm=60, tpm=None, tokens=0)
    decision.allowed, decision.headers["x-ratelimit-remaining-requests"]
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

NAMESPACE = "serve"


def actor_name(app_name: str | None) -> str:
    return f"slm-ratelimit-{app_name or 'default'}"


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
    """Buckets per (key, kind); limits may change between calls (a reloaded keys file)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.buckets: dict[tuple[str, str], _Bucket] = {}

    def _bucket(self, key: str, kind: str, limit: int, now: float) -> _Bucket:
        bucket = self.buckets.get((key, kind))
        if bucket is None or bucket.capacity != limit:
            level = limit if bucket is None else min(bucket.level, limit)
            bucket = _Bucket(float(limit), float(level), now)
            self.buckets[(key, kind)] = bucket
        bucket.refill(now)
        return bucket

    def acquire(self, key: str, rpm: int | None, tpm: int | None, tokens: int) -> Decision:
        """Take one request and ``tokens`` tokens for ``key``, or say how long to wait."""
        now = self.clock()
        headers: dict[str, str] = {}
        waits = []
        req = self._bucket(key, "requests", rpm, now) if rpm else None
        tok = self._bucket(key, "tokens", tpm, now) if tpm else None
        if tok is not None and tokens > tok.capacity:
            headers.update(self._headers(req, tok, rpm, tpm))
            return Decision(False, 0.0, headers,
                            f"this request needs {tokens} tokens, over the key's limit of {tpm} tokens per minute")
        if req is not None:
            waits.append(req.wait_for(1))
        if tok is not None:
            waits.append(tok.wait_for(tokens))
        wait = max(waits, default=0.0)
        if wait > 0:
            headers.update(self._headers(req, tok, rpm, tpm))
            which = "requests" if req is not None and req.wait_for(1) > 0 else "tokens"
            limit = rpm if which == "requests" else tpm
            return Decision(False, wait, headers, f"rate limit of {limit} {which} per minute reached")
        if req is not None:
            req.level -= 1
        if tok is not None:
            tok.level -= tokens
        return Decision(True, 0.0, self._headers(req, tok, rpm, tpm))

    def reconcile(self, key: str, tpm: int | None, reserved: int, actual: int) -> None:
        """Give back (or charge) the difference between reserved and actual tokens."""
        if not tpm:
            return
        bucket = self._bucket(key, "tokens", tpm, self.clock())
        bucket.level = min(bucket.capacity, bucket.level + (reserved - actual))

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


class RateLimitActor:
    """The limiter shared by every gateway replica of an app (a named Ray actor)."""

    def __init__(self) -> None:
        self.limiter = RateLimiter()

    def acquire(self, key: str, rpm: int | None, tpm: int | None, tokens: int) -> Decision:
        return self.limiter.acquire(key, rpm, tpm, tokens)

    def reconcile(self, key: str, tpm: int | None, reserved: int, actual: int) -> None:
        self.limiter.reconcile(key, tpm, reserved, actual)


def get_or_create(app_name: str | None):
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1)(RateLimitActor).options(
        name=actor_name(app_name), namespace=NAMESPACE, get_if_exists=True, lifetime=None,
    ).remote()
