"""Write, or check, every file the repository derives from the fleet spec and the Helm chart.

Derived files are committed so that Helm, kustomize and readers of the chart's README use
them without running Python; they must therefore never drift from their sources. Each
generator is only a function giving every file it owns and the text that file should hold;
this module is the one place that writes them or reports which are stale, so every
generated artefact is kept current, and fails CI, the same way::

    python -m orchestrator.devtools.generate --write    # or: make chart-generate
    python -m orchestrator.devtools.generate --check    # exit 1 naming each stale file

The generators:

- fleet schema: ``values.schema.json``'s ``fleet`` part and ``files/fleet-defaults.json``,
  from ``orchestrator/spec.py`` (Helm validates values against it; templates read defaults);
- values table: the chart README's table of values, from the ``# --`` comments in values.yaml;
- k8s manifests: ``k8s/`` (kustomize base and overlays), rendered by the chart.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.devtools import chart_docs, k8s_manifests
from orchestrator.devtools.chart import CHART, REPO
from orchestrator.k8s import schema

COMMAND = "python -m orchestrator.devtools.generate --write"


def _no_problems() -> list[str]:
    return []


@dataclass(frozen=True)
class Generator:
    """One kind of derived file: ``files()`` maps each path to the text it should hold."""

    name: str
    files: Callable[[], dict[Path, str]]
    # A folder whose every *.yaml this generator produces: any other one there is stale.
    owns: Path | None = None
    # What regenerating cannot fix (e.g. a value without its description), one line each.
    problems: Callable[[], list[str]] = _no_problems

    def stale(self) -> list[Path]:
        return stale(self.files(), self.owns)


def fleet_schema_files(chart: Path = CHART) -> dict[Path, str]:
    """The chart's values schema with the spec's ``fleet`` part, and the spec's defaults."""
    schema_path = chart / "values.schema.json"
    current = json.loads(schema_path.read_text())
    return {
        schema_path: schema.dumps(schema.with_fleet(current)),
        chart / "files" / "fleet-defaults.json": schema.dumps(schema.fleet_defaults()),
    }


# In the order --write must run them: k8s/ is rendered by the chart, whose templates read the
# fleet defaults the first one writes.
GENERATORS = {
    "fleet-schema": Generator("fleet-schema", fleet_schema_files),
    "values-table": Generator("values-table", chart_docs.readme_files, problems=chart_docs.undocumented),
    "k8s-manifests": Generator("k8s-manifests", k8s_manifests.expected_files, owns=k8s_manifests.K8S),
}


def stale(files: dict[Path, str], owns: Path | None = None) -> list[Path]:
    """The files whose text differs from ``files``, then the *.yaml under ``owns`` not in it."""
    out = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    if owns is not None and owns.exists():
        out += sorted(set(owns.rglob("*.yaml")) - set(files))
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def check(generator: Generator) -> bool:
    """Report each stale file of ``generator`` on stderr; True when there is none."""
    files = generator.files()
    problems = generator.problems()
    paths = stale(files, generator.owns)
    for path in paths:
        what = "stale" if path in files else f"not produced by {generator.name}"
        print(f"{_shown(path)}: {what}; run `{COMMAND}` (or make chart-generate)", file=sys.stderr)
    for problem in problems:
        print(problem, file=sys.stderr)
    return not paths and not problems


def write(generator: Generator) -> bool:
    """Bring the files of ``generator`` up to date; False when it has problems to fix by hand."""
    files = generator.files()
    problems = generator.problems()
    for path in stale(files, generator.owns):
        if path in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[path])
            print(f"wrote {_shown(path)}")
        else:
            path.unlink()
            print(f"removed {_shown(path)} (not produced by {generator.name})")
    for problem in problems:
        print(problem, file=sys.stderr)
    return not problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate every stale file")
    mode.add_argument("--check", action="store_true", help="exit 1 naming each stale file")
    args = parser.parse_args(argv)
    run = write if args.write else check
    results = [run(generator) for generator in GENERATORS.values()]  # every generator reports
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
