"""The audit log: one JSON line per request, to stdout or a file.

Fields: ``time`` (UTC, ISO 8601), ``request_id`` (Ray Serve's, as returned in the
``x-request-id`` header), ``gateway`` (the gateway replica), ``key`` (the API key's name, never the
key), ``model``, ``endpoint``, ``status`` (HTTP status, or ``cancelled``), ``stream``,
``prompt_tokens``, ``completion_tokens``, ``latency_ms``; ``body`` only when
``gateway.audit.include_prompts`` is on.
"""

from __future__ import annotations

import datetime
import json
import sys
import threading
from typing import Any, TextIO


class AuditLog:
    def __init__(self, path: str | None = None, include_prompts: bool = False):
        self.include_prompts = include_prompts
        self._lock = threading.Lock()
        self._out: TextIO = open(path, "a", buffering=1) if path else sys.stdout  # noqa: SIM115 - lives as long

    def write(self, record: dict[str, Any]) -> None:
        line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"), **record}
        if not self.include_prompts:
            line.pop("body", None)
        text = json.dumps(line, separators=(",", ":"), default=str)
        with self._lock:
            self._out.write(text + "\n")
            self._out.flush()
