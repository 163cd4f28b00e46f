"""The side-by-side benchmark's load generator: one level of a seeded, closed-loop streaming workload
against one server, timed per token (``python -m loadtests.bench client ...``, JSON on stdout).

It runs in its own process, pinned (unless ``--no-pin``) to a core of its own, so the CPU it spends is
not the servers' and is reported apart (``client_cpu``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx

from loadtests.sse import SSEParser
from loadtests.stats import percentile

MODEL = "tiny"
VOCAB = 1024


def say(message: str) -> None:
    """A progress line, on stderr: the client's stdout carries its result."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class RequestRecord:
    """One streamed request; times are ``time.perf_counter()`` seconds."""

    start: float
    first_token: float | None = None
    last_token: float | None = None
    itls: list[float] = dataclasses.field(default_factory=list)
    tokens: int = 0  # content chunks (one token each with the word-level tokenizer)
    usage_tokens: int | None = None  # completion_tokens from the final usage chunk
    done: bool = False  # saw data: [DONE]
    end: float | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    def on_event(self, data: str, t: float) -> None:
        """Account for one SSE ``data`` payload that arrived at ``t``."""
        if data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        if "error" in event and not event.get("choices"):
            self.error = f"error event: {str(event['error'])[:200]}"
            return
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.usage_tokens = usage["completion_tokens"]
        for choice in event.get("choices") or ():
            if choice.get("index", 0) == 0 and (choice.get("delta") or {}).get("content"):
                if self.last_token is None:
                    self.first_token = t
                else:
                    self.itls.append(t - self.last_token)
                self.last_token = t
                self.tokens += 1

    def finish(self, t: float) -> None:
        self.end = t
        if self.error is None and not self.done:
            self.error = "the stream ended without data: [DONE]"
        elif self.error is None and not self.tokens:
            self.error = "no content"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def level_metrics(records: Sequence[RequestRecord], wall_s: float) -> dict[str, Any]:
    """One level's metrics: throughput over the level's wall time, latencies over its requests.

    Tokens are each request's ``usage.completion_tokens`` (a server may put two tokens in one
    chunk), else its content chunks, also from requests that failed later."""
    ok = [r for r in records if r.error is None]
    tokens = sum(r.tokens if r.usage_tokens is None else r.usage_tokens for r in records)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [x for r in ok for x in r.itls]
    errors = list(dict.fromkeys(r.error for r in records if r.error is not None))
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "wall_s": wall_s,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "itl_p50_ms": _ms(percentile(itls, 50)),
        "itl_p99_ms": _ms(percentile(itls, 99)),
        "usage_tokens": sum(r.usage_tokens or 0 for r in records),
        "chunk_usage_mismatches": sum(1 for r in ok if r.usage_tokens is not None and r.usage_tokens != r.tokens),
        "error_samples": errors[:3],
    }


def make_prompts(seed: str, n: int, words: Sequence[str], length: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


def request_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        # A random model may pick a special token; decoded as text it is still one chunk.
        "skip_special_tokens": False,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_one(client: httpx.AsyncClient, body: dict[str, Any]) -> RequestRecord:
    clock = time.perf_counter
    record = RequestRecord(start=clock())
    parser = SSEParser()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
            else:
                async for chunk in response.aiter_raw():
                    t = clock()
                    for event in parser.feed(chunk):
                        record.on_event(event.data, t)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"[:200]
    record.finish(clock())
    return record


async def closed_loop(client: httpx.AsyncClient, prompts: Sequence[str], concurrency: int, max_tokens: int,
                      label: str = "") -> list[RequestRecord]:
    """Every prompt, ``concurrency`` at a time (a new one as soon as one ends)."""
    records: list[RequestRecord] = []
    next_index = itertools.count()

    async def worker() -> None:
        while (i := next(next_index)) < len(prompts):
            records.append(await stream_one(client, request_body(prompts[i], max_tokens)))

    async def progress() -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(15)
            say(f"  {label}: {len(records)}/{len(prompts)} requests done ({time.monotonic() - started:.0f}s)")

    reporter = asyncio.create_task(progress()) if label else None
    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    finally:
        if reporter:
            reporter.cancel()
    return records


async def run_level(url: str, concurrency: int, requests: int, warmup: int, max_tokens: int, prompt_words: int,
                    seed: str, label: str = "") -> dict[str, Any]:
    from orchestrator.devtools.tiny_model import vocab_words

    words = vocab_words(VOCAB)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900, connect=30), limits=limits) as client:
        if warmup:
            await closed_loop(client, make_prompts(f"{seed}/warm-up", warmup, words, prompt_words), concurrency,
                              max_tokens)
        prompts = make_prompts(seed, requests, words, prompt_words)
        print("measuring", flush=True)  # for the parent's CPU accounting
        cpu = time.process_time()
        started = time.perf_counter()
        records = await closed_loop(client, prompts, concurrency, max_tokens, label)
        wall = max(r.end or started for r in records) - started
        cpu = time.process_time() - cpu
    summary = level_metrics(records, wall)
    summary["client_cpu"] = cpu / wall if wall > 0 else None
    return summary


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench client",
                                     description="One level of the workload against one server; JSON on stdout.")
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--label", default="", help="names the level in progress lines")
    args = parser.parse_args(argv)
    result = asyncio.run(run_level(args.url, args.concurrency, args.requests, args.warmup, args.max_tokens,
                                   args.prompt_words, args.seed, args.label))
    print(json.dumps(result))
    return 0
