"""What `slm serve` shows on its terminal: every line, but the replicas' tracebacks folded.

Ray relays the replicas' output (vLLM's and ours) to the driver, which prints it on its own
stdout and stderr; a replica that fails to start would put hundreds of traceback lines
there, the cause buried in the middle. ``TracebackFolder`` wraps those streams: the frames
of a traceback relayed from a Ray process become one line saying where the full text is
(Ray's session logs); its exception line and every other line pass unchanged. Lines of
the driver itself (no Ray prefix) are never folded.

Example::

    sys.stderr = TracebackFolder(sys.stderr, "/tmp/ray/session_latest/logs")
"""

from __future__ import annotations

import re
import threading
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's "(ServeReplica:slm:model-x pid=12)" and vLLM's "(EngineCore pid=34)" line prefixes.
_PREFIX = re.compile(r"^(?:\s*\([^()]*pid=\d+[^()]*\))+\s?")
# vLLM's own log prefix: "ERROR 12-01 16:42:07 [core.py:900] ".
_VLLM_PREFIX = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]*\] ")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b")
_CONTINUATION = ("During handling", "The above exception")


class TracebackFolder:
    """A text stream that drops the frames of tracebacks relayed from Ray processes (from
    ``Traceback (most recent call last):`` to the exception line, which stays), saying once
    per traceback where to read them. Each process (line prefix) is followed on its own."""

    def __init__(self, stream: TextIO, where: str):
        self._stream = stream
        self._where = where
        self._buffer = ""
        self._folding: set[str] = set()  # prefixes of the processes inside a traceback
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += str(text)
            *lines, self._buffer = self._buffer.split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        plain = _ANSI.sub("", line)
        prefix = _PREFIX.match(plain)
        if prefix is None:  # the driver's own output
            self._stream.write(line + "\n")
            return
        who = re.sub(r"\s+", " ", prefix.group(0)).strip()
        content = _VLLM_PREFIX.sub("", plain[prefix.end():], count=1)
        if content.startswith("Traceback (most recent call last)"):
            if who not in self._folding:
                self._folding.add(who)
                self._stream.write(f"{prefix.group(0)}(traceback folded: see {self._where})\n")
            return
        if who in self._folding:
            if content.startswith((" ", "\t", "^")) or not content.strip() or content.startswith(_CONTINUATION):
                return
            self._folding.discard(who)  # the exception line, or whatever follows: shown
        self._stream.write(line + "\n")

    def flush(self) -> None:
        with self._lock:
            if self._buffer:
                # A partial line (a progress bar): pass it through as it is.
                self._stream.write(self._buffer)
                self._buffer = ""
            self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
