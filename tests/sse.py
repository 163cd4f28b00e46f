"""Lines of a server-sent-events body, split the way the SSE spec splits them.

httpx's ``iter_lines()`` splits like ``str.splitlines()``: also on U+0085, U+2028, U+2029 and
\\x1c-\\x1e. JSON leaves the first three unescaped inside strings, and a random model's text
holds them now and then, so ``iter_lines()`` can cut a ``data:`` line in two mid-string
(seen in CI: "Unterminated string" from a 3,500-token stream). SSE lines end in LF, CRLF or
CR only; JSON escapes all three, so splitting the bytes on LF is exact here.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx


def split_lines(chunks) -> Iterator[str]:
    """The lines in an iterable of byte chunks cut anywhere (a last unterminated line too)."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode()
    if buf:
        yield buf.rstrip(b"\r").decode()


def sse_lines(response: httpx.Response) -> Iterator[str]:
    """``response``'s body, line by line, as it streams."""
    return split_lines(response.iter_bytes())
