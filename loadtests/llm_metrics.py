"""Pure pieces of the Locust load test (``loadtests/locustfile.py``); no Locust import.

* Streams: :func:`decode_event` turns a server-sent event of an OpenAI-style stream (from ``loadtests.sse``)
  into a :class:`StreamEvent` and :class:`StreamTrace` times them into TTFT / TPOT / ITL / tokens-per-second
  (:class:`StreamMetrics`).
* Prompts: :class:`PromptFactory` makes seeded prompts of plain English words, optionally behind one of a few
  long shared prefixes.
* Load shapes: :func:`shape_at` gives the ``(users, spawn_rate)`` of a scenario at a point in time;
  :func:`neighbour_users` checks the noisy-neighbour scenario's two user counts.
* Models: :func:`load_fleet`, :func:`models_from_listing`, :func:`parse_weights` and :func:`build_catalog`.
* SLO gate: :func:`run_summary` folds Locust stats entries into a :class:`RunSummary`, :func:`evaluate_slos`
  checks it against :class:`SLOTargets` (percentiles by Locust's rule: ``loadtests.stats``).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml

from loadtests.sse import ServerSentEvent
from loadtests.stats import histogram_percentile

LLM = "LLM"
"""``request_type`` of the metric entries (TTFT, TPOT, ITL, tokens/s) in Locust's stats."""
TASKS = ("generate", "embed")
SCENARIOS = ("steady", "ramp", "burst", "shared-prefix", "cold-start", "noisy-neighbour")
RAMP_STEPS = 5
# Name prefixes of the noisy-neighbour scenario's stats entries, per user class.
NEIGHBOUR_CHAT, NEIGHBOUR_NOISY = "noisy-neighbour chat ", "noisy-neighbour noisy "


class ConfigError(ValueError):
    """A bad fleet file, model listing or option value; the message names the source and the field."""


# --------------------------------------------------------------------------- stream events


@dataclass(frozen=True)
class StreamEvent:
    """One server-sent event of an OpenAI-compatible stream, decoded.

    ``kind`` is "chunk" (a JSON chunk: ``text`` is the generated text in it, ``completion_tokens`` comes from a
    usage chunk), "done" (``data: [DONE]``) or "error" (an ``{"error": ...}`` chunk, ``event: error`` or data
    that is not a JSON object: ``error`` says what).
    """

    kind: Literal["chunk", "done", "error"]
    text: str = ""
    completion_tokens: int | None = None
    error: str = ""


def _chunk_text(choice: Any) -> str:
    """Generated text of one streamed choice: chat deltas (content or reasoning) or completions text."""
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        parts = [delta.get(k) for k in ("content", "reasoning_content", "reasoning")]
    else:
        parts = [choice.get("text")]
    return "".join(p for p in parts if isinstance(p, str))


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def decode_event(sse: ServerSentEvent) -> StreamEvent:
    """The :class:`StreamEvent` of one server-sent event (its data, and its ``event:`` type)."""
    data = sse.data
    if data.strip() == "[DONE]":
        return StreamEvent("done")
    try:
        payload = json.loads(data)
    except ValueError:
        return StreamEvent("error", error=f"undecodable SSE data: {data[:200]!r}")
    if not isinstance(payload, dict):
        return StreamEvent("error", error=f"SSE data is not a JSON object: {data[:200]!r}")
    if "error" in payload:
        return StreamEvent("error", error=_error_message(payload["error"]))
    if sse.event == "error" or payload.get("object") == "error":
        return StreamEvent("error", error=_error_message(payload))
    choices = payload.get("choices")
    text = "".join(_chunk_text(c) for c in choices) if isinstance(choices, list) else ""
    usage = payload.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return StreamEvent("chunk", text=text, completion_tokens=tokens if isinstance(tokens, int) else None)


# --------------------------------------------------------------------------- stream timing


@dataclass(frozen=True)
class StreamMetrics:
    """Latency figures of one streamed response (ms, except ``tokens_per_s``); None when undefined."""

    ttft_ms: float | None
    tpot_ms: float | None
    itl_ms: list[float]
    output_tokens: int
    tokens_per_s: float | None


@dataclass
class StreamTrace:
    """Arrival times (``time.perf_counter()`` seconds) of one stream's token chunks, its usage and its ending."""

    start: float
    token_times: list[float] = field(default_factory=list)
    usage_tokens: int | None = None
    done: bool = False
    error: str | None = None

    def add(self, event: StreamEvent, at: float) -> None:
        if event.kind == "done":
            self.done = True
        elif event.kind == "error":
            self.error = self.error or event.error
        else:
            if event.text:
                self.token_times.append(at)
            if event.completion_tokens is not None:
                self.usage_tokens = event.completion_tokens

    def problem(self) -> str | None:
        """Why the stream counts as failed, or None."""
        if self.error is not None:
            return f"error event: {self.error}"
        if not self.done:
            return "stream ended without data: [DONE]"
        return None

    def metrics(self, end: float) -> StreamMetrics:
        """TTFT, TPOT = (last - first token) / (tokens - 1), one ITL per gap between token chunks, and output
        tokens / (``end`` - start). Tokens come from the usage chunk, else one per chunk with text."""
        times = self.token_times
        tokens = self.usage_tokens if self.usage_tokens is not None else len(times)
        ttft = (times[0] - self.start) * 1000 if times else None
        tpot = (times[-1] - times[0]) * 1000 / (tokens - 1) if times and tokens > 1 else None
        itl = [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)]
        elapsed = end - self.start
        rate = tokens / elapsed if elapsed > 0 else None
        return StreamMetrics(ttft, tpot, itl, tokens, rate)


def check_response(body: str, field_name: str) -> tuple[str | None, int | None]:
    """(why a non-streaming response failed or None, its ``usage.completion_tokens`` or None).

    It failed unless the body is a JSON object whose ``field_name`` ("choices" or "data") is a non-empty list.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        return f"undecodable body: {body[:200]!r}", None
    if not isinstance(payload, dict):
        return f"body is not a JSON object: {body[:200]!r}", None
    if "error" in payload:
        return f"error: {_error_message(payload['error'])}", None
    items = payload.get(field_name)
    if not isinstance(items, list) or not items:
        return f"no {field_name} in body: {body[:200]!r}", None
    usage = payload.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return None, tokens if isinstance(tokens, int) else None


# --------------------------------------------------------------------------- prompts

WORDS = tuple(
    """time year people way day man thing woman life child world school state family student group country
    problem hand part place case week company system program question work government number night point home
    water room mother area money story fact month lot right study book eye job word business issue side kind
    head house service friend father power hour game line end member law car city community name president team
    minute idea kid body information back parent face others level office door health person art war history
    party result change morning reason research girl guy moment air teacher force education foot boy age policy
    music market sense nation plan college interest death experience effect use class control care field
    development role effort rate heart drug show leader light voice wife police mind price report decision son
    view relationship town road arm difference value building action model season society tax director position
    player record paper space ground form event official matter center couple site project activity star table
    need court oil situation cost industry figure street image phone data picture practice piece land product
    doctor wall patient worker news test movie north love support technology step baby computer type attention
    film tree source organization hair window evidence population garden river bridge mountain island
    quiet bright early simple happy green small large young strong clear open warm gentle careful honest""".split()
)


def words(rng: random.Random, n: int) -> str:
    """``n`` words drawn from :data:`WORDS`."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass(frozen=True)
class Prompt:
    text: str
    group: int | None
    """Index of the shared prefix, or None without shared prefixes."""


class PromptFactory:
    """Prompts of ``prompt_words`` random words; with ``prefix_words`` > 0 each sits behind one of
    ``prefix_groups`` fixed shared prefixes (derived from ``seed``) of ``prefix_words`` words."""

    def __init__(self, seed: int, prompt_words: int, prefix_words: int = 0, prefix_groups: int = 0) -> None:
        if prompt_words < 0 or prefix_words < 0:
            raise ConfigError("--prompt-words and --shared-prefix-words must be >= 0")
        if prefix_words and prefix_groups < 1:
            raise ConfigError(f"--prefix-groups must be >= 1, got {prefix_groups}")
        self.prompt_words = prompt_words
        groups = range(prefix_groups) if prefix_words else range(0)
        self.prefixes = [words(random.Random(f"prefix:{seed}:{g}"), prefix_words) for g in groups]

    def make(self, rng: random.Random) -> Prompt:
        suffix = words(rng, self.prompt_words)
        if not self.prefixes:
            return Prompt(suffix, None)
        group = rng.randrange(len(self.prefixes))
        return Prompt(f"{self.prefixes[group]} {suffix}", group)


def user_rng(seed: int, user_index: int) -> random.Random:
    """The random source of one simulated user: the same ``seed`` and index give the same prompts."""
    return random.Random(f"user:{seed}:{user_index}")


# --------------------------------------------------------------------------- load shapes


def check_scenario(scenario: str, run_time: float | None) -> None:
    """Raise :class:`ConfigError` unless ``scenario`` is known and has the ``run_time`` it needs."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"--scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    if scenario in ("ramp", "burst") and not run_time:
        raise ConfigError(f"--scenario {scenario} needs --run-time (-t)")


def shape_at(scenario: str, t: float, users: int, run_time: float | None, spawn_rate: float,
             cold_start_wait: float = 0.0) -> tuple[int, float] | None:
    """``(users, spawn_rate)`` of ``scenario`` at ``t`` seconds into the run, None once ``run_time`` is over.

    steady, shared-prefix: ``users`` throughout. ramp: 1 to ``users`` in :data:`RAMP_STEPS` equal steps.
    burst: ``users // 8`` (at least 1) in the first and last thirds, ``users`` in the middle one.
    cold-start: 0 users for ``cold_start_wait`` seconds, then ``users``. noisy-neighbour: ``users`` (noisy and
    chat together) throughout. Jumps of burst and cold-start, and noisy-neighbour's start, spawn all users within
    a second; the others use ``spawn_rate``. ramp and burst need a ``run_time``.
    """
    check_scenario(scenario, run_time)
    if run_time is not None and t >= run_time:
        return None
    if scenario in ("steady", "shared-prefix"):
        return users, spawn_rate
    if scenario == "noisy-neighbour":
        return users, max(spawn_rate, float(users))
    if scenario == "cold-start":
        return (0, spawn_rate) if t < cold_start_wait else (users, max(spawn_rate, float(users)))
    assert run_time  # checked above: ramp and burst have one
    if scenario == "ramp":
        step = min(int(t * RAMP_STEPS / run_time), RAMP_STEPS - 1)
        return 1 + round((users - 1) * step / (RAMP_STEPS - 1)), spawn_rate
    low = max(1, users // 8)
    return (users if run_time / 3 <= t < 2 * run_time / 3 else low), max(spawn_rate, float(users))


def neighbour_users(noisy_users: int, chat_users: int) -> int:
    """The noisy-neighbour scenario's users (noisy + chat); :class:`ConfigError` unless each is >= 1."""
    if noisy_users < 1 or chat_users < 1:
        raise ConfigError(f"--noisy-users and --chat-users must be >= 1, got {noisy_users} and {chat_users}")
    return noisy_users + chat_users


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str


def _models(entries: list[Any], name_field: str, where: str, kind: str) -> list[ModelInfo]:
    """The models of a fleet file's or a listing's entries; ``where``, e.g. "fleet.yaml: models", names them."""
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}[{i}] must be {kind}, got {entry!r}")
        name, task = entry.get(name_field), entry.get("task", "generate")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}[{i}].{name_field} must be a non-empty string, got {name!r}")
        if task not in TASKS:
            raise ConfigError(f"{where}[{i}].task must be 'generate' or 'embed', got {task!r}")
        out.append(ModelInfo(name, task))
    return out


def load_fleet(path: str | Path) -> list[ModelInfo]:
    """The models of a fleet YAML (``models: [{name, task: generate|embed, ...}]``; task defaults to generate)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read fleet file: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{path}: 'models' must be a non-empty list")
    out = _models(models, "name", f"{path}: models", "a mapping")
    dupes = sorted(n for n, c in Counter(m.name for m in out).items() if c > 1)
    if dupes:
        raise ConfigError(f"{path}: duplicate model names: {', '.join(dupes)}")
    return out


def models_from_listing(payload: Any, source: str = "GET /v1/models") -> list[ModelInfo]:
    """The models of an OpenAI ``/v1/models`` answer (``data: [{id, task?}]``; no task means generate)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ConfigError(f"{source}: 'data' must be a list, got {payload!r:.200}")
    return _models(data, "id", f"{source}: data", "an object")


def parse_weights(text: str | None) -> dict[str, float]:
    """``"a=3,b=1"`` -> ``{"a": 3.0, "b": 1.0}`` (the ``--model-weights`` option); weights are >= 0."""
    weights: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--model-weights: {item.strip()!r} is not name=weight")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"--model-weights: weight of {name!r} must be a number >= 0, got {value.strip()!r}")
        weights[name] = weight
    return weights


@dataclass(frozen=True)
class Catalog:
    """Models to load per task, with their weights (all > 0)."""

    generate: tuple[tuple[str, float], ...]
    embed: tuple[tuple[str, float], ...]

    def pick(self, task: str, rng: random.Random) -> str | None:
        """A model for ``task`` chosen by weight, or None if there is none."""
        options = self.generate if task == "generate" else self.embed
        if not options:
            return None
        return rng.choices([name for name, _ in options], [weight for _, weight in options])[0]


def build_catalog(models: Sequence[ModelInfo], weights: Mapping[str, float], source: str, only: str = "") -> Catalog:
    """Weight the models of ``source`` (weight 1 unless named in ``weights``; 0 drops a model); ``only``: that
    model alone (``--model``)."""
    known = {m.name for m in models}
    if only:
        if only not in known:
            raise ConfigError(f"--model: unknown model {only}; {source} has: {', '.join(sorted(known)) or 'none'}")
        models = [m for m in models if m.name == only]
    unknown = sorted(set(weights) - known)
    if unknown:
        raise ConfigError(f"--model-weights: unknown model(s) {', '.join(unknown)}; "
                          f"{source} has: {', '.join(sorted(known)) or 'none'}")

    def of(task: str) -> tuple[tuple[str, float], ...]:
        return tuple((m.name, weights.get(m.name, 1.0)) for m in models
                     if m.task == task and weights.get(m.name, 1.0) > 0)

    catalog = Catalog(of("generate"), of("embed"))
    if not catalog.generate and not catalog.embed:
        raise ConfigError(f"{source}: no model to load (none listed, or all weighted 0)")
    return catalog


# --------------------------------------------------------------------------- SLO gate


class StatsEntryLike(Protocol):
    """The fields of ``locust.stats.StatsEntry`` that :func:`run_summary` reads."""

    name: str
    method: str | None
    num_requests: int
    num_failures: int
    total_content_length: int
    response_times: Mapping[int, int]


@dataclass(frozen=True)
class RunSummary:
    """What the SLO gate reads from a run: merged TTFT/TPOT histograms of all models, HTTP requests and failures,
    output tokens (the ``tokens/s`` entries' content length) and the loaded time span."""

    ttft_ms: dict[int, int]
    tpot_ms: dict[int, int]
    requests: int
    failures: int
    output_tokens: int
    duration_s: float


def run_summary(entries: Iterable[StatsEntryLike], duration_s: float) -> RunSummary:
    """Fold Locust stats entries: ``TTFT <model>`` / ``TPOT <model>`` histograms merge across models,
    request counts come from the non-LLM (HTTP) entries, tokens from the ``tokens/s <model>`` entries.
    noisy-neighbour's chat entries count as those; its noisy user's only for tokens."""
    ttft: Counter[int] = Counter()
    tpot: Counter[int] = Counter()
    requests = failures = tokens = 0
    for e in entries:
        name = e.name.removeprefix(NEIGHBOUR_CHAT)
        if e.method != LLM:
            requests += e.num_requests
            failures += e.num_failures
        elif name.startswith("TTFT "):
            ttft.update(e.response_times)
        elif name.startswith("TPOT "):
            tpot.update(e.response_times)
        elif name.removeprefix(NEIGHBOUR_NOISY).startswith("tokens/s "):
            tokens += e.total_content_length
    return RunSummary(dict(ttft), dict(tpot), requests, failures, tokens, duration_s)


@dataclass(frozen=True)
class SLOTargets:
    ttft_p95_ms: float | None = None
    tpot_p95_ms: float | None = None
    fail_ratio: float | None = None
    min_tokens_per_s: float | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_p95_ms, self.tpot_p95_ms, self.fail_ratio,
                                            self.min_tokens_per_s))


@dataclass(frozen=True)
class SLOResult:
    name: str
    value: float | None
    op: str
    limit: float
    ok: bool
    fmt: str = ".1f"

    def line(self) -> str:
        """E.g. ``SLO ttft_p95_ms: 123.4 <= 500 OK`` (``n/a`` and MISSED when there was nothing to measure)."""
        value = "n/a" if self.value is None else format(self.value, self.fmt)
        return f"SLO {self.name}: {value} {self.op} {self.limit:g} {'OK' if self.ok else 'MISSED'}"


def evaluate_slos(summary: RunSummary, targets: SLOTargets) -> list[SLOResult]:
    """One result per target that is set; a target with no samples to judge is missed."""
    results = []

    def upper(name: str, value: float | None, limit: float | None, fmt: str = ".1f") -> None:
        if limit is not None:
            results.append(SLOResult(name, value, "<=", limit, value is not None and value <= limit, fmt))

    upper("ttft_p95_ms", histogram_percentile(summary.ttft_ms, 0.95), targets.ttft_p95_ms)
    upper("tpot_p95_ms", histogram_percentile(summary.tpot_ms, 0.95), targets.tpot_p95_ms)
    ratio = summary.failures / summary.requests if summary.requests else None
    upper("fail_ratio", ratio, targets.fail_ratio, ".4f")
    if targets.min_tokens_per_s is not None:
        rate = summary.output_tokens / summary.duration_s if summary.duration_s > 0 else 0.0
        results.append(SLOResult("tokens_per_s", rate, ">=", targets.min_tokens_per_s,
                                 rate >= targets.min_tokens_per_s))
    return results
