"""The package's shape, measured: no import cycle inside ``orchestrator/`` (imports inside
functions count), no layer importing from one above it, no module over 500 lines, private
Ray and vLLM APIs each used from one file, one SSE parser in ``loadtests/``, and tests that
import public names only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((REPO / root).rglob("*.py"))}


MODULES = package_modules("orchestrator")


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The ``orchestrator`` modules ``path`` imports, anywhere in it (``from a import b``
    counts as importing ``a.b`` when that is a module, else ``a``)."""
    tree = ast.parse(path.read_text())
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:
                    out.add(full)
                elif base in known:
                    out.add(base)
    out.discard(own)
    return out


GRAPH = {name: imports_of(path, MODULES) for name, path in MODULES.items()}


def test_no_import_cycle_inside_the_package():
    """Tarjan's strongly connected components: every one must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in GRAPH[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert cycles == []


@pytest.mark.parametrize("lower, upper", [
    ("orchestrator.engine", "orchestrator.gateway"),  # the engine never imports the gateway
    ("orchestrator.gateway", "orchestrator.app"),  # the gateway never imports the Serve builders
    ("orchestrator.engine", "orchestrator.app"),
    ("orchestrator.routing", "orchestrator.gateway"),
    ("orchestrator.spec", "orchestrator.engine"),
    ("orchestrator.vllm_args", "orchestrator.spec"),
])
def test_no_layer_imports_from_above(lower, upper):
    offenders = {m: sorted(d for d in deps if d == upper or d.startswith(upper + "."))
                 for m, deps in GRAPH.items() if m == lower or m.startswith(lower + ".")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_module_over_500_lines():
    paths = list(MODULES.values()) + sorted((REPO / "loadtests").glob("*.py"))
    long = {str(p.relative_to(REPO)): n for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def uses(pattern: str, roots: tuple[str, ...] = ("orchestrator", "loadtests")) -> set[str]:
    found = set()
    for root in roots:
        for path in (REPO / root).rglob("*.py"):
            if re.search(pattern, path.read_text()):
                found.add(str(path.relative_to(REPO)))
    return found


def test_private_ray_apis_are_used_from_one_file():
    """Ray's private modules and functions, its handle's unchecked lookup, and Serve's
    internal environment variables: only ``orchestrator/ray_compat.py``."""
    pattern = r"ray[\w.]*\._\w|\b_get_serve_request_context\b|_check_exists|[\"']RAY_SERVE_\w+|[\"']RAY_[a-z]\w*"
    assert uses(pattern) <= {"orchestrator/ray_compat.py"}


def test_private_vllm_apis_are_used_from_one_file():
    pattern = (r"vllm[\w.]*\._\w|\._extract_prompt_len|\binit_app_state\b|render_\w+_request|"
               r"[\"']ErrorResponse[\"']|\bcreate_error_response\b|\bStatLoggerBase\b|from vllm\.v1\b")
    assert uses(pattern) <= {"orchestrator/engine/vllm_compat.py"}


def test_one_sse_parser_in_the_load_tests():
    """Only ``loadtests/sse.py`` splits SSE events and reads their fields; the load tests (and
    the tests, through ``tests/sse.py``) take its events."""
    splitting = r"split\((b?)[\"']\\n\\n[\"']\)|startswith\((b?)[\"']data:"
    assert uses(splitting, ("loadtests",)) <= {"loadtests/sse.py"}


def test_tests_import_public_names_only():
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text())
        ours = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("orchestrator", "loadtests"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
                ours.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                ours.update((a.asname or a.name).split(".")[0] for a in node.names
                            if a.name.split(".")[0] in ("orchestrator", "loadtests"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ours
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offenders.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert offenders == []
