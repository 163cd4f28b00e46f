"""Request routing's choice logic: which replica of a model takes a request.

Four policies, chosen per model by ``routing.policy``. One Ray Serve request router class
(``orchestrator.routing.serve_router``, configured per deployment with its model's policy)
applies them inside the gateway, where the model's deployment handle lives:

* ``least-queue``: the replica with the fewest outstanding requests. Loads come from the
  gateway's own count of what it sent and has not seen finish (``InFlight``).
* ``prefix-affinity``: consistent hashing of the prompt's leading characters, with bounded
  load (Mirrokni et al., "Consistent Hashing with Bounded Loads"): a request goes to the
  first replica on its hash ring whose load stays within ``load_factor`` x the mean, so
  requests sharing a long system prompt hit a warm prefix cache, and a hot prefix spills
  over to the next replica instead of piling up.
* ``session``: the same, keyed on the ``x-session-id`` header.
* ``round-robin``: the baseline.

The gateway computes each request's key (``route_key``) and passes it to the replica
call as the ``route_key`` keyword; the router (``orchestrator.routing.serve_router``) reads it
from the pending request. The choice logic here is pure (``rank``) and unit-tested
apart from Serve.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import math
import random
import threading
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter

# Router metrics live in the gateway's process (where routers run); the gateway's
# /metrics includes this registry.
REGISTRY = CollectorRegistry()
PICKS = Counter(
    "slm_router_picks", "Requests the router sent to each replica.",
    ["model", "replica", "policy"], registry=REGISTRY,
)
SPILLS = Counter(
    "slm_router_spills", "Affine requests (prefix or session) sent past their first replica by the load bound.",
    ["model", "policy"], registry=REGISTRY,
)

SESSION_HEADER = "x-session-id"
_VNODES = 64


class InFlight:
    """The routers' load view of each replica: requests this process sent to it and has not
    seen finish.

    Replica-reported counts are not used, because over gRPC handles (the fast path's
    transport) every one of them was stale when read (measured with a burst of 16 and
    then 12 requests on two replicas):
    * Serve's per-handle queue-length cache is not brought back down by its completion
      callbacks: a replica that had finished all 16 of a burst's requests stayed at 15
      until the entry expired 10 s later, so every choice in that window avoided it.
    * The count a replica returns as it accepts a request arrives with the end of a
      non-streaming call, not its start, so what it said about other callers was seconds
      old (it showed 11 queued on a replica that had finished them all).
    * Periodic routing stats, read between two polls, showed 9-15 queued on a replica
      that had just finished a burst, while the other showed this exact count, so every
      request of the next wave went to the other.
    The gateway knows when a body ended (its END frame, its call's return, its client
    leaving), so its count holds whichever transport handles use. Several gateway
    replicas each see their own requests only (as each instance of vLLM's router does).

    The gateway tags each call with a ``track`` token; the router records the replica it
    chooses for that token as it chooses (``routed``, so a burst's later choices see the
    earlier ones), corrects it if another replica took the request (``moved``), and the
    gateway releases it (``finished``). A token finished before its request was routed
    (its client left while it waited) is remembered, so a late ``routed`` or ``moved``
    cannot count it again. Called from the routers' loop and the gateway's, hence the lock."""

    _REMEMBER_DONE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: dict[str, str] = {}
        self._count: dict[str, int] = {}
        self._done: dict[str, None] = {}  # recently finished tokens, oldest first

    def routed(self, token: str, replica: str) -> None:
        with self._lock:
            if token in self._owner or token in self._done:
                return
            self._take(token, replica)

    def moved(self, token: str, replica: str) -> None:
        """The request went to ``replica`` after all (its first choice refused it)."""
        with self._lock:
            old = self._owner.get(token)
            if old == replica or token in self._done:
                return
            if old is not None:
                self._release(old)
            self._take(token, replica)

    def finished(self, token: str | None) -> None:
        if token is None:
            return
        with self._lock:
            replica = self._owner.pop(token, None)
            if replica is not None:
                self._release(replica)
            self._done[token] = None
            if len(self._done) > self._REMEMBER_DONE:
                del self._done[next(iter(self._done))]

    def _take(self, token: str, replica: str) -> None:
        self._owner[token] = replica
        self._count[replica] = self._count.get(replica, 0) + 1

    def _release(self, replica: str) -> None:
        left = self._count.get(replica, 0) - 1
        if left > 0:
            self._count[replica] = left
        else:
            self._count.pop(replica, None)

    def load(self, replica: str) -> int:
        """This process's requests in flight to ``replica``."""
        return self._count.get(replica, 0)


IN_FLIGHT = InFlight()


# --------------------------------------------------------------------------- keys


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_prefix(endpoint: str, payload: Mapping[str, Any], chars: int) -> str | None:
    """The first ``chars`` characters of what the model will read, or None if there is none."""
    if endpoint == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list):
            return None
        parts: list[str] = []
        size = 0
        for m in messages:
            if not isinstance(m, dict):
                continue
            text = f"{m.get('role', '')}:{_content_text(m.get('content'))}\n"
            parts.append(text)
            size += len(text)
            if size >= chars:
                break
        text = "".join(parts)
    else:
        prompt = payload.get("prompt" if endpoint == "completions" else "input")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch: the first prompt
        if isinstance(prompt, list):  # token ids
            prompt = ",".join(str(t) for t in prompt[:chars])
        text = prompt if isinstance(prompt, str) else ""
    return text[:chars] or None


ADAPTER_KEY = "adapter:"


def route_key(policy: str, endpoint: str, payload: Mapping[str, Any], headers: Mapping[str, str],
              prefix_chars: int, adapter: str | None = None) -> str | None:
    """The affinity key of a request under ``policy`` (None: no affinity, least-queue).

    A request for a LoRA adapter carries the adapter's name in its key under every policy
    but round-robin and session (a session already sticks to one replica): requests for one
    adapter gather on the replicas that have it in a GPU slot, within the load bound, instead
    of making every replica swap adapters in and out."""
    if policy == "session":
        return headers.get(SESSION_HEADER) or None
    if policy == "round-robin":
        return None
    prefix = prompt_prefix(endpoint, payload, prefix_chars) if policy == "prefix-affinity" else None
    if adapter is not None:
        return f"{ADAPTER_KEY}{adapter}" + (f"\n{prefix}" if prefix else "")
    return prefix


# --------------------------------------------------------------------------- pure choice


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=64)
def _ring(nodes: tuple[str, ...]) -> tuple[list[int], list[str]]:
    points = sorted((_hash(f"{node}#{v}"), node) for node in nodes for v in range(_VNODES))
    return [p for p, _ in points], [n for _, n in points]


def ring_order(key: str, nodes: Sequence[str]) -> list[str]:
    """The nodes in the order a consistent-hash ring visits them from ``key``.

    Adding or removing a node moves only the keys that hashed next to it.
    """
    hashes, owners = _ring(tuple(sorted(set(nodes))))
    if not hashes:
        return []
    start = bisect.bisect(hashes, _hash(key)) % len(hashes)
    seen: dict[str, None] = {}
    for i in itertools.chain(range(start, len(owners)), range(start)):
        seen.setdefault(owners[i], None)
        if len(seen) == len(set(nodes)):
            break
    return list(seen)


def load_bound(loads: Mapping[Hashable, float], load_factor: float) -> float:
    """Most requests one replica may hold after taking this one: ceil(c x mean load)."""
    total = sum(loads.values()) + 1
    return math.ceil(load_factor * total / max(len(loads), 1))


def rank(policy: str, loads: Mapping[str, float], key: str | None = None, load_factor: float = 1.25,
         turn: int = 0) -> tuple[list[str], bool]:
    """Replica ids in order of preference, and whether an affine request spilled over.

    ``loads`` maps each candidate to its outstanding requests. Least-loaded order breaks
    ties at random, so equal replicas share the work.
    """
    ids = list(loads)
    if not ids:
        return [], False
    by_load = sorted(ids, key=lambda r: (loads[r], random.random()))
    if policy == "round-robin":
        ordered = sorted(ids)
        first = ordered[turn % len(ordered)]
        return [first] + [r for r in by_load if r != first], False
    if key is not None and policy != "round-robin":  # least-queue has a key for adapters only
        order = ring_order(key, ids)
        bound = load_bound(loads, load_factor)
        chosen = next((r for r in order if loads[r] + 1 <= bound), by_load[0])
        return [chosen] + [r for r in by_load if r != chosen], chosen != order[0]
    return by_load, False
