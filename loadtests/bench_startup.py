"""Start-up time of a fleet: first start (empty compile caches) and second start (warm), with
vLLM's AOT compile cache (vLLM's default) and with its other path (the orchestrator's CPU
default, VLLM_USE_AOT_COMPILE=0), side by side in one run.

    python -m loadtests.bench_startup [--fleet FILE] [--out .cache/bench-startup.json]

Each variant gets its own empty vLLM and torch-inductor cache directories, then the fleet
is started twice; the table gives the time to a ready gateway and each engine's own
"init engine" time from vLLM's log, and the ratio of second to first start.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from orchestrator.devtools.stack import serve_stack

VARIANTS = {"aot (vLLM default)": "1", "non-aot (orchestrator default)": "0"}
_INIT = re.compile(r"ServeReplica:slm:model-([\w.-]+?) pid=.*init engine \(profile, create kv cache, warmup model\) "
                   r"took ([\d.]+) s")


def start_once(fleet: Path | None, workdir: Path, env: dict[str, str]) -> dict:
    started = time.monotonic()
    with serve_stack(fleet, workdir, env_extra=env, startup_timeout_s=1200) as stack:
        ready = time.monotonic() - started
        log = stack.log_path.read_text(errors="replace")
    engines = {m: float(s) for m, s in _INIT.findall(log)}
    return {"ready_s": round(ready, 1), "engine_init_s": engines,
            "recompiled": log.count("Compiling model again due to a load failure")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=Path, default=None, help="fleet file (default: the demo fleet)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="slm-bench-startup-") as tmp:
        for name, aot in VARIANTS.items():
            caches = Path(tmp) / f"aot{aot}"
            env = {"VLLM_USE_AOT_COMPILE": aot, "VLLM_CACHE_ROOT": str(caches / "vllm"),
                   "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor")}
            runs = []
            for attempt in ("first", "second"):
                print(f"[bench] {name}: {attempt} start...", flush=True)
                run = start_once(args.fleet, caches / attempt, env)
                print(f"[bench]   ready in {run['ready_s']} s, engines {run['engine_init_s']}, "
                      f"recompiled after a load failure: {run['recompiled']}", flush=True)
                runs.append(run)
            results[name] = runs
    print("\n| variant | first start: ready | second start: ready | second / first | engine init, first -> second |")
    print("|---|---:|---:|---:|---|")
    for name, (first, second) in results.items():
        engines = ", ".join(f"{m} {first['engine_init_s'].get(m, float('nan')):.1f} -> {s:.1f} s"
                            for m, s in second["engine_init_s"].items())
        print(f"| {name} | {first['ready_s']:.0f} s | {second['ready_s']:.0f} s | "
              f"{second['ready_s'] / first['ready_s']:.2f}x | {engines} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
