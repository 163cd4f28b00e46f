"""Every error leaves as OpenAI's envelope, valid under the official schema."""

import pytest
from openai_schema import check_error

from orchestrator import errors


@pytest.mark.parametrize(
    "exc, status, code, param",
    [
        (errors.InvalidRequest("bad", param="temperature"), 400, "invalid_request", "temperature"),
        (errors.ContextLengthExceeded("long"), 400, "context_length_exceeded", None),
        (errors.WrongTask("embed only", param="model"), 400, "model_not_supported", "model"),
        (errors.UnknownModel("gpt-9"), 404, "model_not_found", "model"),
        (errors.RequestTooLarge("big"), 413, "request_too_large", None),
        (errors.Unauthorized("who"), 401, "invalid_api_key", None),
        (errors.RateLimited("slow down"), 429, "rate_limit_exceeded", None),
        (errors.NoReadyReplica("wait"), 503, "model_not_ready", None),
        (errors.UpstreamTimeout("late"), 504, "timeout", None),
        (RuntimeError("secret internals"), 500, "internal_error", None),
    ],
)
def test_mapping(exc, status, code, param):
    got_status, body, headers = errors.to_envelope(exc)
    assert got_status == status
    assert body["error"]["code"] == code
    assert body["error"]["param"] == param
    check_error(body)
    if status == 500:
        assert "secret" not in body["error"]["message"]
    if status == 503:
        assert headers["Retry-After"].isdigit()


def test_vllm_errors_normalised():
    status, body = errors.from_vllm_error(
        {"message": "This model's maximum context length is 2048 tokens", "type": "BadRequestError",
         "param": None, "code": 400})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    check_error(body)
    status, body = errors.from_vllm_error({"message": "CUDA OOM at /usr/lib/x.py", "type": "x", "code": 500})
    assert status == 500 and "/usr/lib" not in body["error"]["message"]
    check_error(body)
    status, body = errors.from_vllm_error({"message": "m", "type": "x", "code": 200})
    assert status == 500


def test_schema_checker_rejects_vllm_integer_code():
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        check_error({"error": {"message": "m", "type": "t", "param": None, "code": 400}})
