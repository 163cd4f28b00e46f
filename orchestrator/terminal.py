"""What `slm serve` shows on its terminal: every line, but tracebacks folded to one line.

Ray relays the replicas' output (vLLM's and ours) to the driver, which prints it on its own
stdout and stderr; a replica that fails to start would put hundreds of traceback lines
there, the cause buried in the middle. ``TracebackFolder`` wraps those streams: a traceback
becomes one line saying where the full text is (the replica's log file, named in the
summary `slm serve` prints), and every other line passes unchanged.

Example::

    sys.stderr = TracebackFolder(sys.stderr, "/tmp/ray/session_latest/logs")
"""

from __future__ import annotations

import re
import threading
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's "(ServeReplica:slm:model-x pid=12)" and vLLM's "(EngineCore pid=34)" line prefixes.
_PREFIX = re.compile(r"^(?:\s*\([^()]*pid=\d+[^()]*\))*\s?")
# vLLM's own log prefix: "ERROR 12-01 16:42:07 [core.py:900] ".
_VLLM_PREFIX = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]*\] ")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b")


def _content(line: str) -> str:
    return _VLLM_PREFIX.sub("", _PREFIX.sub("", _ANSI.sub("", line), count=1), count=1)


class TracebackFolder:
    """A text stream that drops traceback blocks (``Traceback (most recent call last):`` up
    to its exception line) and says once per block where to read them."""

    def __init__(self, stream: TextIO, where: str):
        self._stream = stream
        self._where = where
        self._buffer = ""
        self._in_traceback = False
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            *lines, self._buffer = self._buffer.split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        content = _content(line)
        if content.startswith("Traceback (most recent call last)"):
            if not self._in_traceback:
                self._stream.write(f"[slm] (a traceback, not shown: see {self._where})\n")
            self._in_traceback = True
            return
        if self._in_traceback:
            if (content.startswith((" ", "\t")) or not content.strip() or content.startswith(("During handling",
                                                                                               "The above exception"))
                    or content.startswith("^")):
                return
            if _EXCEPTION.match(content):
                return  # the block's last line; its cause is in the summary
            self._in_traceback = False
        self._stream.write(line + "\n")

    def flush(self) -> None:
        with self._lock:
            if self._buffer and not self._in_traceback:
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
