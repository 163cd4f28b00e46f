"""A replica's start-up failure in one line: the root cause, what to change; tracebacks folded."""

import io

import pytest

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
    cause = startup.root_cause(exc, {str(log): offset})
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


def test_relayed_tracebacks_are_folded_and_other_lines_pass():
    out = io.StringIO()
    folder = TracebackFolder(out, "/tmp/ray/session_latest/logs")
    prefix = "\x1b[36m(ServeReplica:slm:model-m pid=12)\x1b[0m "
    other = "\x1b[36m(ServeReplica:slm:model-n pid=13)\x1b[0m "
    folder.write(prefix + "INFO:orchestrator.engine:model m: chose dtype='float32'\n")
    lines = ENGINE_LOG.splitlines()
    for i, line in enumerate(lines):
        folder.write(prefix + line + "\n")
        if i == 3:  # another process's line in the middle of m's traceback
            folder.write(other + "INFO:orchestrator.engine:model n: engine ready (cpu)\n")
    folder.write(prefix + "INFO after the traceback\n")
    folder.write(prefix + "  an indented line outside any traceback\n")
    folder.write("[slm] model 'm' failed to start: ValueError: Available memory on node 0\n")
    folder.write("progress 50%")
    folder.flush()
    text = out.getvalue()
    assert "chose dtype='float32'" in text and "model n: engine ready" in text
    assert 'File "' not in text and "raise ValueError(" not in text and "Traceback (most" not in text
    assert text.count("(traceback folded: see /tmp/ray/session_latest/logs)") == 2
    # The exception lines stay: at run time they are the only trace of an error on the terminal.
    assert "ValueError: Available memory on node 0 (8.88/11.46 GiB)" in text
    assert "RuntimeError: Engine core initialization failed" in text
    assert "INFO after the traceback" in text and "an indented line outside any traceback" in text
    assert "[slm] model 'm' failed to start: ValueError" in text
    assert text.endswith("progress 50%")


def test_the_drivers_own_traceback_is_never_folded():
    out = io.StringIO()
    folder = TracebackFolder(out, "/tmp/ray/session_latest/logs")
    folder.write('Traceback (most recent call last):\n  File "cli.py", line 1, in main\nKeyboardInterrupt\n')
    folder.flush()
    assert out.getvalue() == 'Traceback (most recent call last):\n  File "cli.py", line 1, in main\nKeyboardInterrupt\n'


def test_a_failure_inside_weight_loading_is_about_the_weights_whatever_its_type(tmp_path):
    """vLLM reads a safetensors header with json.loads(f.read(length)): garbage for a length
    raises an OverflowError there."""
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 64)

    def parse_safetensors_file_metadata(path):
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            return f.read(length)

    try:
        parse_safetensors_file_metadata(bad)
    except OverflowError as e:
        cause, hint = startup.diagnose(e)
    assert cause.startswith("OverflowError: ")
    assert hint == startup.WEIGHTS_ADVICE
    assert startup.diagnose(OverflowError("elsewhere"))[1] == startup.GENERIC_ADVICE


def test_the_child_process_frames_in_the_log_count_too(tmp_path):
    log = tmp_path / "worker.err"
    log.write_text("(EngineCore pid=9) ERROR [core.py:900] Traceback (most recent call last):\n"
                   '(EngineCore pid=9) ERROR [core.py:900]   File "/x/vllm/model_executor/model_loader/'
                   'weight_utils.py", line 9, in safetensors_weights_iterator\n'
                   "(EngineCore pid=9) ERROR [core.py:900] KeyError: 'model.layers.0.mlp.up_proj.weight'\n")
    exc = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    cause, hint = startup.diagnose(exc, {str(log): 0})
    assert cause == "KeyError: 'model.layers.0.mlp.up_proj.weight'"
    assert hint == startup.WEIGHTS_ADVICE


def test_a_pydantic_validation_error_gives_its_message_not_its_title():
    from pydantic import BaseModel, field_validator

    class ModelConfig(BaseModel):
        max_model_len: int

        @field_validator("max_model_len")
        @classmethod
        def _check(cls, v):
            raise ValueError(f"User-specified max_model_len ({v}) is greater than the derived max_model_len (2048)")

    try:
        ModelConfig(max_model_len=1_000_000)
    except Exception as e:
        cause, hint = startup.diagnose(e)
    assert cause == ("ValidationError: max_model_len: User-specified max_model_len (1000000) is greater than the "
                     "derived max_model_len (2048)")
    assert hint == "lower engine.max_model_len to what the model supports"


def test_the_cause_is_read_from_stdout_and_stderr_logs(tmp_path):
    out, err = tmp_path / "w.out", tmp_path / "w.err"
    out.write_text("(Worker pid=1) ERROR 12-01 16:59:14 [multiproc_executor.py:953] "
                   "safetensors._safetensors_rust.SafetensorError: Error while deserializing header: incomplete "
                   "metadata, file not fully covered\n"
                   "(EngineCore pid=2) ERROR 12-01 16:59:16 [core.py:1510] Exception: WorkerProc initialization "
                   "failed due to an exception in a background process. See stack trace for root cause.\n")
    err.write_text("Process EngineCore:\nTraceback (most recent call last):\nException: WorkerProc initialization "
                   "failed due to an exception in a background process. See stack trace for root cause.\n")
    exc = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    cause, hint = startup.diagnose(exc, {str(out): 0, str(err): 0})
    assert cause == ("SafetensorError: Error while deserializing header: incomplete metadata, file not fully "
                     "covered")
    assert hint == startup.WEIGHTS_ADVICE


@pytest.mark.parametrize("failure_at, waited, starting, applies", [
    (None, 0.0, 0, False),  # no failure recorded
    (1005.0, 5.0, 1, True),  # failed while this request waited: answer now
    (990.0, 5.0, 0, False),  # an older failure: Serve may be about to start a replica for this demand
    (990.0, 5.0, 1, False),
    (990.0, 30.0, 1, False),  # an older failure but a replica is starting: keep waiting
    (990.0, 30.0, 0, True),  # an older failure and nothing started for a while: Serve gave up
])
def test_when_a_start_failure_ends_a_held_request(failure_at, waited, starting, applies):
    from orchestrator.gateway.relay import start_failure_applies

    failure = None if failure_at is None else {"error": "ValueError: x", "at": failure_at}
    assert start_failure_applies(failure, 1000.0, waited, starting) is applies
