"""OpenAI's API where vLLM differs from it: answers that parse under OpenAI's official schema,
and requests held to OpenAI's documented parameter ranges (``check_ranges``).

vLLM sends ``null`` for a few fields that OpenAI's schema declares optional but not
nullable (``annotations``, ``function_call``, ``completion_tokens_details`` ...). Strict
typed clients reject those, so such keys are dropped when null; everything else passes
through as vLLM wrote it.
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator import errors

# Optional, non-nullable fields (per OpenAI's openapi.yaml) that vLLM may set to null.
DROP_WHEN_NULL = frozenset(
    {
        "annotations",
        "audio",
        "function_call",
        "completion_tokens_details",
        "prompt_tokens_details",
        "service_tier",
        "system_fingerprint",
        "tool_calls",
        "reasoning",
        "reasoning_content",
    }
)


def clean(value: Any) -> Any:
    """Drop ``DROP_WHEN_NULL`` keys whose value is null, recursively."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if not (v is None and k in DROP_WHEN_NULL)}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def dump(model: Any) -> bytes:
    """A vLLM response model as OpenAI-clean JSON bytes."""
    return json.dumps(clean(model.model_dump(mode="json")), separators=(",", ":")).encode()


def clean_json_bytes(body: bytes) -> bytes:
    return json.dumps(clean(json.loads(body)), separators=(",", ":")).encode()


# OpenAI's documented parameter ranges that vLLM does not enforce itself.
RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "n": (1, 128),
    "max_tokens": (1, None),
    "max_completion_tokens": (1, None),
    "top_logprobs": (0, 20),
}


def check_ranges(payload: dict[str, Any]) -> None:
    """400 naming the parameter when one is outside OpenAI's documented range."""
    for key, (low, high) in RANGES.items():
        value = payload.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise errors.InvalidRequest(f"'{key}' must be {bound}; got {value}", param=key)
