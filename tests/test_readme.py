"""The README's Python quick start runs as written and computes the right loss."""

import os
import re

import jax.numpy as jnp
import numpy as np
import optax

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def quick_start_code() -> str:
  text = open(README).read()
  section = text[text.index("## Quick start") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs_and_its_loss_is_the_full_logits_cross_entropy():
  """Runs the snippet (one train step of the tiny model), then checks the next step's loss
  against optax's cross-entropy on full logits plus the model's aux loss, and that training
  on the same batch lowers it."""
  scope: dict = {}
  exec(compile(quick_start_code(), "README quick start", "exec"), scope)
  model, tokens, first = scope["model"], scope["tokens"], float(scope["loss"])
  assert abs(first - np.log(model.cfg.vocab_size)) < 0.3  # a fresh model is near uniform
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  out = model(inputs)
  want = optax.softmax_cross_entropy_with_integer_labels(out.logits, targets).mean()
  want = float(want + out.aux["aux_loss"])
  got = float(scope["train_step"](model, scope["optimizer"], inputs, targets))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got < first
  assert jnp.isfinite(got)
