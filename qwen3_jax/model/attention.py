"""Grouped-query attention with QK-norm and RoPE (Qwen3).

Full causal attention lives here; the sparse (sliding window + global tokens) kind plugs in
through `Attention(kind=...)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.config import ModelConfig
from qwen3_jax.model.layers import RMSNorm, param, rope
from qwen3_jax.sharding import constrain

NEG_INF = -1e30  # Large finite negative: fully masked rows stay NaN-free.


def full_attention(q, k, v, segment_ids=None):
  """Causal softmax attention in float32.

  Args:
    q: [B, L, H, Dh] queries (already scaled, normed and rotated).
    k, v: [B, L, K, Dh] keys and values; H is a multiple of K.
    segment_ids: optional [B, L] ints; tokens attend only within their own segment.

  Returns:
    [B, L, H, Dh] in q's dtype.
  """
  b, l, h, dh = q.shape
  kh = k.shape[2]
  q = q.reshape(b, l, kh, h // kh, dh)  # [B, L, K, G, Dh]
  logits = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32)
  mask = jnp.tril(jnp.ones((l, l), bool))[None]  # [1, L, S]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  logits = jnp.where(mask[:, None, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgls,bskd->blkgd", probs, v)
  return out.reshape(b, l, h, dh)


class Attention(nnx.Module):
  """q/k/v/o projections, per-head RMSNorm on q and k (before RoPE), GQA."""

  def __init__(self, cfg: ModelConfig, *, kind: str = "full", rngs: nnx.Rngs):
    d, h, kh, dh, dt = (
      cfg.hidden_size,
      cfg.num_attention_heads,
      cfg.num_key_value_heads,
      cfg.head_dim,
      cfg.param_dtype,
    )
    self.q_proj = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), dt)
    self.k_proj = param(rngs, (d, kh, dh), ("embed", "kv_heads", "head_dim"), dt)
    self.v_proj = param(rngs, (d, kh, dh), ("embed", "kv_heads", "head_dim"), dt)
    self.o_proj = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), dt)
    self.q_norm = RMSNorm(dh, cfg.rms_norm_eps, param_dtype=dt)
    self.k_norm = RMSNorm(dh, cfg.rms_norm_eps, param_dtype=dt)
    self.kind = kind
    self.cfg = cfg
    if kind != "full":
      raise NotImplementedError(f"attention kind {kind!r} is not implemented yet")

  def __call__(self, x, positions, segment_ids=None):
    """x: [B, L, D], positions: [B, L] -> [B, L, D]."""
    c = lambda p: p[...].astype(x.dtype)  # noqa: E731
    q = self.q_norm(jnp.einsum("bld,dhk->blhk", x, c(self.q_proj)))
    k = self.k_norm(jnp.einsum("bld,dhk->blhk", x, c(self.k_proj)))
    v = jnp.einsum("bld,dhk->blhk", x, c(self.v_proj))
    q = rope(q, positions, self.cfg.rope_theta) * (self.cfg.head_dim**-0.5)
    k = rope(k, positions, self.cfg.rope_theta)
    q = constrain(q, ("batch", "seq", "heads", None))
    k = constrain(k, ("batch", "seq", "kv_heads", None))
    out = full_attention(q, k, v, segment_ids)
    return jnp.einsum("blhk,hkd->bld", out, c(self.o_proj))
