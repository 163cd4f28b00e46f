"""A stream's SSE chunks from vLLM's generator to the gateway: straight to its inbox
(``orchestrator.wire``), or through Ray with a slow consumer's backlog joined into one chunk."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from orchestrator import wire

log = logging.getLogger("orchestrator.engine")


async def send_direct(source: AsyncIterator[str], conn, sid: bytes) -> None:
    """Write ``source``'s chunks to a gateway inbox connection, then the END frame.

    Cancelled (the client went away), or failing, it closes vLLM's generator, which aborts
    the request; a failure also tells the gateway with a FAIL frame.
    """
    try:
        async for chunk in source:
            conn.send(sid, wire.DATA, chunk.encode())
            if conn.paused:
                await conn.drain()
        conn.send(sid, wire.END)
        conn.flush()
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.warning("stream failed mid-way: %r", e)
        with contextlib.suppress(ConnectionError):
            conn.send(sid, wire.FAIL, b"The model server stopped while streaming; retry the request.")
            conn.flush()
        raise
    finally:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(BaseException):
                await aclose()


async def coalesce(source: AsyncIterator[str]) -> AsyncIterator[bytes]:
    """Relay ``source`` as bytes, joining whatever piled up while the consumer was busy.

    The first chunk goes out as soon as it exists; later chunks that arrive while the
    previous send is in flight are joined into one. Closing this generator (the client
    went away) cancels the pump, which closes vLLM's generator and aborts the request.
    """
    pending: list[str] = []
    ready = asyncio.Event()
    finished = False
    failure: BaseException | None = None

    async def pump() -> None:
        nonlocal finished, failure
        try:
            async for chunk in source:
                pending.append(chunk)
                ready.set()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            failure = e
        finally:
            finished = True
            ready.set()

    task = asyncio.create_task(pump())
    try:
        while True:
            await ready.wait()
            ready.clear()
            if pending:
                data = "".join(pending).encode()
                pending.clear()
                yield data
            if finished and not pending:
                break
        if failure is not None and not isinstance(failure, asyncio.CancelledError):
            raise failure
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001
                pass
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except BaseException:  # noqa: BLE001
                pass
