"""The gateway's stream response cleans up a body that never started (pure ASGI, no server)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect

from orchestrator.gateway.admission import RequestContext
from orchestrator.gateway.http import GuardedStream

SCOPE = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST"}


def _ctx() -> RequestContext:
    return RequestContext("req-1", False, "chat", 0.0)


def _stream(ctx: RequestContext, cleaned: list[str]):
    async def body():
        ctx.body_started = True
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
        finally:
            cleaned.append("generator")

    return GuardedStream(body(), ctx, lambda: cleaned.append("abandoned"))


async def _receive():
    await asyncio.sleep(3600)


def _run_then_cancel(response, send) -> None:
    """Serve ``response`` until it stalls in ``send``, then cancel it (the server does so
    when its client leaves)."""
    async def run():
        task = asyncio.ensure_future(response(SCOPE, _receive, send))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())


def test_a_body_that_ran_cleans_up_in_its_own_finally():
    ctx, cleaned, sent = _ctx(), [], []

    async def send(message):
        sent.append(message)

    asyncio.run(_stream(ctx, cleaned)(SCOPE, _receive, send))
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert cleaned == ["generator"]


def test_a_client_gone_before_the_first_chunk_still_releases_the_stream():
    ctx, cleaned = _ctx(), []

    async def send(message):
        raise OSError("connection reset")  # the response head cannot be written

    with pytest.raises(ClientDisconnect):
        asyncio.run(_stream(ctx, cleaned)(SCOPE, _receive, send))
    assert cleaned == ["abandoned"]


def test_a_stream_cancelled_while_sending_its_head_still_releases_the_stream():
    ctx, cleaned = _ctx(), []

    async def send(message):
        await asyncio.sleep(3600)  # a stalled client, at the response head

    _run_then_cancel(_stream(ctx, cleaned), send)
    assert cleaned == ["abandoned"]


def test_a_stream_cancelled_mid_body_is_cleaned_up_once_by_its_generator():
    ctx, cleaned = _ctx(), []
    sent = []

    async def send(message):
        sent.append(message)
        if len(sent) == 2:  # after the first chunk
            await asyncio.sleep(3600)

    _run_then_cancel(_stream(ctx, cleaned), send)
    assert cleaned == ["generator"]
