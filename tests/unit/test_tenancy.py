"""Tenancy around the fair queue, without Ray or vLLM: a model's queue at one gateway replica
(its bound from running replicas, the interactive reserve, release and dispatch, leaving
clients, 503 past a class's max_wait_s), the class of a request (key, header, service_tier),
the class reaching vLLM as the request priority, the queue reports summed in the fleet
state, the autoscaler counting waiting requests, ``/fleet``'s queue view and the keys'
tenancy fields. Event loops run with ``asyncio.run`` inside plain tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import types

import pytest
from starlette.requests import Request

from orchestrator import errors
from orchestrator.autoscaling import state as fleet_state
from orchestrator.autoscaling.serve_policy import QueueDepthPolicy
from orchestrator.autoscaling.state import FleetState
from orchestrator.gateway import queueing
from orchestrator.gateway.admission import ENGINE_PRIORITY, Admission, request_class
from orchestrator.gateway.auth import KeyRecord, parse_keys
from orchestrator.gateway.fairqueue import Ticket
from orchestrator.gateway.queueing import ModelQueue, Queues, queue_view
from orchestrator.metrics import GatewayMetrics
from orchestrator.spec import CLASSES, FleetSpec, FleetValidationError, ModelSpec


def make_spec(**overrides) -> ModelSpec:
    data = {"name": "m", "source": "/models/m", "resources": {"accelerator": "cpu"}}
    data.update(overrides)
    return ModelSpec.model_validate(data)


def fleet(data: dict) -> FleetSpec:
    """The fleet's own validation, without parse_fleet's engine-argument checks (they load vLLM)."""
    return FleetSpec.model_validate(data)


def model_queue(per_replica: int | None = 4, reserve: int | None = 1, gateways: int = 1, **overrides) -> ModelQueue:
    queue = {"max_concurrency_per_replica": per_replica, "interactive_reserve": reserve}
    return ModelQueue(make_spec(queue={k: v for k, v in queue.items() if v is not None}, **overrides), gateways)


def ticket(key: str = "a", cls: str = "standard", cost: float = 10) -> Ticket:
    return Ticket(key, cls, cost)


# -- one model's queue -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("running", "gateways", "per_replica", "reserve", "overrides", "expected"),
    [
        (None, 1, 4, 1, {}, (None, 0)),  # replicas not known yet: no bound
        (0, 1, 4, 1, {}, (1, 0)),  # none running: one goes on to wake the model through Serve, the rest wait
        (1, 1, 4, 1, {}, (4, 1)),
        (3, 2, 4, 1, {}, (6, 2)),  # ceil(3 x 4 / 2); ceil(3 x 1 / 2)
        (1, 2, 4, 1, {}, (2, 1)),
        (1, 4, 4, 1, {}, (1, 0)),  # a single slot is never reserved
        (2, 1, 1, None, {}, (2, 0)),  # a bound of 1 per replica: no default reserve
        (1, 1, 16, None, {}, (16, 2)),  # default reserve: an eighth
        (1, 1, None, None, {}, (128, 16)),  # default bound on CPU: vLLM's max_num_seqs
        (2, 1, None, None, {"engine": {"max_num_seqs": 10}}, (20, 2)),
        (1, 1, 4, 9, {}, (4, 3)),  # a reserve past the bound keeps one slot for the rest
    ],
)
def test_bound_from_running_and_gateway_replicas(running, gateways, per_replica, reserve, overrides, expected):
    q = model_queue(per_replica, reserve, gateways, **overrides)
    q.set_running(running)
    assert (q.limit, q.reserve) == expected


def test_the_reserve_is_for_interactive_requests_only():
    async def scenario():
        q = model_queue(4, 1)
        q.set_running(1)
        s = [ticket("a") for _ in range(4)]
        assert [q.push(t) for t in s[:3]] == [True, True, True]
        assert not q.push(s[3])  # the fourth slot is kept for interactive
        assert q.allowed() == ("interactive",)
        i1, i2 = ticket("i", "interactive"), ticket("i", "interactive")
        assert q.push(i1) and not q.push(i2)
        assert q.allowed() == () and q.in_flight == 4
        q.release(s[0])  # strict priority: the waiting interactive request goes first
        assert i2.state == "granted" and s[3].state == "waiting"
        q.release(s[1])  # a free slot, but the reserved one
        assert s[3].state == "waiting" and q.in_flight == 3
        q.release(s[2])
        assert s[3].state == "granted" and q.in_flight == 3

    asyncio.run(scenario())


def test_release_frees_a_slot_and_dispatches_the_next_in_order():
    async def scenario():
        q = model_queue(1, None)
        q.set_running(1)
        first = ticket("a")
        assert q.push(first)
        a2, a3, b1 = ticket("a"), ticket("a"), ticket("b")
        assert not any([q.push(a2), q.push(a3), q.push(b1)])
        waiters = {t: asyncio.ensure_future(q.wait(t, 10)) for t in (a2, a3, b1)}
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters.values())
        order = []
        holder = first
        for _ in range(3):
            q.release(holder)
            holder = next(t for t in (a2, a3, b1) if t.state == "granted" and t not in order)
            order.append(holder)
            assert await waiters[holder] is True and q.in_flight == 1
        assert [t.key for t in order] == ["b", "a", "a"] and order[1] is a2  # b's first, then a's FIFO
        assert order[1].overtaken == 1 and order[2].overtaken == 2
        q.release(holder)
        q.release(holder)  # twice: counted once
        assert q.in_flight == 0 and len(q.fair) == 0

    asyncio.run(scenario())


def test_a_cancelled_waiter_is_taken_out_by_its_release():
    async def scenario():
        q = model_queue(1, None)
        q.set_running(1)
        holder, gone, next_one = ticket("a"), ticket("b"), ticket("c")
        assert q.push(holder) and not q.push(gone) and not q.push(next_one)
        waiter = asyncio.ensure_future(q.wait(gone, 10))
        await asyncio.sleep(0)
        waiter.cancel()  # the client left
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        q.release(gone)
        assert gone.state == "removed" and len(q.fair) == 1
        q.release(holder)
        assert next_one.state == "granted" and gone.state == "removed" and q.in_flight == 1
        # Granted just before its client left: its release frees the slot it got.
        late = ticket("d")
        assert not q.push(late)
        waiter = asyncio.ensure_future(q.wait(late, 10))
        await asyncio.sleep(0)
        q.release(next_one)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        assert late.state == "granted" and q.in_flight == 1
        q.release(late)
        assert q.in_flight == 0

    asyncio.run(scenario())


def test_a_key_served_while_the_model_was_idle_is_not_held_back_for_it():
    """a's long request ran while nothing else did; later b fills the model. a's next request
    waits for the next slot, not behind b's next 8000 tokens."""

    async def scenario():
        q = model_queue(1, None)
        q.set_running(1)
        a1 = ticket("a", cost=8000)
        assert q.push(a1)
        q.release(a1)  # done: the model is idle
        b = [ticket("b", cost=100) for _ in range(3)]
        assert q.push(b[0]) and not q.push(b[1]) and not q.push(b[2])
        a2 = ticket("a", cost=100)
        assert not q.push(a2)
        q.release(b[0])
        assert a2.state == "granted" and a2.overtaken == 0

    asyncio.run(scenario())


def test_unknown_running_replicas_mean_no_bound_and_zero_means_everything_waits():
    async def scenario():
        q = model_queue(1, None)
        q.set_running(None)
        assert q.allowed() == CLASSES
        assert all(q.push(ticket(str(n % 7))) for n in range(300))
        q = model_queue(4, 1)
        q.set_running(0)
        assert q.push(first := ticket("first", "batch"))  # one goes on to Serve's handle, which wakes the model
        waiting = [ticket("a", c) for c in CLASSES]
        assert not any(q.push(t) for t in waiting)  # the rest wait, interactive too
        waiter = asyncio.ensure_future(q.wait(waiting[2], 10))
        q.release(first)
        assert [t.state for t in waiting] == ["granted", "waiting", "waiting"]  # the slot, in class order
        q.set_running(1)  # a replica is up: the bound takes them in class order
        assert [t.state for t in waiting] == ["granted"] * 3 and await waiter is True

    asyncio.run(scenario())


# -- every model's queues at a gateway replica ----------------------------------------------------

FLEET = {
    "models": [
        {
            "name": "m",
            "source": "/models/m",
            "resources": {"accelerator": "cpu"},
            "queue": {"max_concurrency_per_replica": 1},
        },
        {"name": "off", "source": "/models/off", "resources": {"accelerator": "cpu"}, "queue": {"enabled": False}},
    ],
    "gateway": {"classes": {"batch": {"max_wait_s": 0.05}}},
}


def test_past_its_class_max_wait_a_request_gets_503_model_overloaded():
    metrics = GatewayMetrics()

    async def scenario():
        queues = Queues(fleet(FLEET), metrics, {"m": 1}.get)
        assert queues.max_wait_s == {"interactive": 30, "standard": 120, "batch": 0.05}
        holder = queues.enter("m", "a", "batch", 10, 1.0)
        assert holder.state == "granted"
        late = queues.enter("m", "b", "batch", 10, 1.0)
        with pytest.raises(errors.Overloaded) as raised:
            while not await queues.wait("m", late, 10):
                pass
        e = raised.value
        assert (e.status, e.code, e.headers) == (503, "model_overloaded", {"Retry-After": "5"})
        assert "batch" in e.message and "gateway.classes.batch.max_wait_s" in e.message
        assert late.state == "removed" and queues.stats()["m"]["batch"]["queued"] == 0
        # A shorter wait than the class allows ends without an error: the caller waits again.
        standard = queues.enter("m", "c", "standard", 10, 1.0)
        assert await queues.wait("m", standard, 0.01) is False and standard.state == "waiting"
        queues.release("m", holder)
        assert await queues.wait("m", standard, 0.01) is True
        queues.release("m", standard)
        assert queues.stats()["m"]["in_flight"] == 0

    asyncio.run(scenario())
    sample = metrics.registry.get_sample_value
    assert sample("slm_queue_timeouts_total", {"model": "m", "class": "batch"}) == 1
    assert sample("slm_queue_wait_seconds_count", {"model": "m", "class": "standard"}) == 1
    assert sample("slm_queued_requests", {"model": "m", "class": "standard"}) == 0


def test_a_disabled_queue_or_unknown_model_lets_everything_through():
    async def scenario():
        queues = Queues(fleet(FLEET), None, {"m": 0, "off": 0}.get)
        assert queues.enter("off", "a", "standard", 10, 1.0) is None
        assert queues.enter("nope", "a", "standard", 10, 1.0) is None
        queues.release("off", None)
        queues.release("m", None)
        assert set(queues.stats()) == {"m"}

    asyncio.run(scenario())


def test_queues_follow_the_running_replicas():
    async def scenario():
        running: dict[str, int | None] = {"m": None}
        queues = Queues(fleet(FLEET), None, running.get)
        first = [queues.enter("m", "a", "standard", 10, 1.0) for _ in range(3)]
        assert all(t.state == "granted" for t in first)  # not known yet: no bound
        for t in first:
            queues.release("m", t)
        running["m"] = 0
        waking = queues.enter("m", "a", "batch", 10, 1.0)
        assert waking.state == "granted"  # one per gateway replica goes on to wake the model
        cold = queues.enter("m", "a", "interactive", 10, 1.0)
        assert cold.state == "waiting"
        queues.max_wait_s["interactive"] = 0.005
        assert await queues.wait("m", cold, 0.02) is False  # a cold start's wait is not max_wait_s's
        assert cold.cold_s >= 0.015
        queues.max_wait_s["interactive"] = 30
        queues.release("m", waking)
        running["m"] = 1  # a replica came up: the next wait sees it
        assert await queues.wait("m", cold, 0.01) is True
        assert queues.stats()["m"]["limit"] == 1

    asyncio.run(scenario())


def test_reports_while_anything_waits_or_runs_and_once_after(monkeypatch):
    monkeypatch.setattr(queueing, "REPORT_S", 0.001)
    reports = []

    async def until(done) -> None:
        for _ in range(2000):
            if reports and done(reports[-1]["m"]):
                return
            await asyncio.sleep(0.001)
        raise AssertionError(f"no such report: {reports[-1:]}")

    async def scenario():
        queues = Queues(fleet(FLEET), None, {"m": 1}.get, reports.append)
        holder = queues.enter("m", "a", "standard", 10, 1.0)
        await until(lambda m: m["in_flight"] == 1)  # running counts: /fleet shows it
        waiting = queues.enter("m", "b", "standard", 10, 1.0)
        await until(lambda m: m["standard"]["queued"] == 1)
        assert (reports[-1]["m"]["in_flight"], reports[-1]["m"]["limit"]) == (1, 1)
        queues.release("m", holder)
        assert waiting.state == "granted"
        queues.release("m", waiting)
        await until(lambda m: m["in_flight"] == 0)
        assert reports[-1]["m"] == {
            "interactive": {"queued": 0, "oldest_wait_s": 0.0},
            "standard": {"queued": 0, "oldest_wait_s": 0.0},
            "batch": {"queued": 0, "oldest_wait_s": 0.0},
            "in_flight": 0,
            "limit": 1,
        }
        count = len(reports)
        await asyncio.sleep(0.01)
        assert len(reports) == count  # idle: the loop has stopped

    asyncio.run(scenario())


def test_queue_view_shape():
    spec = make_spec(
        queue={"max_concurrency_per_replica": 16}, autoscaling={"scale_up_classes": ["interactive", "standard"]}
    )
    reported = {"gateways": 2, "interactive": {"queued": 3, "oldest_wait_s": 1.5}, "batch": {"queued": 7}}
    assert queue_view(spec, {**reported, "in_flight": 5, "limit": 32})["in_flight"] == 5
    assert queue_view(spec, reported) == {
        "enabled": True,
        "max_concurrency_per_replica": 16,
        "interactive_reserve": 2,
        "classes": {
            "interactive": {"queued": 3, "oldest_wait_s": 1.5},
            "standard": {"queued": 0, "oldest_wait_s": 0.0},
            "batch": {"queued": 7, "oldest_wait_s": 0.0},
        },
        "scale_up_classes": ["interactive", "standard"],
        "in_flight": 0,
        "limit": 0,
        "gateways_reporting": 2,
    }
    off = queue_view(make_spec(queue={"enabled": False}), None)
    assert off["enabled"] is False and off["max_concurrency_per_replica"] == 128
    assert off["classes"]["batch"] == {"queued": 0, "oldest_wait_s": 0.0}
    assert off["scale_up_classes"] == list(CLASSES)


# -- a request's class ---------------------------------------------------------------------------------


def key(priority: str) -> KeyRecord:
    return KeyRecord(f"k-{priority}", b"", b"", ("*",), None, None, False, priority=priority)


@pytest.mark.parametrize(
    ("own", "header", "tier", "expected"),
    [
        ("interactive", None, None, "interactive"),
        ("standard", None, None, "standard"),
        ("batch", None, None, "batch"),
        (None, None, None, "standard"),  # anonymous (no auth)
        ("interactive", "standard", None, "standard"),  # lowered by the header
        ("interactive", " Batch ", None, "batch"),
        ("interactive", None, "flex", "batch"),  # lowered by service_tier
        ("standard", None, "flex", "batch"),
        ("interactive", None, "priority", "interactive"),
        ("interactive", None, "auto", "interactive"),  # auto, default, scale: the key's own
        ("batch", None, "default", "batch"),
        ("standard", None, "scale", "standard"),
        ("standard", None, None, "standard"),
        ("batch", "interactive", None, "batch"),  # raising attempts: the key's own
        ("standard", "interactive", None, "standard"),
        ("standard", None, "priority", "standard"),
        ("batch", None, "priority", "batch"),
        (None, "interactive", "priority", "standard"),
        ("interactive", "standard", "flex", "batch"),  # both: the lowest
        ("standard", "batch", "priority", "batch"),
        ("interactive", "batch", "auto", "batch"),
    ],
)
def test_request_class(own, header, tier, expected):
    headers = {} if header is None else {"x-slm-priority": header}
    payload = {"model": "m"} if tier is None else {"model": "m", "service_tier": tier}
    assert request_class(key(own) if own else None, headers, payload) == expected


@pytest.mark.parametrize(
    ("header", "tier", "param"),
    [
        ("urgent", None, None),
        ("", None, None),
        ("priority", None, None),  # a service_tier value is not a class
        (None, "premium", "service_tier"),
        (None, "Priority", "service_tier"),
        (None, 1, "service_tier"),
        (None, "", "service_tier"),
    ],
)
def test_request_class_refuses_unknown_values(header, tier, param):
    headers = {} if header is None else {"x-slm-priority": header}
    payload = {"model": "m"} if tier is None else {"model": "m", "service_tier": tier}
    with pytest.raises(errors.InvalidRequest) as raised:
        request_class(key("interactive"), headers, payload)
    assert raised.value.status == 400 and raised.value.param == param


@pytest.mark.parametrize("tier", [["priority"], {"tier": "flex"}])
def test_an_unhashable_service_tier_is_a_400(tier):
    with pytest.raises(errors.InvalidRequest):
        request_class(None, {}, {"model": "m", "service_tier": tier})


# -- the class reaches vLLM as the request priority ------------------------------------------------------

KEYS = {
    "interactive": "sk-int-0123456789abcdef",
    "standard": "sk-std-0123456789abcdef",
    "batch": "sk-bat-0123456789abcdef",
}


def request(body: dict, headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw}, receive)


@pytest.fixture
def admission(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n" + "".join(f"  - {{name: {c}, key: {k}, priority: {c}}}\n" for c, k in KEYS.items()))
    spec = fleet(
        {
            "models": [
                {"name": "m", "source": "/models/m", "resources": {"accelerator": "cpu"}},
                {
                    "name": "f",
                    "source": "/models/f",
                    "resources": {"accelerator": "cpu"},
                    "engine": {"scheduling_policy": "fcfs"},
                },
            ],
            "gateway": {"auth": {"keys_file": str(keys)}},
        }
    )
    return Admission(spec, None, None)


async def no_capacity_check(spec):
    return None


@pytest.mark.parametrize(
    ("key_class", "header", "tier", "expected"),
    [
        ("interactive", None, None, "interactive"),
        ("standard", None, None, "standard"),
        ("batch", None, None, "batch"),
        ("interactive", "batch", None, "batch"),
        ("interactive", None, "flex", "batch"),
        ("batch", "interactive", "priority", "batch"),
    ],
)
def test_the_class_becomes_the_engine_priority(admission, key_class, header, tier, expected):
    headers = {"authorization": f"Bearer {KEYS[key_class]}"} | ({"x-slm-priority": header} if header else {})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "priority": -100}
    if tier:
        body["service_tier"] = tier
    ctx, payload, _, _ = asyncio.run(admission.enter(request(body, headers), "chat", no_capacity_check))
    assert ctx.cls == expected and payload["priority"] == ENGINE_PRIORITY[expected]
    assert ctx.cost > 0


def test_an_fcfs_engine_gets_no_priority_even_the_clients_own(admission):
    headers = {"authorization": f"Bearer {KEYS['interactive']}"}
    body = {"model": "f", "messages": [{"role": "user", "content": "hi"}], "priority": -100}
    ctx, payload, spec, _ = asyncio.run(admission.enter(request(body, headers), "chat", no_capacity_check))
    assert not spec.priority_scheduling and "priority" not in payload and ctx.cls == "interactive"


def test_a_bad_class_header_is_a_400_at_admission(admission):
    headers = {"authorization": f"Bearer {KEYS['batch']}", "x-slm-priority": "urgent"}
    body = {"model": "m", "messages": []}
    with pytest.raises(errors.InvalidRequest, match="x-slm-priority"):
        asyncio.run(admission.enter(request(body, headers), "chat", no_capacity_check))


# -- the fleet state and the autoscaler ----------------------------------------------------------------------


def report(interactive: int, standard: int, batch: int, oldest: float = 1.0) -> dict:
    return {
        c: {"queued": n, "oldest_wait_s": oldest} for c, n in zip(CLASSES, (interactive, standard, batch), strict=True)
    } | {"in_flight": 4, "limit": 4}


def test_fleet_state_sums_fresh_gateway_reports_and_drops_old_ones(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(fleet_state, "time", types.SimpleNamespace(time=lambda: now[0]))
    state = FleetState()
    assert state.gateway_queues() == {} and state.gateway_queue("m") == {}
    state.record_gateway_queue("g1", {"m": report(1, 2, 3, oldest=4.0), "n": report(0, 0, 5)})
    now[0] += 3
    state.record_gateway_queue("g2", {"m": report(1, 0, 10, oldest=2.5)})
    state.record_gateway_queue("g2", {"m": report(2, 0, 10, oldest=2.5)})  # a newer report replaces it
    view = state.gateway_queues()
    assert view["m"] == {
        "gateways": 2,
        "in_flight": 8,
        "limit": 8,
        "interactive": {"queued": 3, "oldest_wait_s": 4.0},
        "standard": {"queued": 2, "oldest_wait_s": 4.0},
        "batch": {"queued": 13, "oldest_wait_s": 4.0},
    }
    assert view["n"]["gateways"] == 1 and view["n"]["batch"]["queued"] == 5
    assert state.gateway_queue("m") == {"interactive": 3, "standard": 2, "batch": 13}
    assert state.snapshot()["m"]["gateway_queue"] == view["m"]
    now[0] += 2.5  # g1's report is 5.5 s old: that replica is gone (or stuck)
    assert state.gateway_queue("m") == {"interactive": 2, "standard": 0, "batch": 10}
    assert "n" not in state.gateway_queues()
    now[0] += 10
    assert state.gateway_queue("m") == {} and "gateway_queue" not in state.snapshot().get("m", {})
    with pytest.raises(TypeError, match="not a dict"):
        state.record_gateway_queue("g3", [1, 2])


def policy_context(running: int, target: int, engine_queue: float | None) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        aggregated_metrics={"queue_depth": {"r1": engine_queue}} if engine_queue is not None else {},
        total_queued_requests=0,
        total_num_requests=0,
        current_num_replicas=running,
        target_num_replicas=target,
    )


ALL = list(CLASSES)
NO_BATCH = ["interactive", "standard"]


@pytest.mark.parametrize(
    ("scale_up", "running", "target", "engine", "waiting", "expected"),
    [
        (ALL, 1, 1, 3.0, None, 3),
        (ALL, 1, 1, 3.0, {"interactive": 2, "standard": 3, "batch": 4}, 12),
        (NO_BATCH, 1, 1, 3.0, {"interactive": 2, "standard": 3, "batch": 4}, 8),  # a batch backlog buys nothing
        (NO_BATCH, 1, 1, 0.0, {"batch": 40}, 0),
        (["interactive"], 2, 2, 1.0, {"interactive": 5, "standard": 6}, 6),
        (NO_BATCH, 0, 0, None, {"batch": 4}, 1),  # at zero: any waiting request wakes the model
        (NO_BATCH, 0, 0, None, {"batch": 0}, 0),
        (ALL, 0, 0, None, {}, 0),
        (ALL, 0, 0, None, {"interactive": 3}, 3),
        (NO_BATCH, 0, 1, None, {"batch": 4}, 0),  # one already starting: nothing more
    ],
)
def test_the_autoscaler_counts_waiting_requests_of_scale_up_classes(
    scale_up, running, target, engine, waiting, expected
):
    spec = make_spec(autoscaling={"scale_up_classes": scale_up, "min_replicas": 0})
    policy = QueueDepthPolicy("m", spec.autoscaling.model_dump(mode="json"))
    obs = policy.observe(policy_context(running, target, engine), waiting)
    assert (obs.queue_depth, obs.running, obs.starting) == (expected, running, max(0, target - running))


# -- keys -------------------------------------------------------------------------------------------------


def test_keys_carry_priority_weight_and_daily_tokens():
    store = parse_keys(
        {
            "keys": [
                {
                    "name": "a",
                    "key": "sk-a-0123456789abcdef",
                    "priority": "batch",
                    "weight": 2.5,
                    "tokens_per_day": 1000,
                },
                {"name": "b", "key": "sk-b-0123456789abcdef"},
            ]
        },
        "keys.yaml",
    )
    a, b = store.authenticate("sk-a-0123456789abcdef"), store.authenticate("sk-b-0123456789abcdef")
    assert (a.priority, a.weight, a.tokens_per_day) == ("batch", 2.5, 1000)
    assert (b.priority, b.weight, b.tokens_per_day) == ("standard", 1.0, None)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("priority", "urgent"),
        ("priority", "Interactive"),
        ("priority", None),
        ("weight", 0),
        ("weight", -1),
        ("weight", 1001),
        ("weight", "heavy"),
        ("tokens_per_day", 0),
    ],
)
def test_bad_tenancy_fields_of_a_key_are_named(field, value):
    with pytest.raises(FleetValidationError) as raised:
        parse_keys({"keys": [{"name": "a", "key": "sk-a-0123456789abcdef", field: value}]}, "keys.yaml")
    assert f"keys[0].{field}" in str(raised.value)


def test_the_default_reserve_holds_slots_only_while_some_key_is_interactive():
    default = ModelQueue(make_spec(queue={"max_concurrency_per_replica": 8}), 1)
    default.interactive_keys = False
    default.set_running(1)
    assert (default.limit, default.reserve) == (8, 0)  # no interactive key: standard may use all 8
    default.interactive_keys = True
    default.set_running(1)
    assert (default.limit, default.reserve) == (8, 1)
    explicit = ModelQueue(make_spec(queue={"max_concurrency_per_replica": 8, "interactive_reserve": 2}), 1)
    explicit.interactive_keys = False
    explicit.set_running(1)
    assert explicit.reserve == 2  # set in the fleet: always kept


def test_queues_ask_whether_an_interactive_key_exists():
    fleet = FleetSpec.model_validate({"models": [{"name": "m", "source": "/tmp", "queue":
                                                  {"max_concurrency_per_replica": 8}}]})
    keys = parse_keys({"keys": [{"name": "a", "key": "k" * 16}]}, "keys")
    assert not keys.interactive
    assert parse_keys({"keys": [{"name": "a", "key": "k" * 16, "priority": "interactive"}]}, "keys").interactive
    queues = Queues(fleet, None, lambda model: 1, interactive_keys=lambda: keys.interactive)

    async def scenario():
        queues.enter("m", "a", "standard", 10, 1.0)
        assert queues.queues["m"].reserve == 0

    asyncio.run(scenario())
