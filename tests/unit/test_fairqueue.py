"""The fair queue's order, as a table: strict priority between classes, start-time fair
queuing on estimated tokens between keys of a class (weights), FIFO within a key, leaving
clients, idle keys without saved-up credit; then ``allowed``, ``expired``, ``overtaken`` and
``stats`` against a fake clock, and the noisy-neighbour property. Pure logic: no Ray, no
event loop."""

from __future__ import annotations

import itertools
import random

import pytest

from orchestrator.gateway.fairqueue import FairQueue, Ticket
from orchestrator.spec import CLASSES


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def push(key: str, cls: str = "standard", cost: float = 100, weight: float = 1.0, n: int = 1) -> list[tuple]:
    return [("push", key, cls, cost, weight)] * n


def run(ops: list) -> list[str]:
    """Apply ``ops`` to a new queue and return the pop order, as labels ``<key><n>`` (the key's
    n-th push, counting from 1). An op is ``("push", key, cls, cost, weight)``, ``"pop"`` (one
    pop, recorded), ``"-a2"`` (a2's client leaves) or ``"idle"`` (nothing waits or runs any more);
    the queue is drained at the end."""
    q = FairQueue(clock=Clock())
    tickets: dict[str, Ticket] = {}
    counts: dict[str, int] = {}
    order: list[str] = []
    labels: dict[int, str] = {}

    def pop() -> None:
        t = q.pop(CLASSES)
        assert t is not None, "pop on an empty queue"
        order.append(labels[id(t)])

    for op in ops:
        if op == "pop":
            pop()
        elif op == "idle":
            q.idle()
        elif isinstance(op, str) and op.startswith("-"):
            assert q.remove(tickets[op[1:]])
        else:
            _, key, cls, cost, weight = op
            counts[key] = counts.get(key, 0) + 1
            label = f"{key}{counts[key]}"
            t = q.push(Ticket(key, cls, cost, weight))
            tickets[label], labels[id(t)] = t, label
    while len(q):
        pop()
    assert q.pop(CLASSES) is None
    return order


CASES = {
    # Strict priority: a cheap, early batch request still waits for every higher class.
    "strict priority between classes": (
        push("b", "batch", 1) + push("s", "standard", 5000, n=2) + push("i", "interactive", 9000, 0.01),
        "i1 s1 s2 b1",
    ),
    "strict priority over a long standard backlog": (
        push("s", n=5) + ["pop", "pop"] + push("i", "interactive") + push("b", "batch", 1),
        "s1 s2 i1 s3 s4 s5 b1",
    ),
    # FIFO within a key: a key's small request does not pass its own earlier big one.
    "fifo within a key": (push("a", cost=900) + push("a", cost=10) + push("a", cost=300), "a1 a2 a3"),
    # Equal weights share tokens, not requests: 4 requests of 128 for each one of 512.
    "equal weights alternate by cost": (
        push("a", cost=512, n=4) + push("b", cost=128, n=8),
        "a1 b1 b2 b3 b4 a2 b5 b6 b7 b8 a3 a4",
    ),
    "weight 2 against 1 at equal cost": (
        push("a", cost=100, weight=2, n=4) + push("b", cost=100, n=3),
        "a1 b1 a2 a3 b2 a4 b3",
    ),
    # b used the model before a's backlog; back after a was served a while, b starts at the
    # class's virtual time (where a is now), not at its old tag: it interleaves with a from
    # there instead of running three requests in a row on credit saved while it was away.
    "an idle key returning gets no saved-up credit": (
        push("b") + ["pop"] + push("a", n=6) + ["pop"] * 4 + push("b", n=3),
        "b1 a1 a2 a3 a4 b2 a5 b3 a6 b4",
    ),
    # a's big request ran while nobody else wanted the model; after the model went idle, a's
    # next request starts level with b's instead of behind 8000 tokens of b's.
    "a key served alone carries no debt past an idle model": (
        push("a", cost=8000) + ["pop", "idle"] + push("b", n=3) + push("a"),
        "a1 b1 a2 b2 b3",
    ),
    # ... while the model is still busy with it, it does: b catches up first.
    "a key's request still running counts against it": (
        push("a", cost=8000) + ["pop"] + push("b", n=3) + push("a"),
        "a1 b1 b2 b3 a2",
    ),
    "idle while requests wait changes nothing": (
        push("a", cost=500, n=3) + push("b", n=2) + ["pop", "idle"] + push("c"),
        "a1 b1 c1 b2 a2 a3",
    ),
    # A new key arriving at a busy class goes before the busy key's next request.
    "a new key goes before the backlog's next": (
        push("a", n=5) + ["pop", "pop"] + push("b"),
        "a1 a2 b1 a3 a4 a5",
    ),
    # a1's client left: a2 and a3 take a1's and a2's places; b's order is what it was.
    "a leaving head: the key's later requests move up": (
        push("a", n=3) + push("b", n=3) + ["-a1"],
        "a2 b1 a3 b2 b3",
    ),
    "a leaving request in the middle: only the key's later ones move": (
        push("a", cost=100) + push("a", cost=400) + push("a", cost=100) + push("b", n=4) + ["-a2"],
        "a1 b1 a3 b2 b3 b4",
    ),
    "without the leaving request, for comparison": (
        push("a", cost=100) + push("a", cost=400) + push("a", cost=100) + push("b", n=4),
        "a1 b1 a2 b2 b3 b4 a3",
    ),
    # Every waiting request of a left: its tags are given back, its next one starts afresh.
    "a key whose every request left starts afresh": (
        push("a", cost=1000, n=2) + push("b", n=3) + ["-a1", "-a2"] + push("a"),
        "b1 a3 b2 b3",
    ),
    "a leaving request after some were served": (
        push("a", n=4) + push("b", n=4) + ["pop", "pop", "-a3"],
        "a1 b1 a2 b2 a4 b3 b4",
    ),
    # Keys of different classes never share: weights only order keys within a class.
    "weights are per class": (
        push("a", "batch", weight=100, n=2) + push("b", "standard", n=2),
        "b1 b2 a1 a2",
    ),
}


@pytest.mark.parametrize(("ops", "expected"), list(CASES.values()), ids=list(CASES))
def test_pop_order(ops, expected):
    assert " ".join(run(ops)) == expected


def test_a_leaving_request_changes_nothing_for_other_keys():
    """Over many removals: the other keys' requests keep their relative order."""
    base = push("a", cost=300, n=4) + push("b", cost=50, n=6) + push("c", cost=200, weight=2, n=5)
    full = run(base)
    for victim in ["a1", "a2", "a4", "b3", "c1", "c5"]:
        order = run(base + [f"-{victim}"])
        assert victim not in order
        for key in "abc":
            if key == victim[0]:
                continue
            others = [x for x in full if x[0] != victim[0]]
            assert [x for x in order if x[0] != victim[0]] == others, victim


def served_tokens(weights: dict[str, float], costs: dict[str, list[float]], pops: int) -> dict[str, float]:
    """Tokens served per key over ``pops`` pops of a backlog; at every pop, the keys' tokens
    over weight stay within one request of each other (start-time fair queuing's bound)."""
    q = FairQueue(clock=Clock())
    for key, weight in weights.items():
        for cost in itertools.islice(itertools.cycle(costs[key]), 1000):
            q.push(Ticket(key, "standard", cost, weight))
    tokens = dict.fromkeys(weights, 0.0)
    slack = sum(max(costs[k]) / w for k, w in weights.items())
    for _ in range(pops):
        t = q.pop(CLASSES)
        tokens[t.key] += t.cost
        normalized = [tokens[k] / w for k, w in weights.items()]
        assert max(normalized) - min(normalized) <= slack
    return tokens


@pytest.mark.parametrize(
    ("weights", "costs", "ratio"),
    [
        ({"a": 3, "b": 1}, {"a": [100], "b": [100]}, 3.0),
        ({"a": 3, "b": 1}, {"a": [50, 400, 120], "b": [300, 30]}, 3.0),  # tokens, whatever the sizes
        ({"a": 1, "b": 1}, {"a": [512], "b": [20, 60]}, 1.0),
        ({"a": 0.5, "b": 2}, {"a": [64, 256], "b": [1000]}, 0.25),
    ],
)
def test_weights_share_tokens_over_a_long_backlog(weights, costs, ratio):
    tokens = served_tokens(weights, costs, 400)
    assert tokens["a"] / tokens["b"] == pytest.approx(ratio, rel=0.05)


def test_a_small_request_is_not_stuck_behind_a_noisy_neighbour():
    """Key a has 40 requests of 512 tokens queued (its earlier ones fill the slots); key b
    sends one small request at a time: each of b's goes next, overtaken by nobody."""
    q = FairQueue(clock=Clock())
    for _ in range(44):
        q.push(Ticket("a", "standard", 512))
    for _ in range(4):
        assert q.pop(CLASSES).key == "a"  # in flight
    for _ in range(30):
        mine = q.push(Ticket("b", "standard", 20))
        assert q.pop(CLASSES) is mine and mine.overtaken == 0
        assert q.pop(CLASSES).key == "a"  # a's next slot
    assert len(q) == 40 - 30


def test_allowed_restricts_pops_to_those_classes():
    q = FairQueue(clock=Clock())
    i, s, b = (q.push(Ticket("k", c, 10)) for c in CLASSES)
    assert q.pop(()) is None and q.peek(()) is None
    assert q.peek(["batch"]) is b and q.pop(["batch"]) is b
    assert q.pop(("batch",)) is None
    assert q.peek(["standard", "batch"]) is s
    assert q.pop(CLASSES) is i and q.pop(CLASSES) is s
    assert len(q) == 0 and q.pop(CLASSES) is None


def test_an_unknown_class_is_refused():
    with pytest.raises(ValueError, match="unknown request class"):
        FairQueue().push(Ticket("k", "urgent", 10))


def test_expired_per_class_with_a_fake_clock():
    clock = Clock()
    q = FairQueue(clock=clock)
    i = q.push(Ticket("k", "interactive", 10))
    clock.now += 5
    s = q.push(Ticket("k", "standard", 10))
    clock.now += 5
    b = q.push(Ticket("k", "batch", 10))
    max_wait = {"interactive": 30, "standard": 120, "batch": 600}
    assert q.expired(max_wait) == []
    clock.now = 1000 + 30  # interactive waited exactly its max_wait_s
    assert q.expired(max_wait) == [i]
    clock.now = 1000 + 125
    assert q.expired(max_wait) == [i, s]
    assert q.expired({"batch": 1}) == [b]  # a class left out never expires
    q.remove(i)
    clock.now = 1000 + 610
    assert q.expired(max_wait) == [s, b]
    assert q.pop(CLASSES) is s and q.expired(max_wait) == [b]  # only waiting requests expire


def test_overtaken_counts_dispatches_while_waiting():
    q = FairQueue(clock=Clock())
    a1, a2 = q.push(Ticket("a", "standard", 100)), q.push(Ticket("a", "standard", 100))
    b = q.push(Ticket("b", "batch", 1))
    assert q.pop(CLASSES) is a1 and a1.overtaken == 0
    i = q.push(Ticket("i", "interactive", 100))
    through = Ticket("x", "standard", 5)
    q.granted(through)  # let straight through by the caller, never queued: still a dispatch
    assert through.overtaken == 0 and through.state == "granted"
    assert q.pop(CLASSES) is i and i.overtaken == 1
    assert q.pop(CLASSES) is a2 and a2.overtaken == 3
    assert q.pop(CLASSES) is b and b.overtaken == 4
    assert q.dispatched == 5


def test_waited_and_stats_with_a_fake_clock():
    clock = Clock()
    q = FairQueue(clock=clock)
    assert q.stats() == {c: {"queued": 0, "oldest_wait_s": 0.0} for c in CLASSES}
    first = q.push(Ticket("a", "standard", 10))
    clock.now += 2.5
    q.push(Ticket("b", "standard", 10))
    q.push(Ticket("a", "batch", 10))
    clock.now += 1.25
    assert q.stats() == {
        "interactive": {"queued": 0, "oldest_wait_s": 0.0},
        "standard": {"queued": 2, "oldest_wait_s": 3.75},
        "batch": {"queued": 1, "oldest_wait_s": 1.25},
    }
    assert q.pop(CLASSES) is first and first.waited_s == 3.75 and first.state == "granted"
    assert q.stats()["standard"] == {"queued": 1, "oldest_wait_s": 1.25}


def test_remove_only_takes_out_waiting_requests():
    clock = Clock()
    q = FairQueue(clock=clock)
    a, b = q.push(Ticket("a", "standard", 10)), q.push(Ticket("b", "standard", 10))
    assert q.pop(CLASSES) is a
    assert not q.remove(a)  # granted: the caller frees its slot instead
    clock.now += 7
    assert q.remove(b) and b.state == "removed" and b.waited_s == 7
    assert not q.remove(b)
    assert not q.remove(Ticket("c", "standard", 10))  # never queued
    assert len(q) == 0 and q.stats()["standard"]["queued"] == 0


def test_invariants_under_random_pushes_pops_and_removals():
    """Whatever happens: pops take the highest waiting class, each key's requests leave in
    the order they came, a left request never comes out, and the counts add up."""
    rng = random.Random(7)
    clock = Clock()
    q = FairQueue(clock=clock)
    waiting: list[Ticket] = []
    popped: list[Ticket] = []
    for _ in range(3000):
        clock.now += rng.random()
        roll = rng.random()
        if roll < 0.45:
            t = Ticket(
                rng.choice("abcde"), rng.choice(CLASSES), rng.choice([1, 20, 512, 4000]), rng.choice([0.5, 1, 3])
            )
            waiting.append(q.push(t))
        elif roll < 0.85:
            allowed = rng.choice([CLASSES, ("interactive",), ("standard", "batch"), ()])
            eligible = [t for t in waiting if t.cls in allowed]
            t = q.pop(allowed)
            if not eligible:
                assert t is None
                continue
            assert t.cls == min((e.cls for e in eligible), key=CLASSES.index)
            assert t is min((e for e in eligible if (e.key, e.cls) == (t.key, t.cls)), key=lambda e: e.seq)
            assert t.overtaken == len(popped) - t.dispatched_at_push
            waiting.remove(t)
            popped.append(t)
        elif waiting:
            t = rng.choice(waiting)
            assert q.remove(t) and t.state == "removed"
            waiting.remove(t)
        assert len(q) == len(waiting) == sum(s["queued"] for s in q.stats().values())
    assert len(popped) > 500


def test_tags_of_long_idle_keys_are_forgotten_without_changing_the_order():
    q = FairQueue(clock=Clock())
    for n in range(5000):  # many keys, each served once, long ago
        q.push(Ticket(f"k{n}", "standard", 10))
        q.pop(CLASSES)
    x1, x2, y1 = (
        q.push(Ticket("x", "standard", 10)),
        q.push(Ticket("x", "standard", 10)),
        q.push(Ticket("y", "standard", 10)),
    )
    assert q.remove(x1)
    assert [q.pop(CLASSES) for _ in range(2)] == [x2, y1]
    q.idle()  # nothing waits or runs: every key's tag is forgotten
    assert all(not c.last_finish for c in q.classes.values())
    k1, new = q.push(Ticket("k1", "standard", 10)), q.push(Ticket("new", "standard", 10))
    assert k1.start == new.start == q.classes["standard"].virtual
