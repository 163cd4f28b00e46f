"""The local Ray and Serve environment `slm serve` runs in: Serve's fast path, a lean Ray,
private HAProxy files and free ports, and the local Ray cluster sized for the fleet.

Joining a cluster (``RAY_ADDRESS`` set), only what every Ray process must see is added; the
cluster's own settings (the RayService's serveConfigV2, ``orchestrator.k8s.render``) win.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

from orchestrator import ray_compat
from orchestrator.k8s.render import HTTP_KEEP_ALIVE_S
from orchestrator.spec import FleetSpec


def fast_path_on(environ: Mapping[str, str]) -> bool:
    """Serve's fast path (HAProxy, direct ingress, gRPC handles); SLM_SERVE_FAST_PATH=0 turns it off."""
    return environ.get("SLM_SERVE_FAST_PATH", "1") != "0"


def serve_environment(fleet: FleetSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment `slm serve` adds before Ray starts (so every Ray process sees it);
    a variable already in ``environ`` keeps its value."""
    wanted = {ray_compat.HTTP_KEEP_ALIVE_VAR: str(HTTP_KEEP_ALIVE_S),
              ray_compat.HTTP_MIDDLEWARES_VAR: ray_compat.HTTP_MIDDLEWARES}
    local = not environ.get("RAY_ADDRESS")
    if fast_path_on(environ):
        wanted.update(ray_compat.SERVE_FAST_PATH_ENV)
        # Room in one gRPC message for the largest body the gateway takes.
        wanted[ray_compat.GRPC_MAX_MESSAGE_VAR] = str(
            min(2**31 - 1, max(ray_compat.GRPC_MAX_MESSAGE_BYTES, 2 * fleet.gateway.max_body_bytes + 2**20)))
    # Ray's own observability is off for the cluster `slm serve` starts (it costs CPU the
    # replicas share; SLM_RAY_OBSERVABILITY=1 keeps it). The gateway's /metrics, which the
    # chart's alerts and dashboard use, is unaffected.
    if local and environ.get("SLM_RAY_OBSERVABILITY", "0") != "1":
        wanted.update(ray_compat.LEAN_RAY_ENV)
    return {k: v for k, v in wanted.items() if k not in environ}


def private_haproxy_paths() -> None:
    """Give this local stack its own HAProxy files and stats ports (Ray's defaults are fixed
    paths in /tmp and fixed ports, so two stacks on one machine would share and break one
    HAProxy setup), and a short drain window for stopping gateway replicas (Serve's default,
    30 s, made every Ctrl-C wait 30 s; the local HAProxy hears within a second). Explicit
    values win."""
    import atexit
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="slm-haproxy-")
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    for key, name in ray_compat.HAPROXY_PATH_VARS.items():
        os.environ.setdefault(key, os.path.join(base, name) if name else base)
    os.environ.setdefault(ray_compat.DRAINING_PERIOD_VAR, "2")
    for key in ray_compat.HAPROXY_PORT_VARS:
        if key not in os.environ:
            os.environ[key] = str(free_port())  # bound later, by HAProxy


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's ephemeral port range."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A free TCP port on 127.0.0.1, chosen below the kernel's ephemeral range.

    The port is bound later, by another process (HAProxy, uvicorn). Meanwhile Ray opens
    many sockets, and those take ephemeral ports; a port the kernel handed out from that
    range could be taken in between (HAProxy then exits with "Address already in use").
    Ports below the range are never handed out that way."""
    low, _ = ephemeral_ports()
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(20000, low) if low > 21000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free TCP port below the ephemeral range")


def start_ray(fleet: FleetSpec, say: Callable[[str], None]) -> None:
    """Join the cluster at ``RAY_ADDRESS``, or start a local Ray with room for every CPU model
    at its max_replicas (so the autoscaler can place them all; engines then share the cores)."""
    import ray

    from orchestrator.engine.args import accelerator

    address = os.environ.get("RAY_ADDRESS")
    if address:
        say(f"joining the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=True)
        return
    wanted = sum(m.resources.num_cpus * m.autoscaling.max_replicas for m in fleet.models if accelerator(m) == "cpu")
    cores = os.cpu_count() or 1
    num_cpus = max(cores, int(wanted + 0.999))
    if num_cpus > cores:
        say(f"the fleet reserves {wanted:g} logical CPUs on a {cores}-core machine: "
            f"starting Ray with {num_cpus} (engines share the cores)")
    say("starting a local Ray cluster")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
