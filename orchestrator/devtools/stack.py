"""Run `slm serve` on a fleet in a subprocess until it is ready, then stop it with Ctrl-C.

Shared by the integration tests and the benchmarks under loadtests/::

    with serve_stack({"models": [...]}, Path("/tmp/run")) as stack:
        httpx.get(f"{stack.url}/v1/models")
    assert stack.returncode == 0   # a clean shutdown
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import yaml

from orchestrator.runtime_env import free_port

REPO = Path(__file__).resolve().parents[2]


class StackError(RuntimeError):
    """The stack exited or was not ready in time; the message ends with its log's tail."""


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, what: str, log_path: Path,
               on_wait: Callable[[float], None] | None = None, interval_s: float = 1) -> None:
    """Wait until ``url`` answers 200; StackError (ending with the log's tail) when ``proc``
    exits or ``timeout_s`` passes first. ``on_wait`` gets the seconds waited, each round."""
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with {proc.returncode}:\n{log_tail(log_path)}\n(full log: {log_path})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise StackError(f"{what} not ready after {timeout_s:.0f}s:\n{log_tail(log_path)}\n(full log: {log_path})")
        if on_wait:
            on_wait(waited)
        time.sleep(interval_s)


class Stack:
    def __init__(self, url: str, log_path: Path, proc: subprocess.Popen, fleet_path: Path | None = None):
        self.url = url
        self.log_path = log_path
        self.proc = proc
        self.fleet_path = fleet_path
        self.returncode: int | None = None

    def log_tail(self, n: int = 60) -> str:
        return log_tail(self.log_path, n)

    def reload(self, fleet: dict, timeout_s: float = 60) -> str:
        """Write ``fleet`` over the stack's fleet file and send SIGHUP (what an operator does to
        re-apply it); returns ``slm serve``'s line saying it applied the file."""
        marker = "SIGHUP: "
        seen = self.log_path.read_text(errors="replace").count(marker)
        self.fleet_path.write_text(yaml.safe_dump(fleet))
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if marker in line]
            if len(lines) > seen:
                return lines[-1]
            time.sleep(0.2)
        raise StackError(f"slm serve did not apply the fleet within {timeout_s:.0f}s after SIGHUP:\n{self.log_tail()}")


def log_tail(path: Path, n: int = 40) -> str:
    """The last ``n`` lines of a server's log, for an error message ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@contextlib.contextmanager
def serve_stack(
    fleet: dict | Path | None,
    workdir: Path,
    *,
    env_extra: dict[str, str] | None = None,
    startup_timeout_s: float = 900,
    on_wait: Callable[[float], None] | None = None,
    command_prefix: list[str] | None = None,
) -> Iterator[Stack]:
    """A ready stack for ``fleet`` (a dict as in fleet.yaml, a file, or None for the demo).

    ``command_prefix`` goes before the ``slm serve`` command; it must exec it (so signals
    reach it), e.g. ``["taskset", "-c", "0"]`` pins the whole stack, Ray included, to core 0.
    Its output goes to ``workdir/slm-serve.log``. On exit it gets SIGINT (what Ctrl-C
    sends), up to 120 s to stop, then SIGKILL; ``stack.returncode`` holds its exit code."""
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(fleet, dict):
        path = workdir / "fleet.yaml"
        path.write_text(yaml.safe_dump(fleet))
        fleet = path
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra or {})
    cmd = [*(command_prefix or []), sys.executable, "-m", "orchestrator.cli", "serve",
           "--host", "127.0.0.1", "--port", str(port)]
    if fleet is not None:
        cmd += ["-f", str(fleet)]
    log_path = workdir / "slm-serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        stack = Stack(f"http://127.0.0.1:{port}", log_path, proc, fleet)
        try:
            wait_ready(proc, f"{stack.url}/ready", startup_timeout_s, "slm serve", log_path, on_wait, interval_s=2)
            yield stack
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: Serve shuts down cleanly
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            stack.returncode = proc.returncode
