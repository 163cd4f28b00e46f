"""The fleet's autoscaling and routing settings reach Ray Serve's deployment config, and the
Serve-facing policy reads an AutoscalingContext the way the controller fills it."""

import types

import pytest
from ray.serve.config import AutoscalingContext

from orchestrator.app import build_app, replica_options
from orchestrator.autoscaling.serve_policy import QueueDepthPolicy
from orchestrator.names import deployment_name
from orchestrator.ray_compat import build_deployments
from orchestrator.spec import ModelSpec, parse_fleet


def spec(**overrides) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", "source": "/models/m", **overrides})


def test_replica_options_carry_the_policy_router_and_drain_timeout():
    opts = replica_options(spec(autoscaling={"min_replicas": 0, "max_replicas": 3, "target_queue_depth": 6,
                                             "drain_timeout_s": 45},
                                routing={"policy": "session", "load_factor": 1.5}))
    auto = opts["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["initial_replicas"]) == (0, 3, 0)
    assert auto["policy"]["policy_function"].endswith("serve_policy:QueueDepthPolicy")
    assert auto["policy"]["policy_kwargs"]["limits"]["target_queue_depth"] == 6
    assert auto["upscale_delay_s"] == auto["downscale_delay_s"] == 0  # the policy owns the delays
    router = opts["request_router_config"]
    assert router["request_router_class"] == "orchestrator.routing.serve_router:SlmRequestRouter"
    assert router["request_router_kwargs"] == {"model": "m", "policy": "session", "load_factor": 1.5}
    assert opts["graceful_shutdown_timeout_s"] == 45
    assert "num_replicas" not in opts


@pytest.mark.parametrize("policy", ["least-queue", "prefix-affinity", "session", "round-robin"])
def test_serve_accepts_the_deployment_config(policy):
    """Serve validates (and pickles) the policy and router when the app is built."""
    fleet = parse_fleet({"models": [{"name": "m", "source": "/models/m", "routing": {"policy": policy},
                                     "autoscaling": {"min_replicas": 1, "max_replicas": 2}}]}, "test")
    deployments = {d.name: d for d in build_deployments(build_app(fleet), "slm")}
    config = deployments[deployment_name("m")]
    assert config.autoscaling_config.max_replicas == 2
    assert config.autoscaling_config.policy.policy_kwargs["model"] == "m"
    assert config.request_router_config.request_router_kwargs["policy"] == policy


def context(**kw) -> AutoscalingContext:
    base = dict(deployment_id=None, deployment_name="model-m", app_name="slm", current_num_replicas=1,
                target_num_replicas=1, running_replicas=[], total_num_requests=0, total_queued_requests=0,
                aggregated_metrics={}, raw_metrics={}, capacity_adjusted_min_replicas=1,
                capacity_adjusted_max_replicas=4, policy_state={}, last_scale_up_time=None,
                last_scale_down_time=None, current_time=100.0, config=None)
    base.update(kw)
    return AutoscalingContext(**base)


LIMITS = {"min_replicas": 1, "max_replicas": 4, "target_queue_depth": 4, "upscale_delay_s": 1,
          "downscale_delay_s": 60, "idle_timeout_s": 300}


def test_policy_sums_engine_queues_and_requests_queued_at_handles():
    policy = QueueDepthPolicy("m", LIMITS)
    policy.state_actor = lambda *a: None  # no fleet-state actor in a unit test
    ctx = context(aggregated_metrics={"queue_depth": {"r1": 6.0, "r2": 5.0}}, total_queued_requests=3,
                  current_num_replicas=2, target_num_replicas=3)
    obs = policy.observe(ctx)
    assert (obs.queue_depth, obs.running, obs.starting) == (14, 2, 1)


def test_policy_falls_back_to_serves_request_count_before_replicas_report():
    policy = QueueDepthPolicy("m", LIMITS)
    assert policy.observe(context(total_num_requests=9)).queue_depth == 9


def test_policy_decides_with_state_carried_by_serve():
    policy = QueueDepthPolicy("m", LIMITS)
    policy.state_actor = lambda *a: None
    busy = {"queue_depth": {"r1": 20.0}}
    target, state = policy(context(aggregated_metrics=busy, current_time=100.0))
    assert target == 1 and state["want_up_since"] == 100.0  # waiting upscale_delay_s
    target, state = policy(context(aggregated_metrics=busy, current_time=101.0, policy_state=state))
    assert target == 4
    assert policy.counts == {"up": 1, "down": 0}
    assert policy.last_scale["reason"].startswith("queue 20 at target 4/replica needs 4")


def test_policy_records_serves_own_cold_start_as_an_up_decision():
    zero = {**LIMITS, "min_replicas": 0}
    policy = QueueDepthPolicy("m", zero)
    policy.state_actor = lambda *a: None
    policy(context(current_num_replicas=0, target_num_replicas=0, current_time=1.0))
    # Serve raised the target itself (cold-start path) before calling the policy again.
    policy(context(current_num_replicas=1, target_num_replicas=1, current_time=30.0,
                   aggregated_metrics={"queue_depth": {"r1": 1.0}}))
    assert policy.counts["up"] == 1 and "cold start" in policy.last_scale["reason"]


def test_publish_sends_a_snapshot_to_the_fleet_state():
    sent = []
    actor = types.SimpleNamespace(record=types.SimpleNamespace(remote=lambda model, snap: sent.append((model, snap))))
    policy = QueueDepthPolicy("m", LIMITS)
    policy.state_actor = lambda *a: actor
    policy(context(aggregated_metrics={"queue_depth": {"r1": 2.0}}))
    model, snap = sent[-1]
    assert model == "m" and snap["queue_depth"] == 2.0
    assert snap["replicas"] == {"running": 1, "starting": 0, "target": 1}
    assert snap["last_decision"]["direction"] == "hold" and "queue 2" in snap["last_decision"]["reason"]


def _fleet(**gateway):
    return parse_fleet({"models": [{"name": "m", "source": "/models/m"}], "gateway": gateway}, "test")


def test_serve_environment_fast_path_grpc_cap_and_lean_local_ray():
    from orchestrator.runtime_env import serve_environment

    env = serve_environment(_fleet(), {})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
    assert env["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"] == str(256 * 1024 * 1024)
    assert env["RAY_enable_metrics_collection"] == env["RAY_task_events_report_interval_ms"] == "0"
    # a gateway taking 512 MiB bodies gets room for them over gRPC
    big = serve_environment(_fleet(max_body_bytes=512 * 1024**2), {})
    assert int(big["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) > 2 * 512 * 1024**2
    # explicit values win (not returned, so not overwritten)
    mine = serve_environment(_fleet(), {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0", "RAY_event_stats": "1"})
    assert "RAY_SERVE_USE_GRPC_BY_DEFAULT" not in mine and "RAY_event_stats" not in mine
    # fast path off: Serve's defaults; joining a cluster, or asking for Ray's observability:
    # Ray's own settings stay
    off = serve_environment(_fleet(), {"SLM_SERVE_FAST_PATH": "0"})
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in off and "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH" not in off
    for environ in ({"RAY_ADDRESS": "ray://head:10001"}, {"SLM_RAY_OBSERVABILITY": "1"}):
        assert "RAY_enable_metrics_collection" not in serve_environment(_fleet(), environ)
    assert serve_environment(_fleet(), {})["RAY_SERVE_HTTP_KEEP_ALIVE_TIMEOUT_S"] == "90"
