"""Each routing policy's choice on given replica loads, and bounded-load spillover."""

from collections import Counter

import pytest

from orchestrator.routing.policy import load_bound, prompt_prefix, rank, ring_order, route_key

R = ["r1", "r2", "r3"]


def test_least_queue_picks_the_least_loaded():
    order, spilled = rank("least-queue", {"r1": 5, "r2": 1, "r3": 3})
    assert order == ["r2", "r3", "r1"] and not spilled


def test_least_queue_spreads_ties():
    firsts = Counter(rank("least-queue", {"r1": 0, "r2": 0})[0][0] for _ in range(200))
    assert set(firsts) == {"r1", "r2"} and min(firsts.values()) > 50


def test_round_robin_cycles_whatever_the_load():
    loads = {"r1": 9, "r2": 0, "r3": 0}
    assert [rank("round-robin", loads, turn=t)[0][0] for t in range(6)] == R + R


def test_ring_order_is_stable_and_a_permutation():
    order = ring_order("system prompt A", R)
    assert sorted(order) == R
    assert ring_order("system prompt A", list(reversed(R))) == order


def test_consistent_hashing_moves_few_keys_when_a_replica_leaves():
    keys = [f"prefix-{i}" for i in range(300)]
    before = {k: ring_order(k, R)[0] for k in keys}
    after = {k: ring_order(k, ["r1", "r2"])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    # Only keys that lived on r3 move.
    assert all(before[k] == "r3" for k in moved)
    assert 0 < len(moved) < 200


def test_keys_spread_over_replicas():
    owners = Counter(ring_order(f"group-{i}", R)[0] for i in range(300))
    assert set(owners) == set(R) and min(owners.values()) > 50


def test_prefix_affinity_sticks_while_under_the_bound():
    home = ring_order("shared system prompt", R)[0]
    loads = {r: 2 for r in R}
    order, spilled = rank("prefix-affinity", loads, "shared system prompt", 1.25)
    assert order[0] == home and not spilled


def test_hot_prefix_spills_to_the_next_replica_on_the_ring():
    ring = ring_order("hot prefix", R)
    loads = {r: 0 for r in R}
    loads[ring[0]] = 4  # bound = ceil(1.25 * 5 / 3) = 3: the home replica is over it
    assert load_bound(loads, 1.25) == 3
    order, spilled = rank("prefix-affinity", loads, "hot prefix", 1.25)
    assert order[0] == ring[1] and spilled


def test_bounded_load_keeps_every_replica_within_the_bound():
    loads = {r: 0 for r in R}
    for _ in range(60):  # 60 concurrent requests of one prefix
        first = rank("prefix-affinity", loads, "one prefix", 1.25)[0][0]
        loads[first] += 1
    assert max(loads.values()) <= load_bound({r: v - 1 / 3 for r, v in loads.items()}, 1.25)
    assert min(loads.values()) > 0


def test_session_affinity_uses_the_same_ring():
    loads = {r: 0 for r in R}
    assert rank("session", loads, "user-42")[0][0] == ring_order("user-42", R)[0]


def test_no_key_falls_back_to_least_queue():
    assert rank("prefix-affinity", {"r1": 3, "r2": 0}, None)[0][0] == "r2"


def test_no_candidates():
    assert rank("least-queue", {}) == ([], False)


@pytest.mark.parametrize("endpoint, payload, expected", [
    ("chat", {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]},
     "system:You are terse.\nuser:Hi\n"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "part"}]}]}, "user:part\n"),
    ("completions", {"prompt": "Once upon a time"}, "Once upon a time"),
    ("completions", {"prompt": ["first", "second"]}, "first"),
    ("completions", {"prompt": [1, 2, 3]}, "1,2,3"),
    ("chat", {"messages": "not a list"}, None),
    ("completions", {"prompt": ""}, None),
])
def test_prompt_prefix(endpoint, payload, expected):
    assert prompt_prefix(endpoint, payload, 1000) == expected


def test_prompt_prefix_truncates_to_the_leading_characters():
    system = "S" * 5000
    a = prompt_prefix("chat", {"messages": [{"role": "system", "content": system},
                                            {"role": "user", "content": "question one"}]}, 1024)
    b = prompt_prefix("chat", {"messages": [{"role": "system", "content": system},
                                            {"role": "user", "content": "question two"}]}, 1024)
    assert a == b and len(a) == 1024


def test_route_key_by_policy():
    payload = {"prompt": "abc"}
    assert route_key("prefix-affinity", "completions", payload, {}, 100) == "abc"
    assert route_key("session", "completions", payload, {"x-session-id": "s1"}, 100) == "s1"
    assert route_key("session", "completions", payload, {}, 100) is None
    assert route_key("least-queue", "completions", payload, {"x-session-id": "s1"}, 100) is None


def test_in_flight_view_counts_routed_until_finished():
    from orchestrator.routing.policy import InFlight

    view = InFlight()
    view.routed("a", "r1")
    view.routed("b", "r1")
    view.routed("c", "r2")
    view.routed("a", "r2")  # a token is recorded once (a retry of the same call)
    assert (view.load("r1"), view.load("r2"), view.load("r3")) == (2, 1, 0)
    view.finished("a")
    view.finished("a")  # finishing twice releases once
    view.finished(None)
    view.finished("unknown")
    assert (view.load("r1"), view.load("r2")) == (1, 1)
    view.finished("b")
    view.finished("c")
    assert (view.load("r1"), view.load("r2")) == (0, 0)
    view.routed("d", "r1")
    view.moved("d", "r2")  # the first choice refused it
    view.moved("d", "r2")
    assert (view.load("r1"), view.load("r2")) == (0, 1)
    view.moved("e", "r1")  # recorded once routed (least-queue)
    assert view.load("r1") == 1


def test_a_request_finished_before_it_was_routed_is_not_counted_later():
    from orchestrator.routing.policy import InFlight

    view = InFlight()
    view.finished("gone")  # the client left while its request waited for a replica
    view.routed("gone", "r1")  # the router gets to it afterwards
    view.moved("gone", "r2")
    assert (view.load("r1"), view.load("r2")) == (0, 0)
    view.routed("x", "r1")
    view.finished("x")
    view.moved("x", "r2")  # a late acceptance notice
    assert (view.load("r1"), view.load("r2")) == (0, 0)


def test_adapter_requests_carry_their_adapter_in_the_key():
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert route_key("least-queue", "chat", body, {}, 64, adapter="team-a") == "adapter:team-a"
    assert route_key("least-queue", "chat", body, {}, 64) is None
    with_prefix = route_key("prefix-affinity", "chat", body, {}, 64, adapter="team-a")
    assert with_prefix.startswith("adapter:team-a\n") and with_prefix.endswith("user:hi\n")
    assert route_key("session", "chat", body, {"x-session-id": "s1"}, 64, adapter="team-a") == "s1"
    assert route_key("round-robin", "chat", body, {}, 64, adapter="team-a") is None


def test_adapter_affinity_gathers_an_adapter_on_one_replica_within_the_bound():
    loads = {"r1": 0, "r2": 0, "r3": 0}
    picks = Counter()
    for _ in range(6):
        first = rank("least-queue", loads, "adapter:team-a", 1.25)[0][0]
        picks[first] += 1
        loads[first] += 1
    # It sticks to its ring's first replica while under ceil(1.25 x mean), then spills.
    assert max(picks.values()) < 6 and len(picks) >= 2
    home = ring_order("adapter:team-a", list(loads))[0]
    assert picks[home] == max(picks.values())
    # Different adapters are homed on different replicas (the ring spreads them).
    homes = {ring_order(f"adapter:a{i}", ["r1", "r2", "r3"])[0] for i in range(12)}
    assert len(homes) == 3
