# `make demo` and `make test` each build their own virtual environment from nothing, pinned to constraints.txt
# (the environment the suite last passed in), then run. `make lock` moves the lock to the newest releases that
# pyproject.toml allows, after the suite passes on them. scripts/setup_venv.sh says how torch is chosen.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.petuning-installed

.PHONY: demo test lint format bench lock clean

$(STAMP): pyproject.toml constraints.txt Makefile scripts/setup_venv.sh
	scripts/setup_venv.sh $(VENV) constraints.txt
	touch $(STAMP)

# The SFT recipe (TRL's SFTTrainer) on its embedded defaults: SORSA r=16 on SmolLM2-135M-Instruct, arithmetic task, before/after
# exact match, then the adapter reloaded in a fresh process must give the same answers. Always a fresh run.
demo: $(STAMP)
	$(VENV)/bin/petuning train recipes/configs/sorsa_smollm2.yaml --resume_from_checkpoint false

test: $(STAMP)
	$(PY) -m pytest -q -ra

# ruff's formatter and linter, configured in pyproject.toml; `make format` applies what they can fix.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check --diff .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/method_comparison/run.py

lock:
	scripts/refresh_lock.sh

clean:
	rm -rf $(VENV) .venv-lock
