"""The autoscaling policy's table: steady, burst, starting replicas, hysteresis, zero."""

import pytest

from orchestrator.autoscaling.policy import Limits, Observation, State, decide, desired_replicas

L = Limits(min_replicas=1, max_replicas=4, target_queue_depth=8, upscale_delay_s=1, downscale_delay_s=60,
           idle_timeout_s=300)
ZERO = Limits(min_replicas=0, max_replicas=2, target_queue_depth=8, upscale_delay_s=1, downscale_delay_s=10,
              idle_timeout_s=30)


@pytest.mark.parametrize(
    "queue, limits, expected",
    [(0, L, 1), (8, L, 1), (9, L, 2), (32, L, 4), (1000, L, 4), (0, ZERO, 0), (1, ZERO, 1), (17, ZERO, 2)],
)
def test_desired_replicas(queue, limits, expected):
    assert desired_replicas(queue, limits) == expected


def run(steps, limits, state=State()):
    """Feed (time, queue, running, starting) steps; return the decisions."""
    out = []
    for now, queue, running, starting in steps:
        decision, state = decide(Observation(queue, running, starting), limits, state, now)
        out.append(decision)
    return out


def test_steady_load_holds():
    decisions = run([(t, 6, 1, 0) for t in range(10)], L)
    assert {(d.target, d.direction) for d in decisions} == {(1, "hold")}


def test_burst_scales_up_after_the_delay_and_once():
    decisions = run([(0, 30, 1, 0), (0.5, 30, 1, 0), (1.0, 30, 1, 0)], L)
    assert [d.direction for d in decisions] == ["hold", "hold", "up"]
    assert decisions[-1].target == 4 and "needs 4" in decisions[-1].reason


def test_starting_replicas_count_so_a_burst_never_overshoots():
    # Target already raised to 4: three replicas are starting while the queue stays high.
    decisions = run([(t, 32, 1, 3) for t in range(5, 15)], L)
    assert all(d.target == 4 and d.direction == "hold" for d in decisions)


def test_scale_down_waits_for_sustained_low_demand():
    steps = [(0, 4, 3, 0), (30, 4, 3, 0), (59, 4, 3, 0), (60, 4, 3, 0)]
    decisions = run(steps, L)
    assert [d.direction for d in decisions] == ["hold", "hold", "hold", "down"]
    assert decisions[-1].target == 1


def test_a_blip_resets_the_downscale_clock():
    steps = [(0, 4, 3, 0), (50, 30, 3, 0), (55, 4, 3, 0), (100, 4, 3, 0), (115, 4, 3, 0)]
    decisions = run(steps, L)
    assert [d.direction for d in decisions] == ["hold", "hold", "hold", "hold", "down"]


def test_zero_waits_for_idle_timeout_then_scales_to_zero():
    steps = [(0, 3, 1, 0), (5, 0, 1, 0), (20, 0, 1, 0), (29, 0, 1, 0), (31, 0, 1, 0)]
    decisions = run(steps, ZERO)
    assert [d.target for d in decisions] == [1, 1, 1, 1, 0]
    assert "before zero" in decisions[1].reason


def test_scale_from_zero_is_immediate():
    decisions = run([(0, 1, 0, 0)], ZERO)
    assert (decisions[0].target, decisions[0].direction) == (1, "up")


def test_zero_drops_extra_replicas_first_then_goes_to_zero_after_idle():
    # Two replicas, idle: down to one after downscale_delay_s, to zero after idle_timeout_s.
    steps = [(0, 5, 2, 0), (1, 0, 2, 0), (11, 0, 2, 0), (20, 0, 1, 0), (36, 0, 1, 0)]
    decisions = run(steps, ZERO)
    assert [(d.target, d.direction) for d in decisions] == [(2, "hold"), (2, "hold"), (1, "down"), (1, "hold"),
                                                            (0, "down")]
    assert "idle_timeout_s" in decisions[-1].reason


def test_fresh_policy_does_not_scale_to_zero_at_once():
    # No traffic seen yet (e.g. the controller restarted): the idle clock starts now.
    decisions = run([(100, 0, 1, 0), (129, 0, 1, 0), (130, 0, 1, 0)], ZERO)
    assert [d.target for d in decisions] == [1, 1, 0]


def test_bounds_clamp_a_huge_queue_and_min_replicas_hold_at_idle():
    decisions = run([(0, 10_000, 1, 0), (1, 10_000, 1, 0)], L)
    assert decisions[-1].target == 4
    assert run([(0, 0, 1, 0), (1000, 0, 1, 0)], L)[-1].target == 1


def test_limits_from_spec():
    from orchestrator.spec import AutoscalingSpec

    spec = AutoscalingSpec(min_replicas=0, max_replicas=3, target_queue_depth=4, upscale_delay_s=2)
    limits = Limits.from_spec(spec)
    assert (limits.min_replicas, limits.max_replicas, limits.upscale_delay_s) == (0, 3, 2)
    assert Limits.from_spec(spec.model_dump()) == limits


def test_a_queue_at_exactly_n_times_target_does_not_flap_to_n_plus_one():
    # 4 replicas (running + starting) for a queue of 16 at target 4: a sample of 17 is noise.
    decisions = run([(t, 17, 1, 3) for t in range(5)], Limits(max_replicas=6, target_queue_depth=4))
    assert all(d.target == 4 and d.direction == "hold" and "within 10%" in d.reason for d in decisions)
    # Clearly more demand still scales up.
    decisions = run([(0, 20, 1, 3), (1, 20, 1, 3)], Limits(max_replicas=6, target_queue_depth=4))
    assert decisions[-1].target == 5
