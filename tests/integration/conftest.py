"""Real stacks for the integration tests: `slm serve` (real Ray, real vLLM on CPU) in a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = float(os.environ.get("SLM_TEST_STARTUP_TIMEOUT_S", "900"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, url: str, log_path: Path, proc: subprocess.Popen):
        self.url = url
        self.log_path = log_path
        self.proc = proc

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextlib.contextmanager
def run_stack(log_dir: Path, fleet: Path | None = None, env_extra: dict[str, str] | None = None):
    """``slm serve`` in a subprocess until it is ready; Ctrl-C (SIGINT) on exit, which must
    shut it down cleanly (exit code 0)."""
    port = _free_port()
    log_path = log_dir / "slm-serve.log"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if fleet is not None:
        cmd += ["-f", str(fleet)]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stack = Stack(f"http://127.0.0.1:{port}", log_path, proc)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"slm serve exited with {proc.returncode}:\n{stack.log_tail()}")
            try:
                if httpx.get(f"{stack.url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"stack not ready after {STARTUP_TIMEOUT_S:.0f}s:\n{stack.log_tail()}")
            time.sleep(2)
        yield stack
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: Serve shuts down cleanly
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    assert proc.returncode == 0, f"slm serve did not shut down cleanly:\n{stack.log_tail()}"


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
