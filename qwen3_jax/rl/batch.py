"""Rollouts (engine completions, tool-loop transcripts) -> the RL step's batch arrays
(`rl/step.py`'s RL_BATCH_KEYS)."""

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
  seqs = []
  for c in completions:
    p, g = len(c.prompt_ids), len(c.token_ids)
    forced = np.asarray(c.forced, bool) if c.forced else np.zeros(g, bool)
    mask = np.concatenate([np.zeros(p, bool), ~forced])
    logp = np.concatenate([np.zeros(p, np.float32), np.asarray(c.logprobs, np.float32)])
    seqs.append((list(c.prompt_ids) + list(c.token_ids), mask, logp))
  return sequence_batch(seqs, advantages, seq_len, rows=rows)


def sequence_batch(
  seqs: Sequence[tuple], advantages, seq_len: int, *, rows: int | None = None, truncate=False
) -> dict[str, np.ndarray]:
  """One row per token sequence: `rollout_batch` for any rollout (e.g. a tool-loop
  `Transcript`'s token_ids, loss_mask, logprobs).

  Args:
    seqs: per row (token ids [n], loss mask [n] (bool), log-probs [n] of the tokens the
      policy sampled, anything elsewhere).
    advantages, seq_len, rows: as in `rollout_batch`.
    truncate: cut sequences longer than seq_len (their loss on what fits); False = raise.

  Returns:
    `rollout_batch`'s arrays; old_logp is 0 off the loss mask.
  """
  n = len(seqs)
  rows = n if rows is None else rows
  adv = np.asarray(advantages, np.float32)
  if adv.shape != (n,) or rows < n:
    raise ValueError(f"sequence_batch: {n} sequences, advantages {adv.shape}, rows={rows}")
  out = {
    "tokens": np.zeros((rows, seq_len), np.int32),
    "segment_ids": np.zeros((rows, seq_len), np.int32),
    "loss_mask": np.zeros((rows, seq_len), np.int32),
    "old_logp": np.zeros((rows, seq_len), np.float32),
    "advantages": np.zeros((rows,), np.float32),
  }
  for i, (ids, mask, logp) in enumerate(seqs):
    if not len(ids) == len(mask) == len(logp):
      raise ValueError(
        f"sequence_batch: row {i} has {len(ids)} ids, {len(mask)} mask entries "
        f"and {len(logp)} log-probs"
      )
    if len(ids) > seq_len and not truncate:
      raise ValueError(f"sequence_batch: row {i} has {len(ids)} tokens > seq_len={seq_len}")
    k = min(len(ids), seq_len)
    m = np.asarray(mask[:k], bool)
    out["tokens"][i, :k] = ids[:k]
    out["segment_ids"][i, :k] = 1
    out["loss_mask"][i, :k] = m
    out["old_logp"][i, :k] = np.where(m, np.asarray(logp[:k], np.float32), 0.0)
  out["advantages"][:n] = adv
  return out
