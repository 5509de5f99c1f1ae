"""Grouped-query attention with QK-norm and RoPE (Qwen3): `full` causal or `sparse`.

`Attention(cfg, kind="full" | "sparse")`. Sparse = causal sliding window of `window` real keys
(the query itself included) + the `max_globals` most recent global tokens of the query's
document, computed blockwise; the per-document placement of global tokens is in
`global_tokens.py`, the exact visibility rule in `sparse_attention.py`. A full layer sees
every earlier position of its document in the interleaved (real + global) sequence.
With a KV cache, a chunk attends to its own keys (blockwise / dense as above) and to the
cached ones (dense over the cache's rings, see `kv_cache.py`); the two softmax partials are
merged with their log-sum-exps, so cached decoding equals the full forward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.config import ATTENTION_KINDS, ModelConfig
from qwen3_jax.model import kv_cache
from qwen3_jax.model.global_tokens import Layout, make_layout
from qwen3_jax.model.layers import RMSNorm, param, project, rope
from qwen3_jax.model.sparse_attention import (
  INF_SPAN,
  NEG_INF,
  cache_attention,
  chunk_meta,
  dense_attention,
  merge,
  spans,
  sparse_attention,
)
from qwen3_jax.sharding import (
  active_mesh,
  check_batch,
  constrain,
  kv_head_repeats,
  shard_map,
)


def _blocks(l: int, block: int) -> list[tuple[int, int]]:
  """(start, end) of each query block; the last one may be shorter."""
  return [(s, min(s + block, l)) for s in range(0, l, block)]


def _einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`jnp.einsum` accumulating in (and returning) float32, whatever the operand dtypes.

  XLA:CPU runs a bf16 x bf16 -> f32 dot only on its fused matmul path; one that layout
  assignment leaves outside it (the dV product of the backward pass, at some shapes) fails at
  run time with "UNIMPLEMENTED: ... DotThunk ... BF16 x BF16 = F32". So when lowering for CPU,
  bf16 operands are upcast first: the same numbers (a product of two bf16 values is exact in
  float32), chosen per target platform, so GPU/TPU programs keep bf16 operands.
  """

  def native():
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

  def upcast():
    return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))

  if a.dtype == b.dtype == jnp.float32:
    return native()
  return jax.lax.platform_dependent(cpu=upcast, default=native)


# The causal core works on "items": one (sequence, kv head) pair each, stacked along a leading
# axis N. Layouts: queries qt [N, L, G, Dh] (the G query heads of the kv head folded into the
# rows), keys transposed kt [N, Dh, L], values vt [N, L, Dh], segments [N, L] or None. Keys
# are kept transposed, and the key/value gradients are accumulated transposed: those are the
# faster operand / output layouts of XLA:CPU's batched matmuls (docs/attention_kernel.md).


def _block_logits(qt, kt, seg, start, end):
  """Masked float32 logits of queries start..end-1 against keys 0..end-1: [N, Q, G, S]."""
  logits = _einsum_f32("nqgd,nds->nqgs", qt[:, start:end], kt[..., :end])
  mask = (jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None])[None]  # [1, Q, S]
  if seg is not None:
    mask = mask & (seg[:, start:end, None] == seg[:, None, :end])
  return jnp.where(mask[:, :, None], logits, NEG_INF)  # the diagonal is always visible


def _causal_forward(qt, kt, vt, seg, block):
  """Blockwise causal attention: (out [N, L, G, Dh], list of lse [N, Q, G, 1] per block)."""
  outs, lses = [], []
  for start, end in _blocks(qt.shape[1], block):
    logits = _block_logits(qt, kt, seg, start, end)
    row_max = logits.max(-1, keepdims=True)
    probs = jnp.exp(logits - row_max)
    denom = probs.sum(-1, keepdims=True)
    lses.append(row_max + jnp.log(denom))
    pv = _einsum_f32("nqgs,nsd->nqgd", probs.astype(vt.dtype), vt[:, :end])
    outs.append(pv / denom)
  return jnp.concatenate(outs, axis=1).astype(qt.dtype), lses


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal_attention(qt, kt, vt, seg, block):
  return _causal_forward(qt, kt, vt, seg, block)[0]


def _causal_attention_fwd(qt, kt, vt, seg, block):
  out, lses = _causal_forward(qt, kt, vt, seg, block)
  return out, (qt, kt, vt, seg, out, lses)


def _causal_attention_bwd(block, res, d_out):
  """Flash-attention style backward: probabilities recomputed per block from the saved
  log-sum-exps, dS = P * (dP - rowsum(dO * O)) (no autodiff through the softmax)."""
  qt, kt, vt, seg, out, lses = res
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
  v_t = jnp.swapaxes(vt, 1, 2)  # [N, Dh, L]
  k_n = jnp.swapaxes(kt, 1, 2)  # [N, L, Dh]
  dq = []
  dkt = jnp.zeros(kt.shape, jnp.float32)  # [N, Dh, L], like kt
  dvt = jnp.zeros(kt.shape, jnp.float32)  # [N, Dh, L], transposed from vt
  for (start, end), lse in zip(_blocks(qt.shape[1], block), lses, strict=True):
    probs = jnp.exp(_block_logits(qt, kt, seg, start, end) - lse)  # [N, Q, G, S]
    d_blk = d_out[:, start:end]  # [N, Q, G, Dh]
    dp = _einsum_f32("nqgd,nds->nqgs", d_blk, v_t[..., :end])
    ds = probs * (dp - delta[:, start:end])
    dq.append(_einsum_f32("nqgs,nsd->nqgd", ds.astype(kt.dtype), k_n[:, :end]))
    q_blk = qt[:, start:end]
    dkt = dkt.at[..., :end].add(_einsum_f32("nqgd,nqgs->nds", q_blk, ds.astype(qt.dtype)))
    dvt = dvt.at[..., :end].add(_einsum_f32("nqgd,nqgs->nds", d_blk, probs.astype(d_out.dtype)))
  dq = jnp.concatenate(dq, axis=1)
  dv = jnp.swapaxes(dvt, 1, 2)
  return dq.astype(qt.dtype), dkt.astype(kt.dtype), dv.astype(vt.dtype), None


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def full_attention(q, k, v, segment_ids=None, block=None):
  """Causal softmax attention (float32 softmax), skipping the key blocks above the diagonal.

  Queries are taken in blocks of `block` (None: one block); block i only reads keys
  0 .. (i+1)*block - 1, so about half of the L x L logits are never computed. L need not be a
  multiple of `block` (the last block is shorter).

  Every (sequence, kv head) pair is an independent item: q/k/v are transposed once to
  item-major layouts with ONE batch dim (queries [N, L, G, Dh] with the G query heads of a kv
  head folded into the rows, keys [N, Dh, L], values [N, L, Dh]): XLA:CPU runs batched
  matmuls over one merged batch dim faster than over (B, K). A custom VJP keeps only
  q, k, v, the output and one log-sum-exp per query as residuals (no [.., L, L]
  probabilities) and recomputes each block's probabilities in the backward pass
  (flash-attention style). Under a mesh the core runs per device in
  `shard_map` (batch over the data axes, kv heads over `tensor`; kv heads fewer than the
  tensor axis are repeated first, `repeat_kv_heads`), so merging B and K into items never
  reshapes a sharded array.

  Args:
    q: [B, L, H, Dh] queries (already scaled, normed and rotated).
    k, v: [B, L, K, Dh] keys and values; H is a multiple of K.
    segment_ids: optional [B, L] ints; tokens attend only within their own segment. Every
      query sees at least itself, so padding rows (any segment id, e.g. 0) stay finite.
    block: query block length (>= 1), or None.

  Returns:
    [B, L, H, Dh] in q's dtype.
  """
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(
      f"full_attention: q {q.shape} must be [B, L, H, Dh], k {k.shape} == v {v.shape} [B, L, K, Dh]"
    )
  b, l, h, dh = q.shape
  kh = k.shape[2]
  if k.shape[:2] != (b, l) or k.shape[3] != dh or h % kh:
    raise ValueError(
      f"full_attention: q {q.shape} and k/v {k.shape} do not match "
      f"(same B, L, Dh; q heads a multiple of kv heads)"
    )
  if segment_ids is not None and segment_ids.shape != (b, l):
    raise ValueError(f"full_attention: segment_ids {segment_ids.shape} must be [B, L] = {(b, l)}")
  block = l if block is None else int(block)
  if block < 1:
    raise ValueError(f"full_attention: block must be >= 1, got {block}")

  def local(q, k, v, seg):
    b_loc, h_loc, kh_loc = q.shape[0], q.shape[2], k.shape[2]
    n, g = b_loc * kh_loc, h_loc // kh_loc
    qt = q.reshape(b_loc, l, kh_loc, g, dh).transpose(0, 2, 1, 3, 4).reshape(n, l, g, dh)
    kt = k.transpose(0, 2, 3, 1).reshape(n, dh, l)
    vt = v.transpose(0, 2, 1, 3).reshape(n, l, dh)
    if seg is not None:
      seg = jnp.broadcast_to(seg[:, None], (b_loc, kh_loc, l)).reshape(n, l)
    out = _causal_attention(qt, kt, vt, seg, block)  # [N, L, G, Dh]
    out = out.reshape(b_loc, kh_loc, l, g, dh).transpose(0, 2, 1, 3, 4)
    return out.reshape(b_loc, l, h_loc, dh)

  mesh = active_mesh()
  if mesh is None:
    return local(q, k, v, segment_ids)
  check_batch(b, mesh, "attention: batch")
  k, v = repeat_kv_heads(k, v, h)
  heads = ("batch", None, "kv_heads", None)  # [B, L, H or K, Dh]; L whole: causal needs it
  seg = None if segment_ids is None else ("batch", None)  # [B, L]
  return shard_map(
    local, mesh=mesh, in_axes=(heads, heads, heads, seg), out_axes=heads, check_vma=True
  )(q, k, v, segment_ids)


def repeat_kv_heads(k: jax.Array, v: jax.Array, q_heads: int) -> tuple[jax.Array, jax.Array]:
  """Repeats each kv head r = `kv_head_repeats(K)` times when the active mesh's tensor axis
  is larger than K (r = 1, a no-op, otherwise), so each tensor shard holds the kv head its
  query heads use: query head h uses repeated head h // (H / (K r)), which is a copy of kv
  head h // (H / K), the GQA grouping unchanged. [B, L, K, Dh] -> [B, L, K r, Dh] each."""
  r = kv_head_repeats(k.shape[2], q_heads)
  if r == 1:
    return k, v
  return jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)


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
    if kind not in ATTENTION_KINDS:
      raise ValueError(f"attention kind {kind!r} is not one of {ATTENTION_KINDS}")
    self.kind = kind
    self.cfg = cfg

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    layout: Layout | None = None,
    cache: dict | None = None,
  ):
    """Attention over one chunk: its real tokens, then its global tokens, along L.

    Args:
      x: [B, L + Ng, D] (real tokens then global tokens, see `layout`).
      positions: [B, L + Ng] RoPE positions; segment_ids: [B, L + Ng] or None (one segment).
      layout: where the chunk's tokens sit (`make_layout`); None = L real tokens from slot
        0 in the segments `segment_ids`, no global tokens.
      cache: this layer's KV-cache dict (`kv_cache.py`) or None.

    Returns:
      (y [B, L + Ng, D], updated cache dict or None).
    """
    b, n, _ = x.shape
    one_segment = segment_ids is None
    if one_segment:
      segment_ids = jnp.ones((b, n), jnp.int32)
    if layout is None:
      layout = make_layout(segment_ids, 0)
    cfg, att, l = self.cfg, self.cfg.attention, layout.num_real
    q = self.q_norm(project(self, "q_proj", x))  # [B, L, H, Dh]
    k = self.k_norm(project(self, "k_proj", x))  # [B, L, K, Dh]
    v = project(self, "v_proj", x)
    q = rope(q, positions, cfg.rope_theta) * (cfg.head_dim**-0.5)
    k = rope(k, positions, cfg.rope_theta)
    k, v = repeat_kv_heads(k, v, cfg.num_attention_heads)  # K < tensor axis: [B, L, K r, Dh]
    q = constrain(q, ("batch", "seq", "heads", None))
    k = constrain(k, ("batch", "seq", "kv_heads", None))
    v = constrain(v, ("batch", "seq", "kv_heads", None))
    seg = segment_ids
    q_meta, k_meta = chunk_meta(layout, seg[:, :l], seg[:, l:])
    w, m = spans(att.window, att.max_globals) if self.kind == "sparse" else (INF_SPAN, INF_SPAN)
    if self.kind == "sparse":
      (out, lse), glob = sparse_attention(
        q[:, :l], k[:, :l], v[:, :l], seg[:, :l], q[:, l:], k[:, l:], v[:, l:], seg[:, l:],
        layout, att.window, att.max_globals, att.block_size,
      )  # fmt: skip
      if glob is not None:
        out = jnp.concatenate([out, glob[0]], axis=1)
        lse = jnp.concatenate([lse, glob[1]], axis=1)
    elif cache is None and layout.num_globals == 0:  # plain causal (training, scoring)
      out = full_attention(q, k, v, None if one_segment else seg, att.block_size)
    else:
      out, lse = dense_attention(q, k, v, q_meta, k_meta, w, m)
    if cache is not None:
      if cache["k"].shape[1] != k.shape[2]:  # cache keys [B, K, Dh, S]
        raise ValueError(
          f"the KV cache holds {cache['k'].shape[1]} kv heads per layer but attention uses "
          f"{k.shape[2]} under this mesh (num_key_value_heads={cfg.num_key_value_heads}, "
          "repeated when the tensor axis is larger): build it with init_cache under this mesh"
        )
      args = (k[:, :l], v[:, :l], seg[:, :l], k[:, l:], v[:, l:], seg[:, l:], layout)
      # A full layer's cache keeps every token, so the chunk can be written first and the
      # older entries read after (the chunk's own are masked): XLA:CPU then updates the cache
      # in place. Reading first and writing after makes it copy the whole cache (twice, at
      # every decode step). A sparse layer's ring may evict what the chunk still needs.
      write_first = self.kind == "full"
      if write_first:
        cache = kv_cache.write(cache, *args)
      written = layout.num_tokens if write_first else 0
      ck, cv, c_meta = kv_cache.key_meta(cache, layout.row_start, written)
      out_c, lse_c = cache_attention(q, ck, cv, q_meta, c_meta, w, m)
      out, _ = merge(out, lse, out_c, lse_c)
      if not write_first:
        cache = kv_cache.write(cache, *args)
    out = constrain(out.astype(x.dtype), ("batch", "seq", "heads", None))
    return project(self, "o_proj", out, n_in=2), cache
