"""LoRA adapters in ``/fleet`` and ``/metrics``: what replicas report to the fleet-state actor
(``FleetState.record_adapters``), how the gateway's view folds the reports of a model's live
replicas per adapter, and the ``slm_adapter_replicas`` gauge. Fakes stand in for Ray: the
actor class is used directly, and the view is seeded as a background refresh would leave it."""

from __future__ import annotations

import asyncio
import types

import pytest

from orchestrator.autoscaling import state as fleet_state
from orchestrator.autoscaling.state import FleetState
from orchestrator.gateway.fleet_view import FleetView
from orchestrator.metrics import GatewayMetrics
from orchestrator.spec import parse_fleet

FLEET = {"models": [
    {"name": "m", "source": "/models/m", "autoscaling": {"min_replicas": 0, "max_replicas": 4},
     "adapters": [{"name": "m-sql", "source": "hf://org/m-sql"}, {"name": "m-chat", "source": "hf://org/m-chat"}]},
    {"name": "n", "source": "/models/n"},
]}


def adapter(state: str, reason: str | None = None, rank: int | None = 8, source: str = "hf://org/m-sql"):
    return {"state": state, "reason": reason, "rank": rank if state == "loaded" else None,
            "size_bytes": 1234 if state == "loaded" else None, "source": source, "at": 1.0}


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(fleet_state, "time", c)
    return c


class Handle:
    """A model deployment's handle: ``metrics_text.remote()`` awaited (no vLLM metrics here)."""

    def __init__(self) -> None:
        self.metrics_text = types.SimpleNamespace(remote=self._text)

    async def _text(self):
        return ""


def view_of(actor: FleetState, replicas: dict[str, dict[str, int]], fleet: dict = FLEET) -> FleetView:
    spec = parse_fleet(fleet, "fleet.yaml")
    view = FleetView(spec, {m.name: Handle() for m in spec.models}, {m.name: f"model-{m.name}" for m in spec.models},
                     {}, None, GatewayMetrics())
    view.seed(replicas, actor.snapshot(), 0.0)
    return view


def fleet_adapters(view: FleetView, model: str = "m") -> dict[str, dict]:
    models = asyncio.run(view.models())
    return {a["name"]: a for a in next(v for v in models if v["name"] == model)["adapters"]}


# -------------------------------------------------------------------------- the actor


def test_record_adapters_keeps_each_replicas_latest_report_per_model(clock):
    actor = FleetState()
    actor.record_adapters("r1", "m", {"m-sql": adapter("loading")})
    clock.now += 5
    actor.record_adapters("r1", "m", {"m-sql": adapter("loaded")})  # replaces r1's report
    actor.record_adapters("r2", "m", {"m-sql": adapter("failed", "bad rank")})
    actor.record_adapters("r9", "n", {})
    reports = actor.snapshot()["m"]["adapter_reports"]
    assert set(reports) == {"r1", "r2"}
    assert reports["r1"]["states"]["m-sql"]["state"] == "loaded"
    assert reports["r1"]["age_s"] == 0 and reports["r1"]["seen_s"] == 0
    assert actor.snapshot()["n"]["adapter_reports"] == {"r9": {"states": {}, "age_s": 0, "seen_s": 0}}


def test_a_report_over_120_s_old_is_dropped_and_engine_pushes_count_as_seen(clock):
    actor = FleetState()
    actor.record_adapters("r1", "m", {"m-sql": adapter("loaded")})
    clock.now += 60
    actor.record_engine_metrics("r1", "")  # the replica still pushes its metrics
    reports = actor.adapter_reports()
    assert reports["m"]["r1"]["age_s"] == 60 and reports["m"]["r1"]["seen_s"] == 0
    clock.now += fleet_state.ADAPTER_REPORT_MAX_AGE_S
    assert actor.adapter_reports() == {}
    assert "m" not in actor.snapshot()


def test_record_adapters_refuses_what_is_not_a_mapping(clock):
    with pytest.raises(TypeError, match="not a dict"):
        FleetState().record_adapters("r1", "m", [("m-sql", adapter("loaded"))])


# -------------------------------------------------------------------------- /fleet


def test_an_adapter_loaded_on_every_live_replica_is_loaded_with_what_they_found(clock):
    actor = FleetState()
    for r in ("r1", "r2"):
        actor.record_adapters(r, "m", {"m-sql": adapter("loaded"), "m-chat": adapter("loading", source="hf://org/m-chat")})
    actor.record_adapters("r2", "m", {"m-sql": adapter("loaded"), "m-chat": adapter("loaded", rank=16,
                                                                                      source="hf://org/m-chat")})
    shown = fleet_adapters(view_of(actor, {"m": {"RUNNING": 2}}))
    assert list(shown) == ["m-sql", "m-chat"]  # the fleet's order
    assert shown["m-sql"] == {"name": "m-sql", "source": "hf://org/m-sql", "rank": 8, "size_bytes": 1234,
                              "state": "loaded", "reason": None, "replicas": {"loaded": 2, "failed": 0, "loading": 0}}
    assert shown["m-chat"]["state"] == "loading"
    assert shown["m-chat"]["replicas"] == {"loaded": 1, "failed": 0, "loading": 1}
    assert shown["m-chat"]["rank"] == 16
    models = asyncio.run(view_of(actor, {"m": {"RUNNING": 2}}).models())
    assert next(v for v in models if v["name"] == "n")["adapters"] == []


def test_one_replica_failing_an_adapter_fails_it_with_the_reason(clock):
    actor = FleetState()
    actor.record_adapters("r1", "m", {"m-sql": adapter("loaded")})
    actor.record_adapters("r2", "m", {"m-sql": adapter("failed", "rank 64 is over max_lora_rank 16")})
    shown = fleet_adapters(view_of(actor, {"m": {"RUNNING": 2}}))["m-sql"]
    assert shown["state"] == "failed"
    assert shown["reason"] == "rank 64 is over max_lora_rank 16"
    assert shown["replicas"] == {"loaded": 1, "failed": 1, "loading": 0}


def test_a_replica_that_has_not_been_told_of_an_adapter_counts_as_loading(clock):
    actor = FleetState()
    actor.record_adapters("r1", "m", {"m-sql": adapter("loaded")})
    shown = fleet_adapters(view_of(actor, {"m": {"RUNNING": 1}}))
    assert shown["m-sql"]["state"] == "loaded"
    assert shown["m-chat"]["state"] == "loading"
    assert shown["m-chat"]["replicas"] == {"loaded": 0, "failed": 0, "loading": 1}
    assert shown["m-chat"]["source"] == "hf://org/m-chat"  # from the fleet spec


def test_without_live_replicas_an_adapter_is_idle_and_reports_of_replicas_gone_do_not_count(clock):
    actor = FleetState()
    actor.record_adapters("old", "m", {"m-sql": adapter("failed", "gone wrong")})
    shown = fleet_adapters(view_of(actor, {"m": {}}))["m-sql"]  # scaled to zero
    assert shown["state"] == "idle" and shown["reason"] is None
    assert shown["replicas"] == {"loaded": 0, "failed": 0, "loading": 0}
    # One live replica: the one heard from last counts, the replica that left does not.
    clock.now += 20
    actor.record_adapters("new", "m", {"m-sql": adapter("loaded")})
    shown = fleet_adapters(view_of(actor, {"m": {"RUNNING": 1}}))["m-sql"]
    assert shown["state"] == "loaded" and shown["replicas"]["failed"] == 0
    # Starting and draining replicas are live too.
    shown = fleet_adapters(view_of(actor, {"m": {"STARTING": 1, "STOPPING": 1}}))["m-sql"]
    assert shown["state"] == "failed" and shown["replicas"] == {"loaded": 1, "failed": 1, "loading": 0}


def test_a_report_over_120_s_old_is_ignored_by_the_view(clock):
    actor = FleetState()
    actor.record_adapters("r1", "m", {"m-sql": adapter("failed", "bad")})
    actor.record_adapters("r2", "m", {"m-sql": adapter("loaded")})
    spec = parse_fleet(FLEET, "fleet.yaml").models[0]
    reports = actor.snapshot()["m"]["adapter_reports"]
    reports["r1"]["age_s"] = 121.0  # as the view might hold it between refreshes
    view = view_of(actor, {"m": {"RUNNING": 2}})
    shown = {a["name"]: a for a in view.adapter_views(spec, reports, live=2)}["m-sql"]
    assert shown["state"] == "loaded" and shown["replicas"] == {"loaded": 1, "failed": 0, "loading": 0}
    # The time since the view read the snapshot counts too.
    reports["r1"]["age_s"] = 100.0
    shown = {a["name"]: a for a in view.adapter_views(spec, reports, live=2, read_age_s=30)}["m-sql"]
    assert shown["state"] == "loaded"


def test_the_gateways_adapter_list_decides_what_is_shown(clock):
    """The gateway's fleet comes without adapters (they travel as user_config): the list it is
    given names them, and the replicas' reports fill in source, rank and size."""
    bare = {"models": [{"name": "m", "source": "/models/m"}]}
    actor = FleetState()
    actor.record_adapters("r1", "m", {"m-sql": adapter("loaded"), "m-old": adapter("loaded", source="hf://x/y")})
    view = view_of(actor, {"m": {"RUNNING": 1}}, bare)
    assert set(fleet_adapters(view)) == {"m-sql", "m-old"}  # not told: what the replicas report
    view.set_adapters([{"name": "m-sql", "base": "m", "limits": None}, {"name": "m-new", "base": "m"},
                       {"name": "other", "base": "n"}])
    shown = fleet_adapters(view)
    assert list(shown) == ["m-sql", "m-new"]
    assert shown["m-sql"]["source"] == "hf://org/m-sql" and shown["m-sql"]["size_bytes"] == 1234
    assert shown["m-new"]["state"] == "loading" and shown["m-new"]["source"] is None


def test_local_adapter_folders_give_rank_and_size_before_any_replica_reports(clock, tmp_path):
    folder = tmp_path / "sql"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 32, "target_modules": ["q_proj"]}')
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    fleet = {"models": [{"name": "m", "source": "hf://Qwen/Qwen3-0.6B",
                         "adapters": [{"name": "m-sql", "source": str(folder)}]}]}
    shown = fleet_adapters(view_of(FleetState(), {"m": {"STARTING": 1}}, fleet))["m-sql"]
    assert shown == {"name": "m-sql", "source": str(folder), "rank": 32, "size_bytes": 4096, "state": "loading",
                     "reason": None, "replicas": {"loaded": 0, "failed": 0, "loading": 0}}


# -------------------------------------------------------------------------- /metrics


def gauge_lines(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith("slm_adapter_replicas{"))


def test_the_adapter_gauge_counts_replicas_by_state_and_forgets_adapters_that_left(clock):
    from prometheus_client import CollectorRegistry

    actor = FleetState()
    actor.record_adapters("r1", "m", {"m-sql": adapter("loaded"), "m-chat": adapter("failed", "no")})
    actor.record_adapters("r2", "m", {"m-sql": adapter("loaded"), "m-chat": adapter("loaded")})
    view = view_of(actor, {"m": {"RUNNING": 2}})
    text = asyncio.run(view.metrics_text(CollectorRegistry()))
    assert gauge_lines(text) == sorted([
        'slm_adapter_replicas{adapter="m-sql",model="m",state="loaded"} 2.0',
        'slm_adapter_replicas{adapter="m-sql",model="m",state="failed"} 0.0',
        'slm_adapter_replicas{adapter="m-sql",model="m",state="loading"} 0.0',
        'slm_adapter_replicas{adapter="m-chat",model="m",state="loaded"} 1.0',
        'slm_adapter_replicas{adapter="m-chat",model="m",state="failed"} 1.0',
        'slm_adapter_replicas{adapter="m-chat",model="m",state="loading"} 0.0',
    ])
    view.set_adapters([{"name": "m-sql", "base": "m"}])  # m-chat removed from the fleet
    text = asyncio.run(view.metrics_text(CollectorRegistry()))
    assert [line for line in gauge_lines(text) if "m-chat" in line] == []
    assert len(gauge_lines(text)) == 3
