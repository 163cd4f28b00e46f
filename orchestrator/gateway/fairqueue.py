"""Who goes first while a model is full: the order of the gateway's fair queue, pure logic.

Three classes, strict priority between them (``interactive`` > ``standard`` > ``batch``).
Within a class, keys share by weight through start-time fair queuing on estimated tokens:
a request's start tag is the later of the class's virtual time and its key's last finish
tag, its finish tag ``start + cost / weight``; the waiting request with the smallest start
tag goes next and the class's virtual time moves to it. A key that was idle starts at the
virtual time (no credit saved up); a key with a backlog is served in proportion to its
weight, whatever its requests' sizes; FIFO within a key (its tags only grow). Once nothing
waits or runs (``idle``), every key's tag is forgotten, so no debt is carried either.

Example::

    q = FairQueue()
    q.push(Ticket("a", "standard", cost=512, weight=1))
    q.push(Ticket("b", "standard", cost=20, weight=1))
    q.pop(allowed=CLASSES).key   # "a" (it came first), then "b" before a's next request
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable

from orchestrator.spec import CLASSES

_SEQ = itertools.count()


@dataclasses.dataclass(eq=False)
class Ticket:
    """One request in (or through) the queue."""

    key: str
    cls: str
    cost: float
    weight: float = 1.0
    arrived: float = 0.0  # the queue's clock when pushed
    seq: int = dataclasses.field(default_factory=lambda: next(_SEQ))
    start: float = 0.0
    finish: float = 0.0
    entered_v: float = 0.0  # the class's virtual time when pushed
    dispatched_at_push: int = 0  # the queue's dispatch count when pushed
    overtaken: int = 0  # requests dispatched while this one waited
    waited_s: float = 0.0
    cold_s: float = 0.0  # of its wait, the time its model had no running replica
    state: str = "new"  # new | waiting | granted | removed


class _ClassQueue:
    """One class: per-key FIFOs under a virtual clock."""

    def __init__(self) -> None:
        self.virtual = 0.0
        self.keys: dict[str, collections.deque[Ticket]] = {}
        self.last_finish: dict[str, float] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self.keys.values())

    def push(self, t: Ticket) -> None:
        t.entered_v = self.virtual
        t.start = max(self.virtual, self.last_finish.get(t.key, 0.0))
        t.finish = t.start + t.cost / t.weight
        self.last_finish[t.key] = t.finish
        self.keys.setdefault(t.key, collections.deque()).append(t)

    def head(self) -> Ticket | None:
        heads = [q[0] for q in self.keys.values() if q]
        return min(heads, key=lambda t: (t.start, t.seq)) if heads else None

    def pop(self) -> Ticket:
        t = self.head()
        assert t is not None
        self.keys[t.key].popleft()
        if not self.keys[t.key]:
            del self.keys[t.key]
        self.virtual = max(self.virtual, t.start)
        return t

    def remove(self, t: Ticket) -> None:
        """Take out a request that will not be served (its client left, or it timed out); the
        key's later requests move up by its share."""
        queue = self.keys.get(t.key)
        if not queue or t not in queue:
            return
        index = queue.index(t)
        del queue[index]
        previous = queue[index - 1].finish if index > 0 else t.start
        for later in list(queue)[index:]:
            later.start = max(later.entered_v, previous)
            later.finish = later.start + later.cost / later.weight
            previous = later.finish
        if queue:
            self.last_finish[t.key] = queue[-1].finish
        else:
            del self.keys[t.key]
            # Its tag is given back: the key's next request starts from the virtual time.
            self.last_finish[t.key] = min(self.last_finish.get(t.key, 0.0), max(self.virtual, t.start))
        if len(self.last_finish) > 4096:  # keys long idle: their tags are behind the clock anyway
            for key in [k for k, f in self.last_finish.items() if f <= self.virtual and k not in self.keys]:
                del self.last_finish[key]


class FairQueue:
    """The waiting requests of one model at one gateway replica."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.classes = {c: _ClassQueue() for c in CLASSES}
        self.dispatched = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self.classes.values())

    def push(self, t: Ticket) -> Ticket:
        if t.cls not in self.classes:
            raise ValueError(f"unknown request class {t.cls!r}")
        t.arrived = self.clock()
        t.dispatched_at_push = self.dispatched
        t.state = "waiting"
        self.classes[t.cls].push(t)
        return t

    def peek(self, allowed: Iterable[str]) -> Ticket | None:
        """The request that would go next among ``allowed`` classes (highest class first)."""
        allowed = set(allowed)
        for c in CLASSES:
            if c in allowed and len(self.classes[c]):
                return self.classes[c].head()
        return None

    def pop(self, allowed: Iterable[str]) -> Ticket | None:
        """Take the next request among ``allowed`` classes; None when none waits."""
        allowed = set(allowed)
        for c in CLASSES:
            if c in allowed and len(self.classes[c]):
                t = self.classes[c].pop()
                self.granted(t)
                return t
        return None

    def granted(self, t: Ticket) -> None:
        """Count ``t`` as dispatched (popped here, or let straight through by the caller)."""
        if t.state == "waiting":
            t.overtaken = self.dispatched - t.dispatched_at_push
            t.waited_s = max(0.0, self.clock() - t.arrived)
        t.state = "granted"
        self.dispatched += 1

    def idle(self) -> None:
        """The model has nothing running and nothing waits: the busy period ends and every key's
        tag with it (start-time fair queuing's reset). Otherwise the virtual time, which moves
        only with dispatched start tags, would keep a key's last finish tag from a request it
        ran alone and hold its next one back behind that many tokens of the next busy period."""
        if len(self):
            return
        for q in self.classes.values():
            q.last_finish.clear()

    def remove(self, t: Ticket) -> bool:
        """Take out a waiting request (client gone, timed out); False if it was not waiting."""
        if t.state != "waiting":
            return False
        self.classes[t.cls].remove(t)
        t.state = "removed"
        t.waited_s = max(0.0, self.clock() - t.arrived)
        return True

    def expired(self, max_wait_s: dict[str, float]) -> list[Ticket]:
        """Waiting requests past their class's ``max_wait_s`` (still in the queue)."""
        now = self.clock()
        return [t for c, q in self.classes.items() for fifo in q.keys.values() for t in fifo
                if now - t.arrived >= max_wait_s.get(c, float("inf"))]

    def stats(self) -> dict[str, dict[str, float]]:
        """Per class: ``queued`` and the ``oldest_wait_s``."""
        now = self.clock()
        out = {}
        for c, q in self.classes.items():
            waiting = [t for fifo in q.keys.values() for t in fifo]
            out[c] = {"queued": len(waiting),
                      "oldest_wait_s": round(max((now - t.arrived for t in waiting), default=0.0), 3)}
        return out
