import socket

from orchestrator import runtime_env as stack


def test_free_ports_come_from_below_the_ephemeral_range():
    low, _ = stack.ephemeral_ports()
    ports = {stack.free_port() for _ in range(20)}
    assert all(20000 <= p < low for p in ports), ports
    port = ports.pop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # still free: the helper closed its probe


def test_a_taken_port_is_skipped(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        picks = iter([busy, busy, free])
        monkeypatch.setattr(stack.random.SystemRandom, "randrange", lambda self, a, b: next(picks))
        monkeypatch.setattr(stack, "ephemeral_ports", lambda: (32768, 60999))
        assert stack.free_port() == free
