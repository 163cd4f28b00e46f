"""A direct byte channel for stream bodies, from model replicas to gateway replicas.

Sending every SSE chunk through Ray Serve's handle makes each token a Ray streaming-generator
item: serialized, reported to its owner over gRPC, resolved through futures on both sides.
That cost (hundreds of microseconds per token, on each side) dominated the gateway path.

Here the Ray call stays what routes, counts and cancels a request (Serve's router, queue
lengths, autoscaling metrics, draining and disconnect aborts are untouched): the replica
answers it with the status, then writes the body to the gateway replica's *inbox* over one
pooled TCP connection per (model replica, gateway replica) pair, and returns when the body
has ended. Frames of every stream on a connection share it, and whatever was produced during
one event-loop tick leaves in one write, so at N concurrent streams one engine step is one
write, not N Ray messages. The gateway joins the chunks that piled up for a stream before
each write to its client.

Frame: 16-byte stream id, 1-byte kind (DATA, END, FAIL), 4-byte length, payload. A
connection starts with the inbox's 16-byte token; an unknown token is dropped, and so are
frames for ids the inbox does not hold (a stream whose client left).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import struct
from typing import Any

log = logging.getLogger(__name__)

HEADER = struct.Struct("!16sBI")
DATA, END, FAIL = 0, 1, 2
TOKEN_BYTES = 16
MAX_FRAME = 64 * 1024 * 1024
# After the Ray call ended, how long the END frame may still take to arrive.
END_GRACE_S = 10.0
# Pause producing once this much is buffered towards one gateway replica.
HIGH_WATER = 4 * 1024 * 1024
ENV = "SLM_STREAM_TRANSPORT"  # "direct" (default) or "ray"


def enabled() -> bool:
    return os.environ.get(ENV, "direct").strip().lower() != "ray"


class StreamBroken(Exception):
    """The body stopped before its END frame (the model replica died or failed)."""


# ---------------------------------------------------------------- gateway side


class InboxStream:
    """One stream's body as it arrives: ``read()`` returns what piled up since the last call."""

    __slots__ = ("sid", "chunks", "event", "ended", "failure", "conn", "_inbox", "_timer")

    def __init__(self, inbox: Inbox, sid: bytes):
        self.sid = sid
        self.chunks: list[bytes] = []
        self.event = asyncio.Event()
        self.ended = False
        self.failure: BaseException | None = None
        self.conn: _InboxProtocol | None = None
        self._inbox = inbox
        self._timer: asyncio.TimerHandle | None = None

    @property
    def reply_to(self) -> dict[str, str]:
        """What the model replica needs to send this stream's body here."""
        return {"address": self._inbox.address, "token": self._inbox.token.hex(), "stream": self.sid.hex()}

    def _put(self, kind: int, payload: bytes) -> None:
        if kind == DATA:
            self.chunks.append(payload)
        elif kind == END:
            self.ended = True
        else:
            self.failure = StreamBroken(payload.decode(errors="replace") or "the model replica failed mid-stream")
        self.event.set()

    def _break(self, why: str) -> None:
        if not self.ended and self.failure is None:
            self.failure = StreamBroken(why)
            self.event.set()

    def call_finished(self, exc: BaseException | None) -> None:
        """The Ray call behind this stream returned (or failed): END must follow soon."""
        if self.ended or self.failure is not None:
            return
        if exc is not None:
            self._break(f"the model replica's call failed: {exc!r}")
            return
        self._timer = asyncio.get_running_loop().call_later(
            END_GRACE_S, self._break, "the stream's end never arrived from the model replica")

    async def read(self) -> bytes | None:
        """The body bytes that arrived since the last read (waiting for some), or None at
        the end. Raises ``StreamBroken`` if the body stopped short."""
        while True:
            if self.chunks:
                data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
                self.chunks.clear()
                return data
            if self.failure is not None:
                raise self.failure
            if self.ended:
                return None
            self.event.clear()
            await self.event.wait()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._inbox.streams.pop(self.sid, None)


class _InboxProtocol(asyncio.Protocol):
    def __init__(self, inbox: Inbox):
        self.inbox = inbox
        self.buf = bytearray()
        self.authed = False
        self.transport: asyncio.Transport | None = None
        self.streams: set[InboxStream] = set()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.authed:
            if len(buf) < TOKEN_BYTES:
                return
            if not secrets.compare_digest(bytes(buf[:TOKEN_BYTES]), self.inbox.token):
                log.warning("stream inbox: a connection with a wrong token was closed")
                self.transport.close()
                buf.clear()
                return
            self.authed = True
            del buf[:TOKEN_BYTES]
        streams = self.inbox.streams
        pos, end = 0, len(buf)
        while end - pos >= HEADER.size:
            sid, kind, length = HEADER.unpack_from(buf, pos)
            if length > MAX_FRAME:
                log.error("stream inbox: a %d-byte frame is over the limit; closing the connection", length)
                self.transport.close()
                buf.clear()
                return
            stop = pos + HEADER.size + length
            if stop > end:
                break
            stream = streams.get(sid)
            if stream is not None:
                if stream.conn is None:
                    stream.conn = self
                    self.streams.add(stream)
                stream._put(kind, bytes(buf[pos + HEADER.size:stop]))
                if kind != DATA:
                    self.streams.discard(stream)
            pos = stop
        if pos:
            del buf[:pos]

    def connection_lost(self, exc) -> None:
        for stream in self.streams:
            stream._break("the connection from the model replica closed mid-stream")
        self.streams.clear()


class Inbox:
    """A gateway replica's listening end. ``open()`` a stream per request, pass its
    ``reply_to`` with the call, ``read()`` its body, ``close()`` it when done."""

    def __init__(self) -> None:
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.streams: dict[bytes, InboxStream] = {}
        self.address = ""
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str | None = None, port: int = 0, advertise: str | None = None) -> str:
        """Listen (by default on this Ray node's address only, on a free port); returns the
        address model replicas connect to."""
        advertise = advertise or _node_ip()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _InboxProtocol(self), host or advertise, port)
        bound = self._server.sockets[0].getsockname()[1]
        self.address = f"{advertise}:{bound}"
        return self.address

    @property
    def started(self) -> bool:
        return self._server is not None

    def open(self) -> InboxStream:
        sid = secrets.token_bytes(16)
        stream = InboxStream(self, sid)
        self.streams[sid] = stream
        return stream

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        return "127.0.0.1"


# ---------------------------------------------------------------- model replica side


class _OutboxProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.scheduled = False
        self.closed = False
        self._resume: asyncio.Future | None = None
        self._paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def _wake(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None

    def send(self, sid: bytes, kind: int, payload: bytes = b"") -> None:
        """Queue a frame; everything queued during this loop tick leaves in one write."""
        if self.closed:
            raise ConnectionResetError("the gateway replica's inbox connection closed")
        self.pending.append(HEADER.pack(sid, kind, len(payload)))
        if payload:
            self.pending.append(payload)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if self.pending and not self.closed:
            self.transport.write(b"".join(self.pending))
        self.pending.clear()

    async def drain(self) -> None:
        """Wait while the gateway replica reads slower than this replica writes."""
        while self._paused and not self.closed:
            if self._resume is None:
                self._resume = asyncio.get_running_loop().create_future()
            await self._resume
        if self.closed:
            raise ConnectionResetError("the gateway replica's inbox connection closed")

    @property
    def paused(self) -> bool:
        return self._paused


class Outbox:
    """A model replica's connections to gateway inboxes, one per inbox, opened on first use."""

    def __init__(self) -> None:
        self._conns: dict[tuple[str, str], _OutboxProtocol] = {}
        self._opening: dict[tuple[str, str], asyncio.Future] = {}

    async def connection(self, address: str, token_hex: str, timeout_s: float = 5.0) -> _OutboxProtocol:
        key = (address, token_hex)
        conn = self._conns.get(key)
        if conn is not None and not conn.closed:
            return conn
        opening = self._opening.get(key)
        if opening is None:
            opening = asyncio.ensure_future(self._open(address, token_hex, timeout_s))
            self._opening[key] = opening
            opening.add_done_callback(lambda _: self._opening.pop(key, None))
        return await asyncio.shield(opening)

    async def _open(self, address: str, token_hex: str, timeout_s: float) -> _OutboxProtocol:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(_OutboxProtocol, host, int(port)), timeout_s)
        conn.transport.write(bytes.fromhex(token_hex))
        for old in [k for k, c in self._conns.items() if c.closed]:  # gateway replicas gone
            del self._conns[old]
        self._conns[(address, token_hex)] = conn
        return conn

    def close(self) -> None:
        for conn in self._conns.values():
            if conn.transport is not None:
                conn.transport.close()
        self._conns.clear()


def parse_reply_to(reply_to: Any) -> tuple[str, str, bytes] | None:
    """(address, token hex, stream id) from a request's ``reply_to``, or None if unusable."""
    if not isinstance(reply_to, dict):
        return None
    try:
        address, token, sid = str(reply_to["address"]), str(reply_to["token"]), bytes.fromhex(reply_to["stream"])
        bytes.fromhex(token)
    except (KeyError, TypeError, ValueError):
        return None
    if len(sid) != 16 or ":" not in address:
        return None
    return address, token, sid
