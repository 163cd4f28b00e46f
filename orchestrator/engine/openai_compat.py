"""Make vLLM's answers parse under OpenAI's official schema.

vLLM sends ``null`` for a few fields that OpenAI's schema declares optional but not
nullable (``annotations``, ``function_call``, ``completion_tokens_details`` ...). Strict
typed clients reject those, so such keys are dropped when null; everything else passes
through as vLLM wrote it.
"""

from __future__ import annotations

import json
from typing import Any

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
