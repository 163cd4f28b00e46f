"""The ``data`` events of a server-sent-events response, for the integration tests.

httpx's ``iter_lines()`` splits like ``str.splitlines()``: also on U+0085, U+2028, U+2029 and
\\x1c-\\x1e. JSON leaves the first three unescaped inside strings, and a random model's text
holds them now and then, so ``iter_lines()`` can cut a ``data:`` line in two mid-string
(seen in CI: "Unterminated string" from a 3,500-token stream). SSE lines end in LF, CRLF or
CR only, so the tests read bodies with the load generator's parser
(``loadtests.bench.SSEParser``), which splits the bytes on LF.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx

from loadtests.bench import SSEParser


def sse_lines(response: httpx.Response) -> Iterator[str]:
    """``response``'s events as they stream, each as its ``data: ...`` line."""
    parser = SSEParser()
    for chunk in response.iter_bytes():
        for data in parser.feed(chunk):
            yield f"data: {data}"
