"""Synthetic long-range key-value recall, for the attention ablation.

A row of L + 1 token ids is random filler with pairs planted in it: a key k and its value v at
positions p, p + 1, and the same key again at q = p + d, followed by v at q + 1. The model is
trained (loss only on the token after each repeated key) to predict v there; it can do so only
by attending from q back to p + 1, d tokens away. Every row holds `per_distance` pairs for each
distance d in `distances` (from below the attention window to 8x it); accuracy is the share of
repeated keys whose argmax prediction is the value, per distance. Keys are distinct within a
row; values and filler are uniform, so nothing but recall beats chance (1 / num_values).

Token ids (the model's vocabulary must hold them): keys [16, 16 + 128), values [144, 272),
filler [272, 512).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax import sharding as shd
from qwen3_jax.train.config import TrainConfig
from qwen3_jax.train.inputs import to_global
from qwen3_jax.train.step import make_program

KEYS, VALUES, FILLER = (16, 144), (144, 272), (272, 512)


def make_rows(rng: np.random.Generator, n: int, seq_len: int, distances, per_distance: int):
  """n rows (inputs, targets, segment_ids, loss_mask [n, seq_len] int32) and the distance of
  each supervised target ([n, seq_len], 0 elsewhere)."""
  if max(distances) + 2 > seq_len:
    raise ValueError(f"distance {max(distances)} does not fit in seq_len={seq_len}")
  num_pairs = len(distances) * per_distance
  if num_pairs > KEYS[1] - KEYS[0] or 4 * num_pairs > seq_len // 2:
    raise ValueError(f"{num_pairs} pairs do not fit a row of {seq_len} tokens")
  row = rng.integers(*FILLER, (n, seq_len + 1))
  dist = np.zeros((n, seq_len + 1), np.int32)
  for r in range(n):
    used = np.zeros(seq_len + 1, bool)
    keys = rng.choice(np.arange(*KEYS), num_pairs, replace=False)
    # Longest distances first (fewest places fit them); rejection sampling of free slots.
    for i, d in enumerate(np.repeat(sorted(distances, reverse=True), per_distance)):
      for _ in range(10_000):
        p = int(rng.integers(0, seq_len - d))
        slots = [p, p + 1, p + d, p + d + 1]
        if not used[slots].any():
          break
      else:
        raise ValueError(f"no free slots for a pair at distance {d} in a row of {seq_len}")
      used[slots] = True
      v = rng.integers(*VALUES)
      row[r, slots] = (keys[i], v, keys[i], v)
      dist[r, p + d] = d
  mask = (dist[:, :-1] > 0).astype(np.int32)
  rows = {
    "inputs": row[:, :-1].astype(np.int32),
    "targets": row[:, 1:].astype(np.int32),
    "segment_ids": np.ones((n, seq_len), np.int32),
    "loss_mask": mask,
  }
  return rows, dist[:, :-1]


def recall_accuracy(logits: np.ndarray, rows: dict, dist: np.ndarray) -> dict[int, float]:
  """{distance: share of supervised targets whose argmax is the value} from logits [n, L, V]."""
  hit = np.asarray(logits).argmax(-1) == rows["targets"]
  return {int(d): float(hit[dist == d].mean()) for d in np.unique(dist[dist > 0])}


def train_and_eval(
  cfg: TrainConfig,
  *,
  seq_len: int,
  distances,
  steps: int,
  per_distance: int = 4,
  eval_rows: int = 64,
) -> dict[int, float]:
  """Trains a fresh model of `cfg` (its model, optimizer, batch, seed; `seq_len` and `steps`
  replaced) on the task with the training system's compiled step, then returns the held-out
  recall accuracy per distance."""
  cfg = dataclasses.replace(cfg, seq_len=seq_len, num_steps=steps, micro_batches=1)
  prog = make_program(cfg, shd.make_mesh(cfg.mesh))
  state = prog.init()
  rng = np.random.default_rng(cfg.seed)
  for _ in range(steps):
    rows, _ = make_rows(rng, cfg.batch_size, seq_len, distances, per_distance)
    state, _ = prog.train_step(state, to_global(rows, prog))
  rows, dist = make_rows(
    np.random.default_rng(10_000 + cfg.seed), eval_rows, seq_len, distances, per_distance
  )
  params = jax.device_get(state.params)
  graphdef = prog.graphdef
  logits_fn = jax.jit(lambda p, x, s: nnx.merge(graphdef, p)(x, segment_ids=s).logits)
  logits = np.concatenate(
    [
      np.asarray(
        logits_fn(
          params,
          jnp.asarray(rows["inputs"][i : i + 8]),
          jnp.asarray(rows["segment_ids"][i : i + 8]),
        )
      )
      for i in range(0, eval_rows, 8)
    ]
  )
  return recall_accuracy(logits, rows, dist)
