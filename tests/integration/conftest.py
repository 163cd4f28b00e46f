"""Real stacks for the integration tests: `slm serve` (real Ray, real vLLM on CPU) in a subprocess."""

from __future__ import annotations

import contextlib
import os
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
