"""Autoscaling, routing, scale-from-zero and draining, end to end: real Ray Serve, real vLLM
(CPU) serving a tiny random model, real HTTP and the official `openai` client.

The tests run in file order on one stack: the burst leaves two replicas running, which
the prefix-affinity test uses, and the drain test rides the scale-down that follows.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sse import sse_lines

pytestmark = pytest.mark.integration

SCALE = "tiny"
ZERO = "tiny-zero"
NEVER = "tiny-no-gpu"
DOWNSCALE_DELAY_S = 20


# The drain test's streams: long enough that a wave of four outlasts DOWNSCALE_DELAY_S on a
# fast machine too (3,500-token waves took under 20 s in one CI run), so the tiny model here
# has an 8k context.
STREAM_TOKENS = 7500


@pytest.fixture(scope="module")
def scaling_stack(tmp_path_factory, tiny_model):
    from conftest import run_stack

    from orchestrator.devtools.tiny_model import build

    long_model = build(tiny_model.parent / "tiny-llama-2x128-8k", max_len=8192)
    d = tmp_path_factory.mktemp("scaling")
    engine = {"max_model_len": 4096, "max_num_seqs": 32, "enforce_eager": True}
    fleet = {
        "models": [
            {"name": SCALE, "source": str(long_model), "engine": {**engine, "max_model_len": 8192},
             "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_queue_depth": 4, "upscale_delay_s": 1,
                             "downscale_delay_s": DOWNSCALE_DELAY_S, "drain_timeout_s": 300},
             "routing": {"policy": "prefix-affinity", "prefix_chars": 200}},
            {"name": ZERO, "source": str(tiny_model), "engine": {**engine, "max_model_len": 1024},
             "autoscaling": {"min_replicas": 0, "max_replicas": 1, "idle_timeout_s": 8,
                             "cold_start_timeout_s": 400}},
            # Asks for a GPU this machine does not have: it can never start.
            {"name": NEVER, "source": str(tiny_model), "resources": {"accelerator": "gpu"},
             "autoscaling": {"min_replicas": 0, "max_replicas": 1, "cold_start_timeout_s": 3}},
        ],
    }
    path = d / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    with run_stack(d, path) as s:
        yield s


@pytest.fixture(scope="module")
def http(scaling_stack):
    with httpx.Client(base_url=scaling_stack.url, timeout=600) as c:
        yield c


@pytest.fixture(scope="module")
def client(scaling_stack):
    return openai.OpenAI(base_url=f"{scaling_stack.url}/v1", api_key="unused", max_retries=0, timeout=600)


def model_view(http, name: str) -> dict:
    return next(m for m in http.get("/fleet").json()["models"] if m["name"] == name)


def wait_for(http, name: str, predicate, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        view = model_view(http, name)
        if predicate(view):
            return view
        if time.monotonic() > deadline:
            pytest.fail(f"{name}: {what} not reached within {timeout_s:.0f}s; last view: {json.dumps(view)}")
        time.sleep(0.5)


def picks(http, model: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if s.name == "slm_router_picks_total" and s.labels["model"] == model:
                out[s.labels["replica"]] = s.value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


# -- visibility and zero ------------------------------------------------------------------


def test_fleet_shows_queue_replicas_decision_and_policy(http):
    view = model_view(http, SCALE)
    assert view["routing"] == {"policy": "prefix-affinity"}
    assert view["replicas"]["running"] == 1 and view["replicas"]["target"] == 1
    assert view["queue_depth"] == 0
    decision = wait_for(http, SCALE, lambda v: v["autoscaling"]["last_decision"], 30, "a decision")[
        "autoscaling"]["last_decision"]
    assert decision["direction"] == "hold" and "queue 0" in decision["reason"]
    # A model at zero by design does not make the gateway unready.
    assert model_view(http, ZERO)["replicas"]["running"] == 0
    assert http.get("/ready").status_code == 200


def test_slm_status_shows_the_autoscaler(scaling_stack):
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "--url", scaling_stack.url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "prefix-affinity" in out.stdout and "queue" in out.stdout.lower()
    assert ZERO in out.stdout and "hold" in out.stdout


def test_request_to_a_model_at_zero_is_held_with_keepalives_then_answered(http, client):
    body = {"model": ZERO, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "stream": True}
    started = time.monotonic()
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    waited = time.monotonic() - started
    comments = [b for b in text.split("\n\n") if b.startswith(":")]
    assert comments and "waiting for a replica" in comments[0], text[:300]
    assert text.rstrip().endswith("data: [DONE]")
    assert '"finish_reason":"length"' in text.replace(" ", "")
    assert waited > 2, "the model was at zero: its first answer needed a replica to start"
    # /fleet caches Serve's replica states for a second: it may lag the stream by that much.
    wait_for(http, ZERO, lambda v: v["replicas"]["running"] == 1, 10, "the started replica in /fleet")
    # Now warm: the official client gets a plain answer.
    answer = client.chat.completions.create(model=ZERO, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert answer.choices[0].finish_reason == "length"


def test_idle_model_returns_to_zero(http):
    view = wait_for(http, ZERO, lambda v: v["replicas"]["running"] == 0 and v["replicas"]["target"] == 0, 120,
                    "scale to zero after idle_timeout_s")
    assert view["autoscaling"]["last_scale"]["direction"] == "down"
    assert "idle" in view["autoscaling"]["last_scale"]["reason"]
    assert http.get("/ready").status_code == 200


def test_cold_start_timeout_is_a_503_with_retry_after(http, client):
    started = time.monotonic()
    resp = http.post("/v1/chat/completions",
                     json={"model": NEVER, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert resp.status_code == 503, resp.text
    assert int(resp.headers["retry-after"]) > 0
    error = resp.json()["error"]
    assert error["code"] == "model_not_ready" and "cold start" in error["message"]
    assert time.monotonic() - started >= 3, "held for cold_start_timeout_s before giving up"
    # Streaming: keep-alives, then the same error as an SSE event the openai SDK raises.
    with pytest.raises(openai.APIError) as info:
        stream = client.chat.completions.create(model=NEVER, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3, stream=True)
        list(stream)
    assert "cold start" in str(info.value)


# -- burst, routing, draining ------------------------------------------------------------


def burst_to_two_replicas(http, client) -> tuple[dict, dict, float, int]:
    """16 closed-loop clients until SCALE runs two replicas: (the view at the scale-up
    decision, the view with two running, seconds until the decision, requests done)."""
    stop = threading.Event()

    def worker(i: int) -> int:
        n = 0
        while not stop.is_set():
            client.chat.completions.create(model=SCALE, messages=[{"role": "user", "content": f"burst {i} {n}"}],
                                           max_tokens=400, extra_body={"ignore_eos": True})
            n += 1
        return n

    started = time.monotonic()
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(worker, i) for i in range(16)]
        try:
            up = wait_for(http, SCALE, lambda v: v["replicas"]["target"] == 2, 60, "a scale-up decision")
            decided_after = time.monotonic() - started
            view = wait_for(http, SCALE, lambda v: v["replicas"]["running"] == 2, 400, "two running replicas")
        finally:
            stop.set()
        done = sum(f.result() for f in futures)
    return up, view, decided_after, done


def test_burst_scales_from_one_to_two_replicas(http, client):
    up, view, decided_after, done = burst_to_two_replicas(http, client)
    scale = up["autoscaling"]["last_scale"]
    assert scale["direction"] == "up" and scale["from"] == 1 and scale["to"] == 2, scale
    assert "queue" in scale["reason"]
    assert view["replicas"]["target"] == 2, "never more than max_replicas"
    assert done > 0
    print(f"scale-up decided {decided_after:.1f}s after the burst began")


def test_prefix_affinity_sticks_to_one_replica_until_its_bound(http, client):
    assert model_view(http, SCALE)["replicas"]["running"] == 2
    system = "You are a support agent for a serving platform. " * 30  # long shared prefix

    def ask(question: str, max_tokens: int = 4):
        return client.chat.completions.create(
            model=SCALE, max_tokens=max_tokens, extra_body={"ignore_eos": True},
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])

    before = picks(http, SCALE)
    for i in range(6):
        ask(f"question {i}")
    sequential = delta(picks(http, SCALE), before)
    assert list(sequential.values()) == [6], f"one replica takes a shared prefix while under its bound: {sequential}"
    home = next(iter(sequential))

    # The gateway's router learns of the second replica through Serve's long poll, which can
    # trail the controller's RUNNING on a loaded machine: a burst that finds one candidate
    # is tried again, up to three times.
    bursts = []
    for _ in range(3):
        before = picks(http, SCALE)
        with cf.ThreadPoolExecutor(12) as pool:
            list(pool.map(lambda i: ask(f"concurrent {i}", 150), range(12)))
        bursts.append(burst := delta(picks(http, SCALE), before))
        if len(burst) == 2:
            break
        time.sleep(5)
    assert len(burst) == 2, f"a hot prefix spills over once its replica is past the bound: {bursts}"
    # Which side gets more of the burst is not asserted: on 2 shared cores the busy home
    # replica can miss Serve's 0.1 s queue-length probe deadline, and Serve then sends the
    # request to the next-ranked replica (seen on a fresh machine: home 4, other 8).
    print(f"burst of 12: {burst} (home {home})")


def test_streams_in_flight_survive_scale_down(http, client):
    """Waves of four long streams, two replicas each carrying some, until the scale-down
    happens during a wave; every stream of every wave must finish whole. (How long a
    stream lasts depends on the machine and the serving path, so the test does not bet on
    one wave outlasting the downscale delay.)"""
    results: list[tuple[int, str, bool]] = []

    def stream(i: int):
        tokens, finish, done = 0, None, False
        try:
            with http.stream("POST", "/v1/completions", json={
                "model": SCALE, "prompt": f"stream number {i} about draining", "max_tokens": STREAM_TOKENS,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            }) as r:
                assert r.status_code == 200
                for line in sse_lines(r):
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        assert "error" not in event, event
                        if event.get("usage"):
                            tokens = event["usage"]["completion_tokens"]
                        for choice in event.get("choices", []):
                            finish = choice.get("finish_reason") or finish
        except Exception as e:  # noqa: BLE001 - a thread's exception would only warn: record it
            finish = f"{type(e).__name__}: {e}"[:300]
        results.append((tokens, finish, done))

    seen_drain, waves = False, 0
    while not seen_drain:
        assert waves < 8, "no scale-down happened during eight waves of streams"
        view = model_view(http, SCALE)
        if view["replicas"]["running"] < 2 or view["replicas"]["target"] < 2:
            # The scale-down happened between waves (or before the first): scale up again.
            wait_for(http, SCALE, lambda v: v["replicas"]["running"] == 1 and v["replicas"]["draining"] == 0, 120,
                     "the scale-down in progress to finish")
            burst_to_two_replicas(http, client)
        before = picks(http, SCALE)
        threads = [threading.Thread(target=stream, args=(4 * waves + i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        # Both replicas carry a stream, so whichever one leaves, it leaves with a stream in flight.
        both = model_view(http, SCALE)["replicas"]["running"] == 2 and len(delta(picks(http, SCALE), before)) == 2
        while any(t.is_alive() for t in threads):
            view = model_view(http, SCALE)
            if both and view["replicas"]["target"] == 1 and view["replicas"]["draining"] >= 1:
                seen_drain = True
            time.sleep(0.5)
        for t in threads:
            t.join()
        waves += 1
        print(f"wave {waves}: both replicas carried streams: {both}; drain seen: {seen_drain}")
    assert results == [(STREAM_TOKENS, "length", True)] * (4 * waves), results
    view = wait_for(http, SCALE, lambda v: v["replicas"]["running"] == 1 and v["replicas"]["draining"] == 0, 120,
                    "back to one replica")
    assert view["autoscaling"]["last_scale"]["direction"] == "down"
