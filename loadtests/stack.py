"""Start `slm serve` on a fleet for a benchmark, wait until it is ready, stop it cleanly."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serve(fleet: dict, workdir: Path, startup_timeout_s: float = 1200, command_prefix: list[str] | None = None,
          env_extra: dict[str, str] | None = None):
    """Yield the gateway URL of a running stack for ``fleet`` (a dict as in fleet.yaml).

    ``command_prefix``: see ``serve_stack`` (e.g. ``["taskset", "-c", "0"]``)."""
    from orchestrator.devtools.stack import StackError, serve_stack

    last = [0.0]

    def progress(waited: float) -> None:
        if waited - last[0] >= 10:
            last[0] = waited
            print(f"[loadtests] waiting for the stack ({waited:.0f}s)", file=sys.stderr, flush=True)

    try:
        with serve_stack(fleet, workdir, startup_timeout_s=startup_timeout_s, on_wait=progress,
                         command_prefix=command_prefix, env_extra=env_extra) as stack:
            yield stack.url
    except StackError as e:
        raise SystemExit(f"{e}\n(full log: {workdir / 'slm-serve.log'})") from None


def metric_values(url: str, name: str, **labels: str) -> dict[tuple, float]:
    """Samples of one metric from the gateway's /metrics, keyed by their label values."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[tuple(sorted(s.labels.items()))] = s.value
    return out
