"""The LoRA benchmark's pure parts: request picking, fleets, layout, the adapter view from /metrics, the tables."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from loadtests.bench_lora import (
    affinity_groups,
    cell_summary,
    concentration,
    cost_groups,
    layout,
    lora_snapshots,
    pick,
    render,
    rotated,
    summarize,
    tally,
    with_ratios,
)
from loadtests.loadgen import RequestRecord
from orchestrator.spec import FleetSpec

FOLDERS = [Path(f"/adapters/a{i}") for i in range(8)]
ENGINE = {"max_model_len": 1024, "max_num_seqs": 16}


def test_pick_is_seeded_and_spreads():
    names = [f"m-a{i}" for i in range(8)]
    first = [pick(names, i, 0) for i in range(400)]
    assert first == [pick(names, i, 0) for i in range(400)]  # same sequence for every variant
    assert first != [pick(names, i, 1) for i in range(400)]
    counts = Counter(first)
    assert set(counts) == set(names) and min(counts.values()) > 25
    assert {pick(["base"], i, 0) for i in range(10)} == {"base"}


def test_cost_groups_split_lora_off_from_on():
    (off_models, off_cells), (on_models, on_cells) = cost_groups("/m", ENGINE, FOLDERS, eager=False, max_loras=None)
    assert [m["name"] for m in off_models] == ["base", "base-eager"]
    assert all("adapters" not in m for m in off_models)
    assert "enforce_eager" not in off_models[0]["engine"] and off_models[1]["engine"]["enforce_eager"] is True
    (lora,) = on_models
    assert [a["name"] for a in lora["adapters"]] == [f"lora-a{i}" for i in range(8)]
    assert "max_loras" not in lora["engine"] and "enforce_eager" not in lora["engine"]
    assert [c.models for c in on_cells] == [("lora",), ("lora-a0",), tuple(f"lora-a{i}" for i in range(8))]
    assert off_cells[0].label.startswith("(a)") and on_cells[2].label.startswith("(d) 8")
    (eager_off, _), (eager_on, _) = cost_groups("/m", ENGINE, FOLDERS, eager=True, max_loras=8)
    assert [m["name"] for m in eager_off] == ["base"] and eager_off[0]["engine"]["enforce_eager"] is True
    assert eager_on[0]["engine"]["max_loras"] == 8 and eager_on[0]["engine"]["enforce_eager"] is True
    assert ENGINE == {"max_model_len": 1024, "max_num_seqs": 16}  # not modified
    # A fleet slm serve takes: one stack with every model, names unique.
    FleetSpec.model_validate({"models": layout(cost_groups("/m", ENGINE, FOLDERS, False, None), False)[0][0]})


def test_affinity_groups_and_layout():
    groups = affinity_groups("/m", ENGINE, FOLDERS, slots=2)
    (aff,), (lq,) = (g[0] for g in groups)
    assert (aff["routing"], lq["routing"]) == ({"adapter_affinity": True}, {"adapter_affinity": False})
    for m in (aff, lq):
        assert m["autoscaling"] == {"min_replicas": 2, "max_replicas": 2} and m["engine"]["max_loras"] == 2
        assert [a["source"] for a in m["adapters"]] == [str(f) for f in FOLDERS]
    cells = [g[1][0] for g in groups]
    assert [(c.label, c.base) for c in cells] == [("adapter affinity", "aff"), ("least-queue", "lq")]
    (one,) = layout(groups, separate=False)
    assert [m["name"] for m in one[0]] == ["aff", "lq"] and one[1] == cells
    assert layout(groups, separate=True) == groups
    assert rotated(cells, 1) == cells[::-1] and rotated(cells, 2) == cells and rotated([], 3) == []


METRICS = """# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{replica="r1",max_lora="2",running_lora_adapters="aff-a1,aff-a2",waiting_lora_adapters=""} 100.5
vllm:lora_requests_info{replica="r1",max_lora="2",running_lora_adapters="aff-a3",waiting_lora_adapters="aff-a4"} 101.5
vllm:lora_requests_info{replica="r2",max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 99.0
vllm:lora_requests_info{replica="r2",max_lora="2",running_lora_adapters="aff-a1",waiting_lora_adapters=""} 98.0
# HELP vllm:num_requests_running Running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{replica="r1",model_name="aff"} 1.0
"""


def test_lora_snapshots_take_each_replicas_latest_series():
    snaps = lora_snapshots(METRICS)
    assert snaps == {"r1": (101.5, ("aff-a3",), ("aff-a4",)), "r2": (99.0, (), ())}


def test_tally_and_concentration():
    snaps = [
        {"r1": (1.0, ("aff-a1", "aff-a2"), ()), "r2": (1.0, ("aff-a3", "lq-a1"), ())},
        {"r1": (1.0, ("aff-a1", "aff-a2"), ()), "r2": (2.0, ("aff-a1",), ())},  # r1 unchanged: counted once
        {"r1": (3.0, ("aff-a1",), ()), "r2": (3.0, ("lq-a0",), ())},  # r2 runs another model's adapter only
    ]
    counts = tally(snaps, [f"aff-a{i}" for i in range(8)])
    assert counts["per_adapter"] == {"aff-a1": {"r1": 2, "r2": 1}, "aff-a2": {"r1": 1}, "aff-a3": {"r2": 1}}
    assert counts["running_together"] == {"r1": [2, 1], "r2": [1, 1]}
    c = concentration(counts)
    assert c["adapter_share_on_top_replica"] == {"aff-a1": 2 / 3, "aff-a2": 1.0, "aff-a3": 1.0}
    assert abs(c["mean_share_on_top_replica"] - (2 / 3 + 2) / 3) < 1e-9
    assert c["distinct_adapters_per_replica"] == {"r1": 2, "r2": 2}
    assert c["mean_adapters_running_at_once"] == 1.25 and c["snapshots"] == 4
    assert c["pooled_share_on_top_replica"] == 4 / 5
    assert concentration({"per_adapter": {}, "running_together": {}})["mean_share_on_top_replica"] is None


def _record(start: float, ttft: float, tokens: int = 64) -> RequestRecord:
    r = RequestRecord(start=start, first_token=start + ttft, last_token=start + 1, usage_tokens=tokens, done=True,
                      tokens=tokens)
    r.finish(start + 1)
    return r


def test_summary_ratios_and_tables():
    fast = summarize([_record(0, 0.01 * (i + 1)) for i in range(20)], wall_s=2.0)
    assert fast["output_tokens_per_s"] == 640
    assert (fast["ttft_p50_ms"], fast["ttft_p95_ms"]) == pytest.approx((105, 190.5))
    slow = summarize([_record(0, 0.02 * (i + 1)) for i in range(20)], wall_s=4.0)
    cost = with_ratios({"(a) base, LoRA off": {1: cell_summary([fast])}, "(d) 8 adapters": {1: cell_summary([slow])}},
                       "(a) base, LoRA off")
    assert cost["(d) 8 adapters"][1]["ratios"]["output_tokens_per_s"] == 0.5
    assert abs(cost["(d) 8 adapters"][1]["ratios"]["ttft_p50_ms"] - 2) < 1e-9
    watched = dict(slow, picks_per_replica={"r1": 30.0, "r2": 10.0}, spills=3.0,
                   lora=concentration({"per_adapter": {"aff-a1": {"r1": 3, "r2": 1}}, "running_together": {"r1": [1]}}))
    aff = with_ratios({"adapter affinity": {8: cell_summary([watched])}, "least-queue": {8: cell_summary([fast])}},
                      "least-queue")
    args = {"model": "tiny", "adapters": 8, "rank": 8, "max_tokens": 64, "seconds": 30.0, "warmup_seconds": 5.0,
            "rounds": 1, "separate_stacks": False, "affinity_slots": 2}
    text = render({"args": args, "summary": {"cost": cost, "affinity": aff}})
    assert "| (d) 8 adapters | 1 | 320.0 | 0.50x | 210.0 | 2.00x |" in text
    assert "| adapter affinity | 8 | 320.0 | 0.50x |" in text and "| 30 / 10 | 3 | 0.75 (1) | 1 / 1 | 1.00 |" in text
    assert "| least-queue | 8 | 640.0 | 1.00x |" in text and "| - | - | - (-) | - | - | 20 (0) |" in text
    for table in (line for line in text.splitlines() if line.startswith("|")):
        assert table.count("|") in (10, 15)  # 9 and 14 columns
