"""The LoRA adapters one replica serves: loaded and unloaded live as the deployment's
``user_config`` changes (Ray Serve calls ``reconfigure`` on every running replica, and on a
new replica before it takes traffic), without restarting the engine.

Each adapter has a state: ``loading``, ``loaded`` or ``failed`` (with vLLM's reason). A
failed adapter never takes the replica or the other adapters down; requests naming it get a
503 that names it. The states go to the fleet-state actor (``/fleet`` shows them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from orchestrator import adapters, errors
from orchestrator.engine import vllm_compat
from orchestrator.spec_parts import AdapterSpec

log = logging.getLogger("orchestrator.engine")

REPORT_EVERY_S = 30.0  # heartbeat of the adapter states (a restarted fleet-state actor relearns them)


class AdapterSet:
    """A replica's adapters: ``apply`` a wanted set, ``check`` a request's model name."""

    def __init__(self, model: str, serving_models: Any):
        self.model = model
        self._models = serving_models
        self.wanted: dict[str, AdapterSpec] = {}
        self.states: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()

    async def apply(self, config: dict[str, Any] | None) -> None:
        """Load what is new, changed or failed before; unload what is gone; one change set at
        a time. A replaced adapter keeps serving its previous weights until the new ones have
        loaded (and keeps them if the new ones fail)."""
        wanted = {a.name: a for a in (AdapterSpec.model_validate(x) for x in (config or {}).get("adapters") or ())}
        async with self._lock:
            for name in [n for n in self.wanted if n not in wanted]:
                self.states.pop(name, None)  # first: requests for it stop being sent to vLLM
                if self._models is not None:
                    await vllm_compat.unload_adapter(self._models, name)
                log.info("model %s: adapter %s unloaded", self.model, name)
            failed = {n for n, state in self.states.items() if state["state"] == "failed"}
            changed = [a for a in wanted.values() if name_changed(self.wanted.get(a.name), a) or a.name in failed]
            previous = self.wanted
            self.wanted = wanted
            for adapter in changed:
                if self.states.get(adapter.name, {}).get("state") != "loaded":
                    self.states[adapter.name] = self._state(adapter, "loading")
            for adapter in changed:
                await self._load(adapter, previous.get(adapter.name))

    async def _load(self, adapter: AdapterSpec, previous: AdapterSpec | None) -> None:
        started = time.monotonic()
        info, reason = None, None
        try:
            path = await asyncio.to_thread(adapters.resolve_adapter, adapter.source)
            info = await asyncio.to_thread(adapters.read_adapter_config, path)  # hf:// too, once fetched
        except (OSError, ValueError) as e:
            reason = str(e)
        if reason is None:
            reason = await vllm_compat.load_adapter(self._models, adapter.name, path)
        if reason is None:
            self.states[adapter.name] = self._state(adapter, "loaded", info=info)
            log.info("model %s: adapter %s loaded from %s in %.2fs", self.model, adapter.name, adapter.source,
                     time.monotonic() - started)
            return
        kept = self.states.get(adapter.name, {})
        if previous is not None and kept.get("state") == "loaded":
            # The previous weights still serve: keep them, and say the replacement failed.
            kept.update(reason=f"replacing it from {adapter.source} failed: {reason}; still serving "
                               f"{previous.source}", at=time.time())
            self.wanted[adapter.name] = previous
            log.error("model %s: adapter %s: replacing it from %s failed (%s); still serving %s", self.model,
                      adapter.name, adapter.source, reason, previous.source)
            return
        self.states[adapter.name] = self._state(adapter, "failed", reason=reason, info=info)
        log.error("model %s: adapter %s failed to load from %s: %s", self.model, adapter.name, adapter.source,
                  reason)

    @staticmethod
    def _state(adapter: AdapterSpec, state: str, reason: str | None = None,
               info: adapters.AdapterInfo | None = None) -> dict[str, Any]:
        return {"state": state, "reason": reason, "source": adapter.source, "at": time.time(),
                "rank": info.rank if info else None, "size_bytes": info.size_bytes if info else None}

    def check(self, name: Any) -> None:
        """Raise 503 for a request naming an adapter that is not loaded here: failed, still
        loading, or not yet known (the gateway learnt of it before this replica did)."""
        if not isinstance(name, str) or name == self.model:
            return
        state = self.states.get(name)
        if state is not None and state["state"] == "loaded":
            return
        if state is not None and state["state"] == "failed":
            # The reason (paths, vLLM's words) is for operators: /fleet and the replica's log.
            raise errors.AdapterUnavailable(f"The adapter '{name}' of model '{self.model}' failed to load; its "
                                            "operators see why in /fleet")
        what = "is still loading" if state is not None else "is not loaded on this replica yet"
        raise errors.AdapterUnavailable(f"The adapter '{name}' of model '{self.model}' {what}; retry shortly",
                                        retry_after_s=1)

    def report(self) -> dict[str, dict[str, Any]]:
        return {name: dict(state) for name, state in self.states.items()}


def name_changed(old: AdapterSpec | None, new: AdapterSpec) -> bool:
    """Whether an adapter must be (re)loaded: new, or its source changed (limits are the gateway's)."""
    return old is None or old.source != new.source
