"""Held-out evaluation: mean cross-entropy over a fixed set of eval batches.

Any loop (pretraining / SFT, RL) calls `evaluate` with its current parameters; the batches are
the same every time (the eval `Batches` do not shuffle), so values are comparable across steps
and across a resume.
"""

from __future__ import annotations

import jax

from qwen3_jax.data import pipeline
from qwen3_jax.train.inputs import to_global
from qwen3_jax.train.step import Program


def evaluate(prog: Program, params, evals: pipeline.Batches, num_batches: int) -> float:
  """Mean cross-entropy per counted token over the first `num_batches` held-out batches.

  Args:
    prog: the compiled program (its `eval_step` sums CE and counts tokens on device).
    params: the parameters to evaluate (a pure dict, as `TrainState.params`).
    evals: the held-out batches; only as many full batches as it holds are read.
    num_batches: how many batches at most.
  """
  tot = n = 0.0
  for i in range(min(num_batches, evals.num_rows // prog.cfg.batch_size)):
    out = jax.device_get(prog.eval_step(params, to_global(evals[i], prog)))
    tot, n = tot + float(out["ce_sum"]), n + float(out["n"])
  return tot / max(n, 1.0)
