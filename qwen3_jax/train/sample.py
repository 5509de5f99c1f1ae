"""Greedy sampling without a KV cache, for a quick look at a trained model (`scripts/train.py`
prints a few continuations at the end of a run). The generation engine (`infer/`) replaces it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_generate(
  model: nnx.Module, prompts: list[list[int]], num_tokens: int
) -> list[list[int]]:
  """Greedy continuations of several prompts without a KV cache: one compiled call per token.

  Rows live in a fixed [R, max_prompt + n] buffer; row r's next token is read at its own
  position t_r - 1, and slots from t_r on are padding (segment 0), which causal attention
  never lets earlier tokens see.

  Args:
    model: a Qwen3 model.
    prompts: R token-id lists, each at least one token long.
    num_tokens: how many tokens to add to each prompt.

  Returns:
    R lists of `num_tokens` token ids each (the continuations only).
  """
  lens = np.asarray([len(p) for p in prompts], np.int32)
  if lens.min() < 1:
    raise ValueError("every prompt needs at least one token")
  total = int(lens.max()) + num_tokens
  buf = np.zeros((len(prompts), total), np.int32)
  for r, p in enumerate(prompts):
    buf[r, : len(p)] = p
  graphdef, params = nnx.split(model)

  @jax.jit
  def step(params, buf, t):  # buf [R, T], t [R]: tokens already in each row
    seg = (jnp.arange(total)[None, :] < t[:, None]).astype(jnp.int32)
    # [R, T, V]: the model slices off the vocab padding, so argmax never picks a padded id.
    logits = nnx.merge(graphdef, params)(buf, segment_ids=seg).logits
    nxt = jnp.argmax(jnp.take_along_axis(logits, (t - 1)[:, None, None], axis=1)[:, 0], -1)
    return buf.at[jnp.arange(buf.shape[0]), t].set(nxt.astype(jnp.int32)), t + 1

  buf, t = jnp.asarray(buf), jnp.asarray(lens)
  for _ in range(num_tokens):
    buf, t = step(params, buf, t)
  buf = np.asarray(buf)
  return [buf[r, n : n + num_tokens].tolist() for r, n in enumerate(lens)]
