"""Soak: the demo fleet under a steady, moderate mixed load for a bounded time.

C clients (official `openai` client, async) loop over streaming chat, non-streaming chat,
completions and embeddings for --minutes. Reported: requests by kind, failures (an
exception, a non-200, a stream without its final chunk or with an error event), latency
percentiles, and the resident memory of the gateway replicas and Serve's HTTP proxy at the
start, at the end and at the peak (sampled every 5 s from /proc), plus whether any replica
process was replaced during the run.

    python -m loadtests.soak [--minutes 10] [--concurrency 8] [--out .cache/soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import openai

from loadtests.stack import serve
from loadtests.stats import percentile

GEN, EMBED = "smollm2-135m-instruct", "all-minilm-l6-v2"
KINDS = ["stream-chat", "chat", "completions", "embeddings"]
WORDS = "the quick brown fox jumps over a lazy dog while small models serve many requests".split()


def _processes(*titles: str) -> dict[int, str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        for title in titles:
            if args.startswith(title):
                found[int(pid)] = title
    return found


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _memory() -> dict[str, float]:
    """RSS (MiB) summed per process kind: the gateway replicas, the HTTP proxy."""
    out: dict[str, float] = {}
    for pid, title in _processes("ray::ServeReplica:slm:gateway", "ray::ProxyActor").items():
        name = "gateway" if "gateway" in title else "proxy"
        out[name] = round(out.get(name, 0.0) + (_rss_mib(pid) or 0.0), 1)
    return out


async def _one(client: openai.AsyncOpenAI, kind: str, rng: random.Random) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
    messages = [{"role": "user", "content": prompt}]
    max_tokens = rng.randint(8, 48)
    if kind == "stream-chat":
        stream = await client.chat.completions.create(model=GEN, messages=messages, max_tokens=max_tokens,
                                                      stream=True)
        finished = False
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finished = True
        if not finished:
            raise RuntimeError("stream ended without a finish_reason")
    elif kind == "chat":
        r = await client.chat.completions.create(model=GEN, messages=messages, max_tokens=max_tokens)
        if not r.choices or r.choices[0].finish_reason is None:
            raise RuntimeError("chat answer without a finish_reason")
    elif kind == "completions":
        r = await client.completions.create(model=GEN, prompt=prompt, max_tokens=max_tokens)
        if not r.choices:
            raise RuntimeError("completion without choices")
    else:
        r = await client.embeddings.create(model=EMBED, input=[prompt, prompt[::-1]])
        if len(r.data) != 2:
            raise RuntimeError("embeddings: wrong number of vectors")


async def _run(url: str, minutes: float, concurrency: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    deadline = time.monotonic() + minutes * 60
    done = {k: 0 for k in KINDS}
    latency: dict[str, list[float]] = {k: [] for k in KINDS}
    failures: list[str] = []
    memory = [{"t": 0.0, **_memory()}]
    replicas_before = _processes("ray::ServeReplica:slm:")
    started = time.monotonic()

    async def worker(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < deadline:
            kind = rng.choices(KINDS, weights=[4, 2, 2, 1])[0]
            t0 = time.perf_counter()
            try:
                await _one(client, kind, rng)
                latency[kind].append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                failures.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")
            done[kind] += 1

    async def sample() -> None:
        last_print = 0.0
        while time.monotonic() < deadline:
            await asyncio.sleep(5)
            t = time.monotonic() - started
            memory.append({"t": round(t, 1), **_memory()})
            if t - last_print >= 60:
                last_print = t
                print(f"[soak] {t / 60:.0f} min: {sum(done.values())} requests, {len(failures)} failures, "
                      f"memory {memory[-1]}", file=sys.stderr, flush=True)

    await asyncio.gather(sample(), *(worker(i) for i in range(concurrency)))
    await client.close()
    memory.append({"t": round(time.monotonic() - started, 1), **_memory()})
    replaced = sorted(set(replicas_before) ^ set(_processes("ray::ServeReplica:slm:")))

    def pct(xs: list[float], q: float) -> float | None:
        value = percentile(xs, q)
        return None if value is None else round(value, 3)

    kinds = {"gateway", "proxy"}
    return {
        "minutes": minutes, "concurrency": concurrency, "requests": done, "total": sum(done.values()),
        "failures": len(failures), "failure_samples": failures[:10],
        "latency_s": {k: {"p50": pct(v, 50), "p99": pct(v, 99)} for k, v in latency.items()},
        "memory_mib": {k: {"start": memory[0].get(k), "end": memory[-1].get(k),
                           "peak": max(m.get(k, 0.0) for m in memory)} for k in kinds},
        "replica_processes_replaced": replaced,
        "memory_samples": memory,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/soak"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from orchestrator.spec import demo_fleet_path, read_fleet_data

    fleet = read_fleet_data(demo_fleet_path())
    with serve(fleet, args.workdir) as url:
        print(f"[soak] {args.concurrency} clients for {args.minutes:g} min against {url}", file=sys.stderr)
        result = asyncio.run(_run(url, args.minutes, args.concurrency))
    print(json.dumps({k: v for k, v in result.items() if k != "memory_samples"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 1 if result["failures"] or result["replica_processes_replaced"] else 0


if __name__ == "__main__":
    sys.exit(main())
