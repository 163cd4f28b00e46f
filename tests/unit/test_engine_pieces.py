"""Pure pieces of the worker and gateway: chunk coalescing, metrics text, OpenAI clean-up,
request range checks, engine-argument choices and replica options."""

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import errors
from orchestrator.app import replica_options
from orchestrator.engine import args as engine_args
from orchestrator.engine import openai_compat
from orchestrator.engine.openai_compat import check_ranges
from orchestrator.engine.streaming import coalesce
from orchestrator.engine.vllm_compat import parse_request
from orchestrator.metrics import label_samples, merge_exposition
from orchestrator.names import deployment_name
from orchestrator.spec import ModelSpec


def make_spec(**overrides) -> ModelSpec:
    data = {"name": "m", "source": "/models/m"}
    data.update(overrides)
    return ModelSpec.model_validate(data)


# -- coalescing ----------------------------------------------------------------------------


def test_coalesce_sends_first_chunk_at_once_and_joins_the_backlog():
    async def scenario():
        gate = asyncio.Event()
        produced = []

        async def source():
            yield "a"
            await gate.wait()
            for c in "bcd":
                produced.append(c)
                yield c

        out = coalesce(source())
        first = await out.__anext__()
        gate.set()
        await asyncio.sleep(0.01)  # the consumer is "busy" while b, c, d arrive
        rest = [chunk async for chunk in out]
        return first, rest

    first, rest = asyncio.run(scenario())
    assert first == b"a"
    assert rest == [b"bcd"]


def test_coalesce_close_cancels_the_source():
    async def scenario():
        state = {"closed": False}

        async def source():
            try:
                yield "x"
                await asyncio.sleep(3600)
                yield "never"
            finally:
                state["closed"] = True

        out = coalesce(source())
        assert await out.__anext__() == b"x"
        await out.aclose()
        return state["closed"]

    assert asyncio.run(scenario()) is True


def test_coalesce_reraises_source_errors_after_data():
    async def scenario():
        async def source():
            yield "ok"
            raise RuntimeError("engine died")

        return [c async for c in coalesce(source())]

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(scenario())


# -- metrics text --------------------------------------------------------------------------

REPLICA_A = """# HELP vllm:num_requests_running Running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 1.0
# HELP python_gc_objects_collected_total x
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 5.0
"""
REPLICA_B = REPLICA_A.replace('"a"', '"b"').replace("1.0", "2.0")


def test_label_samples_keeps_prefix_and_adds_labels():
    text = label_samples(REPLICA_A, {"replica": "r1"}, prefix="vllm:")
    assert 'vllm:num_requests_running{replica="r1",model_name="a"} 1.0' in text
    assert "python_gc" not in text


def test_merge_keeps_each_family_together_and_parses():
    merged = merge_exposition([label_samples(REPLICA_A, {"replica": "r1"}, "vllm:"),
                               label_samples(REPLICA_B, {"replica": "r2"}, "vllm:")])
    assert merged.count("# TYPE vllm:num_requests_running gauge") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    samples = families["vllm:num_requests_running"].samples
    assert sorted(s.labels["replica"] for s in samples) == ["r1", "r2"]


# -- OpenAI clean-up and request ranges ----------------------------------------------------


def test_clean_drops_only_non_nullable_nulls():
    body = {"choices": [{"message": {"content": None, "refusal": None, "annotations": None,
                                     "function_call": None}, "logprobs": None}],
            "usage": {"completion_tokens_details": None, "prompt_tokens": 1}}
    cleaned = openai_compat.clean(body)
    msg = cleaned["choices"][0]["message"]
    assert msg == {"content": None, "refusal": None}
    assert cleaned["choices"][0]["logprobs"] is None
    assert cleaned["usage"] == {"prompt_tokens": 1}


@pytest.mark.parametrize(
    "payload, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 500}, "n"),
        ({"n": 0}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_out_of_range_parameters(payload, param):
    with pytest.raises(errors.InvalidRequest) as err:
        check_ranges(payload)
    assert err.value.param == param


def test_in_range_parameters_pass():
    check_ranges({"temperature": 0, "top_p": 1, "n": 2, "max_tokens": 16, "stream": True})


def test_vllm_own_validators_give_400_naming_the_field():
    """vLLM's request models raise VLLMValidationError (not a ValueError) for some rules;
    found by the fuzz tests, where it surfaced as a 500."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}
    with pytest.raises(errors.InvalidRequest, match="logprobs") as e:
        parse_request("chat", body)
    assert e.value.status == 400 and e.value.param == "top_logprobs"
    assert parse_request("chat", {**body, "logprobs": True}).top_logprobs == 3


# -- engine choices and replica options ----------------------------------------------------


def test_choices_never_override_the_fleet():
    spec = make_spec(task="embed", resources={"accelerator": "cpu"})
    assert engine_args.engine_choices(spec) == {"runner": "pooling", "dtype": "float32"}
    spec = make_spec(task="embed", resources={"accelerator": "cpu"}, engine={"dtype": "bfloat16", "runner": "pooling"})
    assert engine_args.engine_choices(spec) == {}
    assert engine_args.engine_choices(make_spec(resources={"accelerator": "gpu"})) == {"scheduling_policy": "priority"}
    fcfs = make_spec(resources={"accelerator": "gpu"}, engine={"scheduling_policy": "fcfs"})
    assert engine_args.engine_choices(fcfs) == {} and not fcfs.priority_scheduling
    assert make_spec(resources={"accelerator": "gpu"}).priority_scheduling


def test_a_cpu_replica_takes_the_planned_kv_space_unless_the_fleet_sets_it():
    cpu = {"accelerator": "cpu"}
    assert engine_args.engine_choices(make_spec(resources=cpu), 123_000_000)["kv_cache_memory_bytes"] == 123_000_000
    explicit = make_spec(resources=cpu, engine={"kv_cache_memory_bytes": 5})
    assert "kv_cache_memory_bytes" not in engine_args.engine_choices(explicit, 123_000_000)
    assert "kv_cache_memory_bytes" not in engine_args.engine_choices(make_spec(resources={"accelerator": "gpu"}),
                                                                     123_000_000)
    eng, _, chosen = engine_args.build_vllm_args(make_spec(resources=cpu), "/models/m", None, None, 123_000_000)
    assert eng.kv_cache_memory_bytes == chosen["kv_cache_memory_bytes"] == 123_000_000


def test_cpu_engines_use_the_compile_cache_path_that_loads_again():
    assert engine_args.engine_environment(make_spec(resources={"accelerator": "cpu"})) == {"VLLM_USE_AOT_COMPILE": "0"}
    assert engine_args.engine_environment(make_spec(resources={"accelerator": "gpu"})) == {}


def test_build_vllm_args_passes_engine_through():
    spec = make_spec(engine={"max_model_len": 512, "max_num_seqs": 7, "response_role": "bot"},
                     resources={"accelerator": "cpu"})
    eng, front, chosen = engine_args.build_vllm_args(spec, "/models/m", "main")
    assert (eng.model, eng.served_model_name, eng.revision) == ("/models/m", ["m"], "main")
    assert (eng.max_model_len, eng.max_num_seqs, eng.dtype) == (512, 7, "float32")
    assert front.response_role == "bot"
    assert chosen == {"dtype": "float32", "scheduling_policy": "priority"}
    assert eng.scheduling_policy == "priority"


def test_quantization_passes_through_and_shows_in_the_fleet_view():
    from orchestrator.footprint import source_quantization

    spec = make_spec(engine={"quantization": "fp8"}, resources={"accelerator": "gpu"})
    eng, _, chosen = engine_args.build_vllm_args(spec, "/models/m", None)
    assert eng.quantization == "fp8" and "quantization" not in chosen
    assert source_quantization("hf://Qwen/Qwen3-4B", {"quantization": "awq"}) == {"method": "awq"}
    assert source_quantization("hf://Qwen/Qwen3-4B", {}) == {}


def test_replica_options_cpu_gpu_and_tensor_parallel():
    cpu = replica_options(make_spec(resources={"accelerator": "cpu", "num_cpus": 2}, env={"A": "1"}))
    assert cpu["ray_actor_options"] == {"num_cpus": 2, "runtime_env": {"env_vars": {"A": "1"}}}
    gpu = replica_options(make_spec(resources={"accelerator": "gpu"}))
    assert gpu["ray_actor_options"]["num_gpus"] == 1
    shared = replica_options(make_spec(resources={"accelerator": "gpu", "num_gpus": 0.25, "accelerator_type": "L4"},
                                       engine={"gpu_memory_utilization": 0.25}))
    assert shared["ray_actor_options"]["num_gpus"] == 0.25  # a planned share of one GPU
    assert shared["ray_actor_options"]["accelerator_type"] == "L4"
    tp = replica_options(make_spec(resources={"accelerator": "gpu"}, engine={"tensor_parallel_size": 4}))
    assert len(tp["placement_group_bundles"]) == 4
    assert all(b["GPU"] == 1 for b in tp["placement_group_bundles"])
    assert tp["placement_group_strategy"] == "STRICT_PACK"
    assert "num_gpus" not in tp["ray_actor_options"]


def test_deployment_names_are_safe_and_distinct():
    assert deployment_name("smollm2-135m") == "model-smollm2-135m"
    a, b = deployment_name("Qwen/Qwen3-0.6B"), deployment_name("Qwen:Qwen3-0.6B")
    assert a != b and "/" not in a and ":" not in b


def test_a_json_schema_xgrammar_cannot_compile_is_a_400_naming_its_field():
    """vLLM's validation accepts this pattern and its engine then failed the request (500)."""
    from orchestrator.engine.vllm_compat import check_json_schema, json_schema_of

    bad = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a|aa)*(b|bb)*(a|aa)*c{1,999}$"}},
           "required": ["s"]}
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    request = parse_request("chat", {**chat, "response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "s", "schema": bad}}})
    with pytest.raises(errors.InvalidRequest, match="cannot be compiled") as e:
        check_json_schema(json_schema_of(request))
    assert e.value.param == "response_format"
    with pytest.raises(errors.InvalidRequest) as e:
        check_json_schema(json_schema_of(parse_request("chat", {**chat, "structured_outputs": {"json": bad}})))
    assert e.value.param == "structured_outputs"
    check_json_schema(("response_format", {"type": "object", "properties": {"s": {"pattern": "^a+$"}}}))
    assert json_schema_of(parse_request("chat", chat)) is None
