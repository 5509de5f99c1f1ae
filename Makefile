# `make run`: install into .venv, then run the main job. `make test`: install, lint, test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install lint format clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,hf]'
	$(PY) -m pip install -q -e '.[tpu]' || echo "tpu extra (libtpu) not installed: the TPU AOT tests skip"
	touch $(STAMP)

install: $(STAMP)

# Main job: pretrain the tiny MoE on the embedded corpus, 8 simulated CPU devices (2 data x
# 4 expert), about 1-2 min on 2 cores (plus the first install); checkpoints + TensorBoard in
# RUN_DIR; greedy samples at the end.
RUN_DIR ?= runs/pretrain_tiny_$(shell date +%Y%m%d_%H%M%S)
RUN_STEPS ?= 1000

run: $(STAMP)
	@echo "workdir: $(RUN_DIR)  (tensorboard --logdir $(RUN_DIR)/tb)"
	$(PY) scripts/train.py --config=configs/pretrain.py:model=tiny,steps=$(RUN_STEPS) \
	  --workdir=$(RUN_DIR) --num_cpu_devices=8 --config.mesh.data=2 --config.mesh.expert=4 \
	  --config.log_every=50 --config.eval_every=100 --config.checkpoint_every=100
	@echo "workdir: $(RUN_DIR)"

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
