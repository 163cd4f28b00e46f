"""The fairness benchmark's pure parts: keys and fleet, the run plan, token counting, the audit view, the tables."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from loadtests.bench_fairness import (
    KEYS,
    audit_view,
    engine_sum,
    fleet,
    keys_doc,
    plan,
    ratios,
    render,
    summarize,
    turn_stats,
)
from loadtests.loadgen import RequestRecord
from orchestrator.gateway.auth import KeysFile
from orchestrator.spec import FleetSpec

ENGINE = {"max_model_len": 1024, "max_num_seqs": 8}


def test_keys_give_each_tenant_its_class_and_an_admin_key():
    doc = KeysFile.model_validate(keys_doc())
    classes = {k.name: k.priority for k in doc.keys if not k.admin}
    assert (
        classes == KEYS == {"team-a": "standard", "team-b": "standard", "interactive": "interactive", "batch": "batch"}
    )
    assert [k.name for k in doc.keys if k.admin] == ["ops"]
    assert len({k.key for k in doc.keys}) == len(doc.keys)


def test_fleet_serves_each_variant_once_with_its_queue_and_policy():
    raw = fleet("/m", ENGINE, ["fair", "fifo", "fair", "fifo-prio"], Path("/w/keys.yaml"), Path("/w/audit.jsonl"))
    spec = FleetSpec.model_validate(raw)
    got = {m.name: (m.queue.enabled, m.priority_scheduling, m.queue.bound(m.engine, "cpu")) for m in spec.models}
    assert got == {"fair": (True, True, 8), "fifo": (False, False, 8), "fifo-prio": (False, True, 8)}
    assert spec.model("fifo").engine["scheduling_policy"] == "fcfs"
    assert "scheduling_policy" not in spec.model("fair").engine  # the fleet's default: priority
    assert all(m.autoscaling.min_replicas == m.autoscaling.max_replicas == 1 for m in spec.models)
    g = spec.gateway
    assert g.auth.keys_file == "/w/keys.yaml" and g.audit.enabled and g.audit.path == "/w/audit.jsonl"
    assert g.classes.standard.max_wait_s >= 600  # a flood must not time out of the queue
    assert ENGINE == {"max_model_len": 1024, "max_num_seqs": 8}  # not modified
    bounded = FleetSpec.model_validate(fleet("/m", ENGINE, ["fair", "fifo"], Path("/k"), Path("/a"), bound=10))
    assert [m.queue.bound(m.engine, "cpu") for m in bounded.models] == [10, 8]


def test_plan_runs_phases_in_order_and_rotates_the_models_per_round():
    variants = {"noisy": ["fair", "fifo"], "interactive": ["fair", "fifo", "fifo-prio"]}
    steps = plan(["noisy", "interactive"], variants, rounds=2)
    assert steps[:5] == [
        (0, "noisy", "fair"),
        (0, "noisy", "fifo"),
        (0, "interactive", "fair"),
        (0, "interactive", "fifo"),
        (0, "interactive", "fifo-prio"),
    ]
    assert [v for r, p, v in steps if r == 1 and p == "interactive"] == ["fifo", "fifo-prio", "fair"]
    assert plan(["noisy"], variants, rounds=0) == []


def record(start: float, ttft: float | None, tokens: int = 16, usage: int | None = 16, error: str | None = None):
    r = RequestRecord(
        start=start,
        first_token=None if ttft is None else start + ttft,
        last_token=start + 1,
        tokens=tokens,
        usage_tokens=usage,
        done=error is None,
    )
    r.error = error
    r.finish(start + 1)
    return r


def test_turn_stats():
    stats = turn_stats([record(0, 0.01 * (i + 1)) for i in range(20)] + [record(0, None, error="HTTP 503: full")])
    assert (stats["turns"], stats["errors"], stats["error_samples"]) == (21, 1, ["HTTP 503: full"])
    assert (stats["ttft_p50_ms"], stats["ttft_p95_ms"]) == pytest.approx((105, 190.5))


def line(key: str, model: str, end: str, latency_ms: float, wait: float | None, overtaken: int | None, status=200):
    return json.dumps(
        {
            "time": f"2026-12-02T01:00:{end}+00:00",
            "key": key,
            "model": model,
            "class": "standard",
            "queue_wait_ms": wait,
            "queue_overtaken": overtaken,
            "status": status,
            "latency_ms": latency_ms,
        }
    )


def test_audit_view_reads_latency_queue_wait_overtaken_and_requests_in_the_gateway():
    lines = [
        line("team-b", "fair", f"1{i}.000", 50 * (i + 1), w, o)
        for i, (w, o) in enumerate(((0.0, 0), (100.0, 1), (300.0, 4)))
    ]
    lines += [
        line("team-a", "fair", "10.000", 4000, 9000, 40),  # from 06 s to 10 s
        line("team-a", "fair", "20.000", 8000, 0, 0, status="cancelled"),  # from 12 s to 20 s
        line("team-b", "fifo", "10.000", 50, None, None),
        '{"time": "2026-12-02T01:00:30',  # being written
    ]
    view = audit_view(lines, "team-b", "fair")
    assert view["requests"] == 3 and view["classes"] == ["standard"] and view["in_flight"] is None  # no window
    assert (view["latency_p50_ms"], view["queue_wait_p50_ms"], view["queue_wait_p95_ms"]) == pytest.approx(
        (100, 100, 280)
    )
    assert (view["overtaken_median"], view["overtaken_max"]) == (1, 4)
    fifo = audit_view(lines, "team-b", "fifo")
    assert fifo["requests"] == 1 and fifo["queue_wait_p95_ms"] is None and fifo["overtaken_max"] is None
    t0 = datetime.datetime(2026, 12, 2, 1, 0, 8, tzinfo=datetime.timezone.utc).timestamp()  # wall-clock seconds
    flood = audit_view(lines, "team-a", "fair", (t0, t0 + 8))  # 08 s to 16 s: 2 s of one, 4 s of the other
    assert flood["in_flight"] == pytest.approx(6 / 8) and flood["latency_p95_ms"] == 4000


def test_engine_sum_reads_one_models_engines():
    text = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="fair",replica="r1"} 3.0
vllm:num_requests_running{model_name="fifo",replica="r2"} 8.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="fair",replica="r1"} 2.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{model_name="fair",replica="r1"} 1234.0
vllm:generation_tokens_total{model_name="fifo",replica="r2"} 99.0
"""
    assert engine_sum(text, "fair") == 5 and engine_sum(text, "fifo") == 8 and engine_sum(text, "x") == 0
    assert engine_sum(text, "fair", ("vllm:generation_tokens_total",)) == 1234


def run(model: str, solo_p95: float, flood_p95: float, noisy_tps: float, total_tps: float, wait: float | None):
    audit = {
        "requests": 5,
        "classes": ["standard"],
        "queue_wait_p50_ms": wait,
        "queue_wait_p95_ms": wait,
        "overtaken_median": None if wait is None else 0,
        "overtaken_max": None if wait is None else 2,
    }
    return {
        "phase": "noisy",
        "model": model,
        "quiet": "team-b",
        "noisy": "team-a",
        "solo": {"turns": 10, "errors": 0, "ttft_p50_ms": solo_p95 / 2, "ttft_p95_ms": solo_p95},
        "flood": {"turns": 5, "errors": 1, "ttft_p50_ms": flood_p95 / 2, "ttft_p95_ms": flood_p95},
        "wall_s": 40.0,
        "noisy_tokens_per_s": noisy_tps,
        "total_tokens_per_s": total_tps,
        "flood_requests": 30,
        "flood_errors": 0,
        "audit": audit | {"latency_p95_ms": flood_p95 + 10},
        "audit_noisy": audit | {"in_flight": 47.5},
        "audit_solo": audit | {"latency_p95_ms": solo_p95 + 5},
        "client_lag_p95_ms": 3.0,
    }


def test_summary_ratios_and_table():
    runs = [
        run("fair", 40, 300, 700, 720, 250.0),
        run("fifo", 50, 20000, 760, 765, None),
        run("fair", 60, 500, 740, 760, 150.0),
    ]
    summary = summarize(runs)
    fair = summary["noisy"]["fair"]
    assert fair["rounds"] == 2 and fair["flood"]["ttft_p95_ms"] == 400 and fair["noisy_tokens_per_s"] == 720
    assert fair["flood"]["turns"] == 10 and fair["flood_requests"] == 60
    assert fair["flood"]["ratio_to_solo_p95"] == 8.0
    rs = ratios(summary["noisy"])
    assert list(rs) == ["fair"] and rs["fair"]["ttft_p95"] == 0.02
    assert rs["fair"]["total_tokens_per_s"] == pytest.approx(740 / 765)
    assert ratios({"fair": fair}) == {}  # no fifo to compare with
    args = {
        "model": "tiny",
        "max_num_seqs": 8,
        "flood": 48,
        "flood_max_tokens": 512,
        "turn_max_tokens": 16,
        "solo_seconds": 15.0,
        "seconds": 40.0,
        "flood_warmup": 10.0,
        "rounds": 2,
    }
    text = render({"args": args, "summary": summary, "ratios": {"noisy": rs}})  # the audit view: the last round's
    assert (
        "| fair | 25 | 50 | 200 | 400 | 8.0x | 10 (2) | 65 -> 510 | 150 | 0 / 2 | 720.0 | 740.0 | 60 (0) | 47.5 |"
        in text
    )
    assert (
        "| fifo | 25 | 50 | 10000 | 20000 | 400.0x | 5 (1) | 55 -> 20010 | - | - | 760.0 | 765.0 | 30 (0) | 47.5 |"
        in text
    )
    assert "| fair | 0.020x | 0.020x | 0.947x | 0.967x |" in text
    assert "team-b TTFT p50 alone" in text and "team-a tok/s" in text
    for row in (x for x in text.splitlines() if x.startswith("|")):
        assert row.count("|") in (15, 6)  # 14 and 5 columns
