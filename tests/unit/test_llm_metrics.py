"""The pure pieces of the Locust load test: SSE parsing, stream timing, prompts, shapes, models, SLO gate."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from loadtests.llm_metrics import (
    LLM,
    WORDS,
    ConfigError,
    ModelInfo,
    PromptFactory,
    RunSummary,
    SLOTargets,
    StreamEvent,
    StreamTrace,
    build_catalog,
    check_response,
    check_scenario,
    decode_event,
    evaluate_slos,
    load_fleet,
    models_from_listing,
    parse_weights,
    run_summary,
    shape_at,
    user_rng,
)
from loadtests.sse import SSEParser
from loadtests.stats import histogram_percentile

CHUNK = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}\n'


def parse(*pieces: bytes) -> list[StreamEvent]:
    parser = SSEParser()
    events = [e for piece in pieces for e in parser.feed(piece)]
    return [decode_event(e) for e in events + parser.close()]


# --------------------------------------------------------------------------- SSE


def test_sse_chat_stream_with_usage_and_done() -> None:
    events = parse(b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n', b"\n",
                   CHUNK, b"\n",
                   b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}\n', b"\n",
                   b"data: [DONE]\n", b"\n")
    assert events == [StreamEvent("chunk"), StreamEvent("chunk", text="Hi"), StreamEvent("chunk", completion_tokens=7),
                      StreamEvent("done")]


def test_sse_completions_text_and_reasoning_deltas_count_as_text() -> None:
    events = parse(b'data: {"choices": [{"index": 0, "text": "abc"}]}\n\n'
                   b'data: {"choices": [{"delta": {"reasoning_content": "hm"}}]}\n\n'
                   b'data: {"choices": [{"delta": {"content": null}}, {"delta": {"content": "x"}}]}\n\n')
    assert [e.text for e in events] == ["abc", "hm", "x"]


def test_sse_lines_split_anywhere_and_crlf() -> None:
    whole = b'data: {"choices": [{"delta": {"content": "A"}}]}\r\n\r\ndata: [DONE]\r\n\r\n'
    pieces = [whole[i:i + 5] for i in range(0, len(whole), 5)]
    assert parse(*pieces) == [StreamEvent("chunk", text="A"), StreamEvent("done")]


def test_sse_odd_lines() -> None:
    events = parse(b": keep-alive comment\n\n",
                   b"id: 3\nretry: 100\n\n",  # fields without data dispatch nothing
                   b'data:{"choices": [{"delta": {"content": "no space"}}]}\n\n',
                   b"data: [DONE]")  # unterminated at the end of the stream
    assert events == [StreamEvent("chunk", text="no space"), StreamEvent("done")]


def test_sse_multiline_data_is_joined() -> None:
    assert parse(b'data: {"choices":\ndata: [{"delta": {"content": "j"}}]}\n\n') == [StreamEvent("chunk", text="j")]


@pytest.mark.parametrize("raw, message", [
    (b'data: {"error": {"message": "boom", "code": 500}}\n\n', "boom"),
    (b'data: {"error": "plain"}\n\n', "plain"),
    (b'data: {"object": "error", "message": "old vllm", "code": 400}\n\n', "old vllm"),
    (b'event: error\ndata: {"detail": "x"}\n\n', "detail"),
    (b"data: {not json\n\n", "undecodable"),
    (b"data: [1, 2]\n\n", "not a JSON object"),
])
def test_sse_error_events(raw: bytes, message: str) -> None:
    [event] = parse(raw)
    assert event.kind == "error" and message in event.error


def test_sse_chunk_without_choices_or_with_bad_usage() -> None:
    assert parse(b'data: {"usage": {"completion_tokens": "7"}}\n\n') == [StreamEvent("chunk")]


# --------------------------------------------------------------------------- stream timing


def test_stream_trace_metrics_from_usage() -> None:
    trace = StreamTrace(start=10.0)
    trace.add(StreamEvent("chunk"), 10.05)  # role only: not a token
    for i, at in enumerate([10.2, 10.25, 10.3, 10.4]):
        trace.add(StreamEvent("chunk", text=f"t{i}"), at)
    trace.add(StreamEvent("chunk", completion_tokens=7), 10.41)  # 7 tokens in 4 chunks
    trace.add(StreamEvent("done"), 10.42)
    m = trace.metrics(end=10.5)
    assert trace.problem() is None
    assert m.ttft_ms == pytest.approx(200)
    assert m.tpot_ms == pytest.approx(200 / 6)
    assert m.itl_ms == pytest.approx([50, 50, 100])
    assert m.output_tokens == 7 and m.tokens_per_s == pytest.approx(14)


def test_stream_trace_counts_chunks_without_usage() -> None:
    trace = StreamTrace(start=0.0)
    for at in (1.0, 1.5, 2.0):
        trace.add(StreamEvent("chunk", text="w"), at)
    m = trace.metrics(end=3.0)
    assert m.output_tokens == 3 and m.tpot_ms == pytest.approx(500) and m.tokens_per_s == pytest.approx(1)


def test_stream_trace_one_or_no_token() -> None:
    one = StreamTrace(start=0.0)
    one.add(StreamEvent("chunk", text="w"), 0.1)
    assert one.metrics(0.2).tpot_ms is None and one.metrics(0.2).itl_ms == []
    empty = StreamTrace(start=0.0).metrics(0.0)
    assert (empty.ttft_ms, empty.tpot_ms, empty.output_tokens, empty.tokens_per_s) == (None, None, 0, None)


def test_stream_trace_problems() -> None:
    trace = StreamTrace(start=0.0)
    assert trace.problem() == "stream ended without data: [DONE]"
    trace.add(StreamEvent("error", error="first"), 1.0)
    trace.add(StreamEvent("error", error="second"), 1.1)
    trace.add(StreamEvent("done"), 1.2)
    assert trace.problem() == "error event: first"


@pytest.mark.parametrize("body, field_name, problem, tokens", [
    ('{"choices": [{"message": {}}], "usage": {"completion_tokens": 5}}', "choices", None, 5),
    ('{"choices": [{"text": "x"}]}', "choices", None, None),
    ('{"data": [{"embedding": [0.1]}], "usage": {"prompt_tokens": 3}}', "data", None, None),
    ('{"choices": []}', "choices", "no choices", None),
    ('{"data": null}', "data", "no data", None),
    ('{"error": {"message": "nope"}}', "choices", "error: nope", None),
    ("<html>", "choices", "undecodable", None),
    ("[]", "choices", "not a JSON object", None),
])
def test_check_response(body: str, field_name: str, problem: str | None, tokens: int | None) -> None:
    got_problem, got_tokens = check_response(body, field_name)
    assert got_tokens == tokens
    assert (got_problem is None) if problem is None else (problem in (got_problem or ""))


# --------------------------------------------------------------------------- prompts


def test_prompts_are_deterministic_plain_words() -> None:
    factory = PromptFactory(seed=7, prompt_words=12)
    a = [factory.make(user_rng(7, 3)).text for _ in range(2)]
    b = [PromptFactory(7, 12).make(user_rng(7, 3)).text for _ in range(2)]
    assert a == b
    assert len(a[0].split()) == 12 and set(a[0].split()) <= set(WORDS)
    assert all(w.isalpha() and w.islower() for w in WORDS)
    assert factory.make(user_rng(7, 4)).text != a[0]  # another user
    assert PromptFactory(8, 12).make(user_rng(8, 3)).text != a[0]  # another seed
    rng = user_rng(7, 3)
    assert factory.make(rng).text != factory.make(rng).text  # successive prompts differ
    assert factory.make(rng).group is None


def test_shared_prefixes() -> None:
    factory = PromptFactory(seed=1, prompt_words=5, prefix_words=400, prefix_groups=4)
    rng = random.Random(0)
    prompts = [factory.make(rng) for _ in range(200)]
    assert {p.group for p in prompts} == {0, 1, 2, 3}
    assert len({p.text for p in prompts}) == 200  # unique suffixes
    for p in prompts:
        prefix = factory.prefixes[p.group]
        assert p.text.startswith(prefix + " ") and len(p.text.split()) == 405
    assert len(set(factory.prefixes)) == 4
    assert PromptFactory(1, 5, 400, 4).prefixes == factory.prefixes  # fixed by the seed
    assert PromptFactory(2, 5, 400, 4).prefixes != factory.prefixes
    assert PromptFactory(1, 5, 0, 4).prefixes == []


def test_prompt_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="--prefix-groups"):
        PromptFactory(0, 5, 10, 0)
    with pytest.raises(ConfigError, match="--prompt-words"):
        PromptFactory(0, -1)


# --------------------------------------------------------------------------- shapes


def over(scenario: str, times: list[float], users: int = 16, run_time: float | None = 100, rate: float = 2,
         wait: float = 0) -> list[tuple[int, float] | None]:
    return [shape_at(scenario, t, users, run_time, rate, wait) for t in times]


@pytest.mark.parametrize("scenario", ["steady", "shared-prefix"])
def test_steady_shapes_hold_users_until_the_run_time(scenario: str) -> None:
    assert over(scenario, [0, 50, 99.9, 100, 150]) == [(16, 2)] * 3 + [None, None]
    assert over(scenario, [0, 1e6], run_time=None) == [(16, 2)] * 2  # no -t: until stopped


def test_ramp_steps_from_one_to_all_users() -> None:
    shape = over("ramp", [0, 19.9, 20, 40, 60, 80, 99.9, 100])
    assert shape == [(1, 2), (1, 2), (5, 2), (9, 2), (12, 2), (16, 2), (16, 2), None]
    assert [u for u, _ in over("ramp", [0, 30, 50, 70, 90], users=1)] == [1] * 5


def test_burst_is_low_high_low() -> None:
    shape = over("burst", [0, 33, 34, 66, 67, 99, 100])
    assert shape == [(2, 16), (2, 16), (16, 16), (16, 16), (2, 16), (2, 16), None]
    assert over("burst", [0, 50], users=3, rate=5) == [(1, 5), (3, 5)]


def test_cold_start_waits_with_no_user_then_all_at_once() -> None:
    assert over("cold-start", [0, 29.9, 30, 99, 100], wait=30) == [(0, 2), (0, 2), (16, 16), (16, 16), None]
    assert over("cold-start", [0], wait=0) == [(16, 16)]


@pytest.mark.parametrize("scenario", ["ramp", "burst"])
def test_ramp_and_burst_need_a_run_time(scenario: str) -> None:
    with pytest.raises(ConfigError, match=f"--scenario {scenario} needs --run-time"):
        shape_at(scenario, 0, 4, None, 1)
    check_scenario("steady", None)
    with pytest.raises(ConfigError, match="must be one of"):
        check_scenario("spiky", 10)


# --------------------------------------------------------------------------- models


def test_load_fleet(tmp_path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("models:\n  - {name: a, source: hf://x}\n  - {name: e, task: embed}\ngateway: {port: 1}\n")
    assert load_fleet(path) == [ModelInfo("a", "generate"), ModelInfo("e", "embed")]


@pytest.mark.parametrize("text, message", [
    ("models: []\n", "'models' must be a non-empty list"),
    ("- a\n", "'models' must be a non-empty list"),
    ("models: [a]\n", "models[0] must be a mapping"),
    ("models:\n  - {name: a}\n  - {task: embed}\n", "models[1].name must be a non-empty string"),
    ("models:\n  - {name: a, task: chat}\n", "models[0].task must be 'generate' or 'embed', got 'chat'"),
    ("models:\n  - {name: a}\n  - {name: a}\n", "duplicate model names: a"),
    ("models: [\n", "not valid YAML"),
])
def test_load_fleet_errors_name_file_and_field(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_fleet(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_load_fleet_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: cannot read fleet file"):
        load_fleet(tmp_path / "nope.yaml")


def test_models_from_listing() -> None:
    listing = {"object": "list", "data": [{"id": "a", "task": "generate"}, {"id": "e", "task": "embed"},
                                          {"id": "plain-vllm"}]}
    assert models_from_listing(listing) == [ModelInfo("a", "generate"), ModelInfo("e", "embed"),
                                            ModelInfo("plain-vllm", "generate")]
    with pytest.raises(ConfigError, match=r"GET /v1/models: data\[0\].id must be a non-empty string"):
        models_from_listing({"data": [{"task": "embed"}]})
    with pytest.raises(ConfigError, match=r"src: data\[0\].task must be 'generate' or 'embed'"):
        models_from_listing({"data": [{"id": "x", "task": "rerank"}]}, "src")
    with pytest.raises(ConfigError, match="'data' must be a list"):
        models_from_listing({"detail": "unauthorized"})


def test_parse_weights() -> None:
    assert parse_weights("a=3, b = 1.5,,") == {"a": 3.0, "b": 1.5}
    assert parse_weights("") == {} and parse_weights(None) == {}
    assert parse_weights("org/model:v1=0") == {"org/model:v1": 0.0}
    for bad, message in [("a", "'a' is not name=weight"), ("=2", "'=2' is not name=weight"),
                         ("a=x", "weight of 'a' must be a number >= 0, got 'x'"), ("a=-1", "got '-1'"),
                         ("a=nan", "got 'nan'")]:
        with pytest.raises(ConfigError, match="^--model-weights: ") as e:
            parse_weights(bad)
        assert message in str(e.value)


def test_catalog_picks_by_weight_per_task() -> None:
    models = [ModelInfo("a", "generate"), ModelInfo("b", "generate"), ModelInfo("c", "generate"),
              ModelInfo("e", "embed")]
    catalog = build_catalog(models, {"a": 3, "c": 0}, "fleet.yaml")
    assert catalog.generate == (("a", 3), ("b", 1.0)) and catalog.embed == (("e", 1.0),)
    rng = random.Random(0)
    picks = [catalog.pick("generate", rng) for _ in range(4000)]
    assert set(picks) == {"a", "b"} and 0.7 < picks.count("a") / len(picks) < 0.8
    assert catalog.pick("embed", rng) == "e"
    assert build_catalog(models[:1], {}, "src").pick("embed", rng) is None


def test_catalog_errors() -> None:
    models = [ModelInfo("a", "generate")]
    with pytest.raises(ConfigError, match="unknown model.*zz; fleet.yaml has: a"):
        build_catalog(models, {"zz": 1}, "fleet.yaml")
    with pytest.raises(ConfigError, match="GET /v1/models: no model to load"):
        build_catalog(models, {"a": 0}, "GET /v1/models")
    with pytest.raises(ConfigError, match="no model to load"):
        build_catalog([], {}, "GET /v1/models")


# --------------------------------------------------------------------------- SLO gate


@dataclass
class Entry:
    name: str
    method: str
    num_requests: int = 0
    num_failures: int = 0
    total_content_length: int = 0
    response_times: dict[int, int] = field(default_factory=dict)


def test_percentile_matches_locust() -> None:
    assert histogram_percentile({}, 0.95) is None
    assert histogram_percentile({100: 96, 900: 4}, 0.95) == 100
    assert histogram_percentile({100: 95, 900: 5}, 0.95) == 900
    rng = random.Random(0)
    cases = [({rng.randrange(1, 500): rng.randrange(1, 50) for _ in range(rng.randrange(1, 20))}, q)
             for q in (0.5, 0.9, 0.95, 0.99) for _ in range(10)]
    # Locust's own function, in a subprocess (importing locust monkey-patches the process with gevent).
    script = ("import json, sys; from locust.stats import calculate_response_time_percentile as p; "
              "print(json.dumps([p({int(k): v for k, v in h.items()}, sum(h.values()), q) "
              "for h, q in json.load(sys.stdin)]))")
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(cases), capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert [histogram_percentile(h, q) for h, q in cases] == json.loads(out)


def entries() -> list[Entry]:
    return [
        Entry("/v1/chat/completions [stream] a", "POST", 100, 1),
        Entry("/v1/embeddings e", "POST", 100, 1),
        Entry("TTFT a", LLM, 90, 0, 0, {100: 90}),
        Entry("TTFT b", LLM, 10, 0, 0, {900: 10}),  # merged with a: p95 = 900
        Entry("cold-start TTFT a", LLM, 1, 0, 0, {99999: 1}),  # not part of the TTFT percentiles
        Entry("TPOT a", LLM, 100, 0, 0, {20: 100}),
        Entry("ITL a", LLM, 1000, 0, 0, {20: 1000}),
        Entry("tokens/s a", LLM, 100, 0, 6400, {30: 100}),
        Entry("tokens/s b", LLM, 10, 0, 3600, {30: 10}),
    ]


def test_summarize_merges_models_and_counts_http_requests_only() -> None:
    s = run_summary(entries(), duration_s=50)
    assert s == RunSummary({100: 90, 900: 10}, {20: 100}, requests=200, failures=2, output_tokens=10000,
                           duration_s=50)


def test_slos_pass() -> None:
    targets = SLOTargets(ttft_p95_ms=900, tpot_p95_ms=25, fail_ratio=0.01, min_tokens_per_s=200)
    results = evaluate_slos(run_summary(entries(), 50), targets)
    assert [r.line() for r in results] == ["SLO ttft_p95_ms: 900.0 <= 900 OK", "SLO tpot_p95_ms: 20.0 <= 25 OK",
                                           "SLO fail_ratio: 0.0100 <= 0.01 OK", "SLO tokens_per_s: 200.0 >= 200 OK"]
    assert all(r.ok for r in results)


def test_slos_missed() -> None:
    targets = SLOTargets(ttft_p95_ms=500, tpot_p95_ms=19.5, fail_ratio=0.005, min_tokens_per_s=201)
    results = evaluate_slos(run_summary(entries(), 50), targets)
    assert [r.line() for r in results] == ["SLO ttft_p95_ms: 900.0 <= 500 MISSED",
                                           "SLO tpot_p95_ms: 20.0 <= 19.5 MISSED",
                                           "SLO fail_ratio: 0.0100 <= 0.005 MISSED",
                                           "SLO tokens_per_s: 200.0 >= 201 MISSED"]


def test_slos_without_samples_are_missed_and_unset_ones_skipped() -> None:
    empty = run_summary([], duration_s=0)
    assert [r.line() for r in evaluate_slos(empty, SLOTargets(ttft_p95_ms=1, fail_ratio=1, min_tokens_per_s=0))] \
        == ["SLO ttft_p95_ms: n/a <= 1 MISSED", "SLO fail_ratio: n/a <= 1 MISSED", "SLO tokens_per_s: 0.0 >= 0 OK"]
    assert evaluate_slos(empty, SLOTargets()) == [] and not SLOTargets().any()
    assert SLOTargets(fail_ratio=0).any()
