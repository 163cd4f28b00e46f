"""Autoscaler step response: a load step, the scaling decision, the new replicas serving.

One model (a tiny random Llama: fast replicas, so the run measures the control loop,
not model loading) starts at one replica. At t=0 a step of C concurrent clients begins;
the ideal replica count is ceil(C / target_queue_depth). Reported, from polling /fleet
every 0.25 s: when the queue crossed the target, when the autoscaler decided, when each
new replica was serving, the peak target against the ideal (overshoot), and, after the
load stops, when the model scaled back down.

    python -m loadtests.bench_autoscaler [--concurrency 16] [--target 4] [--max-replicas 6]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

import httpx

from loadtests.stack import serve
from orchestrator.devtools.tiny_model import build

MODEL = "tiny"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--target", type=float, default=4, help="target_queue_depth")
    parser.add_argument("--max-replicas", type=int, default=6)
    parser.add_argument("--step-s", type=float, default=150, help="how long the load lasts")
    parser.add_argument("--downscale-delay-s", type=float, default=10)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-autoscaler"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    model_dir = build(args.workdir / "tiny-llama-2x128")
    fleet = {"models": [{
        "name": MODEL, "source": str(model_dir),
        "engine": {"max_model_len": 2048, "max_num_seqs": 32, "enforce_eager": True},
        "autoscaling": {"min_replicas": 1, "max_replicas": args.max_replicas, "target_queue_depth": args.target,
                        "upscale_delay_s": 1, "downscale_delay_s": args.downscale_delay_s},
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
    }]}
    ideal = min(args.max_replicas, math.ceil(args.concurrency / args.target))
    timeline: list[dict] = []
    with serve(fleet, args.workdir) as url:
        stop = threading.Event()

        def client(i: int) -> None:
            with httpx.Client(base_url=url, timeout=600) as c:
                n = 0
                while not stop.is_set():
                    c.post("/v1/completions", json={"model": MODEL, "prompt": f"client {i} request {n}",
                                                    "max_tokens": 256, "ignore_eos": True}).raise_for_status()
                    n += 1

        with httpx.Client(base_url=url, timeout=30) as poll:
            def view() -> dict:
                return poll.get("/fleet").json()["models"][0]

            t0 = time.time()
            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.concurrency)]
            for t in threads:
                t.start()
            load_stopped_at = None
            while True:
                now = time.time()
                v = view()
                timeline.append({"t": now - t0, "queue": v["queue_depth"], **v["replicas"],
                                 "last_scale": v["autoscaling"]["last_scale"]})
                if load_stopped_at is None and now - t0 >= args.step_s:
                    stop.set()
                    load_stopped_at = now - t0
                if load_stopped_at is not None and v["replicas"]["target"] == 1 and v["replicas"]["running"] == 1 \
                        and v["replicas"]["draining"] == 0:
                    break
                if now - t0 > args.step_s + 600:
                    break
                time.sleep(0.25)
            for t in threads:
                t.join(timeout=600)

    def first(pred):
        return next((p["t"] for p in timeline if pred(p)), None)

    crossed = first(lambda p: p["queue"] > args.target)
    decided = first(lambda p: p["target"] > 1)
    serving = {n: first(lambda p, n=n: p["running"] >= n) for n in range(2, ideal + 1)}
    peak = max(p["target"] for p in timeline)
    at_stop = next((p["target"] for p in timeline if p["t"] >= (load_stopped_at or 0)), peak)
    down_decided = first(lambda p: load_stopped_at is not None and p["t"] > load_stopped_at and p["target"] < at_stop)
    result = {
        "concurrency": args.concurrency, "target_queue_depth": args.target, "ideal_replicas": ideal,
        "peak_target_replicas": peak, "overshoot": peak - ideal,
        "queue_crossed_target_s": crossed, "scale_up_decided_s": decided,
        "decision_after_crossing_s": (decided - crossed) if crossed is not None and decided is not None else None,
        "replica_serving_s": serving, "load_stopped_s": load_stopped_at,
        "scale_down_decided_after_stop_s": (down_decided - load_stopped_at) if down_decided else None,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps({"result": result, "timeline": timeline}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
