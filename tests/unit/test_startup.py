"""A replica's start-up failure in one line: the root cause, what to change; tracebacks folded."""

import io

from orchestrator import startup
from orchestrator.terminal import TracebackFolder

ENGINE_LOG = """\
INFO 12-01 16:42:05 [core.py:133] Initializing a V1 LLM engine (v0.32.0)
(EngineCore pid=5159) ERROR 12-01 16:42:07 [core.py:900] EngineCore failed to start.
(EngineCore pid=5159) ERROR 12-01 16:42:07 [core.py:900] Traceback (most recent call last):
(EngineCore pid=5159) ERROR 12-01 16:42:07 [core.py:900]   File "/x/vllm/v1/worker/cpu_worker.py", line 81, in __init__
(EngineCore pid=5159) ERROR 12-01 16:42:07 [core.py:900]     raise ValueError(
(EngineCore pid=5159) ERROR 12-01 16:42:07 [core.py:900] ValueError: Available memory on node 0 (8.88/11.46 GiB) \
on startup is less than desired CPU memory utilization (0.92, 10.55 GiB).
Traceback (most recent call last):
  File "/x/vllm/v1/engine/core_client.py", line 512, in __init__
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""


def wrapped(inner: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


def test_the_innermost_exception_of_a_chain_is_the_cause():
    exc = wrapped(ValueError("User-specified max_model_len (99999) is greater than the derived max_model_len"),
                  RuntimeError("Ray actor creation failed"))
    cause = startup.root_cause(exc)
    assert cause.startswith("ValueError: User-specified max_model_len (99999)")
    assert startup.advice(cause) == "lower engine.max_model_len to what the model supports"


def test_the_engine_wrapper_reads_the_cause_from_the_replica_log(tmp_path):
    log = tmp_path / "worker.err"
    log.write_text("ValueError: an older start's failure\n")
    offset = log.stat().st_size
    log.write_text(log.read_text() + ENGINE_LOG)
    exc = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    cause = startup.root_cause(exc, str(log), offset)
    assert cause.startswith("ValueError: Available memory on node 0 (8.88/11.46 GiB) on startup")
    assert "max_replicas" in startup.advice(cause)
    # Without the log the wrapper is all there is.
    assert startup.root_cause(exc).startswith("RuntimeError: Engine core initialization failed")


def test_advice_for_unreadable_weights_and_unknown_causes():
    assert "weights are unreadable" in startup.advice("SafetensorError: Error while deserializing header: "
                                                      "HeaderTooLarge")
    assert startup.advice("KeyError: 'x'") == "check the model's engine arguments and source"


def test_a_cause_line_is_bounded():
    exc = ValueError("x" * 10_000)
    assert len(startup.root_cause(exc)) <= startup.MAX_CAUSE_CHARS


def test_tracebacks_are_folded_to_one_line_and_other_lines_pass():
    out = io.StringIO()
    folder = TracebackFolder(out, "/tmp/ray/session_latest/logs")
    prefix = "\x1b[36m(ServeReplica:slm:model-m pid=12)\x1b[0m "
    folder.write(prefix + "INFO:orchestrator.engine:model m: chose dtype='float32'\n")
    for line in ENGINE_LOG.splitlines():
        folder.write(prefix + line + "\n")
    folder.write("[slm] model 'm' failed to start: ValueError: Available memory on node 0\n")
    folder.write("progress 50%")
    folder.flush()
    text = out.getvalue()
    assert "chose dtype='float32'" in text
    assert "Traceback" not in text and 'File "' not in text and "RuntimeError" not in text
    assert text.count("(a traceback, not shown: see /tmp/ray/session_latest/logs)") == 1  # adjacent blocks: one note
    assert "[slm] model 'm' failed to start: ValueError" in text
    assert text.endswith("progress 50%")
