"""The fleet spec's JSON schema, in the shape the Helm chart's values.schema.json embeds.

``spec.FleetSpec`` is the only definition of the fleet; this module exports it for tools
that cannot run Python: Helm validates ``.Values.fleet`` against it at ``helm install``,
``helm lint`` and ``helm template``, and editors use it for completion. References are
inlined (Helm resolves none across the file), and the draft is JSON Schema draft-07.

The chart's copies, ``values.schema.json`` (its ``fleet`` part) and ``files/fleet-defaults.json``
(the spec's defaults, which templates read instead of restating them), are written by
``python -m orchestrator.devtools.generate --write``; a unit test fails while they are stale.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from orchestrator.spec import FleetSpec

DRAFT = "http://json-schema.org/draft-07/schema#"


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        target.update(siblings)  # the field's own description wins over the class docstring
        return _inline(target, defs)
    return {key: _inline(value, defs) for key, value in node.items() if key != "title"}


def fleet_schema() -> dict[str, Any]:
    """The fleet's JSON schema (draft-07, no references), as the chart embeds it."""
    raw = FleetSpec.model_json_schema()
    defs = raw.pop("$defs", {})
    schema = _inline(raw, defs)
    schema["description"] = (
        "The fleet: the same tree `slm serve -f fleet.yaml` reads, passed unchanged to the Serve "
        "application's builder, except LoRA adapters (they go to the deployments' user_config). "
        "Generated from orchestrator/spec.py; do not edit by hand."
    )
    return schema


def fleet_defaults() -> dict[str, Any]:
    """Every default of a model and of the gateway, for chart templates that size pods, and
    the LoRA engine arguments a model with adapters gets when its engine leaves them unset
    (``orchestrator.adapters.lora_engine_args``; the chart cannot read adapter folders, so
    its max_lora_rank is always the default)."""
    from orchestrator import adapters
    from orchestrator.spec import GatewaySpec, ModelSpec

    model = ModelSpec(name="m", source="/m").model_dump(mode="json", exclude={"name", "source"})
    lora = {"max_lora_rank": adapters.DEFAULT_RANK, "max_loras": adapters.DEFAULT_SLOTS,
            "max_cpu_loras": adapters.DEFAULT_CPU_CACHE}
    return {"model": model, "gateway": GatewaySpec().model_dump(mode="json"), "lora": lora}


def with_fleet(values_schema: dict[str, Any]) -> dict[str, Any]:
    """A chart values schema with its ``properties.fleet`` replaced by the generated one."""
    out = copy.deepcopy(values_schema)
    out.setdefault("properties", {})["fleet"] = fleet_schema()
    return out


def dumps(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
