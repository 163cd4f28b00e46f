"""CPU accounting from /proc for the side-by-side benchmark: which processes make up a server, how much
CPU they and a core used between two snapshots, where they may run, and which other model servers are
up (they skew the figures)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator


@dataclasses.dataclass(frozen=True)
class ProcInfo:
    """One process in a snapshot of /proc."""

    ppid: int
    sid: int
    cpu_ticks: int  # utime + stime


def read_procs() -> dict[int, ProcInfo]:
    """A snapshot: every process's parent, session and CPU time so far."""
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        procs[int(entry.name)] = ProcInfo(ppid=int(fields[1]), sid=int(fields[3]),
                                          cpu_ticks=int(fields[11]) + int(fields[12]))
    return procs


def process_tree(procs: dict[int, ProcInfo], root: int) -> set[int]:
    """``root``, its descendants and the rest of its session (servers start in their own)."""
    if root not in procs:
        return set()
    sid = procs[root].sid
    tree = {root} | {pid for pid, p in procs.items() if p.sid == sid}
    children: dict[int, list[int]] = {}
    for pid, p in procs.items():
        children.setdefault(p.ppid, []).append(pid)
    todo = list(tree)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree


def cpu_used(before: dict[int, ProcInfo], after: dict[int, ProcInfo], root: int) -> float:
    """CPU seconds a process tree used between two snapshots (processes that exited meanwhile
    are lost; ones that started count whole)."""
    tick = os.sysconf("SC_CLK_TCK")
    used = 0
    for pid in process_tree(after, root):
        was = before.get(pid)
        used += after[pid].cpu_ticks - (was.cpu_ticks if was and was.ppid == after[pid].ppid else 0)
    return used / tick


def core_times(core: int) -> tuple[int, int]:
    """(busy, total) jiffies of one core since boot (steal and idle/iowait are not busy)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                total = sum(v[:8])
                return total - v[3] - v[4] - v[7], total
    raise RuntimeError(f"no cpu{core} in /proc/stat")


def affinities(pids: Iterable[int]) -> dict[str, int]:
    """How many of ``pids`` may run on which cores ({"0": 12} means all twelve on core 0)."""
    out: dict[str, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                allowed = next(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list"))
        except (OSError, StopIteration):
            continue
        out[allowed] = out.get(allowed, 0) + 1
    return out


def _cmdlines() -> Iterator[tuple[int, list[bytes]]]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    yield int(entry.name), f.read().split(b"\0")
            except OSError:
                continue


def find_slm_serve(port: int) -> int | None:
    """The pid of the ``slm serve`` process listening on ``port``."""
    for pid, args in _cmdlines():
        if b"orchestrator.cli" in args and b"serve" in args and b"--port" in args \
                and args[args.index(b"--port") + 1] == str(port).encode():
            return pid
    return None


def other_servers(exclude: set[int] = frozenset()) -> list[int]:
    """Pids of model servers (slm serve, vLLM, Ray workers) not in ``exclude``: they skew results."""
    found = []
    for pid, args in _cmdlines():
        line = b" ".join(args)
        if pid not in exclude and (b"orchestrator.cli serve" in line or b"vllm.entrypoints" in line
                                   or line.startswith(b"ray::")):
            found.append(pid)
    return found
