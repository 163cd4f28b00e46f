"""The fleet spec's JSON schema, in the shape the Helm chart's values.schema.json embeds.

``spec.FleetSpec`` is the only definition of the fleet; this module exports it for tools
that cannot run Python: Helm validates ``.Values.fleet`` against it at ``helm install``,
``helm lint`` and ``helm template``, and editors use it for completion. References are
inlined (Helm resolves none across the file), and the draft is JSON Schema draft-07.

Regenerate the chart's copy after changing the spec (a unit test fails until you do)::

    python -m orchestrator.k8s.schema --write helm/slm-orchestrator

That updates ``values.schema.json`` (its ``fleet`` part) and ``files/fleet-defaults.json``
(the spec's defaults, which templates read instead of restating them).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
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
        "application's builder. Generated from orchestrator/spec.py; do not edit by hand."
    )
    return schema


def fleet_defaults() -> dict[str, Any]:
    """Every default of a model and of the gateway, for chart templates that size pods."""
    from orchestrator.spec import GatewaySpec, ModelSpec

    model = ModelSpec(name="m", source="/m").model_dump(mode="json", exclude={"name", "source"})
    return {"model": model, "gateway": GatewaySpec().model_dump(mode="json")}


def with_fleet(values_schema: dict[str, Any]) -> dict[str, Any]:
    """A chart values schema with its ``properties.fleet`` replaced by the generated one."""
    out = copy.deepcopy(values_schema)
    out.setdefault("properties", {})["fleet"] = fleet_schema()
    return out


def dumps(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def _files(chart: Path) -> dict[Path, str]:
    """The chart's generated files and the text each should have."""
    schema_path = chart / "values.schema.json"
    current = json.loads(schema_path.read_text())
    return {
        schema_path: dumps(with_fleet(current)),
        chart / "files" / "fleet-defaults.json": dumps(fleet_defaults()),
    }


def stale_files(chart: str | Path) -> list[Path]:
    """The chart's generated files whose content differs from what the spec gives now."""
    out = []
    for path, text in _files(Path(chart)).items():
        if not path.exists() or path.read_text() != text:
            out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="CHART_DIR", help="regenerate the chart's fleet schema and defaults")
    parser.add_argument("--check", metavar="CHART_DIR", help="exit 1 if they are stale")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print(dumps(fleet_schema()), end="")
        return 0
    chart = Path(args.write or args.check)
    if args.check:
        stale = stale_files(chart)
        for path in stale:
            print(f"{path}: stale; run python -m orchestrator.k8s.schema --write {chart}", file=sys.stderr)
        return 1 if stale else 0
    for path, text in _files(chart).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
