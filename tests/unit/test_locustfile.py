"""loadtests/locustfile.py run headless (as a subprocess) against a fake OpenAI server with timed SSE chunks."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from loadtests.llm_metrics import ConfigError, neighbour_users, run_summary, shape_at

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key"
NOISY_KEY = "noisy-test-key"
FIRST_CHUNK_S = 0.1  # before the first content chunk
GAP_S = 0.02  # between content chunks
TOKENS = 8
GENERATION_S = FIRST_CHUNK_S + (TOKENS - 1) * GAP_S  # also the time a non-streaming answer takes


class FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/models, chat (streamed in chunked SSE like uvicorn, or not), completions and embeddings.

    Model fake-chat works; fail-http answers 503, fail-event streams an error event (and answers without
    choices), fail-nodone ends its streams without [DONE]. Streamed prompts are logged by x-session-id, streams by
    key and max_tokens, with the most each key had open at once.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # each SSE chunk leaves at once, as the timing assertions assume
    sessions: ClassVar[list[tuple[str | None, str]]] = []
    streams: ClassVar[list[tuple[str, int]]] = []
    open_streams: ClassVar[Counter[str]] = Counter()
    peak_streams: ClassVar[dict[str, int]] = {}
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, payload: dict, status: int = 200) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _authorized(self) -> bool:
        if self.headers.get("authorization") in (f"Bearer {KEY}", f"Bearer {NOISY_KEY}"):
            return True
        self._json({"error": {"message": "bad key"}}, 401)
        return False

    def do_GET(self) -> None:
        if self._authorized():
            self._json({"object": "list", "data": [{"id": "fake-chat", "task": "generate"},
                                                   {"id": "fake-embed", "task": "embed"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        model = body["model"]
        if not self._authorized():
            return
        usage = {"prompt_tokens": 5, "completion_tokens": TOKENS, "total_tokens": 5 + TOKENS}
        if model == "fail-http":
            self._json({"error": {"message": "overloaded"}}, 503)
        elif self.path == "/v1/embeddings":
            self._json({"object": "list", "data": [{"index": 0, "embedding": [0.1, 0.2]}]})
        elif body.get("stream"):
            self.sessions.append((self.headers.get("x-session-id"), body["messages"][0]["content"]))
            key = self.headers["authorization"].removeprefix("Bearer ")
            with self.lock:
                self.streams.append((key, body.get("max_tokens")))
                self.open_streams[key] += 1
                self.peak_streams[key] = max(self.peak_streams.get(key, 0), self.open_streams[key])
            try:
                self._stream(model, usage)
            finally:
                with self.lock:
                    self.open_streams[key] -= 1
        else:
            time.sleep(GENERATION_S)
            if model == "fail-event":
                self._json({"object": "list"})
            elif self.path == "/v1/completions":
                self._json({"choices": [{"index": 0, "text": "x" * TOKENS}], "usage": usage})
            else:
                self._json({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                            "usage": usage})

    def _stream(self, model: str, usage: dict) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self._chunk(b'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n')
        time.sleep(FIRST_CHUNK_S)
        for i in range(TOKENS):
            if i:
                time.sleep(GAP_S)
            self._chunk(b'data: {"choices": [{"index": 0, "delta": {"content": "t%d"}}]}\n\n' % i)
            if model == "fail-event":
                self._chunk(b'data: {"error": {"message": "boom", "code": 500}}\n\n')
                break
        if model != "fail-event":
            self._chunk(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        if model != "fail-nodone":
            self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Locust drops streams in flight when a run ends: not worth a traceback."""


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    server = QuietServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run_locust(host: str, prefix: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless", "--only-summary",
           "-H", host, "--api-key", KEY, "--csv", str(prefix), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def stats_rows(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_streaming_metrics_and_passing_slos(fake_server: str, tmp_path: Path) -> None:
    run = run_locust(fake_server, tmp_path / "ok", "-u", "4", "-r", "4", "-t", "6s", "--slo-ttft-p95-ms", "5000",
                     "--slo-fail-ratio", "0", "--slo-min-tokens-per-s", "1")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "SLO ttft_p95_ms:" in run.stdout and "SLO fail_ratio: 0.0000 <= 0 OK" in run.stdout
    assert "MISSED" not in out
    rows = stats_rows(tmp_path / "ok")
    for name in ["/v1/chat/completions [stream] fake-chat", "/v1/chat/completions fake-chat",
                 "/v1/completions fake-chat", "/v1/embeddings fake-embed"]:
        assert int(rows[("POST", name)]["Request Count"]) > 0, name
        assert rows[("POST", name)]["Failure Count"] == "0", name
    stream_ms = float(rows[("POST", "/v1/chat/completions [stream] fake-chat")]["Average Response Time"])
    assert stream_ms >= GENERATION_S * 1000 * 0.95  # timed to [DONE], not to the headers

    ttft, tpot, itl, rate = (rows[("LLM", f"{m} fake-chat")] for m in ("TTFT", "TPOT", "ITL", "tokens/s"))
    # Arrival timestamps: TTFT includes the first-chunk delay, ITL / TPOT the gaps between chunks.
    assert FIRST_CHUNK_S * 1000 <= float(ttft["Median Response Time"]) < FIRST_CHUNK_S * 1000 + 150
    assert GAP_S * 1000 * 0.8 <= float(tpot["Median Response Time"]) < GAP_S * 1000 + 30
    assert GAP_S * 1000 * 0.8 <= float(itl["Median Response Time"]) < GAP_S * 1000 + 30
    assert int(itl["Request Count"]) >= (TOKENS - 1) * int(ttft["Request Count"])
    assert TOKENS / (GENERATION_S + 0.1) <= float(rate["Median Response Time"]) <= TOKENS / GENERATION_S * 1.1
    assert float(rate["Average Content Size"]) == TOKENS  # the tokens/s entry's size: output tokens
    assert ("LLM", "TTFT fake-embed") not in rows


def test_missed_slo_exits_non_zero_and_shared_prefixes_carry_session_ids(fake_server: str, tmp_path: Path) -> None:
    FakeOpenAI.sessions.clear()
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("models:\n  - {name: fake-chat, source: hf://x}\n")
    run = run_locust(fake_server, tmp_path / "missed", "-u", "6", "-r", "6", "-t", "3s", "--fleet", str(fleet),
                     "--tags", "stream", "embeddings", "--slo-ttft-p95-ms", "1", "--scenario", "shared-prefix",
                     "--prefix-groups", "2", "--shared-prefix-words", "50", "--prompt-words", "5")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "SLO ttft_p95_ms:" in run.stdout and "<= 1 MISSED" in run.stdout
    rows = stats_rows(tmp_path / "missed")
    assert rows[("POST", "/v1/chat/completions [stream] fake-chat")]["Failure Count"] == "0"
    assert {name for method, name in rows if method == "POST"} == {"/v1/chat/completions [stream] fake-chat"}
    # The fleet has no embed model: the embeddings task idles (no request, no failure).
    prefixes = {(session, " ".join(prompt.split()[:50])) for session, prompt in FakeOpenAI.sessions}
    assert {s for s, _ in prefixes} == {"group-0", "group-1"} and len(prefixes) == 2
    assert all(len(prompt.split()) == 55 for _, prompt in FakeOpenAI.sessions)


def test_failed_requests_are_reported(fake_server: str, tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("models:\n  - {name: fail-http}\n  - {name: fail-event}\n  - {name: fail-nodone}\n")
    run = run_locust(fake_server, tmp_path / "fail", "-u", "4", "-r", "4", "-t", "3s", "--fleet", str(fleet),
                     "--tags", "stream", "chat", "--model-weights", "fail-http=1,fail-event=1",
                     "--slo-fail-ratio", "1")
    # Failures make Locust exit with 1, unless a fail-ratio SLO is set and met.
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SLO fail_ratio: " in run.stdout and "<= 1 OK" in run.stdout
    rows = stats_rows(tmp_path / "fail")
    chat, stream = "/v1/chat/completions", "/v1/chat/completions [stream]"
    for name in [f"{stream} fail-http", f"{stream} fail-event", f"{stream} fail-nodone", f"{chat} fail-event",
                 f"{chat} fail-http"]:
        assert rows[("POST", name)]["Failure Count"] == rows[("POST", name)]["Request Count"] != "0", name
    assert rows[("POST", f"{chat} fail-nodone")]["Failure Count"] == "0"
    assert not any(name.startswith(("TTFT", "ITL", "TPOT")) for _, name in rows)  # no metrics from failures
    with open(tmp_path / "fail_failures.csv", newline="") as f:
        errors = {(row["Name"], row["Error"]) for row in csv.DictReader(f)}
    expected = {(f"{stream} fail-event", "error event: boom"),
                (f"{stream} fail-nodone", "stream ended without data: [DONE]"),
                (f"{chat} fail-event", "no choices in body"),
                (f"{stream} fail-http", "HTTP 503: {")}
    for name, message in expected:
        assert any(n == name and message in e for n, e in errors), (name, message, errors)


def test_noisy_neighbour_runs_a_noisy_and_a_chat_user_class_with_their_keys(fake_server: str, tmp_path: Path) -> None:
    FakeOpenAI.streams.clear()
    FakeOpenAI.peak_streams.clear()
    run = run_locust(fake_server, tmp_path / "nn", "-t", "4s", "--scenario", "noisy-neighbour", "--model", "fake-chat",
                     "--noisy-key", NOISY_KEY, "--noisy-users", "3", "--noisy-max-tokens", "300", "--max-tokens", "16",
                     "--chat-delay", "0.5", "--slo-ttft-p95-ms", "5000", "--slo-min-tokens-per-s", "1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SLO ttft_p95_ms:" in run.stdout and "MISSED" not in run.stdout
    rows = stats_rows(tmp_path / "nn")
    chat, noisy = "noisy-neighbour chat", "noisy-neighbour noisy"
    posts = {name for method, name in rows if method == "POST"}
    assert posts == {f"/v1/chat/completions [{chat}] fake-chat", f"/v1/chat/completions [{noisy}] fake-chat"}
    assert all(rows[("POST", name)]["Failure Count"] == "0" for name in posts)
    llm = {name for method, name in rows if method == "LLM"}
    assert llm == {f"{chat} {m} fake-chat" for m in ("TTFT", "TPOT", "ITL", "tokens/s")} | {
        f"{noisy} {m} fake-chat" for m in ("TTFT", "TPOT", "tokens/s")}  # no ITL for the flood
    assert float(rows[("LLM", f"{noisy} tokens/s fake-chat")]["Average Content Size"]) == TOKENS
    # Each class with its own key and max_tokens; the chat user sends one turn at a time, the noisy ones 3.
    assert set(FakeOpenAI.streams) == {(KEY, 16), (NOISY_KEY, 300)}
    assert FakeOpenAI.peak_streams == {KEY: 1, NOISY_KEY: 3}
    counts = Counter(key for key, _ in FakeOpenAI.streams)
    assert counts[NOISY_KEY] > counts[KEY] > 0


def test_noisy_neighbour_options_are_checked(fake_server: str, tmp_path: Path) -> None:
    run = run_locust(fake_server, tmp_path / "bad", "-t", "2s", "--scenario", "noisy-neighbour", "--noisy-users", "0")
    assert run.returncode == 1 and "--noisy-users and --chat-users must be >= 1" in run.stderr
    run = run_locust(fake_server, tmp_path / "unknown", "-t", "2s", "--model", "nope")
    assert run.returncode == 1 and "--model: unknown model nope" in run.stderr
    assert neighbour_users(48, 1) == 49
    with pytest.raises(ConfigError):
        neighbour_users(4, 0)
    # All users at once, then until -t.
    assert shape_at("noisy-neighbour", 0, 49, 60, 1) == (49, 49.0)
    assert shape_at("noisy-neighbour", 60, 49, 60, 1) is None


def test_slo_summary_judges_the_chat_users_latency_and_counts_every_token() -> None:
    def entry(name: str, times: dict[int, int], tokens: int = 0, method: str = "LLM") -> SimpleNamespace:
        return SimpleNamespace(name=name, method=method, num_requests=sum(times.values()), num_failures=0,
                               total_content_length=tokens, response_times=times)

    summary = run_summary([
        entry("noisy-neighbour chat TTFT m", {100: 3}), entry("noisy-neighbour noisy TTFT m", {9000: 5}),
        entry("noisy-neighbour chat TPOT m", {10: 2}), entry("noisy-neighbour noisy TPOT m", {50: 5}),
        entry("noisy-neighbour chat tokens/s m", {300: 3}, tokens=48),
        entry("noisy-neighbour noisy tokens/s m", {80: 5}, tokens=2560),
        entry("/v1/chat/completions [noisy-neighbour chat] m", {150: 3}, method="POST"),
    ], duration_s=10)
    assert summary.ttft_ms == {100: 3} and summary.tpot_ms == {10: 2}
    assert (summary.output_tokens, summary.requests) == (2608, 3)
