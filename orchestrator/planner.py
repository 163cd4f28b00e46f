"""Placement planner: which GPUs (or GPU fractions) each model replica gets, by memory.

Each replica's need comes from ``orchestrator.memory``: weights, LoRA slots (models with
adapters), runtime overhead (1 GiB + 10% of the weights) and a KV cache between a floor (one
``max_model_len`` sequence: vLLM needs it to start) and a target (``kv_cache_tokens``, else
the autoscaler's target concurrency at full length). Replicas are packed by their floor, largest first, onto the
first GPU with room (first-fit decreasing) up to ``max_util`` of its memory; then the room
left on each GPU is shared toward the targets. A replica that fits in a fraction of a GPU
shares it (fractional Ray ``num_gpus`` and the matching vLLM ``gpu_memory_utilization``);
a replica with ``tensor_parallel_size`` N takes N whole GPUs of one node. Every model is
planned at ``max_replicas``, so the autoscaler can always reach it. Only a replica that
cannot reach its floor is refused; one short of its target is a warning.

Example::

    plan = make_plan(fleet, parse_gpus("1xH100-80GB"))
    print(render_table(plan))
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any

from orchestrator import memory
from orchestrator.memory import PlanError, ReplicaNeed
from orchestrator.spec import FleetSpec, ModelSpec

__all__ = ["PlanError", "Node", "Placement", "Plan", "parse_gpus", "budget", "make_plan", "planned_fleet",
           "render_table"]

GIB = 1024**3
# Known GPUs: memory in GiB as sold (80 GB cards report ~79.2 GiB usable; the planner's
# max_util leaves that margin).
GPU_MEMORY_GB = {
    "H200-141GB": 141, "H100-94GB": 94, "H100-80GB": 80, "A100-80GB": 80, "A100-40GB": 40, "L40S-48GB": 48,
    "L40-48GB": 48, "A6000-48GB": 48, "A10G-24GB": 24, "A10-24GB": 24, "L4-24GB": 24, "RTX4090-24GB": 24,
    "V100-32GB": 32, "V100-16GB": 16, "T4-16GB": 16,
}
_GPU_RE = re.compile(r"^(?:(\d+)\s*x\s*)?([A-Za-z0-9]+)-(\d+(?:\.\d+)?)GB$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Node:
    index: int
    gpu_type: str  # Ray's accelerator type name: H100, A10G, L4...
    gpu_name: str  # as given: H100-80GB
    gpu_memory_gb: float
    gpus: int


def parse_gpus(text: str) -> list[Node]:
    """``4xH100-80GB`` (one node of 4), or several nodes: ``4xH100-80GB,2xL4-24GB``."""
    nodes = []
    for i, item in enumerate(part.strip() for part in text.split(",")):
        m = _GPU_RE.match(item)
        if not m:
            known = ", ".join(sorted(GPU_MEMORY_GB))
            raise PlanError(f"--gpus {item!r}: expected COUNTxTYPE-MEMGB, e.g. 4xH100-80GB (known: {known})")
        count = int(m.group(1) or 1)
        if count < 1:
            raise PlanError(f"--gpus {item!r}: a node needs at least one GPU")
        name = f"{m.group(2).upper()}-{m.group(3)}GB"
        nodes.append(Node(i, m.group(2).upper(), name, float(m.group(3)), count))
    return nodes


@dataclasses.dataclass
class Placement:
    model: str
    replica: int
    node: int
    gpu_indices: list[int]
    num_gpus: float  # Ray's per-replica GPUs: N for tensor parallel, a fraction below 1
    gpu_memory_utilization: float
    budget: ReplicaNeed  # this replica's need, with its planned KV


@dataclasses.dataclass
class Plan:
    nodes: list[Node]
    placements: list[Placement]
    used: dict[tuple[int, int], float]  # (node, gpu) -> fraction of memory taken

    def for_model(self, name: str) -> list[Placement]:
        return [p for p in self.placements if p.model == name]

    def shortfalls(self) -> list[str]:
        """One line per model whose planned KV is below its target (the plan still runs)."""
        out = []
        for name in dict.fromkeys(p.model for p in self.placements):
            b = min((p.budget for p in self.for_model(name)), key=lambda b: b.kv)
            if not b.target_met:
                out.append(f"model {name!r}: KV for {b.full_sequences:.1f} of its "
                           f"{b.target_tokens / b.max_model_len:.1f} target sequences of {b.max_model_len} tokens "
                           f"({b.kv_tokens:,} of {b.target_tokens:,} tokens per replica)")
        return out


def budget(spec: ModelSpec, kv_seqs: int | None = None, index: int = 0) -> ReplicaNeed:
    """One GPU replica's need (per GPU); ``kv_seqs`` overrides the KV target with that many
    full-length sequences (at most max_num_seqs). ``kv`` is set to the target."""
    need = memory.replica_need(spec, "gpu", index)
    if kv_seqs is not None:
        need.target_tokens = max(need.floor_tokens, min(kv_seqs, need.max_num_seqs) * need.max_model_len)
    need.kv = need.target
    return need


_STEP = 0.01  # GPU shares are whole hundredths


def _share(need_bytes: float, gpu_bytes: float) -> float:
    return min(1.0, round(math.ceil(need_bytes / gpu_bytes / _STEP - 1e-9) * _STEP, 2))


def _place_one(spec: ModelSpec, r: int, b: ReplicaNeed, nodes: list[Node], used: dict[tuple[int, int], float],
               max_util: float) -> Placement | None:
    """Place one replica, by its floor, on the first GPU(s) of ``nodes`` with room (mutating ``used``)."""
    floor = b.base + b.floor
    for node in nodes:
        gpu_bytes = node.gpu_memory_gb * 1e9
        frac = _share(floor, gpu_bytes)
        if b.gpus == 1 and frac <= max_util:
            for g in range(node.gpus):
                if used[(node.index, g)] + frac <= max_util + 1e-9:
                    used[(node.index, g)] += frac
                    return Placement(spec.name, r, node.index, [g], frac, frac, copy.copy(b))
        elif b.gpus > 1 and floor <= max_util * gpu_bytes:
            free = [g for g in range(node.gpus) if used[(node.index, g)] == 0.0]
            if len(free) >= b.gpus:
                chosen = free[: b.gpus]
                for g in chosen:
                    used[(node.index, g)] = 1.0
                # Whole GPUs are the replica's own: the KV cache may take all the planned room.
                return Placement(spec.name, r, node.index, chosen, float(b.gpus), max_util, copy.copy(b))
    return None


def _grow(placements: list[Placement], nodes: list[Node], used: dict[tuple[int, int], float],
          max_util: float) -> None:
    """Share each GPU's room left after the floors toward its replicas' KV targets."""
    by_gpu: dict[tuple[int, int], list[Placement]] = {}
    for p in placements:
        gpu_bytes = nodes[p.node].gpu_memory_gb * 1e9
        if p.num_gpus >= 1:
            # A whole-GPU replica: vLLM fills max_util of each GPU, all of it beyond the base is KV.
            p.budget.kv = max(p.budget.floor, int(max_util * gpu_bytes) - p.budget.base)
            continue
        by_gpu.setdefault((p.node, p.gpu_indices[0]), []).append(p)
    for (n, g), mine in by_gpu.items():
        gpu_bytes = nodes[n].gpu_memory_gb * 1e9
        # Shares round up to a hundredth: keep that slack out of the room handed out.
        room = max_util * gpu_bytes - len(mine) * _STEP * gpu_bytes
        memory.fill([p.budget for p in mine], room)
        for p in mine:
            p.num_gpus = p.gpu_memory_utilization = max(p.num_gpus, _share(p.budget.total, gpu_bytes))
        used[(n, g)] = sum(p.num_gpus for p in mine)


def make_plan(fleet: FleetSpec, nodes: list[Node], kv_seqs: int | None = None, max_util: float = 0.9) -> Plan:
    """Pack every GPU model's max_replicas onto ``nodes``; raise PlanError naming a model whose
    floor does not fit.

    Models are placed largest first (tensor-parallel ones, then by memory); all replicas of a
    model go to one GPU type (the first in ``nodes`` where they all fit), so one GPU share and
    one memory fraction describe them."""
    used: dict[tuple[int, int], float] = {(n.index, g): 0.0 for n in nodes for g in range(n.gpus)}
    wanted = []
    for i, spec in enumerate(fleet.models):
        if spec.resources.accelerator == "cpu":
            continue
        wanted.append((i, spec, budget(spec, kv_seqs, i)))
    wanted.sort(key=lambda x: (-x[2].gpus, -(x[2].base + x[2].floor)))
    placements: list[Placement] = []
    for i, spec, b in wanted:
        asked = spec.resources.accelerator_type
        types = list(dict.fromkeys(n.gpu_type for n in nodes if not asked or n.gpu_type == asked.upper()))
        if not types:
            raise PlanError(f"model {spec.name!r} asks for {asked} GPUs; --gpus has none", i,
                            "resources.accelerator_type")
        best: tuple[int, str] = (-1, types[0])
        for gpu_type in types:
            trial = dict(used)
            typed = [n for n in nodes if n.gpu_type == gpu_type]
            mine = []
            for r in range(spec.autoscaling.max_replicas):
                placed = _place_one(spec, r, b, typed, trial, max_util)
                if placed is None:
                    break
                mine.append(placed)
            if len(mine) == spec.autoscaling.max_replicas:
                used.update(trial)
                placements.extend(mine)
                break
            best = max(best, (len(mine), gpu_type))
        else:
            raise PlanError(_refusal(spec, b, nodes, types, best[0], max_util), i, "")
    _grow(placements, nodes, used, max_util)
    order = [s.name for s in fleet.models]
    placements.sort(key=lambda p: (order.index(p.model), p.replica))
    return Plan(nodes, placements, used)


def _refusal(spec: ModelSpec, b: ReplicaNeed, nodes: list[Node], types: list[str], placed_count: int,
             max_util: float) -> str:
    biggest = max((n for n in nodes if n.gpu_type in types), key=lambda n: n.gpu_memory_gb)
    need, room = (b.base + b.floor) / 1e9, max_util * biggest.gpu_memory_gb
    widest = max((n for n in nodes if n.gpu_type in types), key=lambda n: n.gpus)
    if b.gpus > widest.gpus:
        what = (f"tensor_parallel_size {b.gpus} needs {b.gpus} GPUs on one node; the largest node has "
                f"{widest.gpus} ({widest.gpus}x{widest.gpu_name})")
        hint = f"lower tensor_parallel_size or add a node with {b.gpus} GPUs"
    elif need > room:
        lora = f", LoRA {b.lora / 1e9:.1f}" if b.lora else ""
        what = (f"needs at least {need:.1f} GB per GPU (weights {b.weights / 1e9:.1f}{lora}, KV floor "
                f"{b.floor / 1e9:.1f} for one {b.max_model_len}-token sequence, overhead {b.overhead / 1e9:.1f}), "
                f"more than {max_util:.0%} of a {biggest.gpu_name} ({room:.1f} GB)")
        hint = "raise tensor_parallel_size, lower engine.max_model_len, or quantize"
    else:
        what = (f"replica {placed_count + 1} of {spec.autoscaling.max_replicas} finds no GPU with room "
                f"left (after the larger models)")
        hint = "add GPUs or lower max_replicas"
    return f"model {spec.name!r} does not fit: {what}; {hint}"


def planned_fleet(fleet_data: dict[str, Any], fleet: FleetSpec, plan: Plan) -> dict[str, Any]:
    """The fleet as written, with each planned model's GPU share and memory fraction set."""
    out = copy.deepcopy(fleet_data)
    for raw, spec in zip(out["models"], fleet.models, strict=True):
        mine = plan.for_model(spec.name)
        if not mine:
            continue
        # Replicas on different GPUs may have been given different shares; the smallest keeps
        # every GPU within its plan.
        first = min(mine, key=lambda p: p.num_gpus)
        raw.setdefault("engine", {})["gpu_memory_utilization"] = first.gpu_memory_utilization
        resources = dict(raw.get("resources") or {})
        if first.num_gpus < 1:
            resources["num_gpus"] = first.num_gpus
        node_types = {plan.nodes[p.node].gpu_type for p in mine}
        if len(node_types) == 1 and len({n.gpu_type for n in plan.nodes}) > 1:
            resources["accelerator_type"] = node_types.pop()
        if resources:
            raw["resources"] = resources
    return out


def render_table(plan: Plan) -> str:
    rows = [("MODEL", "REPLICA", "CLASS", "PARAMS", "NODE", "GPUS", "NUM_GPUS", "GPU_MEM_UTIL", "WEIGHTS",
             "LORA", "KV_FLOOR", "KV", "KV_TOKENS", "FULL_SEQS", "BUDGET")]
    for p in plan.placements:
        node = plan.nodes[p.node]
        b = p.budget
        rows.append((p.model, str(p.replica + 1), b.size_class, f"{b.parameters / 1e9:.2f}B",
                     f"{node.index}:{node.gpu_name}", ",".join(map(str, p.gpu_indices)), f"{p.num_gpus:g}",
                     f"{p.gpu_memory_utilization:.2f}", f"{b.weights / 1e9:.2f} GB",
                     f"{b.lora / 1e9:.2f} GB" if b.lora else "-", f"{b.floor / 1e9:.2f} GB",
                     f"{b.kv / 1e9:.2f} GB", f"{b.kv_tokens:,}", f"{b.full_sequences:.1f} x {b.max_model_len}",
                     f"{b.total / 1e9:.2f} GB"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.append("")
    for (n, g), frac in sorted(plan.used.items()):
        lines.append(f"node {n} ({plan.nodes[n].gpu_name}) GPU {g}: {frac:.0%} of memory planned")
    return "\n".join(lines)
