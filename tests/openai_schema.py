"""Validate JSON against OpenAI's official OpenAPI spec (from ../shared, not copied here).

The spec is OpenAPI 3.1 but marks some fields OpenAPI-3.0 style with ``nullable: true``;
those become ``anyOf [schema, null]`` so the validator honours them.

    check("CreateChatCompletionResponse", body)   # raises jsonschema.ValidationError
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SLM_SHARED_DIR", REPO.parent / "shared"))
SPEC_PATH = SHARED / "third_party" / "openai-openapi" / "openapi.yaml"


def _convert(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _convert(v) for k, v in node.items() if k not in ("nullable", "discriminator", "example")}
        if node.get("nullable") is True:
            return {"anyOf": [out, {"type": "null"}]}
        return out
    if isinstance(node, list):
        return [_convert(v) for v in node]
    return node


@functools.cache
def _registry() -> tuple[Registry, dict[str, Any]]:
    spec = yaml.safe_load(SPEC_PATH.read_text())
    converted = _convert(spec)
    resource = Resource.from_contents(converted, default_specification=DRAFT202012)
    return Registry().with_resource("openapi.yaml", resource), converted


def check(schema_name: str, instance: Any) -> None:
    """Raise jsonschema.ValidationError unless ``instance`` matches the named schema."""
    registry, converted = _registry()
    if schema_name not in converted["components"]["schemas"]:
        raise KeyError(schema_name)
    schema = {"$ref": f"openapi.yaml#/components/schemas/{schema_name}"}
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is not None:
        raise error


def check_error(body: Any) -> None:
    check("ErrorResponse", body)
