# Quick start: `make demo` (environment + a real-model conversion), `make test` (the whole suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_WAIT_POLICY := PASSIVE

.PHONY: env demo test test-fast bench peer-venv clean

# The environment: torch 2.13.0 CPU from the local wheel unless a torch is already importable.
$(BIN)/.cq-installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,demo,report]"
	touch $@

env: $(BIN)/.cq-installed

demo: env
	$(BIN)/python scripts/demo.py

test: env
	$(BIN)/python -m pytest -n 2 -q -p no:cacheprovider --hypothesis-profile=ci

test-fast: env
	$(BIN)/python -m pytest -n 2 -q -m "not slow" --hypothesis-profile=dev

bench: env
	$(BIN)/python benchmarks/run_all.py

# The peer tool (convert_to_quant) for bench_convert.py's `peer` rows, in its own venv outside the repo.
PEER_VENV ?= ../peer-venv
peer-venv:
	test -x $(PEER_VENV)/bin/python || $(PY) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q "torch==2.13.0"
	$(PEER_VENV)/bin/pip install -q convert_to_quant==1.3.4 prodigy-plus-schedule-free==2.0.1 safetensors tqdm numpy \
		scipy==1.17.1 triton==3.7.1

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
