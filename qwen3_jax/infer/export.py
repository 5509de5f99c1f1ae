"""Portable export: the model's prefill and decode-step programs as StableHLO (`jax.export`).

`export_model(model, directory)` writes
  init.stablehlo     () -> cache                         an empty KV cache
  prefill.stablehlo  (weights, cache, tokens [B, C], num [B]) -> cache
  step.stablehlo     (weights, cache, token [B]) -> (logits [B, V] float32, cache)
  weights.npz        the parameters, `w0 .. w{N-1}` in the order the programs take them
  meta.json          batch B, max_len, chunk C, vocab V, EOS ids, counts of weights / cache arrays

The weights are arguments, not constants, so the files stay small and one export serves any
checkpoint of the same architecture. Weights and cache travel as flat lists of arrays (no
custom pytree types), so `exported.py` runs them with jax and numpy alone, without this
package's model code. Prefill feeds row r its first `num[r]` tokens of the chunk (the rest
are padding); the step feeds one token per row and returns the next-token logits. These are
the engine's own calls (`decode.prefill`, one decode step), exported for one device.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax.model import kv_cache

PROGRAMS = ("init", "prefill", "step")


def export_model(
  model, directory: str, *, batch: int = 1, max_len: int = 256, chunk: int = 64, eos_ids=()
) -> dict:
  """Writes the exported programs and weights of `model` to `directory`; returns the meta.

  Args:
    model: a `Qwen3` module (its params on one device).
    directory: created if missing; existing export files are overwritten.
    batch: rows B of every call; max_len: KV length per row (prompt + reply tokens).
    chunk: tokens per prefill call (longer prompts take several calls).
    eos_ids: ids that end a reply (stored in the meta for the runner).
  """
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  weights, w_tree = jax.tree.flatten(state)
  cache0 = kv_cache.init_cache(cfg, batch, max_len)
  cache_leaves, c_tree = jax.tree.flatten(cache0)

  def call(w, c, tokens, num, logits):
    m = nnx.merge(graphdef, jax.tree.unflatten(w_tree, w))
    cache = jax.tree.unflatten(c_tree, c)
    return m(tokens, cache=cache, num_tokens=num, return_hidden=not logits)

  def init():
    return jax.tree.leaves(kv_cache.init_cache(cfg, batch, max_len))

  def prefill(w, c, tokens, num):
    return jax.tree.leaves(call(w, c, tokens, num, False).cache)

  def step(w, c, token):
    out = call(w, c, token[:, None], jnp.ones((batch,), jnp.int32), True)
    return out.logits[:, 0].astype(jnp.float32), jax.tree.leaves(out.cache)

  spec = lambda xs: [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]  # noqa: E731
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  w_spec, c_spec = spec(weights), spec(cache_leaves)
  with kv_cache.without_runtime_check():  # the runner checks lengths on the host
    programs = {
      "init": jax.export.export(jax.jit(init))(),
      "prefill": jax.export.export(jax.jit(prefill))(w_spec, c_spec, i32(batch, chunk), i32(batch)),
      "step": jax.export.export(jax.jit(step))(w_spec, c_spec, i32(batch)),
    }
  os.makedirs(directory, exist_ok=True)
  for name, exp in programs.items():
    with open(os.path.join(directory, f"{name}.stablehlo"), "wb") as f:
      f.write(exp.serialize())
  np.savez(
    os.path.join(directory, "weights.npz"),
    **{f"w{i}": np.asarray(jax.device_get(w)) for i, w in enumerate(weights)},
  )
  meta = {
    "batch": batch,
    "max_len": max_len,
    "chunk": chunk,
    "vocab_size": cfg.vocab_size,
    "eos_ids": [int(i) for i in eos_ids],
    "num_weights": len(weights),
    "num_cache_arrays": len(cache_leaves),
  }
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta
