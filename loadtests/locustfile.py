"""Locust load test of the OpenAI-compatible gateway: chat (streamed and not), completions, embeddings.

Each simulated user loops without think time over four equally weighted tasks, tagged so ``--tags`` /
``--exclude-tags`` pick them: ``stream`` (chat with ``stream: true`` and usage), ``chat``, ``completions`` and
``embeddings``. Models come from ``GET /v1/models`` (or ``--fleet FILE``); generative ones serve the first three
tasks, embedding ones the last, picked per request by ``--model-weights`` (default 1 each, 0 leaves a model out).
A task with no model for it idles for a second and records nothing. Prompts are ``--prompt-words`` plain English
words, the same for a given ``--seed`` and user number. Requests may take up to 600 s (cold starts).

Examples (from the repository root, the gateway at http://127.0.0.1:8000)::

    # 8 users for 2 minutes, only the final tables
    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -r 8 -t 2m --only-summary
    # streaming chat only, fixed output length, CSV (out/llm_stats.csv, ...) and HTML reports
    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 16 -r 4 -t 5m --tags stream \\
        --ignore-eos --max-tokens 128 --csv out/llm --html out/llm.html
    # everything but embeddings
    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -t 2m --exclude-tags embeddings
    # scenarios: ramp 1 -> 32 users in 5 steps, a burst, a cold start after 60 s idle, shared prefixes
    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 32 -r 8 -t 10m --scenario ramp
    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 32 -t 6m --scenario burst
    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 4 -t 3m --tags stream \\
        --scenario cold-start --cold-start-wait 60
    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 16 -r 16 -t 5m \\
        --scenario shared-prefix --prefix-groups 8 --shared-prefix-words 600
    # noisy neighbour: 48 users of key A stream 512 tokens each while one user of key B sends short turns;
    # run it once per model (e.g. fair, then fifo) and compare the "noisy-neighbour chat TTFT" rows. Where the
    # stack saturates the machine, give Locust a session and a core of its own (Linux's autogroup scheduling
    # otherwise lets it stall for up to seconds): setsid taskset -c 1 locust ...
    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -t 2m --scenario noisy-neighbour \\
        --model fair --api-key "$KEY_B" --noisy-key "$KEY_A" --noisy-users 48 --noisy-max-tokens 512 \\
        --max-tokens 16 --ignore-eos --csv out/fair
    # models and weights from a fleet file, with an API key
    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -t 2m \\
        --fleet examples/fleet-gpu.yaml --model-weights qwen3-1.7b=3,llama-3.2-3b-instruct=1 --api-key "$KEY"
    # SLO gate for CI: exit code 1 if a target is missed
    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -t 2m --only-summary \\
        --slo-ttft-p95-ms 500 --slo-tpot-p95-ms 50 --slo-fail-ratio 0.01 --slo-min-tokens-per-s 200
    # web UI on http://localhost:8089 (the options but the SLOs are in its form)
    locust -f loadtests/locustfile.py -H http://127.0.0.1:8000

Stats entries (console tables, ``--csv``, ``--html``). The HTTP requests, per model:
``POST /v1/chat/completions [stream] <model>`` (timed until the end of the stream; failed on a non-200 answer,
an error event or no ``data: [DONE]``), ``POST /v1/chat/completions <model>``, ``POST /v1/completions <model>``
and ``POST /v1/embeddings <model>`` (failed on a non-200 answer or a body without ``choices`` / ``data``). Then
entries of type ``LLM``, from successful requests, whose "response time" columns hold:

* ``TTFT <model>``: ms from sending a streamed request to its first content (or reasoning) token;
* ``TPOT <model>``: ms per output token after the first: (last token - first token) / (tokens - 1);
* ``ITL <model>``: ms between consecutive token chunks, one sample per gap;
* ``tokens/s <model>``: output tokens per second of one request (tokens / its latency; streamed and
  non-streaming chat and completions). Its "ms" columns are tokens/s, its content size is the token count;
* ``cold-start TTFT <model>`` (``--scenario cold-start``): the first TTFT measured for each model (per Locust
  process; with ``--tags stream`` the first request is a streamed one).
* ``noisy-neighbour chat <metric> <model>`` and ``noisy-neighbour noisy <metric> <model>`` (``--scenario
  noisy-neighbour``): the same metrics per user class (no ITL for the noisy one), after the HTTP entries
  ``POST /v1/chat/completions [noisy-neighbour chat|noisy] <model>``. The noisy key's throughput over the run is
  its ``tokens/s`` row's requests/s x average content size (output tokens per request).

Output tokens are ``usage.completion_tokens`` (the usage chunk of a stream), else one per chunk with text.
Locust rounds every value to 2 significant digits (integers below 100 ms). Its "Aggregated" row mixes HTTP and
LLM entries: read the per-entry rows. A headless run logs to stderr: the spawning, a stats table every few
seconds (unless ``--only-summary``), then the final stats table, percentiles and errors; the SLO verdicts go to
stdout, one line per SLO option, printed just before the final tables::

    SLO ttft_p95_ms: 110.0 <= 500 OK
    SLO fail_ratio: 0.0000 <= 0.01 OK

Scenarios (``--scenario``; one load shape class, driven by ``-u``, ``-r`` and ``-t``; see
``llm_metrics.shape_at``): steady (default) and shared-prefix hold ``-u`` users; ramp steps from 1 to ``-u``
users in 5 equal steps; burst runs ``-u``/8 users, all ``-u`` in the middle third; cold-start has no user for
``--cold-start-wait`` seconds, then ``-u``. Burst and cold-start add users all at once, steady and ramp at ``-r``
per second (a step only completes once its users are spawned). The shape ends the run after ``-t`` (ramp and
burst need one; without it steady runs until Ctrl-C). With shared-prefix each prompt is one of
``--prefix-groups`` fixed prefixes of ``--shared-prefix-words`` words then ``--prompt-words`` random words, sent
with the header ``x-session-id: group-<n>``. noisy-neighbour ignores ``-u`` and the four tasks (its own are
tagged ``stream``): it runs ``--noisy-users`` users that stream chat of ``--noisy-max-tokens`` tokens back to back
with ``--noisy-key`` (default: ``--api-key``) and ``--chat-users`` (default 1) users that each send streamed chat
turns one at a time with ``--api-key``, starting ``--chat-delay`` seconds in; all against ``--model`` (default: a
generative model per request, by ``--model-weights``). With the fair queue on, give the two keys the same priority
to see the weighted sharing between keys, or different ones to see the classes.

SLO gate, over all models at the end of the run: ``--slo-ttft-p95-ms`` and ``--slo-tpot-p95-ms`` (p95 of all
TTFT / TPOT samples; with noisy-neighbour the chat users' only), ``--slo-fail-ratio`` (failed / all HTTP
requests), ``--slo-min-tokens-per-s`` (all output tokens / the time from the start, after any cold-start wait, to
the last request). A target with no sample is missed. A missed target sets the exit code to 1; when all are met
and ``--slo-fail-ratio`` is one of them, the exit code is 0 even though some requests failed (Locust's default is
1 on any failure).
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import requests
from locust import FastHttpUser, LoadTestShape, constant, events, tag, task
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import FAILURE_EXCEPTIONS, ResponseContextManager
from locust.env import Environment
from locust.runners import WorkerRunner

# Locust puts this file's folder and the working directory on sys.path; the loadtests package needs
# the repository's root, which the working directory need not be. (Appended: Locust removes the
# first entry after the import, taking it for its own.)
sys.path.append(str(Path(__file__).resolve().parents[1]))

from loadtests.llm_metrics import (  # noqa: E402
    LLM,
    NEIGHBOUR_CHAT,
    NEIGHBOUR_NOISY,
    SCENARIOS,
    Catalog,
    ConfigError,
    Prompt,
    PromptFactory,
    SLOTargets,
    StreamTrace,
    build_catalog,
    check_response,
    check_scenario,
    decode_event,
    evaluate_slos,
    load_fleet,
    models_from_listing,
    neighbour_users,
    parse_weights,
    run_summary,
    shape_at,
    user_rng,
)
from loadtests.sse import SSEParser  # noqa: E402

logger = logging.getLogger("loadtests.locustfile")
CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"


@events.init_command_line_parser.add_listener
def _add_options(parser: LocustArgumentParser) -> None:
    add = parser.add_argument
    add("--scenario", choices=SCENARIOS, default="steady", help="Load shape (see the locustfile's docstring).")
    add("--fleet", default="", help="Fleet YAML to take the models from, instead of GET /v1/models.")
    add("--model-weights", default="", help="Relative load per model, e.g. a=3,b=1 (default 1, 0 skips one).")
    add("--api-key", default="", is_secret=True, help="Sent as 'Authorization: Bearer <key>'.")
    add("--max-tokens", type=int, default=64, help="max_tokens of chat and completions requests.")
    add("--prompt-words", type=int, default=32, help="Random words per prompt (after any shared prefix).")
    add("--temperature", type=float, default=0.0, help="Sampling temperature.")
    add("--ignore-eos", action="store_true", help="Send vLLM's ignore_eos: true (outputs of max_tokens).")
    add("--seed", type=int, default=0, help="Seed of the prompts.")
    add("--shared-prefix-words", type=int, default=400, help="shared-prefix: words per shared prefix.")
    add("--prefix-groups", type=int, default=4, help="shared-prefix: number of distinct prefixes.")
    add("--cold-start-wait", type=float, default=0.0, help="cold-start: seconds with no user first.")
    add("--model", default="", help="Load only this model (default: by --model-weights).")
    add("--noisy-key", default="", is_secret=True, help="noisy-neighbour: the noisy users' key (default: --api-key).")
    add("--noisy-users", type=int, default=16, help="noisy-neighbour: users streaming long generations.")
    add("--noisy-max-tokens", type=int, default=512, help="noisy-neighbour: max_tokens of the noisy requests.")
    add("--chat-users", type=int, default=1, help="noisy-neighbour: users sending chat turns one at a time.")
    add("--chat-delay", type=float, default=10.0, help="noisy-neighbour: seconds before the chat users start.")
    for name, what in [("ttft-p95-ms", "Max p95 TTFT (ms)"), ("tpot-p95-ms", "Max p95 TPOT (ms)"),
                       ("fail-ratio", "Max failed / all requests"),
                       ("min-tokens-per-s", "Min output tokens/s over the run")]:
        add(f"--slo-{name}", type=float, default=None, include_in_web_ui=False, help=f"SLO: {what}.")


@dataclass
class _Run:
    """State of the current test run, shared by the users of this process; rebuilt on each test start."""

    prompts: PromptFactory | None = None
    params: dict[str, Any] = field(default_factory=dict)
    catalog: Catalog | None = None
    cold_started: set[str] = field(default_factory=set)
    user_ids: itertools.count[int] = field(default_factory=itertools.count)


RUN = _Run()


def _prepare(o: Namespace) -> dict[str, float]:
    """Reset :data:`RUN` from the options (the catalog too with --fleet); the model weights. Raises ConfigError."""
    check_scenario(o.scenario, o.run_time)
    NoisyUser.fixed_count, ChatUser.fixed_count = o.noisy_users, o.chat_users
    if o.scenario == "noisy-neighbour":
        neighbour_users(o.noisy_users, o.chat_users)
    prefix_words = o.shared_prefix_words if o.scenario == "shared-prefix" else 0
    weights = parse_weights(o.model_weights)
    catalog = build_catalog(load_fleet(o.fleet), weights, o.fleet, o.model) if o.fleet else None
    params: dict[str, Any] = {"max_tokens": o.max_tokens, "temperature": o.temperature}
    if o.ignore_eos:
        params["ignore_eos"] = True
    global RUN
    RUN = _Run(PromptFactory(o.seed, o.prompt_words, prefix_words, o.prefix_groups), params, catalog)
    return weights


def _auth(environment: Environment, noisy: bool = False) -> dict[str, str]:
    o = environment.parsed_options
    key = (o.noisy_key if noisy else "") or o.api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


@events.init.add_listener
def _check_options(environment: Environment, **_: Any) -> None:
    """Refuse bad options before any load (the web UI form may change them: :func:`_start_run` checks again)."""
    try:
        _prepare(environment.parsed_options)
    except ConfigError as e:
        logger.error("%s", e)
        sys.exit(1)


@events.test_start.add_listener
def _start_run(environment: Environment, **_: Any) -> None:
    """Set the run up; without --fleet, ask the gateway for its models. On failure, end with exit code 1."""
    o = environment.parsed_options
    url = f"{(environment.host or '').rstrip('/')}/v1/models"
    try:
        weights = _prepare(o)
        if not o.fleet:
            answer = requests.get(url, headers=_auth(environment), timeout=30)
            answer.raise_for_status()
            RUN.catalog = build_catalog(models_from_listing(answer.json(), f"GET {url}"), weights, f"GET {url}",
                                        o.model)
    except (requests.RequestException, ValueError) as e:  # ConfigError is a ValueError
        logger.error("cannot start: %s", e)
        RUN.catalog = None  # users idle until the quit
        environment.process_exit_code = 1
        gevent.spawn(environment.runner.quit)
        return
    logger.info("models: generate %s, embed %s", dict(RUN.catalog.generate), dict(RUN.catalog.embed))


class ScenarioShape(LoadTestShape):
    """The --scenario's load shape over -u users, spawn rate -r and run time -t (``llm_metrics.shape_at``);
    noisy-neighbour runs its two user classes (counts fixed by their options), the others :class:`LLMUser`."""

    use_common_options = True

    def tick(self) -> tuple[int, float, list[type[FastHttpUser]]] | None:
        o = self.runner.environment.parsed_options
        users, classes = o.num_users, [LLMUser]
        if o.scenario == "noisy-neighbour":
            users, classes = neighbour_users(o.noisy_users, o.chat_users), [NoisyUser, ChatUser]
        shape = shape_at(o.scenario, self.get_run_time(), users, o.run_time, o.spawn_rate, o.cold_start_wait)
        return None if shape is None else (*shape, classes)


def _http_error(response: ResponseContextManager) -> str:
    if not response.status_code:
        return f"no response: {getattr(response, 'error', None)!r}"
    return f"HTTP {response.status_code}: {(response.text or '')[:200]}"


def _read_sse(response: ResponseContextManager, trace: StreamTrace) -> int:
    """Feed the stream's events to ``trace`` as they arrive; the number of bytes read.

    Reads lines from the geventhttpclient response underneath: Locust's ``iter_content()`` / ``iter_lines()``
    only return once 1 KiB has arrived (or the stream ended), which would delay token timestamps.
    """
    raw = response._response
    parser = SSEParser()
    size = 0
    while line := raw.readline(b"\n"):
        size += len(line)
        now = time.perf_counter()
        for event in parser.feed(line):
            trace.add(decode_event(event), now)
    for event in parser.close():
        trace.add(decode_event(event), time.perf_counter())
    return size


class StreamingUser(FastHttpUser):
    """A client of the gateway, no think time: the requests and their timing; the subclasses' tasks send them."""

    abstract = True
    wait_time = constant(0)
    network_timeout = 600.0  # a request may wait for a cold start
    connection_timeout = 60.0

    def on_start(self) -> None:
        self.rng = user_rng(self.environment.parsed_options.seed, next(RUN.user_ids))

    def _next(self, task_kind: str, noisy: bool = False) -> tuple[str, Prompt, dict[str, str]] | None:
        """A model for ``task_kind``, a prompt and the request's headers; None if there is no model."""
        model = RUN.catalog.pick(task_kind, self.rng) if RUN.catalog else None
        if model is None:
            gevent.sleep(1)  # nothing to load: don't spin
            return None
        prompt = RUN.prompts.make(self.rng)
        headers = _auth(self.environment, noisy)
        if prompt.group is not None:
            headers["x-session-id"] = f"group-{prompt.group}"
        return model, prompt, headers

    def _record(self, name: str, value: float, length: int = 0) -> None:
        self.environment.events.request.fire(request_type=LLM, name=name, response_time=value,
                                             response_length=length, exception=None, context={})

    def _post(self, path: str, model: str, body: dict[str, Any], headers: dict[str, str], field_name: str) -> None:
        """A non-streaming request; records its tokens/s when the answer has a usage."""
        with self.client.post(path, name=f"{path} {model}", json=body, headers=headers,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(_http_error(response))
                return
            problem, tokens = check_response(response.text or "", field_name)
            if problem:
                response.failure(problem)
                return
            elapsed_ms = response.request_meta["response_time"]
        if tokens is not None and elapsed_ms > 0:
            self._record(f"tokens/s {model}", tokens * 1000 / elapsed_ms, tokens)

    def _stream(self, role: str = "", noisy: bool = False) -> None:
        """A streamed chat request, timed per token; ``role`` (noisy-neighbour's user class) prefixes its entries."""
        if (picked := self._next("generate", noisy)) is None:
            return
        model, prompt, headers = picked
        params = {**RUN.params, "max_tokens": self.environment.parsed_options.noisy_max_tokens} if noisy else RUN.params
        body = {"model": model, "messages": [{"role": "user", "content": prompt.text}], "stream": True,
                "stream_options": {"include_usage": True}, **params}
        trace = StreamTrace(start=time.perf_counter())
        label = f"[{role.strip()}]" if role else "[stream]"
        with self.client.post(CHAT, name=f"{CHAT} {label} {model}", json=body, stream=True, catch_response=True,
                              headers={**headers, "Accept-Encoding": "identity"}) as response:
            if response.status_code != 200:
                response.failure(_http_error(response))
                return
            try:
                response.request_meta["response_length"] = _read_sse(response, trace)
                problem = trace.problem()
            except FAILURE_EXCEPTIONS as e:
                problem = f"stream broken: {e!r}"
            end = time.perf_counter()
            response.request_meta["response_time"] = (end - trace.start) * 1000
            if problem:
                response.failure(problem)
                return
        m = trace.metrics(end)
        if m.ttft_ms is not None:
            self._record(f"{role}TTFT {model}", m.ttft_ms)
            if self.environment.parsed_options.scenario == "cold-start" and model not in RUN.cold_started:
                RUN.cold_started.add(model)
                self._record(f"cold-start TTFT {model}", m.ttft_ms)
        if m.tpot_ms is not None:
            self._record(f"{role}TPOT {model}", m.tpot_ms)
        for gap in () if noisy else m.itl_ms:  # a flood's ITL samples would cost the load generator most
            self._record(f"{role}ITL {model}", gap)
        if m.tokens_per_s is not None:
            self._record(f"{role}tokens/s {model}", m.tokens_per_s, m.output_tokens)


class LLMUser(StreamingUser):
    """One client looping over the tagged tasks."""

    @tag("stream")
    @task
    def chat_stream(self) -> None:
        self._stream()

    @tag("chat")
    @task
    def chat(self) -> None:
        if picked := self._next("generate"):
            model, prompt, headers = picked
            body = {"model": model, "messages": [{"role": "user", "content": prompt.text}], **RUN.params}
            self._post(CHAT, model, body, headers, "choices")

    @tag("completions")
    @task
    def completions(self) -> None:
        if picked := self._next("generate"):
            model, prompt, headers = picked
            self._post(COMPLETIONS, model, {"model": model, "prompt": prompt.text, **RUN.params}, headers, "choices")

    @tag("embeddings")
    @task
    def embeddings(self) -> None:
        if picked := self._next("embed"):
            model, prompt, headers = picked
            self._post(EMBEDDINGS, model, {"model": model, "input": prompt.text}, headers, "data")


class NoisyUser(StreamingUser):
    """noisy-neighbour: long streamed generations back to back with ``--noisy-key``."""

    @tag("stream")
    @task
    def flood(self) -> None:
        self._stream(NEIGHBOUR_NOISY, noisy=True)


class ChatUser(StreamingUser):
    """noisy-neighbour: short streamed chat turns, one at a time, with ``--api-key``."""

    def on_start(self) -> None:
        super().on_start()
        gevent.sleep(self.environment.parsed_options.chat_delay)

    @tag("stream")
    @task
    def turn(self) -> None:
        self._stream(NEIGHBOUR_CHAT)


@events.quitting.add_listener
def _slo_gate(environment: Environment, **_: Any) -> None:
    """Print one line per SLO option and set the exit code (see the module docstring)."""
    o = environment.parsed_options
    targets = SLOTargets(o.slo_ttft_p95_ms, o.slo_tpot_p95_ms, o.slo_fail_ratio, o.slo_min_tokens_per_s)
    if not targets.any() or isinstance(environment.runner, WorkerRunner):
        return
    total = environment.stats.total
    started = total.start_time + (o.cold_start_wait if o.scenario == "cold-start" else 0.0)
    duration = (total.last_request_timestamp or started) - started
    results = evaluate_slos(run_summary(environment.stats.entries.values(), duration), targets)
    for result in results:
        print(result.line(), flush=True)
    if not all(r.ok for r in results):
        environment.process_exit_code = 1
    elif targets.fail_ratio is not None and not environment.runner.exceptions:
        environment.process_exit_code = 0
