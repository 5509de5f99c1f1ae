"""Engine completions -> the RL step's batch arrays (`rl/step.py`'s RL_BATCH_KEYS)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qwen3_jax.infer.engine import Completion


def rollout_batch(
  completions: Sequence[Completion], advantages, seq_len: int, *, rows: int | None = None
) -> dict[str, np.ndarray]:
  """One row per completion: prompt_ids + token_ids, right-padded to seq_len.

  Args:
    completions: the engine's samples (e.g. every group's, flattened in order).
    advantages: [N] per completion.
    seq_len: L, the row length (static: one compiled step per L).
    rows: pad the batch with empty rows (segment 0, mask 0, advantage 0) to this many, e.g.
      a multiple of the data-parallel axes; None = N.

  Returns:
    numpy tokens, segment_ids (1 on the sequence), loss_mask (1 on generated tokens that were
    sampled: forced tokens, such as the thinking-budget early-stop text, are not trained on),
    old_logp (the engine's log-probs on the generated tokens, 0 elsewhere), advantages.
  """
  n = len(completions)
  rows = n if rows is None else rows
  adv = np.asarray(advantages, np.float32)
  if adv.shape != (n,) or rows < n:
    raise ValueError(f"rollout_batch: {n} completions, advantages {adv.shape}, rows={rows}")
  out = {
    "tokens": np.zeros((rows, seq_len), np.int32),
    "segment_ids": np.zeros((rows, seq_len), np.int32),
    "loss_mask": np.zeros((rows, seq_len), np.int32),
    "old_logp": np.zeros((rows, seq_len), np.float32),
    "advantages": np.zeros((rows,), np.float32),
  }
  for i, c in enumerate(completions):
    p, g = len(c.prompt_ids), len(c.token_ids)
    if p + g > seq_len:
      raise ValueError(f"rollout_batch: completion {i} has {p} + {g} tokens > seq_len={seq_len}")
    out["tokens"][i, : p + g] = list(c.prompt_ids) + list(c.token_ids)
    out["segment_ids"][i, : p + g] = 1
    forced = np.asarray(c.forced, bool) if c.forced else np.zeros(g, bool)
    out["loss_mask"][i, p : p + g] = ~forced
    out["old_logp"][i, p : p + g] = c.logprobs
  out["advantages"][:n] = adv
  return out
