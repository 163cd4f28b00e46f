"""slm-orchestrator: serve small language models on vLLM workers behind one OpenAI gateway."""

__version__ = "0.1.0"


def console_logging() -> None:
    """Send this package's logs (INFO and up) to the process's stderr, which Ray relays to
    `slm serve`'s console and to the pod's log. Replicas call it: with Ray Serve's fast path
    (RAY_SERVE_LOG_TO_STDERR=0) Serve's own request logs go to files only, and our lines must
    not depend on how Serve configures the root logger."""
    import logging
    import sys

    logger = logging.getLogger("orchestrator")
    if not any(getattr(h, "_slm_console", False) for h in logger.handlers):
        # The process's real stderr: in that mode Serve swaps sys.stderr for a logger to its files.
        handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        handler._slm_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
