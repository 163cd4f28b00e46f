"""HTTP pieces every front door shares (the gateway's ``/v1`` and each fast lane): one FastAPI
app factory whose errors all leave as OpenAI's envelope, the SSE error event, a stream
response that cleans up when its body never starts, and the request-id bound.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator import errors

log = logging.getLogger("orchestrator.gateway")

SSE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# What a request id may be when the gateway reflects it: a client's longer or stranger
# x-request-id is replaced by a fresh one (it goes into response headers and audit lines).
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/=+-]{1,128}$")


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = errors.to_envelope(exc)
    if status >= 500 and not isinstance(exc, errors.OrchestratorError):
        log.error("unhandled error: %r", exc, exc_info=exc)
    return JSONResponse(body, status_code=status, headers=headers)


async def orchestrator_error(request: Request, exc: errors.OrchestratorError) -> JSONResponse:
    response = error_response(exc)
    ctx = getattr(request.state, "ctx", None)
    if ctx is not None and ctx.echo_id:
        response.headers["x-request-id"] = ctx.request_id
    return response


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    path = errors.clip(request.url.path)
    if exc.status_code == 404:
        return error_response(errors.NotFound(f"No route for {request.method} {path}"))
    if exc.status_code == 405:
        return error_response(errors.MethodNotAllowed(f"Method {request.method} is not allowed on {path}"))
    body = errors.envelope(errors.clip(str(exc.detail)), exc.status_code)
    return JSONResponse(body, status_code=exc.status_code)


async def any_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def openai_api() -> FastAPI:
    """A FastAPI app without docs pages, every error answered as OpenAI's envelope."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(errors.OrchestratorError, orchestrator_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, any_error)
    return app


def error_event(exc: errors.OrchestratorError) -> bytes:
    """An error inside an SSE stream (the status line is already sent): OpenAI's envelope
    as a data event, then ``[DONE]``. The openai SDK raises it as an ``APIError``."""
    _, body, _ = errors.to_envelope(exc)
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


class GuardedStream(StreamingResponse):
    """A stream response whose ``abandoned`` callback runs if its body never started.

    Cancelled before its first step (the client left while the response head was being
    sent), an async generator is dropped without running its ``finally``, which is where a
    stream cancels its call (vLLM would otherwise generate the whole answer for nobody)
    and releases its bookkeeping (the routers' in-flight count, which would otherwise
    keep that replica looking one request busier for good)."""

    def __init__(self, content, ctx: Any, abandoned, headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type=SSE, headers={**SSE_HEADERS, **(headers or {})})
        self._ctx = ctx
        self._abandoned = abandoned

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._ctx.body_started:
                self._abandoned()


class BoundRequestId:
    """ASGI middleware, outside Serve's own request-id middleware: a client's ``x-request-id``
    that is too long or holds other characters than ``REQUEST_ID`` allows is dropped, so Serve
    makes a fresh id instead of echoing the client's bytes back (and logging them)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") == "http":
            headers = scope.get("headers") or []
            kept = [(k, v) for k, v in headers if k.lower() != b"x-request-id" or REQUEST_ID.match(
                v.decode("latin-1"))]
            if len(kept) != len(headers):
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


def serve_middlewares() -> list:
    """Serve's HTTP middleware hook (``ray_compat.HTTP_MIDDLEWARES_VAR`` names this function)."""
    from starlette.middleware import Middleware

    return [Middleware(BoundRequestId)]
