# `make run`: install into .venv, then run the main job. `make test`: install, lint, test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 8

.PHONY: run test install lint format clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,hf]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) scripts/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff format --check qwen3_jax configs scripts experiments tests
	$(VENV)/bin/ruff check qwen3_jax configs scripts experiments tests

format: $(STAMP)
	$(VENV)/bin/ruff format qwen3_jax configs scripts experiments tests
	$(VENV)/bin/ruff check --fix qwen3_jax configs scripts experiments tests

test: $(STAMP) lint
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info
