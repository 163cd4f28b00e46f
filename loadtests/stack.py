"""Start `slm serve` on a fleet for a benchmark, wait until it is ready, stop it cleanly."""

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
import yaml

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(fleet: dict, workdir: Path, startup_timeout_s: float = 1200):
    """Yield the gateway URL of a running stack for ``fleet`` (a dict as in fleet.yaml)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    port = _free_port()
    log_path = workdir / "slm-serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "serve", "-f", str(path), "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"slm serve exited with {proc.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                        break
                if time.monotonic() - started > startup_timeout_s:
                    raise SystemExit(f"stack not ready after {startup_timeout_s:.0f}s; see {log_path}")
                print(f"[bench] waiting for the stack ({time.monotonic() - started:.0f}s)", file=sys.stderr,
                      flush=True)
                time.sleep(10)
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def metric_values(url: str, name: str, **labels: str) -> dict[tuple, float]:
    """Samples of one metric from the gateway's /metrics, keyed by their label values."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[tuple(sorted(s.labels.items()))] = s.value
    return out
