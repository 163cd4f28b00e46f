"""The direct stream channel (orchestrator.wire) over real localhost TCP: frames, joining,
ends, failures, tokens, lost connections; and the replica's sender (send_direct)."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from orchestrator import wire
from orchestrator.engine.streaming import send_direct


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def _pair():
    inbox = wire.Inbox()
    await inbox.start("127.0.0.1", 0, advertise="127.0.0.1")
    outbox = wire.Outbox()
    return inbox, outbox


async def _connect(inbox: wire.Inbox, outbox: wire.Outbox, stream: wire.InboxStream):
    address, token, sid = wire.parse_reply_to(stream.reply_to)
    return await outbox.connection(address, token), sid


async def _one_stream():
    """An inbox with one open stream, and a replica-side connection to it."""
    inbox, outbox = await _pair()
    stream = inbox.open()
    conn, sid = await _connect(inbox, outbox, stream)
    return inbox, outbox, stream, conn, sid


async def _body(stream: wire.InboxStream) -> bytes:
    got = b""
    while (data := await stream.read()) is not None:
        got += data
    return got


def test_chunks_of_several_streams_arrive_in_order_and_end():
    async def main():
        inbox, outbox = await _pair()
        a, b = inbox.open(), inbox.open()
        conn, sid_a = await _connect(inbox, outbox, a)
        _, sid_b = await _connect(inbox, outbox, b)
        for i in range(3):
            conn.send(sid_a, wire.DATA, f"a{i};".encode())
            conn.send(sid_b, wire.DATA, f"b{i};".encode())
        conn.send(sid_a, wire.END)
        got_a = []
        while (data := await a.read()) is not None:
            got_a.append(data)
        assert b"".join(got_a) == b"a0;a1;a2;"
        # everything sent in one tick arrives together and is read as one joined chunk
        assert len(got_a) == 1
        assert await b.read() == b"b0;b1;b2;"
        conn.send(sid_b, wire.END)
        assert await b.read() is None
        a.close(), b.close()
        assert inbox.streams == {}
        outbox.close(), inbox.close()

    run(main())


def test_one_connection_per_inbox_is_reused():
    async def main():
        inbox, outbox = await _pair()
        s1, s2 = inbox.open(), inbox.open()
        c1, _ = await _connect(inbox, outbox, s1)
        c2, _ = await _connect(inbox, outbox, s2)
        assert c1 is c2
        outbox.close(), inbox.close()

    run(main())


def test_fail_frame_and_frames_for_closed_streams():
    async def main():
        inbox, outbox = await _pair()
        gone, live = inbox.open(), inbox.open()
        conn, sid_gone = await _connect(inbox, outbox, gone)
        _, sid_live = await _connect(inbox, outbox, live)
        gone.close()  # the client left: its frames are dropped, the others still arrive
        conn.send(sid_gone, wire.DATA, b"lost")
        conn.send(sid_live, wire.DATA, b"kept")
        conn.send(sid_live, wire.FAIL, b"engine died")
        assert await live.read() == b"kept"
        with pytest.raises(wire.StreamBroken, match="engine died"):
            await live.read()
        outbox.close(), inbox.close()

    run(main())


def test_a_wrong_token_is_refused():
    async def main():
        inbox, outbox = await _pair()
        stream = inbox.open()
        conn = await outbox.connection(inbox.address, secrets.token_hex(16))
        conn.send(stream.sid, wire.DATA, b"forged")
        for _ in range(100):
            if conn.closed:
                break
            await asyncio.sleep(0.01)
        assert conn.closed
        assert stream.chunks == []
        outbox.close(), inbox.close()

    run(main())


def test_a_lost_connection_breaks_its_streams():
    async def main():
        inbox, outbox, stream, conn, sid = await _one_stream()
        conn.send(sid, wire.DATA, b"half")
        assert await stream.read() == b"half"
        conn.transport.close()  # the model replica died
        with pytest.raises(wire.StreamBroken, match="closed mid-stream"):
            await stream.read()
        inbox.close()

    run(main())


def test_a_finished_call_without_end_frame_breaks_after_the_grace(monkeypatch):
    monkeypatch.setattr(wire, "END_GRACE_S", 0.2)

    async def main():
        inbox = wire.Inbox()
        await inbox.start("127.0.0.1", 0, advertise="127.0.0.1")
        stream = inbox.open()
        stream.call_finished(None)
        with pytest.raises(wire.StreamBroken, match="never arrived"):
            await stream.read()
        failed = inbox.open()
        failed.call_finished(RuntimeError("actor died"))
        with pytest.raises(wire.StreamBroken, match="actor died"):
            await failed.read()
        inbox.close()

    run(main())


def test_frames_split_across_reads_are_reassembled():
    async def main():
        inbox, outbox, stream, conn, sid = await _one_stream()
        payload = b"x" * 300_000  # spans many TCP reads
        conn.send(sid, wire.DATA, payload)
        conn.send(sid, wire.END)
        assert await _body(stream) == payload
        outbox.close(), inbox.close()

    run(main())


def test_reply_to_parsing():
    sid = secrets.token_bytes(16)
    ok = {"address": "10.0.0.1:4000", "token": secrets.token_hex(16), "stream": sid.hex()}
    assert wire.parse_reply_to(ok) == ("10.0.0.1:4000", ok["token"], sid)
    assert wire.parse_reply_to(None) is None
    assert wire.parse_reply_to({**ok, "stream": "zz"}) is None
    assert wire.parse_reply_to({**ok, "stream": "ab"}) is None
    assert wire.parse_reply_to({**ok, "address": "nohost"}) is None
    assert wire.parse_reply_to({"address": "h:1"}) is None


def test_send_direct_relays_then_ends_and_closes_the_source():
    closed = []

    async def source():
        try:
            for i in range(5):
                yield f"data: {i}\n\n"
        finally:
            closed.append(True)

    async def main():
        inbox, outbox, stream, conn, sid = await _one_stream()
        await send_direct(source(), conn, sid)
        assert await _body(stream) == b"".join(f"data: {i}\n\n".encode() for i in range(5))
        assert closed == [True]
        outbox.close(), inbox.close()

    run(main())


def test_send_direct_failure_sends_fail_and_cancel_closes_the_source():
    closed = []

    async def broken():
        yield "data: 0\n\n"
        raise RuntimeError("engine dead")

    async def endless():
        try:
            while True:
                yield "data: x\n\n"
                await asyncio.sleep(0.01)
        finally:
            closed.append(True)

    async def main():
        inbox, outbox, stream, conn, sid = await _one_stream()
        with pytest.raises(RuntimeError, match="engine dead"):
            await send_direct(broken(), conn, sid)
        assert await stream.read() == b"data: 0\n\n"
        with pytest.raises(wire.StreamBroken, match="stopped while streaming"):
            await stream.read()

        other = inbox.open()
        task = asyncio.ensure_future(send_direct(endless(), conn, other.sid))
        assert (await other.read()).startswith(b"data: x")
        task.cancel()  # the gateway cancelled the call: the client left
        with pytest.raises(asyncio.CancelledError):
            await task
        assert closed == [True]
        outbox.close(), inbox.close()

    run(main())


def test_transport_switch(monkeypatch):
    monkeypatch.delenv(wire.ENV, raising=False)
    assert wire.enabled()
    monkeypatch.setenv(wire.ENV, "ray")
    assert not wire.enabled()
