"""One memory model for a replica, on CPU and on GPU: weights + LoRA + overhead + KV cache.

LoRA (a model with adapters, or engine.enable_lora): vLLM's ``max_loras`` slots at
``max_lora_rank`` for every LoRA-capable layer (``footprint.lora_slot_bytes``), counted with
the weights; on CPU also the host cache of loaded adapters.

The KV cache has a **floor** and a **target**:

* floor: one sequence of ``max_model_len`` tokens (rounded up to whole cache blocks). Below
  it vLLM refuses to start ("the model's max seq len is larger than the maximum number of
  tokens that can be stored in KV cache"); a plan that cannot give a replica its floor is
  refused, naming the model.
* target: what the fleet asks for: ``kv_cache_tokens`` when the model sets it, else
  enough for the autoscaler's target concurrency at full length,
  ``min(max_num_seqs, ceil(target_queue_depth)) x max_model_len`` tokens. Beyond the floor,
  KV buys concurrency; a plan that cannot reach the target still runs and says so.

Replicas that share memory (the GPUs of ``slm plan``, the CPU node of ``slm serve``) get
their floor first; what is left is filled toward each replica's target, every replica
reaching the same fraction of the way from floor to target (water-filling).

A CPU replica whose fleet entry sets none of ``engine.kv_cache_memory_bytes``,
``engine.gpu_memory_utilization`` or ``env.VLLM_CPU_KVCACHE_SPACE`` gets its KV space from
this plan as ``kv_cache_memory_bytes`` (vLLM's own engine argument); without it vLLM's CPU
worker reserves 92% of the node for every replica and the second one cannot start.

Example::

    plan = plan_cpu(fleet.models, 24 * GIB, is_cpu=lambda m: True)
    plan.kv_cache_bytes("smollm2")        # kv_cache_memory_bytes for each engine worker of that model
    print(render_cpu_plan(plan))
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping

from orchestrator import footprint
from orchestrator.spec import ModelSpec

GIB = 1024**3
# vLLM's default max_num_seqs for its OpenAI server: 128 per rank on CPU, 256 on most GPUs.
VLLM_DEFAULT_MAX_NUM_SEQS = {"cpu": 128, "gpu": 256}
# KV-cache block sizes (tokens): vLLM's CPU backend uses 128, its GPU backends 16.
BLOCK_TOKENS = {"cpu": 128, "gpu": 16}
# Memory of a CPU replica beyond weights and KV (proportional set size, vllm-cpu 0.32,
# measured on the running stack): its Serve actor (Python, torch, vLLM's serving layer)
# ~0.55 GiB, its engine-core process ~0.45 GiB, and one worker process per rank ~0.65 GiB.
CPU_REPLICA_OVERHEAD = int(1.0 * GIB)
CPU_RANK_OVERHEAD = int(0.65 * GIB)
CPU_OVERHEAD_PER_WEIGHT = 0.10
# What `slm serve` keeps for itself on the node: its own process, Ray's GCS, raylet and
# agents, Serve's controller, proxy and the gateway (~1.5 GiB PSS measured here), plus headroom.
CPU_STACK_RESERVED = 2 * GIB
# Share of the node's memory the plan may hand out (like gpu_memory_utilization).
CPU_MAX_UTIL = 0.9
# GPU replicas: CUDA context, activations and CUDA graphs as 1 GiB + 10% of the weights.
GPU_REPLICA_OVERHEAD = 1 * GIB
GPU_OVERHEAD_PER_WEIGHT = 0.10
# vLLM's LoRA defaults when enable_lora is set without them (vllm.config.lora.LoRAConfig).
VLLM_LORA_DEFAULTS = {"max_loras": 1, "max_lora_rank": 16}


class PlanError(ValueError):
    """The fleet does not fit; ``model_index`` and ``field`` say where to look."""

    def __init__(self, message: str, model_index: int | None = None, field: str = ""):
        self.model_index = model_index
        self.field = field
        super().__init__(message)


@dataclasses.dataclass
class ReplicaNeed:
    """What one replica of a model needs, in bytes (per GPU for tensor-parallel GPU replicas)."""

    model: str
    index: int  # the model's position in the fleet
    device: str  # cpu | gpu
    weights: int
    overhead: int
    kv_bytes_per_token: int
    max_model_len: int
    max_num_seqs: int
    floor_tokens: int
    target_tokens: int
    parameters: int = 0
    size_class: str = "unknown"
    quantization: str | None = None
    gpus: int = 1  # GPUs one replica takes (tensor parallel), 1 for a share of one
    ranks: int = 1  # CPU tensor parallel: engine processes, each holding 1/ranks of the KV cache
    fixed_kv: int | None = None  # KV the fleet set itself (explicit setting wins)
    fixed_how: str = ""
    kv: int = 0  # planned KV bytes
    lora: int = 0  # LoRA: max_loras slots at max_lora_rank (+ on CPU the host cache of loaded adapters)

    @property
    def floor(self) -> int:
        return self.fixed_kv if self.fixed_kv is not None else self.floor_tokens * self.kv_bytes_per_token

    @property
    def target(self) -> int:
        return self.fixed_kv if self.fixed_kv is not None else max(self.floor, self.target_tokens *
                                                                   self.kv_bytes_per_token)

    @property
    def base(self) -> int:
        """Memory that does not depend on the KV plan."""
        return self.weights + self.overhead + self.lora

    @property
    def total(self) -> int:
        return self.base + self.kv

    @property
    def kv_tokens(self) -> int:
        return self.kv // self.kv_bytes_per_token if self.kv_bytes_per_token else 0

    @property
    def full_sequences(self) -> float:
        """Concurrent sequences of max_model_len tokens the planned KV holds."""
        return self.kv_tokens / self.max_model_len if self.max_model_len else 0.0

    @property
    def target_met(self) -> bool:
        return self.kv >= self.target

    def describe(self) -> str:
        """``weights 0.50 + overhead 1.30 + KV 0.19 GiB (4,096 tokens, 4.0 x 1024)``, with
        ``+ lora 0.08`` after the weights for a model with LoRA adapters."""
        lora = f" + lora {self.lora / GIB:.2f}" if self.lora else ""
        return (f"weights {self.weights / GIB:.2f}{lora} + overhead {self.overhead / GIB:.2f} + "
                f"KV {self.kv / GIB:.2f} GiB ({self.kv_tokens:,} tokens, {self.full_sequences:.1f} x "
                f"{self.max_model_len})")


def _served_dtype(spec: ModelSpec, device: str) -> str | None:
    dtype = spec.engine.get("dtype")
    if dtype in (None, "auto") and device == "cpu":
        return "float32"  # the orchestrator's CPU choice (orchestrator.engine.args.engine_choices)
    return dtype


def lora_bytes(spec: ModelSpec, shape: footprint.ModelShape, device: str, dtype: str | None = None) -> int:
    """A replica's LoRA memory (0 without LoRA): ``max_loras`` slots of
    ``footprint.lora_slot_bytes`` at ``max_lora_rank`` in the LoRA dtype (the model's unless
    engine.lora_dtype says), and on CPU, where the slots and the host cache of loaded adapters
    share the node, min(max_cpu_loras, adapters) x the largest adapter file known on disk
    (hub adapters are not sized before a replica loads them)."""
    from orchestrator import adapters

    lora = adapters.effective_lora_args(spec)
    if not lora.get("enable_lora"):
        return 0
    slots = int(lora.get("max_loras") or VLLM_LORA_DEFAULTS["max_loras"])
    rank = int(lora.get("max_lora_rank") or VLLM_LORA_DEFAULTS["max_lora_rank"])
    lora_dtype = spec.engine.get("lora_dtype")
    total = slots * footprint.lora_slot_bytes(shape, rank, dtype if lora_dtype in (None, "auto") else lora_dtype)
    if device == "cpu" and spec.adapters:
        sizes = []
        for adapter in spec.adapters:
            try:
                info = adapters.adapter_info(adapter.source)
            except ValueError:
                continue  # validation names it
            if info is not None and info.size_bytes:
                sizes.append(info.size_bytes)
        cached = min(int(lora.get("max_cpu_loras") or slots), len(spec.adapters))
        total += cached * max(sizes, default=0)
    return total


def replica_need(spec: ModelSpec, device: str, index: int = 0,
                 shape: footprint.ModelShape | None = None) -> ReplicaNeed:
    """A replica's floor, target, weights and overhead; raises PlanError when the model's
    size is unknown (a hub id outside the catalog that is not on disk)."""
    if shape is None:
        try:
            shape = footprint.source_shape(spec.source)
        except Exception as e:  # noqa: BLE001 - a missing file, an odd header: the size is unknown
            raise PlanError(f"model {spec.name!r}: cannot read its size: {e}", index, "source") from None
    if shape is None:
        raise PlanError(f"model {spec.name!r}: {spec.source} is not in the catalog and is not local; its size is "
                        f"unknown (serve it from a local folder, add it to orchestrator/footprint.py, or set "
                        f"engine.kv_cache_memory_bytes)", index, "source")
    tp = spec.tensor_parallel_size
    dtype = _served_dtype(spec, device)
    quant = spec.engine.get("quantization")
    kv_dtype = spec.engine.get("kv_cache_dtype")
    kv_dtype = dtype if kv_dtype in (None, "auto") else kv_dtype
    try:
        weights = footprint.weight_bytes(shape, dtype, quant)
        per_token = footprint.kv_bytes_per_token(shape, kv_dtype)
        lora = lora_bytes(spec, shape, device, dtype)
    except ValueError as e:
        raise PlanError(f"model {spec.name!r}: {e}", index, "engine") from None
    if spec.speculative is not None and hasattr(spec.speculative.draft, "derive_layers"):
        # A derived draft's layers keep their own KV cache in the same space.
        per_token += per_token * spec.speculative.draft.derive_layers // shape.num_layers
    max_len = int(spec.engine.get("max_model_len") or shape.max_position_embeddings)
    max_seqs = int(spec.engine.get("max_num_seqs") or VLLM_DEFAULT_MAX_NUM_SEQS[device] * (tp if device == "cpu"
                                                                                            else 1))
    block = int(spec.engine.get("block_size") or BLOCK_TOKENS[device])
    floor_tokens = math.ceil(max_len / block) * block + block  # one sequence, whole blocks, one spare
    if spec.kv_cache_tokens is not None:
        target_tokens = spec.kv_cache_tokens
    else:
        target_tokens = min(max_seqs, math.ceil(spec.autoscaling.target_queue_depth)) * max_len
    params = shape.parameters()
    if device == "gpu":
        overhead = int(GPU_REPLICA_OVERHEAD + GPU_OVERHEAD_PER_WEIGHT * weights)
        # Tensor parallel: each GPU holds 1/tp of the weights and of the KV cache.
        weights, per_token, lora = weights // tp, max(1, per_token // tp), lora // tp
    else:
        # CPU tensor parallel: one engine process per rank on the same node.
        overhead = int(CPU_REPLICA_OVERHEAD + CPU_RANK_OVERHEAD * tp + CPU_OVERHEAD_PER_WEIGHT * weights)
    need = ReplicaNeed(spec.name, index, device, weights, overhead, per_token, max_len, max_seqs, floor_tokens,
                       max(floor_tokens, target_tokens), params, footprint.size_class(params), quant,
                       gpus=tp if device == "gpu" else 1, ranks=tp if device == "cpu" else 1, lora=lora)
    return need


def fill(needs: Iterable[ReplicaNeed], room: float, counts: dict[str, int] | None = None) -> float:
    """Set each replica's ``kv`` within ``room`` bytes: floors first, then the rest toward
    the targets, every replica the same fraction of the way. ``counts``: replicas per model
    when one need stands for several. Returns that fraction (1.0: every target met). The
    caller checks that the floors fit; if they do not, every replica gets its floor."""
    needs = list(needs)
    count = (lambda n: counts[n.model]) if counts else (lambda n: 1)
    for n in needs:
        n.kv = n.floor
    spare = room - sum((n.base + n.floor) * count(n) for n in needs)
    wanted = sum((n.target - n.floor) * count(n) for n in needs)
    if wanted <= 0:
        return 1.0
    fraction = max(0.0, min(1.0, spare / wanted))
    for n in needs:
        n.kv = n.floor + int(fraction * (n.target - n.floor))
    return fraction


# ----------------------------------------------------------------------------- CPU plans


@dataclasses.dataclass
class CpuPlan:
    """Every CPU replica of a fleet on one node: what each model's replicas get."""

    node_memory: int
    room: int  # what the replicas may take together
    needs: dict[str, ReplicaNeed]  # model -> one replica's need (kv planned)
    replicas: dict[str, int]  # model -> replicas planned (max_replicas)
    unknown: list[str] = dataclasses.field(default_factory=list)  # models whose size is not known here

    def kv_cache_bytes(self, model: str) -> int | None:
        """The KV bytes to give each replica of ``model`` (None: the fleet set its own)."""
        need = self.needs.get(model)
        if need is None or need.fixed_kv is not None:
            return None
        return need.kv // need.ranks  # vLLM's kv_cache_memory_bytes is per worker process

    @property
    def used(self) -> int:
        return sum(n.total * self.replicas[m] for m, n in self.needs.items())

    def shortfalls(self, model: str | None = None) -> list[str]:
        """One line per model (or for ``model``) whose KV is below its target."""
        out = []
        for n in self.needs.values():
            if model is not None and n.model != model:
                continue
            if n.fixed_kv is None and not n.target_met:
                out.append(f"model {n.model!r}: KV for {n.full_sequences:.1f} of its "
                           f"{n.target_tokens / n.max_model_len:.1f} target sequences of {n.max_model_len} tokens "
                           f"({n.kv_tokens:,} of {n.target_tokens:,} tokens)")
        return out


def explicit_kv(spec: ModelSpec, node_memory: int, environ: Mapping[str, str] | None = None) -> tuple[int | None, str]:
    """The KV (or whole-worker) memory the fleet, or the environment the replicas inherit, set
    for a CPU model itself, per engine worker (vLLM applies each of these to every worker)."""
    if spec.engine.get("kv_cache_memory_bytes") is not None:
        return int(spec.engine["kv_cache_memory_bytes"]), "engine.kv_cache_memory_bytes"
    inherited = os.environ if environ is None else environ
    for label, env in (("env.VLLM_CPU_KVCACHE_SPACE", spec.env), ("VLLM_CPU_KVCACHE_SPACE (environment)", inherited)):
        space = env.get("VLLM_CPU_KVCACHE_SPACE", "")
        if space.strip():
            try:
                return int(space) * GIB, label
            except ValueError:
                pass  # vLLM reports it at start
    util = spec.engine.get("gpu_memory_utilization")
    if isinstance(util, int | float):
        return int(util * node_memory), "engine.gpu_memory_utilization"  # the whole worker, counted as KV
    return None, ""


_PLAN_ENGINE_KEYS = ("dtype", "quantization", "kv_cache_dtype", "max_model_len", "max_num_seqs", "block_size",
                     "tensor_parallel_size", "kv_cache_memory_bytes", "gpu_memory_utilization",
                     # LoRA slots (written into a served model's engine args with its adapters; the
                     # adapters themselves are left out: they change without restarting anything)
                     "enable_lora", "max_lora_rank", "max_loras", "max_cpu_loras", "lora_dtype")


def plan_inputs(spec: ModelSpec) -> dict:
    """The fields of a model that its memory plan reads, as a fleet entry: what a replica
    needs to know of the models it shares a node with (so editing another model's routing,
    say, does not restart it)."""
    out: dict = {
        "name": spec.name, "source": spec.source, "task": spec.task,
        "engine": {k: spec.engine[k] for k in _PLAN_ENGINE_KEYS if k in spec.engine},
        "autoscaling": {"min_replicas": 0, "max_replicas": spec.autoscaling.max_replicas,
                        "target_queue_depth": spec.autoscaling.target_queue_depth},
        "resources": {"accelerator": spec.resources.accelerator, "num_cpus": spec.resources.num_cpus},
        "kv_cache_tokens": spec.kv_cache_tokens,
        "speculative": spec.speculative.model_dump(mode="json") if spec.speculative else None,
    }
    if "VLLM_CPU_KVCACHE_SPACE" in spec.env:
        out["env"] = {"VLLM_CPU_KVCACHE_SPACE": spec.env["VLLM_CPU_KVCACHE_SPACE"]}
    return out


def plan_cpu(fleet_models: Iterable[ModelSpec], node_memory: int, *, is_cpu: Callable[[ModelSpec], bool],
             node_cpus: float | None = None, reserved: int = CPU_STACK_RESERVED,
             max_util: float = CPU_MAX_UTIL, environ: Mapping[str, str] | None = None) -> CpuPlan:
    """Plan every CPU model of a fleet at ``max_replicas`` on one node of ``node_memory`` bytes.

    ``node_cpus``: the node's logical CPUs (Ray's ``CPU`` resource); when the fleet's CPU
    replicas reserve more than that, the node can hold only part of them, and each model's
    count is scaled down in proportion (at least one). Raises PlanError naming the model (and
    what to lower) when the replicas' floors do not fit. A model whose size cannot be read
    keeps vLLM's own sizing unless the fleet set one. ``environ``: the environment replicas
    inherit (default: this process's), where VLLM_CPU_KVCACHE_SPACE wins like the fleet's."""
    fleet_models = list(fleet_models)
    spec_index = {m.name: i for i, m in enumerate(fleet_models)}
    fleet_models = [m for m in fleet_models if is_cpu(m)]
    wanted_cpus = sum(m.resources.num_cpus * m.autoscaling.max_replicas for m in fleet_models)
    scale = min(1.0, node_cpus / wanted_cpus) if node_cpus and wanted_cpus else 1.0
    room = int(node_memory * max_util) - reserved
    needs: dict[str, ReplicaNeed] = {}
    replicas: dict[str, int] = {}
    unknown: list[str] = []
    for spec in fleet_models:
        i = spec_index.get(spec.name, 0)
        fixed, how = explicit_kv(spec, node_memory, environ)
        try:
            need = replica_need(spec, "cpu", i)
        except PlanError as e:
            if e.field != "source":
                raise
            # Size unknown until the replica fetches it (a hub model outside the catalog):
            # its KV is vLLM's own sizing unless the fleet set one.
            unknown.append(spec.name)
            if fixed is None:
                continue
            tp = spec.tensor_parallel_size
            need = ReplicaNeed(spec.name, i, "cpu", 0, CPU_REPLICA_OVERHEAD + CPU_RANK_OVERHEAD * tp, 1, 1, 1, 1, 1,
                               ranks=tp)
        if fixed is not None:
            need.fixed_kv, need.fixed_how = fixed * need.ranks, how  # per worker, each rank a worker
            if how == "engine.gpu_memory_utilization":
                need.weights, need.overhead, need.lora = 0, 0, 0  # vLLM reserves that share for everything
        needs[spec.name] = need
        replicas[spec.name] = max(1, math.ceil(spec.autoscaling.max_replicas * scale - 1e-9))
    floors = {m: (n.base + n.floor) * replicas[m] for m, n in needs.items()}
    if sum(floors.values()) > room:
        _refuse(needs, replicas, floors, node_memory, room, reserved, max_util)
    fill(needs.values(), room, replicas)
    return CpuPlan(node_memory, room, needs, replicas, unknown)


def _refuse(needs: dict[str, ReplicaNeed], replicas: dict[str, int], floors: dict[str, int], node_memory: int,
            room: int, reserved: int, max_util: float) -> None:
    if not floors:
        raise PlanError(f"this node's {node_memory / GIB:.1f} GiB leave no room for model replicas after "
                        f"{reserved / GIB:.1f} GiB for Ray and the gateway")
    worst = max(floors, key=lambda m: floors[m])
    n, count = needs[worst], replicas[worst]
    others = sum(v for m, v in floors.items() if m != worst)
    where = (f"the fleet's CPU replicas share {room / GIB:.1f} GiB of this node ({node_memory / GIB:.1f} GiB x "
             f"{max_util:.0%}, less {reserved / GIB:.1f} GiB for Ray and the gateway)")
    if others:
        where += f", {others / GIB:.1f} GiB of it for the other models"
    if n.fixed_kv is not None:
        what = f"{n.fixed_how} asks for {n.fixed_kv / GIB:.2f} GiB per replica"
        hint = f"lower {n.fixed_how} or autoscaling.max_replicas"
    else:
        lora = f", LoRA {n.lora / GIB:.2f}" if n.lora else ""
        what = (f"each needs at least {(n.base + n.floor) / GIB:.2f} GiB (weights {n.weights / GIB:.2f}{lora}, "
                f"overhead {n.overhead / GIB:.2f}, KV floor {n.floor / GIB:.2f} for one {n.max_model_len}-token "
                "sequence)")
        own_room = room - others
        fits = int(own_room // (n.base + n.floor)) if own_room > 0 else 0
        tokens = int((own_room / count - n.base) // n.kv_bytes_per_token) if own_room > 0 else 0
        block = BLOCK_TOKENS["cpu"]
        tokens = (tokens // block - 1) * block  # the floor is whole blocks plus a spare one
        hints = []
        if fits >= 1:
            hints.append(f"autoscaling.max_replicas (at most {fits} fit)")
        if tokens >= 256:
            hints.append(f"engine.max_model_len (at most ~{tokens} tokens fit at {count} replicas)")
        hint = "lower " + (" or ".join(hints) if hints else "autoscaling.max_replicas and engine.max_model_len") + \
            ", or serve it on a larger machine (slm plan --cpu-memory)"
    raise PlanError(f"model {worst!r} does not fit: {count} replica(s) at max_replicas; {what}, "
                    f"{count * (n.base + n.floor) / GIB:.1f} GiB in all; {where}; {hint}", n.index, "")


def render_cpu_plan(plan: CpuPlan) -> str:
    """One line per CPU model: replicas x (weights + overhead + KV), and the node's total."""
    lines = []
    for m, n in plan.needs.items():
        how = f" (set by {n.fixed_how})" if n.fixed_kv is not None else ""
        lines.append(f"{m}: {plan.replicas[m]} replica(s) x {n.describe()}{how}")
    for m in plan.unknown:
        if m not in plan.needs:
            lines.append(f"{m}: size unknown until its replica fetches it; vLLM sizes its KV cache (set "
                         f"engine.kv_cache_memory_bytes to plan it)")
    lines.append(f"CPU node: {plan.used / GIB:.1f} of {plan.room / GIB:.1f} GiB planned "
                 f"({plan.node_memory / GIB:.1f} GiB node)")
    return "\n".join(lines)


def parse_size(text: str) -> int:
    """``24GiB``, ``24G``, ``16GB``, ``512MiB`` or plain bytes -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r}: expected a size such as 24GiB, 16GB or 512MiB")
    number, unit, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1000 if suffix == "b" and unit else 1024
    return int(number * base**power)


def node_memory() -> int:
    """This machine's memory (what the Ray node's replicas share), clamped by a cgroup
    memory limit (a container's or a pod's), as vLLM clamps its own view."""
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                limit = int(f.read().strip())
        except (OSError, ValueError):
            continue  # absent, or "max" (no limit)
        return min(total, limit)
    return total
