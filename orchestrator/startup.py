"""Why a replica failed to start, in one line, with what to change.

vLLM starts its engine in a child process; when that fails, the replica sees only a
wrapper ("Engine core initialization failed. See root cause above"), and the cause is in
the child's traceback, written to the replica's log. ``root_cause`` takes the innermost
exception of the chain, and for that wrapper the last ``SomethingError: ...`` line of
the log (the child writes to the replica's own stderr, which Ray keeps in a file).
``advice`` maps the causes users meet to the field to change.

Example::

    cause = root_cause(exc, log_path="/tmp/ray/session_latest/logs/worker-1.err")
    # "ValueError: Available memory on node 0 (8.88/11.46 GiB) on startup is less than ..."
"""

from __future__ import annotations

import os
import re

# Exception lines in a log, after any "(EngineCore pid=N) " style prefixes.
_EXCEPTION_LINE = re.compile(r"(?:^|\)\s|\s)((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit)): (.+)$")
# Wrappers around the real cause: the cause is elsewhere.
_WRAPPERS = ("Engine core initialization failed", "See root cause above", "Exception raised in creation task",
             "The actor died", "RayTaskError", "ActorDiedError")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
MAX_CAUSE_CHARS = 400

ADVICE = (
    (("Available memory on node", "desired CPU memory utilization", "requested memory for kv"),
     "the replicas do not fit this machine's memory: lower autoscaling.max_replicas or engine.max_model_len, "
     "or set engine.kv_cache_memory_bytes"),
    (("larger than the maximum number of tokens that can be stored in KV cache", "No available memory for the "
      "cache blocks", "max seq len"),
     "the KV cache cannot hold one max_model_len sequence: lower engine.max_model_len or raise "
     "engine.kv_cache_memory_bytes (kv_cache_tokens)"),
    (("HeaderTooLarge", "deserializing header", "SafetensorError", "invalid load key", "unpickling",
      "incomplete metadata", "file might be corrupted", "not a gguf file", "Unexpected end of file"),
     "the model's weights are unreadable: check or re-create the files of models[].source"),
    (("max_model_len", "derived max_model_len"), "lower engine.max_model_len to what the model supports"),
    (("CUDA out of memory", "OutOfMemoryError"),
     "the GPU share is too small: run `slm plan --write` or lower engine.max_model_len"),
    (("No such file or directory", "does not appear to have a file", "not found"),
     "check models[].source"),
)


def _clean(line: str) -> str:
    return _ANSI.sub("", line).rstrip()


def _is_wrapper(text: str) -> bool:
    return any(w in text for w in _WRAPPERS)


def cause_from_log(text: str) -> str | None:
    """The last exception line in a log text that is not a wrapper, as ``Type: message``."""
    found = None
    for raw in text.splitlines():
        m = _EXCEPTION_LINE.search(_clean(raw))
        if m and not _is_wrapper(m.group(0)):
            found = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2).strip()}"
    return found


def root_cause(exc: BaseException, log_path: str | None = None, log_offset: int = 0) -> str:
    """One line: the innermost exception of ``exc``'s chain, or, where that is a wrapper
    around a child process's failure, the cause that child wrote to ``log_path`` (read from
    ``log_offset`` on: what this start wrote)."""
    inner: BaseException = exc
    seen = {id(inner)}
    while True:
        nxt = inner.__cause__ or (None if inner.__suppress_context__ else inner.__context__)
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        inner = nxt
    text = str(inner).strip().splitlines()
    cause = f"{type(inner).__name__}: {text[0] if text else ''}".rstrip(": ")
    if (_is_wrapper(str(inner)) or _is_wrapper(str(exc))) and log_path:
        try:
            with open(log_path, errors="replace") as f:
                f.seek(log_offset)
                logged = cause_from_log(f.read()[-200_000:])
        except OSError:
            logged = None
        if logged:
            cause = logged
    return cause[:MAX_CAUSE_CHARS]


def advice(cause: str) -> str:
    """What to change for a cause line (generic when the cause is not a known one)."""
    for needles, hint in ADVICE:
        if any(n in cause for n in needles):
            return hint
    return "check the model's engine arguments and source"


def own_log_path() -> str | None:
    """The file this process's stderr goes to (Ray keeps each worker's in its session's
    logs), or None when stderr is not a file."""
    try:
        path = os.readlink("/proc/self/fd/2")
    except OSError:
        return None
    return path if os.path.isfile(path) else None


def log_size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0
