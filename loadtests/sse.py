"""Server-sent events, parsed from the bytes of a stream as they arrive: the one SSE parser of the
load generators (bench, Locust, bench_routing) and of the tests.

The rules are those of the HTML standard's event-stream format, as far as OpenAI-style streams use
them: a line ends in LF, CRLF or CR; a blank line ends an event; ``data:`` lines (one optional space
after the colon) accumulate, joined by LF; ``event:`` sets the event's type; comments (lines that
start with ``:``) and other fields are ignored; an event without data is not dispatched.

Lines are split on the bytes, then decoded (UTF-8, invalid bytes replaced): a chunk boundary inside
a UTF-8 sequence cannot garble a character, and U+0085, U+2028 or U+2029 inside JSON text (which
JSON leaves unescaped, and which ``str.splitlines()`` and httpx's ``iter_lines()`` take for line
ends) cannot cut an event in two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class ServerSentEvent:
    data: str
    event: str = ""
    """The ``event:`` field ("" without one)."""


class SSEParser:
    """Incremental parser: :meth:`feed` it the stream's bytes in any pieces, get the events completed."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        buffer = self._buffer + chunk
        # A CR at the end may be the first half of a CRLF: it waits for the next byte.
        cut = len(buffer) - buffer.endswith(b"\r")
        *lines, rest = _LINE_END.split(buffer[:cut])
        self._buffer = rest + buffer[cut:]
        events = (self._line(line.decode("utf-8", errors="replace")) for line in lines)
        return [e for e in events if e is not None]

    def close(self) -> list[ServerSentEvent]:
        """The end of the stream: what :meth:`feed` still held, including an event whose blank line
        never came (the standard drops it; a load test would rather judge the data that arrived)."""
        events = self.feed(b"\n") if self._buffer else []
        last = self._dispatch()
        return events + ([last] if last else [])

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event, self._data, self._event = "\n".join(self._data), self._event, [], ""
        return ServerSentEvent(data, event) if data else None


def parse_sse(body: bytes) -> list[ServerSentEvent]:
    """The events of a whole body, including a last one without its blank line (see :meth:`SSEParser.close`)."""
    parser = SSEParser()
    return parser.feed(body) + parser.close()
