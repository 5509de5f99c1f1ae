# `make run`: install into .venv, then run the main job. `make test`: install, lint, test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install lint format clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,hf,serve]'
	$(PY) -m pip install -q -e '.[tpu]' || echo "tpu extra (libtpu) not installed: the TPU AOT tests skip"
	touch $(STAMP)

install: $(STAMP)

# Main job: the Qwen3 post-training recipe on the `mini` MoE preset, 8 simulated CPU devices
# (2 data x 4 expert): pretrain -> stage 1 (long-CoT cold start) -> 2 (reasoning RL) ->
# 3 (thinking-mode fusion) -> 4 (general RL), each evaluated on held-out prompts, then
# RUN_DIR/report.md (one row per stage, each stage's target with its paired interval) and
# curves.png. Rerunning with the same RUN_DIR skips finished stages and resumes the others.
RUN_DIR ?= runs/recipe_$(shell date +%Y%m%d_%H%M%S)

run: $(STAMP)
	@echo "workdir: $(RUN_DIR)"
	$(PY) scripts/recipe.py --workdir=$(RUN_DIR)
	@echo "report: $(RUN_DIR)/report.md"

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
