"""What every OpenAI request passes before a model sees it, wherever it enters: the
gateway (``/v1``, routed by its "model") or a model's fast lane (``/models/<name>/v1``,
answered by that model's replicas themselves; see ``orchestrator.gateway.lane``).

``Admission.enter`` is the one sequence both take: the caller's API key, the decoded body,
the request caps, capacity (``orchestrator.gateway.capacity``, checked by the caller's
``capacity`` callback), then the key's rate limits, charged last so that a request refused
for any other reason costs the key nothing. After the answer, ``finish`` reconciles the key's
tokens with what was used and writes the audit line. Both entry points share one
rate-limiter actor, so a key's limits hold across them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request

from orchestrator import errors, ray_compat
from orchestrator.gateway import auth as keys
from orchestrator.gateway import capacity, ratelimit
from orchestrator.gateway.audit import AuditLog
from orchestrator.gateway.http import REQUEST_ID
from orchestrator.spec import CLASSES, FleetSpec, ModelSpec, RequestLimits

log = logging.getLogger("orchestrator.gateway")

# Tokens reserved against a key's tokens-per-minute for a request without max_tokens
# (reconciled with the answer's real usage when it is known).
DEFAULT_RESERVED_OUTPUT_TOKENS = 256
KEYS_RELOAD_CHECK_S = 5.0
TASK_OF_ENDPOINT = {"chat": "generate", "completions": "generate", "embeddings": "embed"}
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}


@dataclasses.dataclass
class RequestContext:
    """One request's bookkeeping: its id, key, reservation and outcome (for the audit log)."""

    request_id: str
    echo_id: bool
    endpoint: str
    started: float
    key: keys.KeyRecord | None = None
    model: str | None = None
    stream: bool = False
    status: int | str = 500
    reserved: int = 0
    usage: dict[str, Any] | None = None
    body: Any = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    cls: str = "standard"  # the request's class (its key's, or lower if it asked)
    cost: int = 0  # estimated tokens: its weight in the fair queue
    ticket: Any = None  # its place in the fair queue (orchestrator.gateway.fairqueue.Ticket)
    track: str | None = None  # the stream's token in the routers' in-flight view
    body_started: bool = False  # the stream's body generator ran (its finally will clean up)

    def note_usage(self, data: bytes) -> None:
        """Keep the ``usage`` object of an answer or stream chunk, if it has one."""
        if b'"usage"' not in data:
            return
        for part in data.split(b"\n"):
            text = part[6:] if part.startswith(b"data: ") else part
            if b'"usage"' not in text:
                continue
            try:
                usage = json.loads(text).get("usage")
            except (ValueError, AttributeError):
                continue
            if isinstance(usage, dict):
                self.usage = usage


def request_id(request: Request) -> tuple[str, bool]:
    """(the request's id, whether the gateway must echo it). Under Ray Serve the proxy has
    already taken the client's x-request-id (or made one) and returns it itself."""
    serve_id = ray_compat.serve_request_id()
    if serve_id:
        return serve_id, False
    given = request.headers.get("x-request-id")
    if given and REQUEST_ID.match(given):
        return given, True
    return uuid.uuid4().hex, True


def estimate_tokens(payload: dict[str, Any]) -> int:
    """Prompt tokens (about 4 characters each) plus the output the request may ask for."""
    text = payload.get("messages") or payload.get("prompt") or payload.get("input") or ""
    chars = len(json.dumps(text)) if not isinstance(text, str) else len(text)
    asked = payload.get("max_completion_tokens") or payload.get("max_tokens")
    output = asked if isinstance(asked, int) and asked > 0 else DEFAULT_RESERVED_OUTPUT_TOKENS
    if "input" in payload and "messages" not in payload and "prompt" not in payload:
        output = 0  # embeddings produce no tokens
    return chars // 4 + 1 + output


# The header a request may lower its class with; OpenAI's service_tier maps onto the classes
# ("auto", "default" and "scale": the key's own class).
CLASS_HEADER = "x-slm-priority"
SERVICE_TIERS = {"priority": "interactive", "flex": "batch", "auto": None, "default": None, "scale": None}
# vLLM's request priority per class (lower runs first) under scheduling_policy: priority.
ENGINE_PRIORITY = {"interactive": 0, "standard": 1, "batch": 2}


def request_class(key: keys.KeyRecord | None, headers: Any, payload: dict[str, Any]) -> str:
    """The request's class: its key's ``priority`` (anonymous: standard), lowered (never raised)
    by the ``x-slm-priority`` header or the body's ``service_tier``; 400 for an unknown value."""
    own = key.priority if key is not None else "standard"
    asked = [own]
    header = headers.get(CLASS_HEADER)
    if header is not None:
        value = header.strip().lower()
        if value not in CLASSES:
            raise errors.InvalidRequest(f"The {CLASS_HEADER} header must be one of {', '.join(CLASSES)}; "
                                        f"got {header[:40]!r}")
        asked.append(value)
    tier = payload.get("service_tier")
    if tier is not None:
        if not isinstance(tier, str) or tier not in SERVICE_TIERS:
            raise errors.InvalidRequest(f"service_tier must be one of {', '.join(SERVICE_TIERS)}",
                                        param="service_tier")
        asked.append(SERVICE_TIERS[tier] or own)
    return max(asked, key=CLASSES.index)  # the lowest of them


class Admission:
    """A fleet's request admission: keys (reloaded when their file changes), caps, rate
    limits, audit. ``app_name`` names the Serve application whose rate-limiter actor is used;
    ``replica`` goes into audit lines."""

    def __init__(self, fleet: FleetSpec, app_name: str | None, replica: str | None, audit_fallback: bool = False,
                 limiter=None):
        """``limiter``: the rate-limiter actor (default: the application's, found on first use)."""
        self.fleet = fleet
        self.max_body_bytes = fleet.gateway.max_body_bytes
        self._app_name = app_name
        self._replica = replica
        self._keys: keys.KeyStore | None = None
        self._keys_checked = 0.0
        self._keys_mtime: float | None = None
        if fleet.gateway.auth is not None:
            self._load_keys()
        audit = fleet.gateway.audit
        self.audit = None
        if audit.enabled:
            try:
                self.audit = AuditLog(audit.path, audit.include_prompts)
            except OSError as e:
                if not audit_fallback:
                    raise
                # A model replica may run on a node without the gateway's audit path.
                log.warning("audit log %s not writable here (%s): writing it to stdout", audit.path, e)
                self.audit = AuditLog(None, audit.include_prompts)
        self._limiter = limiter
        # Adapter name -> (its base model, its own request limits), from the gateway's user_config.
        self.adapters: dict[str, tuple[str, RequestLimits | None]] = {}

    def set_adapters(self, entries: list[dict[str, Any]]) -> None:
        """The fleet's adapters (``[{"name", "base", "limits"}]``), replacing the previous set."""
        adapters = {}
        for entry in entries:
            if self.fleet.model(entry["base"]) is None:
                log.warning("adapter %s: its base model %s is not in this fleet; ignored", entry["name"], entry["base"])
                continue
            limits = RequestLimits.model_validate(entry["limits"]) if entry.get("limits") else None
            adapters[entry["name"]] = (entry["base"], limits)
        added, removed = sorted(set(adapters) - set(self.adapters)), sorted(set(self.adapters) - set(adapters))
        self.adapters = adapters
        if added or removed:
            log.info("adapters: %d served%s%s", len(adapters), f"; added {', '.join(added)}" if added else "",
                     f"; removed {', '.join(removed)}" if removed else "")

    def resolve(self, name: str) -> tuple[ModelSpec, RequestLimits | None] | None:
        """The model that serves ``name`` (itself, or an adapter's base) and the adapter's own
        limits; None for a name the fleet does not serve."""
        spec = self.fleet.model(name)
        if spec is not None:
            return spec, None
        adapter = self.adapters.get(name)
        if adapter is None:
            return None
        return self.fleet.model(adapter[0]), adapter[1]

    def _load_keys(self) -> None:
        a = self.fleet.gateway.auth
        if a.keys_file:
            self._keys_mtime = os.stat(a.keys_file).st_mtime
            self._keys = keys.load_keys_file(a.keys_file)
        else:
            self._keys = keys.load_keys_env(a.keys_env)
        log.info("API keys loaded: %d keys", len(self._keys))

    def _current_keys(self) -> keys.KeyStore | None:
        """The key store, reloaded when its file changes (a rotated Secret); a broken new
        file keeps the old keys and logs why."""
        a = self.fleet.gateway.auth
        now = time.monotonic()
        if a is not None and a.keys_file and now - self._keys_checked > KEYS_RELOAD_CHECK_S:
            self._keys_checked = now
            try:
                if os.stat(a.keys_file).st_mtime != self._keys_mtime:
                    self._load_keys()
            except (OSError, ValueError) as e:
                log.error("keeping the previous API keys: %s", e)
        return self._keys

    def interactive_keys(self) -> bool:
        """Whether a request can be interactive: some API key has ``priority: interactive``
        (without keys every request is standard or lower)."""
        store = self._current_keys()
        return store is not None and store.interactive

    def authenticate(self, request: Request, admin: bool = False) -> keys.KeyRecord | None:
        """The caller's key (None when auth is off); 401 without a valid key, 403 for a
        non-admin key on an admin endpoint."""
        store = self._current_keys()
        if store is None:
            return None
        presented = keys.bearer(request.headers.get("authorization"))
        if presented is None:
            raise errors.Unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.")
        record = store.authenticate(presented)
        if record is None:
            raise errors.Unauthorized("Incorrect API key provided.")
        if admin and not record.admin:
            raise errors.Forbidden("This key may not read this endpoint (it needs an admin key).")
        return record

    async def enter(self, request: Request, endpoint: str, capacity: Callable[[ModelSpec], Awaitable[None]],
                    serves: str | None = None) -> tuple[RequestContext, dict[str, Any], ModelSpec, bool]:
        """Admit a request or raise its 4xx/503 (its audit line written): (its context, the
        decoded body, the model's spec, whether it streams). ``capacity`` raises 503 when the
        model is full; ``serves`` names the only model this entry point serves."""
        ctx = RequestContext(*request_id(request), endpoint, time.perf_counter())
        request.state.ctx = ctx
        try:
            ctx.key = self.authenticate(request)
            payload, spec, stream = await self.read(request, endpoint, ctx.key)
            if serves is not None and spec.name != serves:
                raise errors.InvalidRequest(f"This endpoint serves only the model '{serves}' and its adapters; "
                                            f"send requests for '{payload['model']}' to /v1", param="model")
            ctx.model, ctx.stream = payload["model"], stream
            ctx.cls = request_class(ctx.key, request.headers, payload)
            ctx.cost = estimate_tokens(payload)
            if spec.priority_scheduling:
                payload["priority"] = ENGINE_PRIORITY[ctx.cls]  # a client's own value never raises it
            else:
                payload.pop("priority", None)
            if self.audit is not None and self.audit.include_prompts:
                ctx.body = payload
            await capacity(spec)
            await self.admit(ctx, payload)
        except errors.OrchestratorError as e:
            ctx.status = e.status
            self.finish(ctx)
            raise
        if ctx.echo_id:
            ctx.headers["x-request-id"] = ctx.request_id
        return ctx, payload, spec, stream

    def _limiter_actor(self):
        if self._limiter is None:
            self._limiter = ratelimit.get_or_create(self._app_name)
        return self._limiter

    async def admit(self, ctx: RequestContext, payload: dict[str, Any]) -> None:
        """Take the request and its reserved tokens from the key's limits, or raise 429."""
        key = ctx.key
        if key is None or not (key.rpm or key.tpm or key.tokens_per_day):
            return
        tokens = estimate_tokens(payload) if key.tpm or key.tokens_per_day else 0
        try:
            decision = await self._limiter_actor().acquire.remote(key.name, key.rpm, key.tpm, tokens,
                                                                  key.tokens_per_day)
        except Exception as e:  # noqa: BLE001 - the limiter actor restarting: admit rather than fail
            log.warning("rate limiter unavailable, admitting: %r", e)
            self._limiter = None
            return
        ctx.headers.update(decision.headers)
        if not decision.allowed:
            headers = dict(decision.headers)
            if decision.retry_after_s > 0:
                headers["Retry-After"] = str(max(1, int(decision.retry_after_s + 0.999)))
                headers["retry-after-ms"] = str(int(decision.retry_after_s * 1000))
            raise errors.RateLimited(f"Rate limit for key '{key.name}': {decision.reason}.", headers=headers)
        ctx.reserved = tokens

    def finish(self, ctx: RequestContext) -> None:
        """After the answer: reconcile the key's tokens with what it used; write the audit line."""
        usage = ctx.usage or {}
        if isinstance(ctx.status, str) and ctx.status.isdigit():
            ctx.status = int(ctx.status)  # a stream's status
        if ctx.reserved and ctx.key is not None and (ctx.key.tpm or ctx.key.tokens_per_day):
            used = usage.get("total_tokens")
            never_ran = ctx.ticket is not None and ctx.ticket.state == "removed"  # left the queue unserved
            if not isinstance(used, int) and (never_ran or (isinstance(ctx.status, int) and ctx.status >= 400)):
                used = 0  # nothing was generated
            if isinstance(used, int) and self._limiter is not None:
                self._limiter.reconcile.remote(ctx.key.name, ctx.key.tpm, ctx.reserved, used, ctx.key.tokens_per_day)
        if self.audit is not None:
            status = ctx.status
            self.audit.write({
                "request_id": ctx.request_id, "gateway": self._replica, "key": ctx.key.name if ctx.key else None,
                "model": ctx.model, "class": ctx.cls,
                "queue_wait_ms": round(ctx.ticket.waited_s * 1000, 1) if ctx.ticket is not None else None,
                "queue_overtaken": ctx.ticket.overtaken if ctx.ticket is not None else None,
                "endpoint": ctx.endpoint, "status": status, "stream": ctx.stream,
                "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
                "latency_ms": round((time.perf_counter() - ctx.started) * 1000, 1), "body": ctx.body,
            })

    async def read(self, request: Request, endpoint: str,
                    key: keys.KeyRecord | None = None) -> tuple[dict[str, Any], ModelSpec, bool]:
        """The decoded body, the model's spec and the stream flag; raises the right 4xx for bad input."""
        limit = self.max_body_bytes
        too_large = f"The request body is over the gateway's limit of {limit} bytes (gateway.max_body_bytes)"
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise errors.RequestTooLarge(too_large)
        body = await request.body()
        if len(body) > limit:
            raise errors.RequestTooLarge(too_large)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise errors.InvalidRequest(f"We could not parse the JSON body of your request: {e}") from e
        except RecursionError as e:
            raise errors.InvalidRequest("We could not parse the JSON body of your request: it is nested too "
                                        "deeply") from e
        if not isinstance(payload, dict):
            raise errors.InvalidRequest("The request body must be a JSON object")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise errors.InvalidRequest("You must provide a model parameter", param="model")
        served = self.resolve(model)
        if served is None or (key is not None and not key.allows(model)):
            raise errors.UnknownModel(model)  # the same answer: do not reveal models a key may not use
        spec, adapter_limits = served
        self.check_limits(spec, payload, adapter_limits)
        if spec.task != TASK_OF_ENDPOINT[endpoint]:
            what = "an embedding model" if spec.task == "embed" else "a generative model"
            raise errors.WrongTask(
                f"The model '{model}' is {what} and does not support {PATHS[endpoint]}", param="model"
            )
        stream = payload.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise errors.InvalidRequest("'stream' must be a boolean", param="stream")
        if endpoint == "embeddings":
            stream = False
        return payload, spec, stream

    def check_limits(self, spec: ModelSpec, payload: dict[str, Any], adapter: RequestLimits | None = None) -> None:
        """The request caps of the adapter, else the model, else gateway.limits: 400 naming the cap."""
        def cap(name: str) -> int | None:
            return capacity.limit(self.fleet, spec, name, adapter)

        asked = payload.get("max_completion_tokens", payload.get("max_tokens"))
        limit = cap("max_tokens")
        if limit is not None and asked is None and spec.task == "generate":
            # No max_tokens asked: the cap is the default, not the whole context window.
            payload["max_tokens"] = limit
            payload.pop("max_completion_tokens", None)
        if limit is not None and isinstance(asked, int) and asked > limit:
            param = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
            raise errors.InvalidRequest(f"{param} {asked} is over this model's limit of {limit} (limits.max_tokens)",
                                        param=param)
        n, limit = payload.get("n"), cap("max_n")
        if limit is not None and isinstance(n, int) and n > limit:
            raise errors.InvalidRequest(f"n {n} is over this model's limit of {limit} (limits.max_n)", param="n")
        messages, limit = payload.get("messages"), cap("max_messages")
        if limit is not None and isinstance(messages, list) and len(messages) > limit:
            raise errors.InvalidRequest(f"{len(messages)} messages are over this model's limit of {limit} "
                                        "(limits.max_messages)", param="messages")
