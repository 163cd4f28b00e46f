"""A replica's adapter set (orchestrator.engine.lora) against a fake of vLLM's model registry:
what is loaded, replaced and unloaded as the wanted set changes, and what requests get while
an adapter is failed, loading or unknown. The real registry is exercised by
tests/integration/test_lora_adapters.py."""

from __future__ import annotations

import asyncio
import json
import types

import pytest

from orchestrator import errors
from orchestrator.engine.lora import AdapterSet


class ErrorResponse:
    """Named as vLLM's (the replica tells errors by the class name)."""

    def __init__(self, message: str):
        self.error = types.SimpleNamespace(message=message)


class Registry:
    """The parts of vLLM's OpenAIServingModels the replica uses."""

    def __init__(self, broken: set[str] = frozenset()):
        self.lora_requests: dict[str, types.SimpleNamespace] = {}
        self.broken = broken
        self.removed: list[int] = []
        self.next_id = 0
        self.engine_client = types.SimpleNamespace(vllm_config=types.SimpleNamespace(lora_config=object()),
                                                   remove_lora=self._remove)

    async def _remove(self, lora_id):
        self.removed.append(lora_id)

    async def load_lora_adapter(self, request, base_model_name=None):
        if request.lora_path in self.broken:
            return ErrorResponse("Traceback (most recent call last):\n  File x\nValueError: bad shape")
        self.next_id += 1
        self.lora_requests[request.lora_name] = types.SimpleNamespace(lora_int_id=self.next_id,
                                                                      lora_path=request.lora_path)
        return "ok"

    async def unload_lora_adapter(self, request):
        del self.lora_requests[request.lora_name]


def folders(tmp_path, *names):
    """Adapter folders as PEFT writes them (the fake registry does not read the weights)."""
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}))
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"weights")


def apply(adapters: AdapterSet, *pairs):
    asyncio.run(adapters.apply({"adapters": [{"name": n, "source": s} for n, s in pairs]}))


def test_adapters_load_replace_and_unload_as_the_wanted_set_changes(tmp_path):
    folders(tmp_path, "a", "b", "b2")
    registry = Registry()
    adapters = AdapterSet("base", registry)
    apply(adapters, ("x", str(tmp_path / "a")), ("y", str(tmp_path / "b")))
    assert {n: s["state"] for n, s in adapters.states.items()} == {"x": "loaded", "y": "loaded"}
    first_y = registry.lora_requests["y"].lora_int_id
    apply(adapters, ("y", str(tmp_path / "b2")))  # x removed, y replaced from a new folder
    assert set(registry.lora_requests) == {"y"} and set(adapters.states) == {"y"}
    assert registry.lora_requests["y"].lora_int_id != first_y  # new weights, new LoRA id
    assert first_y in registry.removed
    apply(adapters, ("y", str(tmp_path / "b2")))  # unchanged: nothing reloaded
    assert registry.next_id == 3


def test_a_failed_adapter_answers_503_naming_it_and_the_others_still_load(tmp_path):
    folders(tmp_path, "good", "bad")
    adapters = AdapterSet("base", Registry(broken={str(tmp_path / "bad")}))
    apply(adapters, ("ok", str(tmp_path / "good")), ("broken", str(tmp_path / "bad")), ("gone", str(tmp_path / "x")))
    assert adapters.states["ok"]["state"] == "loaded"
    broken = adapters.states["broken"]
    assert (broken["state"], broken["reason"]) == ("failed", "ValueError: bad shape")
    assert adapters.states["gone"]["state"] == "failed" and "does not exist" in adapters.states["gone"]["reason"]
    adapters.check("ok")
    adapters.check("base")  # the model itself
    with pytest.raises(errors.AdapterUnavailable, match="'broken' of model 'base' failed to load; its operators") as e:
        adapters.check("broken")
    assert "ValueError" not in str(e.value) and str(tmp_path) not in str(e.value)  # the reason is for /fleet
    with pytest.raises(errors.AdapterUnavailable, match="not loaded on this replica yet") as e:
        adapters.check("added-elsewhere")
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"


def test_lora_off_fails_every_adapter_with_the_reason(tmp_path):
    folders(tmp_path, "a")
    registry = Registry()
    registry.engine_client.vllm_config.lora_config = None
    adapters = AdapterSet("base", registry)
    apply(adapters, ("x", str(tmp_path / "a")))
    assert "enable_lora" in adapters.states["x"]["reason"]


def test_a_replacement_that_fails_keeps_the_previous_weights_serving(tmp_path):
    folders(tmp_path, "v1", "v2")
    registry = Registry(broken={str(tmp_path / "v2")})
    adapters = AdapterSet("base", registry)
    apply(adapters, ("x", str(tmp_path / "v1")))
    first = registry.lora_requests["x"].lora_int_id
    apply(adapters, ("x", str(tmp_path / "v2")))
    assert registry.lora_requests["x"].lora_int_id == first and registry.removed == []
    state = adapters.states["x"]
    assert state["state"] == "loaded"
    assert "replacing it from" in state["reason"] and str(tmp_path / "v1") in state["reason"]
    adapters.check("x")  # still served
    registry.broken = set()
    apply(adapters, ("x", str(tmp_path / "v2")))  # applied again: tried again, now it loads
    assert registry.lora_requests["x"].lora_int_id != first and first in registry.removed
    assert adapters.states["x"]["reason"] is None


def test_applying_again_retries_a_failed_adapter(tmp_path):
    folders(tmp_path, "a")
    registry = Registry(broken={str(tmp_path / "a")})
    adapters = AdapterSet("base", registry)
    apply(adapters, ("x", str(tmp_path / "a")))
    assert adapters.states["x"]["state"] == "failed"
    registry.broken = set()
    apply(adapters, ("x", str(tmp_path / "a")))
    assert adapters.states["x"]["state"] == "loaded"
