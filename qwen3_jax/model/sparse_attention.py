"""Causal sliding-window + global-token attention, computed blockwise (sub-quadratic).

The model works on two streams per chunk: L real tokens at slots start..start+L-1 and Ng
global tokens. Global number j (j = 0, 1, 2, ...) sits in the causal order immediately
*before* real slot j*g (g = `global_every`): slots 0, g, 2g, ... are each preceded by one.
Its RoPE position and segment are those of that next real token. Every rule below is stated
with two integers per query:

  anchor a: the last real slot the query may see (a = t for real slot t, a = j*g - 1 for
            global j: the real tokens strictly before it);
  count c:  the newest global number the query may see (c = t // g for real slot t, c = j for
            global j: itself).

A key is visible to a query iff it is valid, in the same segment, and
  real key at slot s:    a - w < s <= a    (w = `window` real keys, the query itself included)
  global key number i:   c - M < i <= c    (M = `max_globals` most recent globals)
Full attention is the same rule with w = M = infinity. Globals are never part of the window
band, so nothing is counted twice; a global sees only what precedes it and only later
queries see it (causality holds in the interleaved order).

Blockwise cost for real queries: each block of b queries reads ceil((w-1)/b)+1 key blocks
plus one contiguous segment of M + (b-1)//g + 1 globals: O(L * (w + b + M)) compute and
memory. Global queries read a gathered window of w real keys and M globals: O(L/g * (w + M)).
No L x L array exists anywhere when M is finite (M = 0 means "all globals": quadratic).
Shape letters: B batch, N blocks, Q queries per block, S keys, K kv heads, G q heads per kv
head, Dh head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # Large finite negative: fully masked rows stay NaN-free.
INF_SPAN = 1 << 30  # "Unlimited" window / global cap.


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the real and global tokens of one chunk sit (a static + traced description).

  Attributes:
    num_real: L, real tokens in the chunk (static).
    num_globals: Ng = ceil(L / g) global slots in the chunk (static; 0 without globals).
    start: [] int, slot of the chunk's first real token (0 without a KV cache).
    every: g, global_every (0 = no globals).
  The chunk's global slot k holds global number j0 + k, j0 = ceil(start / g); it is valid iff
  (j0 + k) * g < start + L (only the last slot can be invalid, e.g. in a 1-token decode step).
  """

  num_real: int
  num_globals: int
  start: jax.Array | int
  every: int

  @property
  def real_slots(self) -> jax.Array:  # [L]
    return self.start + jnp.arange(self.num_real, dtype=jnp.int32)

  @property
  def global_numbers(self) -> jax.Array:  # [Ng]
    g = max(self.every, 1)  # every = 0: no globals (num_globals = 0)
    j0 = (self.start + g - 1) // g
    return j0 + jnp.arange(self.num_globals, dtype=jnp.int32)

  @property
  def global_offsets(self) -> jax.Array:  # [Ng] chunk offset of the real token after each global
    return self.global_numbers * self.every - self.start

  @property
  def global_valid(self) -> jax.Array:  # [Ng] bool
    return self.global_offsets < self.num_real


def make_layout(num_real: int, start, every: int) -> Layout:
  num_globals = -(-num_real // every) if every else 0
  return Layout(num_real, num_globals, start, every)


def visible(q_anchor, q_count, q_seg, k_global, k_index, k_seg, k_valid, window, max_globals):
  """The visibility rule of the module docstring, broadcast over any leading shape.

  Args:
    q_anchor, q_count: [..., Q, 1] ints; q_seg: [..., Q, 1].
    k_global: [..., 1, S] bool (key is a global token); k_index: slot or global number;
    k_seg: [..., 1, S]; k_valid: [..., 1, S] bool.
    window, max_globals: ints (INF_SPAN for unlimited).
  Returns:
    [..., Q, S] bool.
  """
  real_ok = (k_index <= q_anchor) & (k_index > q_anchor - window)
  glob_ok = (k_index <= q_count) & (k_index > q_count - max_globals)
  return jnp.where(k_global, glob_ok, real_ok) & k_valid & (q_seg == k_seg)


def attend(q, k, v, mask):
  """Masked softmax attention in float32 with GQA.

  Args:
    q: [B, N, Q, K, G, Dh] (already scaled); k, v: [B, N, S, K, Dh]; mask: [B, N, Q, S].
  Returns:
    out [B, N, Q, K, G, Dh] float32 (zero for rows with no visible key) and
    lse [B, N, Q, K, G] float32 (log-sum-exp of the logits; NEG_INF for such rows).
  """
  logits = jnp.einsum("bnqkgd,bnskd->bnkgqs", q, k, preferred_element_type=jnp.float32)
  m = mask[:, :, None, None]  # [B, N, 1, 1, Q, S]
  logits = jnp.where(m, logits, NEG_INF)
  mx = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  p = jnp.exp(logits - mx)  # masked entries: exp(-1e30 - mx) = 0; all-masked rows: 1
  s = jnp.sum(p, axis=-1, keepdims=True)
  probs = (p / s).astype(v.dtype)
  out = jnp.einsum("bnkgqs,bnskd->bnqkgd", probs, v, preferred_element_type=jnp.float32)
  lse = jnp.moveaxis((jnp.log(s) + mx)[..., 0], -1, 2)  # [B, N, Q, K, G]
  any_key = jnp.any(mask, axis=-1)  # [B, N, Q]
  out = jnp.where(any_key[..., None, None, None], out, 0.0)
  lse = jnp.where(any_key[..., None, None], lse, NEG_INF)
  return out, lse


def merge(out1, lse1, out2, lse2):
  """Combines two softmax partials over disjoint key sets. out: [..., Dh], lse: [...]."""
  m = jnp.maximum(lse1, lse2)
  w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)
  out = (out1 * w1[..., None] + out2 * w2[..., None]) / (w1 + w2)[..., None]
  return out, m + jnp.log(w1 + w2)


def spans(window: int, max_globals: int) -> tuple[int, int]:
  """(w, M) with 0 / None meaning unlimited."""
  return window or INF_SPAN, max_globals or INF_SPAN


def dense_attention(q, k, v, q_meta, k_meta, window, max_globals):
  """Every query against every key with the explicit mask (full layers and the KV cache).

  Args:
    q: [B, Q, H, Dh]; k, v: [B, S, K, Dh].
    q_meta: (anchor [Q], count [Q], seg [B, Q]); k_meta: (is_global [S], index [S],
      seg [B, S], valid [S]).
  Returns:
    out [B, Q, H, Dh] float32, lse [B, Q, H].
  """
  b, nq, h, dh = q.shape
  kh = k.shape[2]
  anchor, count, qseg = q_meta
  is_g, index, kseg, valid = k_meta
  mask = visible(
    anchor[None, :, None],
    count[None, :, None],
    qseg[:, :, None],
    is_g[None, None, :],
    index[None, None, :],
    kseg[:, None, :],
    valid[None, None, :],
    window,
    max_globals,
  )  # [B, Q, S]
  qr = q.reshape(b, 1, nq, kh, h // kh, dh)
  out, lse = attend(qr, k[:, None], v[:, None], mask[:, None])
  return out.reshape(b, nq, h, dh), lse.reshape(b, nq, h)


def chunk_meta(layout: Layout, seg, gseg):
  """Query and key metadata of a chunk's real tokens followed by its globals."""
  t = layout.real_slots
  g = max(layout.every, 1)
  j = layout.global_numbers
  anchor = jnp.concatenate([t, j * g - 1])
  count = jnp.concatenate([t // g, j])
  is_g = jnp.concatenate([jnp.zeros_like(t, bool), jnp.ones_like(j, bool)])
  index = jnp.concatenate([t, j])
  valid = jnp.concatenate([jnp.ones_like(t, bool), layout.global_valid])
  seg_all = jnp.concatenate([seg, gseg], axis=1)
  return (anchor, count, seg_all), (is_g, index, seg_all, valid)


def _pad_axis1(x, front, back, value=0):
  pad = [(0, 0)] * x.ndim
  pad[1] = (front, back)
  return jnp.pad(x, pad, constant_values=value)


def sparse_attention(q, k, v, seg, qg, kg, vg, gseg, layout, window, max_globals, block):
  """Blockwise sliding-window + globals attention within one chunk.

  Args:
    q: [B, L, H, Dh] real queries (scaled); k, v: [B, L, K, Dh]; seg: [B, L] ints.
    qg: [B, Ng, H, Dh] global queries; kg, vg: [B, Ng, K, Dh]; gseg: [B, Ng] (Ng may be 0).
    layout: the chunk's Layout; window w >= 1; max_globals M (0 = all); block b.
  Returns:
    (out [B, L, H, Dh], lse [B, L, H]) for real queries and the same for global queries,
    float32.
  """
  b_, l, h, dh = q.shape
  kh = k.shape[2]
  gq = h // kh
  w, m_cap = spans(window, max_globals)
  bs = min(block, l)
  nb = -(-l // bs)
  lp = nb * bs
  nprev = min(-(-(w - 1) // bs), nb - 1)  # previous key blocks covering the window
  # --- real queries: the band of own + nprev previous key blocks. [B, N, b, ...]
  qb = _pad_axis1(q, 0, lp - l).reshape(b_, nb, bs, kh, gq, dh)
  qseg = _pad_axis1(seg, 0, lp - l, -1).reshape(b_, nb, bs)

  def band(x, value=0):  # [B, L, ...] -> [B, N, (nprev+1)*b, ...]
    xp = _pad_axis1(x, nprev * bs, lp - l, value)
    xp = xp.reshape((b_, nprev + nb, bs) + x.shape[2:])
    return jnp.concatenate([xp[:, i : i + nb] for i in range(nprev + 1)], axis=2)

  kb, vb, kseg = band(k), band(v), band(seg, -1)
  qo = jnp.arange(nb)[:, None] * bs + jnp.arange(bs)[None, :]  # [N, b] chunk offsets
  ko = (jnp.arange(nb)[:, None] - nprev) * bs + jnp.arange((nprev + 1) * bs)[None, :]
  mask = (
    (ko[:, None, :] <= qo[:, :, None])
    & (ko[:, None, :] > qo[:, :, None] - w)
    & (ko[:, None, :] >= 0)
    & (ko[:, None, :] < l)
  )[None] & (qseg[..., :, None] == kseg[..., None, :])  # [B, N, b, S1]
  ng = layout.num_globals
  if ng:
    g = layout.every
    m_eff = min(m_cap, ng)
    span = min(m_eff + (bs - 1) // g + 1, ng)  # globals one query block can see
    j_all = layout.global_numbers
    qc = (layout.start + qo) // g  # [N, b] newest visible global number
    if span == ng:
      gidx = jnp.broadcast_to(jnp.arange(ng), (nb, ng))
    else:
      lo = (layout.start + jnp.arange(nb) * bs) // g - m_eff + 1 - j_all[0]  # [N]
      gidx = lo[:, None] + jnp.arange(span)[None, :]  # [N, span] chunk global index
    inside = (gidx >= 0) & (gidx < ng)
    gidx_c = jnp.clip(gidx, 0, ng - 1)
    jn = j_all[gidx_c]  # [N, span] global numbers
    gmask = (
      (inside & layout.global_valid[gidx_c])[:, None, :]
      & (jn[:, None, :] <= qc[:, :, None])
      & (jn[:, None, :] > qc[:, :, None] - m_cap)
    )[None] & (qseg[..., :, None] == jnp.take(gseg, gidx_c, axis=1)[:, :, None, :])
    kb = jnp.concatenate([kb, jnp.take(kg, gidx_c, axis=1)], axis=2)
    vb = jnp.concatenate([vb, jnp.take(vg, gidx_c, axis=1)], axis=2)
    mask = jnp.concatenate([mask, gmask], axis=-1)
  out, lse = attend(qb, kb, vb, mask)
  out = out.reshape(b_, lp, h, dh)[:, :l]
  lse = lse.reshape(b_, lp, h)[:, :l]
  if not ng:
    return (out, lse), None
  # --- global queries: gathered window of real keys before each global + recent globals.
  offs = layout.global_offsets - 1  # [Ng] anchor as a chunk offset
  wr = min(w, l)
  ridx = offs[:, None] - wr + 1 + jnp.arange(wr)[None, :] if wr < l else jnp.arange(l)[None, :]
  ridx = jnp.broadcast_to(ridx, (ng, wr))
  ridx_c = jnp.clip(ridx, 0, l - 1)
  rmask = (ridx >= 0) & (ridx <= offs[:, None]) & (ridx > offs[:, None] - w)  # [Ng, wr]
  mg = min(m_cap, ng)
  kk = jnp.arange(ng)
  gg = kk[:, None] - mg + 1 + jnp.arange(mg)[None, :] if mg < ng else kk[None, :]
  gg = jnp.broadcast_to(gg, (ng, mg))
  gg_c = jnp.clip(gg, 0, ng - 1)
  ggmask = (gg >= 0) & (gg <= kk[:, None]) & (gg > kk[:, None] - m_cap)
  ggmask = ggmask & layout.global_valid[gg_c]
  kw = jnp.concatenate([jnp.take(k, ridx_c, axis=1), jnp.take(kg, gg_c, axis=1)], axis=2)
  vw = jnp.concatenate([jnp.take(v, ridx_c, axis=1), jnp.take(vg, gg_c, axis=1)], axis=2)
  kwseg = jnp.concatenate([jnp.take(seg, ridx_c, axis=1), jnp.take(gseg, gg_c, axis=1)], axis=2)
  wmask = jnp.concatenate([rmask, ggmask], axis=-1)[None] & (gseg[:, :, None] == kwseg)
  qgb = qg.reshape(b_, ng, 1, kh, gq, dh)
  gout, glse = attend(qgb, kw, vw, wmask[:, :, None, :])
  return (out, lse), (gout.reshape(b_, ng, h, dh), glse.reshape(b_, ng, h))
