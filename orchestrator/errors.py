"""The exception hierarchy, mapped once to OpenAI's error envelope.

Sorted by who can fix it: the client (4xx: fix the request), the fleet (503: wait
and retry), or us (500). Every answer has the shape
``{"error": {"message", "type", "param", "code"}}`` with string-or-null ``param``
and ``code``, as OpenAI's own schema (and strict typed clients) expect.

Example::

    raise UnknownModel("gpt-9")          # -> 404 model_not_found
    status, body = to_envelope(exc)
"""

from __future__ import annotations

from typing import Any

MAX_REFLECTED_CHARS = 200


def clip(value: object, limit: int = MAX_REFLECTED_CHARS) -> str:
    """A client-supplied value as it may appear in an error message: cut to ``limit``
    characters (a 1 MB model name must not come back whole in a 404)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class OrchestratorError(Exception):
    """Base class. ``status``, ``type`` and ``code`` become the HTTP answer."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


# -- the client's to fix ---------------------------------------------------------------


class InvalidRequest(OrchestratorError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class WrongTask(InvalidRequest):
    """An embedding model asked to chat, or a generative model asked to embed."""

    code = "model_not_supported"


class RequestTooLarge(OrchestratorError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Unauthorized(OrchestratorError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(OrchestratorError):
    """A valid key without the right to this endpoint (e.g. /fleet without admin)."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class UnknownModel(OrchestratorError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(f"The model '{clip(model)}' does not exist", param="model")


class NotFound(OrchestratorError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(OrchestratorError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimited(OrchestratorError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


# -- the fleet's: retry later ----------------------------------------------------------


class RetryLater(OrchestratorError):
    """A 503 with ``Retry-After``: the fleet cannot answer now; ``retry_after_s`` says when to
    try again (each subclass has its default)."""

    status = 503
    type = "server_error"
    retry_after_s = 5

    def __init__(self, message: str, retry_after_s: int | None = None):
        wait = self.retry_after_s if retry_after_s is None else retry_after_s
        super().__init__(message, headers={"Retry-After": str(wait)})


class NoReadyReplica(RetryLater):
    code = "model_not_ready"


class AdapterUnavailable(RetryLater):
    """A LoRA adapter that failed to load (its reason in the message), or is still loading."""

    code = "adapter_unavailable"
    retry_after_s = 30


class Overloaded(RetryLater):
    """Admission control: the model's queue is past its bound; retry shortly."""

    code = "model_overloaded"
    retry_after_s = 2


class ModelStartFailed(RetryLater):
    """A model's replica failed to start (the message names the cause and what to change):
    requests held for it get this instead of waiting out cold_start_timeout_s."""

    code = "model_start_failed"
    retry_after_s = 30


class UpstreamTimeout(OrchestratorError):
    status = 504
    type = "server_error"
    code = "timeout"


_STATUS_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "invalid_request"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    501: ("invalid_request_error", "not_implemented"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


def envelope(message: str, status: int, *, type_: str | None = None, param: str | None = None,
             code: str | None = None) -> dict[str, Any]:
    """The OpenAI error body for a status; ``type`` and ``code`` default from the status."""
    default_type, default_code = _STATUS_TYPES.get(status, ("server_error", "internal_error"))
    return {
        "error": {
            "message": message,
            "type": type_ or default_type,
            "param": param,
            "code": code or default_code,
        }
    }


def to_envelope(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Map any exception to (status, body, headers). Unknown errors become a terse 500."""
    if isinstance(exc, OrchestratorError):
        body = envelope(exc.message, exc.status, type_=exc.type, param=exc.param, code=exc.code)
        return exc.status, body, dict(exc.headers)
    return 500, envelope("The server had an error while processing your request.", 500), {}


def from_vllm_error(error: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Normalise vLLM's ErrorResponse (integer ``code``, free ``type``) to the envelope."""
    status = int(error.get("code") or 500)
    if status < 400 or status > 599:
        status = 500
    message = str(error.get("message") or "error")
    param = error.get("param")
    code = None
    lowered = message.lower()
    if status == 400 and ("maximum context length" in lowered or "context length" in lowered
                          or "too long" in lowered or "max_model_len" in lowered):
        code = "context_length_exceeded"
    if status >= 500:
        # Do not leak engine internals to clients; the replica logs the detail.
        message = "The model server had an error while processing your request."
    return status, envelope(message, status, param=str(param) if param is not None else None, code=code)
