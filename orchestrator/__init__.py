"""slm-orchestrator: serve small language models on vLLM workers behind one OpenAI gateway."""

__version__ = "0.1.0"
