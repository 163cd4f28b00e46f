"""Real stacks for the integration tests: `slm serve` (real Ray, real vLLM on CPU) in a subprocess."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from orchestrator.devtools.stack import Stack

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = float(os.environ.get("SLM_TEST_STARTUP_TIMEOUT_S", "900"))


@contextlib.contextmanager
def run_stack(log_dir: Path, fleet: Path | dict | None = None, env_extra: dict[str, str] | None = None):
    """``slm serve`` in a subprocess until it is ready; Ctrl-C (SIGINT) on exit, which must
    shut it down cleanly (exit code 0)."""
    from orchestrator.devtools.stack import StackError, serve_stack

    try:
        with serve_stack(fleet, log_dir, env_extra=env_extra, startup_timeout_s=STARTUP_TIMEOUT_S) as stack:
            yield stack
    except StackError as e:
        pytest.fail(str(e))
    assert stack.returncode == 0, f"slm serve did not shut down cleanly:\n{stack.log_tail()}"


def processes() -> list[tuple[int, int, str]]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) == 3:
            rows.append((int(parts[0]), int(parts[1]), parts[2]))
    return rows


def replica_pids(deployment: str) -> list[int]:
    """The processes of a Serve deployment's replica actors (not their engine subprocesses,
    which may share the title); deployment "" gives every replica of the app."""
    rows = processes()
    titled = {pid for pid, _, args in rows if f"ServeReplica:slm:{deployment}" in args and "EngineCore" not in args}
    return sorted(pid for pid, ppid, _ in rows if pid in titled and ppid not in titled)


def engine_pid(replica_pid: int) -> int | None:
    """The vLLM EngineCore process under a replica (a child or a grandchild)."""
    rows = processes()
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in rows:
        children.setdefault(ppid, []).append(pid)
    args = {pid: a for pid, _, a in rows}
    todo, seen = list(children.get(replica_pid, [])), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        if "EngineCore" in args.get(pid, ""):
            return pid
        todo.extend(children.get(pid, []))
    return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    """The demo fleet (module-scoped: one Ray cluster at a time on a 2-core machine)."""
    with run_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama model (fast to start; see orchestrator.devtools.tiny_model)."""
    from orchestrator.devtools.tiny_model import build

    cache = Path(os.environ.get("SLM_CACHE_DIR", Path.home() / ".cache" / "slm-orchestrator"))
    return build(cache / "tiny-llama-2x128")


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.url, timeout=120) as c:
        yield c
