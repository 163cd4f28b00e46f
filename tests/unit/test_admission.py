"""Admission's order (capacity before the key's rate limit), the capacity rule and its
fallback when the fleet state is gone, and the bounds on what the gateway reflects. Fakes
stand in for Ray here; tests/integration/test_gateway_security.py runs the same on the stack."""

from __future__ import annotations

import asyncio
import time
import types

import pytest
from starlette.requests import Request

from orchestrator import errors
from orchestrator.gateway import capacity
from orchestrator.gateway.admission import Admission
from orchestrator.gateway.fleet_view import FleetView
from orchestrator.gateway.http import REQUEST_ID, BoundRequestId
from orchestrator.metrics import GatewayMetrics
from orchestrator.spec import parse_fleet

FLEET = {"models": [{"name": "m", "source": "/models/m", "limits": {"max_queue_per_replica": 2}},
                    {"name": "n", "source": "/models/n"}],
         "gateway": {"replicas": 2, "limits": {"max_queue_per_replica": 5}}}


class Limiter:
    """The rate-limiter actor's interface: ``acquire.remote(...)`` awaited."""

    def __init__(self) -> None:
        self.calls = []
        self.acquire = types.SimpleNamespace(remote=self._acquire)
        self.reconcile = types.SimpleNamespace(remote=lambda *a: None)

    async def _acquire(self, *args):
        self.calls.append(args)
        return types.SimpleNamespace(allowed=True, headers={}, retry_after_s=0, reason="")


def request(body: bytes, headers: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw}, receive)


def keyed_fleet(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {name: a, key: sk-a-0123456789abcdef, rpm: 1}\n")
    return parse_fleet({**FLEET, "gateway": {**FLEET["gateway"], "auth": {"keys_file": str(keys)}}}, "fleet.yaml")


def test_a_request_refused_for_capacity_is_not_charged_to_the_key(tmp_path):
    limiter = Limiter()
    admission = Admission(keyed_fleet(tmp_path), None, None, limiter=limiter)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}'
    headers = {"authorization": "Bearer sk-a-0123456789abcdef"}

    async def full(spec):
        raise errors.Overloaded("full")

    async def room(spec):
        return None

    with pytest.raises(errors.Overloaded):
        asyncio.run(admission.enter(request(body, headers), "chat", full))
    assert limiter.calls == []
    ctx, payload, spec, stream = asyncio.run(admission.enter(request(body, headers), "chat", room))
    assert spec.name == "m" and not stream and len(limiter.calls) == 1


def test_the_model_cap_else_the_gateway_cap():
    fleet = parse_fleet(FLEET, "fleet.yaml")
    assert capacity.bound(fleet, fleet.model("m")) == 2
    assert capacity.bound(fleet, fleet.model("n")) == 5
    capacity.check("m", 3.9, 2, 2)  # under 2 x 2
    with pytest.raises(errors.Overloaded):
        capacity.check("m", 4, 2, 2)
    capacity.check("m", 100, 0, 2)  # no running replica: the request waits for one instead
    capacity.check("m", 100, 1, None)  # no bound: no admission control


def view_with(snapshot_at: float | None, queue: float | None, refreshing_for: float | None = 60.0,
              published_s_ago: float = 0.5) -> FleetView:
    fleet = parse_fleet(FLEET, "fleet.yaml")
    view = FleetView(fleet, {}, {"m": "model-m"}, {}, None, GatewayMetrics())
    view.keep_fresh = lambda: None  # no event loop, no refresh here
    entry = {"queue_depth": queue, "received_at": time.time() - published_s_ago}
    view.seed({"m": {"RUNNING": 1}}, {"m": entry} if queue is not None else {}, snapshot_at, refreshing_for)
    return view


def test_admission_reads_the_fleet_queue_while_it_is_fresh():
    assert view_with(0.5, 7.0).queue_estimate("m", local_in_flight=1) == (7.0, 1)


@pytest.mark.parametrize("age, queue", [(None, None), (30.0, 7.0), (0.5, None)])
def test_without_a_fresh_fleet_state_admission_counts_its_own_in_flight(age, queue):
    """Actor gone (never read), stale (last read 30 s ago) or silent about the model: the
    gateway replica's own in-flight requests x 2 gateway replicas, flagged in a metric."""
    view = view_with(age, queue)
    assert view.queue_estimate("m", local_in_flight=3) == (6.0, 1)
    assert view.metrics.registry.get_sample_value("slm_admission_queue_estimated", {"model": "m"}) == 1


def test_a_queue_depth_the_policy_stopped_publishing_is_not_trusted():
    """The actor answers, but the model's entry is a minute old (the policy stuck, or writing
    to a replaced actor): estimated like a missing one."""
    view = view_with(0.5, 7.0, published_s_ago=60.0)
    assert view.queue_estimate("m", local_in_flight=3) == (6.0, 1)


def test_admission_waits_for_the_first_refresh_before_estimating():
    """The refresh just started (this replica's first request with a queue bound): an old
    snapshot is not judged stale yet, and nothing is estimated; after STATE_STALE_S it is."""
    assert view_with(None, None, refreshing_for=0.2).queue_estimate("m", local_in_flight=3) is None
    assert view_with(30.0, 7.0, refreshing_for=0.2).queue_estimate("m", local_in_flight=3) is None
    assert view_with(30.0, 7.0, refreshing_for=6.0).queue_estimate("m", local_in_flight=3) == (6.0, 1)


def test_request_ids_and_reflected_values_are_bounded():
    assert REQUEST_ID.match("req-1") and not REQUEST_ID.match("r" * 129) and not REQUEST_ID.match("a b")
    seen = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]).get(b"x-request-id"))

    middleware = BoundRequestId(app)
    for given, kept in ((b"req-ok", b"req-ok"), (b"r" * 5000, None), (b"bad\x01id", None)):
        asyncio.run(middleware({"type": "http", "headers": [(b"x-request-id", given)]}, None, None))
        assert seen[-1] == kept
    message = errors.UnknownModel("m" * 1_000_000).message
    assert len(message) < 300 and "1000000 characters" in message


async def no_capacity(spec):
    return None


def adapter_admission(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {name: a, key: sk-a-0123456789abcdef, models: ['team-a-*']}\n")
    fleet = parse_fleet({"models": [{"name": "m", "source": "/models/m", "limits": {"max_tokens": 50, "max_n": 2}}],
                         "gateway": {"auth": {"keys_file": str(keys)}, "limits": {"max_messages": 3}}}, "fleet.yaml")
    admission = Admission(fleet, None, None, limiter=Limiter())
    admission.set_adapters([{"name": "team-a-sql", "base": "m", "limits": {"max_tokens": 10}},
                            {"name": "team-a-chat", "base": "m", "limits": None},
                            {"name": "orphan", "base": "gone", "limits": None}])
    return admission


def test_an_adapter_is_admitted_as_a_model_of_its_own_with_its_base_spec(tmp_path):
    admission = adapter_admission(tmp_path)
    assert set(admission.adapters) == {"team-a-sql", "team-a-chat"}  # an adapter of an unknown base is dropped
    key = {"authorization": "Bearer sk-a-0123456789abcdef"}
    body = b'{"model": "team-a-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}'
    ctx, payload, spec, _ = asyncio.run(admission.enter(request(body, key), "chat", no_capacity))
    assert (ctx.model, spec.name, payload["model"]) == ("team-a-chat", "m", "team-a-chat")
    for model in ("m", "orphan", "team-b-x"):  # the key's glob; unknown names: the same 404
        body = f'{{"model": "{model}", "messages": []}}'.encode()
        with pytest.raises(errors.UnknownModel):
            asyncio.run(admission.enter(request(body, key), "chat", no_capacity))


@pytest.mark.parametrize(("model", "field", "value", "allowed"), [
    ("team-a-sql", "max_tokens", 11, False),   # the adapter's own cap (10) wins
    ("team-a-sql", "max_tokens", 10, True),
    ("team-a-chat", "max_tokens", 51, False),  # no cap of its own: the model's (50)
    ("team-a-chat", "n", 3, False),            # the model's max_n
    ("team-a-sql", "n", 3, False),             # fields the adapter leaves unset: still the model's
])
def test_an_adapter_inherits_the_model_limits_unless_it_sets_its_own(tmp_path, model, field, value, allowed):
    admission = adapter_admission(tmp_path)
    spec, own = admission.resolve(model)
    payload = {"model": model, field: value}
    if allowed:
        admission.check_limits(spec, payload, own)
    else:
        with pytest.raises(errors.InvalidRequest):
            admission.check_limits(spec, payload, own)


def test_the_gateway_limits_are_the_last_fallback_for_adapters(tmp_path):
    admission = adapter_admission(tmp_path)
    spec, own = admission.resolve("team-a-sql")
    with pytest.raises(errors.InvalidRequest, match="max_messages"):
        admission.check_limits(spec, {"model": "team-a-sql", "messages": [{}] * 4}, own)
