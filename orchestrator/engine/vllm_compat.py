"""Every use of vLLM's internals, in one file.

The project pins vLLM (pyproject.toml); what the model replica needs beyond vLLM's public
engine API is here, so a version bump is checked against this file alone:

* starting an ``AsyncLLM`` the way vLLM's OpenAI server does, with a stat logger of ours;
* vLLM's OpenAI serving layer, built by its server's ``init_app_state``, and its request
  models (whose module paths move between versions);
* its error responses (``ErrorResponse``, ``create_error_response``);
* a context-length check wrapped around the serving layer's request rendering (it uses
  the private ``_extract_prompt_len``);
* vLLM's structured-output checks and its grammar compiler (xgrammar), to refuse a JSON
  schema xgrammar accepts but cannot compile, before the engine fails on it;
* LoRA adapters loaded and unloaded through the serving layer's model registry
  (``OpenAIServingModels``), as vLLM's own ``/v1/load_lora_adapter`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
from typing import Any

from orchestrator import errors

GRAMMAR_CACHE_BYTES = 16 * 2**20


async def start_engine(engine_args, record_stats, placement_group=None):
    """vLLM's ``AsyncLLM`` for ``engine_args``, as its OpenAI server starts it; ``record_stats``
    gets each step's scheduler stats; ``placement_group``: a GPU replica's, for tensor
    parallelism over Ray."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.executor.abstract import Executor

    def create():
        config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        if placement_group is not None:
            config.parallel_config.placement_group = placement_group
        return config

    config = await asyncio.to_thread(create)
    return AsyncLLM(
        vllm_config=config,
        executor_class=Executor.get_class(config),
        log_requests=False,
        log_stats=not engine_args.disable_log_stats,
        stat_loggers=[stat_logger_factory(record_stats)],
    )


def stat_logger_factory(record_stats):
    """A vLLM stat-logger factory whose loggers pass each step's scheduler stats to ``record_stats``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            record_stats(scheduler_stats)

        def log_engine_initialized(self):
            pass

    return LoadLogger


async def init_serving(engine, engine_args, frontend_args) -> dict[str, Any]:
    """vLLM's OpenAI serving objects for ``engine``, built as its server builds them:
    ``{"chat", "completions", "embeddings"}`` (None where the model does not do that task)."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    state = State()
    ns = argparse.Namespace(**(vars(frontend_args) | vars(engine_args)))
    supported = await engine.get_supported_tasks()
    await init_app_state(engine, state, ns, supported_tasks=supported)
    chat = getattr(state, "openai_serving_chat", None)
    completion = getattr(state, "openai_serving_completion", None)
    for serving in (chat, completion):
        if serving is not None:
            enforce_context_limit(serving)
    return {"chat": chat, "completions": completion, "embeddings": getattr(state, "serving_embedding", None),
            "models": getattr(state, "openai_serving_models", None)}


async def load_adapter(models, name: str, path: str) -> str | None:
    """Load a LoRA adapter into the engine and serve it as ``name``: None, or why it failed.

    A name already loaded is replaced make-before-break: the new weights load under a staging
    name with a new LoRA id (so no prefix-cache block or in-flight request mixes the two),
    then the name points at them and the old id leaves the engine's cache. Until then, and if
    the new weights fail, the old ones keep serving."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    if models is None:
        return "this model has no generative serving layer"
    if models.engine_client.vllm_config.lora_config is None:
        return "LoRA is off on this model's engine (engine.enable_lora is false)"
    replacing = name in models.lora_requests
    staging = f"{name}\x00next" if replacing else name
    try:
        result = await models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=staging, lora_path=path))
    except Exception as e:  # noqa: BLE001 - a bad adapter must not take the replica down
        result = error_response(str(e) or type(e).__name__)
    if is_error(result):
        return _adapter_reason(result.error.message)
    if replacing:
        new = models.lora_requests.pop(staging)
        new.lora_name = name
        old = models.lora_requests.get(name)
        models.lora_requests[name] = new
        if old is not None:
            try:
                await models.engine_client.remove_lora(old.lora_int_id)
            except Exception:  # noqa: BLE001 - the cache evicts it anyway (LRU, max_cpu_loras)
                pass
    return None


def _adapter_reason(message: str) -> str:
    """vLLM's message about a failed adapter load, without the engine's traceback noise."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Traceback", "File ", "^"))]
    return (useful[-1] if useful else "the adapter could not be loaded")[:400]


async def unload_adapter(models, name: str) -> None:
    """Stop serving ``name`` and drop its weights from the engine's adapter cache (a request
    already running with it keeps its own reference; vLLM reloads it for that request if needed)."""
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    lora = models.lora_requests.get(name)
    if lora is None:
        return
    await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
    try:
        await models.engine_client.remove_lora(lora.lora_int_id)
    except Exception:  # noqa: BLE001 - the cache evicts it anyway (LRU, max_cpu_loras)
        pass


def adapter_names(models) -> set[str]:
    """The adapters the serving layer serves now."""
    return set(models.lora_requests) if models is not None else set()


async def run(serving, endpoint: str, request):
    """Submit a parsed request to its serving object: vLLM's response, error or generator."""
    try:
        if endpoint == "chat":
            return await serving.create_chat_completion(request, None)
        if endpoint == "completions":
            return await serving.create_completion(request, None)
        return await serving(request, None)
    except errors.OrchestratorError:
        raise
    except Exception as e:  # noqa: BLE001 - vLLM raises plain exceptions for bad input
        return error_response(e)


def error_response(exc: BaseException | str, param: str | None = None):
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    return create_error_response(exc, param=param) if param else create_error_response(exc)


def is_error(result: Any) -> bool:
    """Whether a serving call's result is vLLM's ``ErrorResponse``."""
    return type(result).__name__ == "ErrorResponse"


def parse_request(endpoint: str, payload: dict[str, Any]):
    """vLLM's request model for a JSON object the gateway already decoded; 400 naming the
    field for what vLLM's models refuse."""
    from pydantic import TypeAdapter, ValidationError
    from vllm.exceptions import VLLMClientError

    try:
        if endpoint == "chat":
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

            return ChatCompletionRequest.model_validate(payload)
        if endpoint == "completions":
            from vllm.entrypoints.openai.completion.protocol import CompletionRequest

            return CompletionRequest.model_validate(payload)
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

        return TypeAdapter(EmbeddingRequest).validate_python(payload)
    except ValidationError as e:
        raise _pydantic_error(e) from e
    except VLLMClientError as e:  # vLLM's own validators (e.g. top_logprobs without logprobs)
        message = e.args[0] if e.args else str(e)
        raise errors.InvalidRequest(f"Invalid request: {message}", param=getattr(e, "parameter", None)) from e
    except (ValueError, TypeError) as e:
        raise errors.InvalidRequest(f"Invalid request: {e}") from e


def _pydantic_error(exc: Exception) -> errors.InvalidRequest:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "tagged-union"))]
        # Unions report the member class as the first location part; drop it.
        loc = [p for p in loc if not re.fullmatch(r"[A-Z]\w*Request", p)]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        where = f"'{param}': " if param else ""
        return errors.InvalidRequest(f"Invalid request: {where}{msg}", param=param)
    return errors.InvalidRequest(f"Invalid request: {exc}")


@functools.lru_cache(maxsize=1)
def _grammar_compiler():
    """A grammar compiler over a tiny vocabulary: the grammar-level checks that can fail a
    schema do not depend on the model's tokens, and a small vocabulary compiles fast. Its
    cache is on, as in the engine (the failing check is on the cache's path), but bounded:
    clients choose the schemas."""
    import xgrammar as xgr

    vocab = [chr(c) for c in range(32, 127)] + ["<eos>"]
    return xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, stop_token_ids=[len(vocab) - 1]), max_threads=1,
                               cache_enabled=True, cache_limit_bytes=GRAMMAR_CACHE_BYTES)


def _compiler_reason(exc: BaseException) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text)[:300]


def structured_backend(engine_args) -> str:
    """The engine's structured-output backend (vLLM's default: auto)."""
    config = getattr(engine_args, "structured_outputs_config", None)
    return str(getattr(config, "backend", None) or "auto")


def json_schema_of(request) -> tuple[str, Any] | None:
    """(the field it came in, the JSON schema) of a request whose output must follow a JSON
    schema; None for most requests (cheap: no compiling here)."""
    fmt = getattr(request, "response_format", None)
    if fmt is not None and getattr(fmt, "type", None) == "json_schema" and getattr(fmt, "json_schema", None):
        return "response_format", fmt.json_schema.json_schema
    params = getattr(request, "structured_outputs", None)
    if params is not None and getattr(params, "json", None) is not None:
        return "structured_outputs", params.json
    return None


def check_json_schema(found: tuple[str, Any]) -> None:
    """400 naming the field when xgrammar accepts a JSON schema in vLLM's validation but then
    cannot compile it (the request failed inside the engine with a 500). What vLLM refuses
    itself (too deep, unsupported features it hands to another backend) is left to vLLM, and
    so is anything this check cannot run."""
    param, schema = found
    try:
        import json

        from vllm.sampling_params import check_json_nesting
        from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features

        parsed = json.loads(schema) if isinstance(schema, str) else schema
        check_json_nesting(parsed)
        if not isinstance(parsed, dict) or has_xgrammar_unsupported_json_features(parsed):
            return
        compiler = _grammar_compiler()
    except Exception:  # noqa: BLE001 - vLLM answers these itself
        return
    try:
        compiler.compile_json_schema(_json(parsed))
    except Exception as e:  # noqa: BLE001 - the compiler raises RuntimeError and ValueError
        raise errors.InvalidRequest(f"The JSON schema in '{param}' cannot be compiled: {_compiler_reason(e)}",
                                    param=param) from e


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def enforce_context_limit(serving) -> None:
    """Refuse (400) prompts whose tokens plus the requested output exceed max_model_len.

    vLLM quietly shortens ``max_tokens`` to fit; OpenAI answers such a request with a
    400, and clients rely on that to notice truncation. The check runs on the prompt
    vLLM has already rendered and tokenized, so nothing is tokenized twice.
    """
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    max_model_len = serving.model_config.max_model_len
    chat_render = getattr(serving, "render_chat_request", None)
    completion_render = getattr(serving, "render_completion_request", None)

    def check(request, engine_inputs) -> ErrorResponse | None:
        requested = getattr(request, "max_completion_tokens", None) or getattr(request, "max_tokens", None)
        if requested is None or getattr(request, "truncate_prompt_tokens", None) is not None:
            return None
        for engine_input in engine_inputs:
            prompt_len = serving._extract_prompt_len(engine_input)
            if prompt_len + requested > max_model_len:
                return error_response(
                    f"This model's maximum context length is {max_model_len} tokens. However, you "
                    f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                    f"{requested} for the completion). Please reduce the prompt or max_tokens.",
                    param="max_tokens",
                )
        return None

    if chat_render is not None:
        async def render_chat_request(request):
            result = await chat_render(request)
            if isinstance(result, ErrorResponse):
                return result
            return check(request, result[1]) or result

        serving.render_chat_request = render_chat_request
    elif completion_render is not None:
        async def render_completion_request(request):
            result = await completion_render(request)
            if isinstance(result, ErrorResponse):
                return result
            return check(request, result) or result

        serving.render_completion_request = render_completion_request
