"""`slm`: serve a fleet, validate a fleet file, show a running fleet's status.

    slm serve [-f FILE] [--host HOST] [--port PORT]
    slm validate -f FILE [--plan]
    slm status [--url URL]
    slm render -f FILE --format serve-config|rayservice [--name NAME] [--namespace NS] [--engine gpu|cpu]
    slm apply -f FILE [--namespace NS] [--name NAME] [--context CTX] [--wait SECONDS]
    slm plan -f FILE [--gpus 4xH100-80GB] [--cpu-memory 24GiB] [--kv-seqs N] [--max-util F] [--write OUT] [--json]

Exit codes: 0 success, 1 runtime failure, 2 bad input (the message names the file and
the field).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from orchestrator import ray_compat, runtime_env
from orchestrator.names import deployment_name, model_app
from orchestrator.spec import FleetSpec, FleetValidationError, demo_fleet_path, load_fleet

EXIT_BAD_INPUT = 2


def _say(message: str) -> None:
    print(f"[slm] {message}", file=sys.stderr, flush=True)


def _load(path: str | None) -> tuple[FleetSpec, str]:
    file = Path(path) if path else demo_fleet_path()
    return load_fleet(file), str(file)


def cmd_validate(args: argparse.Namespace) -> int:
    fleet, origin = _load(args.file)
    names = ", ".join(m.name for m in fleet.models)
    if args.plan:
        for line in _plan_cpu_memory(fleet, origin).splitlines():
            print(line)
    print(f"{origin}: valid ({len(fleet.models)} models: {names})")
    return 0


def _plan_refusal(origin: str, e) -> FleetValidationError:
    """A memory.PlanError as the CLI's bad-input error, naming the file and the model's field."""
    from orchestrator.spec import FieldError

    where = "" if e.model_index is None else f"models[{e.model_index}]" + (f".{e.field}" if e.field else "")
    return FleetValidationError(origin, [FieldError(where, str(e))])


def _plan_cpu_memory(fleet: FleetSpec, origin: str, memory_bytes: int | None = None,
                     is_cpu=None) -> str:
    """The CPU memory plan of a fleet on this machine (or on ``memory_bytes``) as text, with a
    warning line per model short of its KV target; FleetValidationError (exit 2) naming the
    model when its replicas cannot reach their floor."""
    from orchestrator import memory
    from orchestrator.engine.args import accelerator

    node = memory_bytes or memory.node_memory()
    try:
        plan = memory.plan_cpu(fleet.models, node, is_cpu=is_cpu or (lambda m: accelerator(m) == "cpu"))
    except memory.PlanError as e:
        raise _plan_refusal(origin, e) from None
    if not plan.needs and not plan.unknown:
        return ""
    lines = [f"memory: {line}" for line in memory.render_cpu_plan(plan).splitlines()]
    lines += [f"warning: {line} (lower max_model_len, raise the memory, or set kv_cache_tokens lower)"
              for line in plan.shortfalls()]
    return "\n".join(lines)


def resolve_sources(fleet: FleetSpec, origin: str) -> None:
    """Check every local source exists and convert GGUF files now, with progress shown."""
    from orchestrator import sources
    from orchestrator.engine import speculative
    from orchestrator.spec import FieldError

    problems = []
    for i, model in enumerate(fleet.models):
        src = sources.parse_source(model.source)
        path = None
        if src.kind != "hf":
            try:
                path, _ = sources.resolve(src)
            except (FileNotFoundError, ValueError) as e:
                problems.append(FieldError(f"models[{i}].source", str(e)))
                continue
        if model.speculative is not None and model.speculative.method_name == "draft_model":
            # Build a derived draft now (with progress) and check the draft's tokenizer.
            try:
                speculative.resolve_draft(model, path or src.location)
            except (FileNotFoundError, ValueError) as e:
                problems.append(FieldError(f"models[{i}].speculative.draft", str(e)))
    if problems:
        raise FleetValidationError(origin, problems)


def _replica_summary(apps: dict, names: dict[str, tuple[str, str]]) -> str:
    """``names``: model -> (its application, its deployment)."""
    parts = []
    for model, (app_name, dep) in names.items():
        app_status = apps.get(app_name)
        d = app_status.deployments.get(dep) if app_status else None
        states = {str(getattr(k, "value", k)): v for k, v in (d.replica_states if d else {}).items()}
        parts.append(f"{model}: {states.get('RUNNING', 0)} running, {states.get('STARTING', 0)} starting")
    return "; ".join(parts)


def _failure_summary(statuses: dict, failed: list[str], names: dict[str, tuple[str, str]]) -> list[str]:
    """A few lines per model that failed to deploy: the replica's own summary (cause, what to
    change, its log) where it gave one, else the last exception line of Serve's message."""
    from orchestrator import startup

    lines = []
    by_deployment = {dep: model for model, (_, dep) in names.items()}
    for app_name in failed:
        for dep_name, dep in statuses[app_name].deployments.items():
            status = str(getattr(dep.status, "value", dep.status))
            if status not in ("DEPLOY_FAILED", "UNHEALTHY") and not dep.message:
                continue
            model = by_deployment.get(dep_name, dep_name)
            message = dep.message or statuses[app_name].message or ""
            own = re.search(r"model '.*?' failed to start: (.*)", message)
            if own:
                cause, _, rest = own.group(1).partition(" -- ")
                lines.append(f"model {model!r} failed to start: {cause}")
                advice, _, where = rest.rpartition(" (full log: ")
                lines.append(f"  what to change: {advice or rest}")
                if where:
                    lines.append(f"  full log: {where.rstrip(')')}")
            elif status in ("DEPLOY_FAILED", "UNHEALTHY"):
                cause = startup.cause_from_log(message) or (message.strip().splitlines() or ["(no message)"])[0]
                lines.append(f"model {model!r} ({dep_name}) failed: {cause[:400]}")
                lines.append(f"  full log: {ray_compat.ray_logs_dir()}/serve (the Serve controller's log)")
    return lines or [f"deployment failed: {', '.join(failed)} (see {ray_compat.ray_logs_dir()})"]


def cmd_serve(args: argparse.Namespace) -> int:
    fleet, origin = _load(args.file)
    host = args.host or fleet.gateway.host
    port = args.port or fleet.gateway.port
    _say(f"fleet {origin}: {', '.join(m.name for m in fleet.models)}")
    if not os.environ.get("RAY_ADDRESS"):
        # Refuse what cannot fit before starting anything (joining a cluster, each replica plans on
        # its own node when it starts).
        for line in _plan_cpu_memory(fleet, origin).splitlines():
            _say(line)
    resolve_sources(fleet, origin)

    os.environ.update(runtime_env.serve_environment(fleet, os.environ))
    if runtime_env.fast_path_on(os.environ) and not os.environ.get("RAY_ADDRESS"):
        runtime_env.private_haproxy_paths()
    from orchestrator.terminal import TracebackFolder

    # The replicas' output comes through here: fold their tracebacks (the failure summary
    # names the cause and the log that holds them).
    sys.stdout = TracebackFolder(sys.stdout, ray_compat.ray_logs_dir())
    sys.stderr = TracebackFolder(sys.stderr, ray_compat.ray_logs_dir())
    import ray
    from ray import serve

    from orchestrator.app import applications, log_lora_choices

    runtime_env.start_ray(fleet, _say)

    stop = {"now": False, "reload": False}

    def on_signal(signum, _frame):
        stop["now"] = True

    def on_hangup(signum, _frame):
        stop["reload"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        serve.start(http_options={"host": host, "port": port})
        names = {m.name: (model_app(m.name, m.fast_lane), deployment_name(m.name)) for m in fleet.models}
        log_lora_choices(fleet, _say)
        apps = applications(fleet.model_dump(mode="json"))
        # Declarative, as KubeRay deploys: a re-applied fleet whose adapters changed only
        # reconfigures the running replicas (see ray_compat.deploy_applications).
        ray_compat.deploy_applications(apps)
        _say(f"deploying {len(fleet.models)} models (engines take ~30 s each to start)")
        started = time.monotonic()
        last = ""
        while not stop["now"]:
            statuses = serve.status().applications
            states = {a["name"]: (str(getattr(statuses[a["name"]].status, "value", statuses[a["name"]].status))
                                  if a["name"] in statuses else "NOT_STARTED") for a in apps}
            summary = _replica_summary(statuses, names)
            if all(v == "RUNNING" for v in states.values()):
                _say(f"ready in {time.monotonic() - started:.0f}s: {summary}")
                break
            failed = [name for name, v in states.items() if v in ("DEPLOY_FAILED", "UNHEALTHY")]
            if failed:
                for line in _failure_summary(statuses, failed, names):
                    _say(line)
                return 1
            state = next(v for v in states.values() if v != "RUNNING")
            line = f"{state.lower()} ({time.monotonic() - started:.0f}s): {summary}"
            if line != last:
                _say(line)
                last = line
            time.sleep(2)
        if not stop["now"]:
            shown = "localhost" if host in ("0.0.0.0", "::") else host
            _say(f"gateway at http://{shown}:{port}/v1 (models: {', '.join(names)}); Ctrl-C to stop")
            for a in apps[1:]:
                _say(f"fast lane of {a['args']['model']} at http://{shown}:{port}{a['route_prefix']}/v1")
            _say(f"send SIGHUP (kill -HUP {os.getpid()}) to re-read {origin} and apply what changed")
        while not stop["now"]:
            time.sleep(0.5)
            if stop["reload"]:
                stop["reload"] = False
                try:
                    fleet = _reload(origin, fleet) or fleet
                except Exception as e:  # noqa: BLE001 - a bad re-apply must not stop a serving fleet
                    first = (str(e).splitlines() or [""])[0][:300]
                    _say(f"SIGHUP: {origin} not applied ({type(e).__name__}: {first}); the running fleet is unchanged")
        _say("shutting down")
        return 0
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _reload(origin: str, current: FleetSpec) -> FleetSpec | None:
    """SIGHUP: re-read the fleet file and apply it. Changed adapters are loaded and unloaded on
    the running replicas (no restart); other changes redeploy as Serve decides. A file that
    does not validate changes nothing (its errors are printed)."""
    from orchestrator.app import applications, log_lora_choices

    try:
        fleet = load_fleet(origin)
        resolve_sources(fleet, origin)
    except FleetValidationError as e:
        _say(f"SIGHUP: {origin} not applied, the running fleet is unchanged:")
        for line in str(e).splitlines():
            _say(f"  {line}")
        return None
    before = {a.name: a.source for m in current.models for a in m.adapters}
    after = {a.name: a.source for m in fleet.models for a in m.adapters}
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    replaced = sorted(n for n in set(before) & set(after) if before[n] != after[n])
    log_lora_choices(fleet, _say)
    ray_compat.deploy_applications(applications(fleet.model_dump(mode="json")))
    parts = [f"{what} {', '.join(names)}" for what, names in (("added", added), ("removed", removed),
                                                               ("replaced", replaced)) if names]
    _say(f"SIGHUP: applied {origin}" + (f"; adapters {'; '.join(parts)}" if parts else ""))
    return fleet


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    url = args.url.rstrip("/")
    try:
        resp = httpx.get(f"{url}/fleet", timeout=10)
    except httpx.HTTPError as e:
        print(f"slm status: cannot reach the gateway at {url}: {e}", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        print(f"slm status: {url}/fleet answered {resp.status_code}: {resp.text[:200]}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(resp.json(), indent=2))
        return 0
    rows = [("MODEL", "TASK", "QUEUE", "RUNNING", "STARTING", "DRAINING", "TARGET", "MIN-MAX", "ROUTING",
             "KV/REPLICA", "LAST DECISION")]
    failures = []
    for m in resp.json().get("models", []):
        r = m.get("replicas", {})
        a = m.get("autoscaling", {})
        last = a.get("last_decision") or {}
        decision = f"{last.get('direction', '-')}: {last.get('reason', '')}" if last else "-"
        kv = (m.get("footprint") or {}).get("kv_cache_tokens")
        rows.append((m["name"], m.get("task", ""), f"{m.get('queue_depth', 0):g}", str(r.get("running", 0)),
                     str(r.get("starting", 0)), str(r.get("draining", 0)), str(r.get("target", 0)),
                     f"{a.get('min_replicas', '?')}-{a.get('max_replicas', '?')}",
                     m.get("routing", {}).get("policy", ""), f"{kv:,} tok" if kv else "-", decision))
        if r.get("last_error"):
            e = r["last_error"]
            failures.append(f"{m['name']}: failed to start: {e.get('error')}\n  what to change: {e.get('advice')}\n"
                            f"  full log: {e.get('log')}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    for failure in failures:
        print(failure)
    return 0


def _render(args: argparse.Namespace) -> tuple[dict, str]:
    from orchestrator.k8s import render
    from orchestrator.spec import parse_fleet, read_fleet_data

    data = read_fleet_data(args.file)
    fleet = parse_fleet(data, args.file)
    opts = render.ClusterOptions(
        name=args.name, namespace=args.namespace, engine=args.engine, image=args.image,
    )
    return render.rayservice(fleet, data, opts, origin=args.file), args.file


def cmd_render(args: argparse.Namespace) -> int:
    from orchestrator.k8s import render

    if args.format == "serve-config":
        from orchestrator.spec import parse_fleet, read_fleet_data

        data = read_fleet_data(args.file)
        parse_fleet(data, args.file)
        print(render.to_yaml(render.serve_config(data)), end="")
        return 0
    body, _ = _render(args)
    print(render.to_yaml(body), end="")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from orchestrator.k8s import apply as k8s_apply

    body, origin = _render(args)
    _say(f"applying {origin} as rayservice/{body['metadata']['name']}")
    try:
        ready = k8s_apply.apply(body, args.namespace, context=args.context, wait_s=args.wait,
                                say=lambda line: print(line, flush=True))
    except k8s_apply.ApplyError as e:
        print(f"slm apply: {e}", file=sys.stderr)
        return 1
    return 0 if ready or not args.wait else 1


def cmd_plan(args: argparse.Namespace) -> int:
    import yaml

    from orchestrator import memory, planner
    from orchestrator.engine.args import accelerator
    from orchestrator.spec import parse_fleet, read_fleet_data

    data = read_fleet_data(args.file)
    fleet = parse_fleet(data, args.file)
    try:
        cpu_memory = memory.parse_size(args.cpu_memory) if args.cpu_memory else None
    except ValueError as e:
        print(f"slm plan: --cpu-memory {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # With --gpus, models whose accelerator is auto go to the GPUs; without, they follow the
    # installed vLLM build.
    on_cpu = (lambda m: m.resources.accelerator == "cpu") if args.gpus else (lambda m: accelerator(m) == "cpu")
    plan = None
    if args.gpus:
        try:
            nodes = planner.parse_gpus(args.gpus)
            plan = planner.make_plan(fleet, nodes, kv_seqs=args.kv_seqs, max_util=args.max_util)
        except planner.PlanError as e:
            if e.model_index is None:
                print(f"slm plan: {e}", file=sys.stderr)
                return EXIT_BAD_INPUT
            raise _plan_refusal(args.file, e) from None
    # With --gpus, CPU models are planned only for a machine named with --cpu-memory (the
    # machine running `slm plan` is rarely where they will run).
    cpu_text = _plan_cpu_memory(fleet, args.file, cpu_memory, on_cpu) if cpu_memory or not args.gpus else ""
    skipped = [m.name for m in fleet.models if on_cpu(m)] if args.gpus and not cpu_memory else []
    if plan is not None and args.json:
        print(json.dumps([{
            "model": p.model, "replica": p.replica + 1, "node": p.node, "gpu_type": plan.nodes[p.node].gpu_type,
            "gpus": p.gpu_indices, "num_gpus": p.num_gpus, "gpu_memory_utilization": p.gpu_memory_utilization,
            "weight_bytes": int(p.budget.weights), "lora_bytes": int(p.budget.lora),
            "kv_floor_bytes": int(p.budget.floor),
            "kv_target_bytes": int(p.budget.target), "kv_bytes": int(p.budget.kv), "kv_tokens": p.budget.kv_tokens,
            "full_sequences": round(p.budget.full_sequences, 2), "max_model_len": p.budget.max_model_len,
            "budget_bytes": int(p.budget.total), "parameters": p.budget.parameters,
            "size_class": p.budget.size_class,
        } for p in plan.placements], indent=2))
    elif plan is not None:
        print(planner.render_table(plan))
    if plan is not None:
        for line in plan.shortfalls():
            _say(f"warning: {line}")
    if cpu_text:
        print(cpu_text, file=sys.stderr if args.json else sys.stdout)
    elif skipped:
        _say(f"not planned (CPU models): {', '.join(skipped)} (give --cpu-memory to plan them)")
    elif plan is None:
        _say("no CPU models to plan here; give --gpus to plan GPU models")
    if args.write and plan is not None:
        Path(args.write).write_text(yaml.safe_dump(planner.planned_fleet(data, fleet, plan), sort_keys=False))
        _say(f"wrote {args.write}: the fleet with each model's GPU share and gpu_memory_utilization")
    return 0


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", required=True, help="fleet YAML")
    p.add_argument("--name", default="slm", help="RayService name, prefix of its Services (default: slm)")
    p.add_argument("--namespace", default=None, help="namespace (default: the kube context's, else default)")
    p.add_argument("--engine", choices=["gpu", "cpu"], default="gpu",
                   help="engine build of the image; models with accelerator auto run on it (default: gpu)")
    p.add_argument("--image", default=None, help="worker image (default: the project's image for --engine)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slm", description="Serve small language models on Ray Serve + vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="deploy a fleet and open the OpenAI-compatible gateway")
    p.add_argument("-f", "--file", help="fleet YAML (default: the built-in demo fleet)")
    p.add_argument("--host", default=None, help="bind address (default: gateway.host, 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="port (default: gateway.port, 8000)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("validate", help="check a fleet file")
    p.add_argument("-f", "--file", required=True, help="fleet YAML")
    p.add_argument("--plan", action="store_true",
                   help="also check that the fleet's CPU replicas at max_replicas fit this machine's memory")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("status", help="show a running fleet")
    p.add_argument("--url", default="http://localhost:8000", help="gateway URL")
    p.add_argument("--json", action="store_true", help="print the raw /fleet JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("render", help="print the Serve config or a complete KubeRay RayService for a fleet")
    _cluster_args(p)
    p.add_argument("--format", choices=["serve-config", "rayservice"], default="rayservice",
                   help="serve-config: Ray Serve's config (serveConfigV2); rayservice: the whole RayService")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("apply", help="create or update the fleet's RayService in the current kube context")
    _cluster_args(p)
    p.add_argument("--context", default=None, help="kube context (default: the current one)")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="wait up to this long for the RayService to be ready (exit 1 if it is not)")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("plan", help="place every model replica on GPUs (and CPU memory) by memory footprint")
    p.add_argument("-f", "--file", required=True, help="fleet YAML")
    p.add_argument("--gpus", default=None,
                   help="GPUs per node, e.g. 4xH100-80GB, or several nodes: 4xH100-80GB,2xL4-24GB (unset: plan "
                        "the CPU models only)")
    p.add_argument("--cpu-memory", default=None, metavar="SIZE",
                   help="plan the CPU models for a machine of this memory, e.g. 24GiB (default: this machine's)")
    p.add_argument("--kv-seqs", type=int, default=None,
                   help="KV-cache target per GPU replica, in sequences of max_model_len tokens (default: each "
                        "model's kv_cache_tokens, else min(max_num_seqs, target_queue_depth) sequences)")
    p.add_argument("--max-util", type=float, default=0.9, help="most of a GPU's memory to plan (default: 0.9)")
    p.add_argument("--write", metavar="OUT",
                   help="write the fleet with the plan applied (num_gpus, gpu_memory_utilization)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FleetValidationError as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
