"""The ``data`` events of a server-sent-events response, for the integration tests.

Not httpx's ``iter_lines()``: it splits like ``str.splitlines()``, also on U+0085, U+2028,
U+2029 and \\x1c-\\x1e, and JSON leaves the first three unescaped inside strings, so a model's
text can cut a ``data:`` line in two mid-string. The bytes go to the load tests' SSE parser
(``loadtests.sse``), which splits lines on CR and LF only, as SSE does.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx

from loadtests.sse import SSEParser


def sse_lines(response: httpx.Response) -> Iterator[str]:
    """``response``'s events as they stream, each as its ``data: ...`` line."""
    parser = SSEParser()
    for chunk in response.iter_bytes():
        for event in parser.feed(chunk):
            yield f"data: {event.data}"
