"""Why a replica failed to start, in one line, with what to change.

vLLM starts its engine in a child process; when that fails, the replica sees only a
wrapper ("Engine core initialization failed. See root cause above"), and the cause is in
the child's traceback, written to the replica's log. ``root_cause`` takes the innermost
exception of the chain, and for that wrapper the last ``SomethingError: ...`` line of
the log (the child writes to the replica's own stderr, which Ray keeps in a file).
``advice`` maps the causes users meet to the field to change.

Example::

    cause, what_to_change = diagnose(exc, {"/tmp/ray/session_latest/logs/worker-1.out": 0})
    # "ValueError: Available memory on node 0 (8.88/11.46 GiB) on startup is less than ..."
"""

from __future__ import annotations

import os
import re
import traceback

# Exception lines in a log, after any "(EngineCore pid=N) " style prefixes.
_EXCEPTION_LINE = re.compile(r"(?:^|\)\s|\s)((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit)): (.+)$")
# Wrappers around the real cause: the cause is elsewhere.
_WRAPPERS = ("Engine core initialization failed", "See root cause above", "Exception raised in creation task",
             "The actor died", "RayTaskError", "ActorDiedError", "WorkerProc initialization failed",
             "See stack trace for root cause", "failed to start: ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
MAX_CAUSE_CHARS = 400

GENERIC_ADVICE = "check the model's engine arguments and source"
WEIGHTS_ADVICE = "the model's weights are unreadable: check or re-create the files of models[].source"
# Where a failure means the weights could not be read (frames of vLLM's loaders, safetensors).
_WEIGHT_PLACES = ("safetensors", "weight_utils", "model_loader", "load_weights", "gguf")

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
     WEIGHTS_ADVICE),
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


def diagnose(exc: BaseException, logs: dict[str, int] | None = None) -> tuple[str, str]:
    """(cause line, what to change) for a failed start: see ``root_cause``; the advice also
    reads where the cause was raised (a failure inside weight loading is about the weights,
    whatever its exception type)."""
    cause, where = _root_cause(exc, logs or {})
    hint = advice(cause)
    if hint == GENERIC_ADVICE and any(w in where for w in _WEIGHT_PLACES):
        hint = WEIGHTS_ADVICE
    return cause, hint


def root_cause(exc: BaseException, logs: dict[str, int] | None = None) -> str:
    """One line: the innermost exception of ``exc``'s chain, or, where that is a wrapper
    around a child process's failure, the cause that child wrote to one of ``logs`` (path ->
    offset: what this start wrote; vLLM's logger writes to stdout, Python's own traceback
    printing to stderr, so both are read, stdout's first)."""
    return _root_cause(exc, logs or {})[0]


def _pydantic_detail(exc: BaseException) -> str | None:
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ != "ValidationError" or not callable(errors):
        return None
    try:
        first = errors()[0]
    except Exception:  # noqa: BLE001 - not pydantic's after all
        return None
    msg = str(first.get("msg", "")).removeprefix("Value error, ")
    loc = ".".join(str(p) for p in first.get("loc", ()))
    return f"{loc}: {msg}" if loc else msg


def _root_cause(exc: BaseException, logs: dict[str, int]) -> tuple[str, str]:
    inner: BaseException = exc
    seen = {id(inner)}
    while True:
        nxt = inner.__cause__ or (None if inner.__suppress_context__ else inner.__context__)
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        inner = nxt
    text = (_pydantic_detail(inner) or str(inner)).strip().splitlines()
    cause = f"{type(inner).__name__}: {text[0] if text else ''}".rstrip(": ")
    where = " ".join(f"{f.filename}:{f.name}" for f in traceback.extract_tb(inner.__traceback__))
    if _is_wrapper(str(inner)) or _is_wrapper(str(exc)):
        for path, offset in logs.items():
            try:
                with open(path, errors="replace") as f:
                    f.seek(offset)
                    logged = f.read()[-200_000:]
            except OSError:
                continue
            found = cause_from_log(logged)
            if found:
                # The frames the child printed before its cause line (its `File "..."` lines).
                before = logged[:logged.rfind(found.split(":", 1)[1].strip()[:40])][-4000:]
                where = " ".join(m.group(0) for m in re.finditer(r'File "[^"]*", line \d+, in \w+', before))
                cause = found
                break
    return cause[:MAX_CAUSE_CHARS], where


def advice(cause: str) -> str:
    """What to change for a cause line (generic when the cause is not a known one)."""
    for needles, hint in ADVICE:
        if any(n in cause for n in needles):
            return hint
    return GENERIC_ADVICE


def own_logs() -> dict[str, int]:
    """The files this process's stdout and stderr go to (Ray keeps each worker's in its
    session's logs), stdout's first, with their sizes now: what a start writes comes after."""
    out: dict[str, int] = {}
    for fd in (1, 2):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if os.path.isfile(path):
            try:
                out[path] = os.path.getsize(path)
            except OSError:
                continue
    return out
