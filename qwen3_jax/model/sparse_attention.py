"""Causal sliding-window + global-token attention, computed blockwise (sub-quadratic).

Documents, the placement of global tokens and the chunk's two streams (L real tokens at slots
start..start+L-1, then Ng global slots per row) are defined in `global_tokens.py`; this module
is the attention over them. Every rule below is stated with, per query, three integers and its
segment:

  anchor a: the last real slot the query may see (a = t for real slot t, a = u - 1 for the
            global before real slot u: the real tokens strictly before it);
  time e:   the real slot at or after the query (e = t for real slot t, e = u for the global
            before slot u);
  count c:  the newest global number of its document it may see (c = p // g for a real token
            of document offset p, c = j for global j: itself).

A key is visible to a query iff it is valid, in the same segment, and
  real key at slot s:                 a - w < s <= a   (w = `window` real keys, itself included)
  global key before slot u', number i: u' <= e and c - M < i <= c   (M = `max_globals`)
i.e. the last w real tokens and the M most recent globals of the query's own document.
Full attention is the same rule with w = M = infinity: every earlier position (real or global)
of the query's document. Globals are never part of the window band, so nothing is counted
twice; a global sees only what precedes it and only later queries see it (causality holds in
the interleaved order).

Blockwise cost for real queries: each block of b queries reads ceil((w-1)/b)+1 key blocks
plus one contiguous run of M + floor((b - 1 + min(D, b - 1) * (g - 1)) / g) global slots (the M
most recent at the block's first query and those the next b - 1 queries add; D documents per
row, `global_tokens.py`): O(L * (w + b + M + min(D, b))) compute and memory. Global queries
read a gathered window of w real keys and M globals: O(Ng * (w + M)). No L x L array exists
anywhere when M is finite (M = 0 means "all globals": quadratic). Shape letters: B batch,
N blocks, Q queries per block, S keys, K kv heads, G q heads per kv head, Dh head dim,
Ng global slots per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3_jax.model.global_tokens import Layout

NEG_INF = -1e30  # Large finite negative: fully masked rows stay NaN-free.
INF_SPAN = 1 << 30  # "Unlimited" window / global cap.


def _rows(x, idx):
  """Per-row gather: x [B, N, ...], idx [B, ...] ints in [0, N) -> [B, *idx.shape[1:], ...]."""
  return jax.vmap(lambda a, i: a[i])(x, idx)


def visible(q_meta, k_meta, window, max_globals):
  """The visibility rule of the module docstring, broadcast over any leading shape.

  Args:
    q_meta: (anchor, time, count, seg), each [..., Q, 1] ints.
    k_meta: (is_global [..., 1, S] bool, slot, number, seg [..., 1, S] ints, valid
      [..., 1, S] bool); slot of a global = the slot of the real token after it.
    window, max_globals: ints (INF_SPAN for unlimited).
  Returns:
    [..., Q, S] bool.
  """
  anchor, time, count, q_seg = q_meta
  k_global, k_slot, k_number, k_seg, k_valid = k_meta
  real_ok = (k_slot <= anchor) & (k_slot > anchor - window)
  glob_ok = (k_slot <= time) & (k_number <= count) & (k_number > count - max_globals)
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
    q_meta: (anchor, time, count, seg), each [B, Q]; k_meta: (is_global [S], slot [B, S],
      number [B, S], seg [B, S], valid [B, S]); see `visible`.
  Returns:
    out [B, Q, H, Dh] float32, lse [B, Q, H].
  """
  b, nq, h, dh = q.shape
  kh = k.shape[2]
  is_g, *k_rest = k_meta
  mask = visible(
    tuple(x[:, :, None] for x in q_meta),
    (is_g[None, None, :],) + tuple(x[:, None, :] for x in k_rest),
    window,
    max_globals,
  )  # [B, Q, S]
  qr = q.reshape(b, 1, nq, kh, h // kh, dh)
  out, lse = attend(qr, k[:, None], v[:, None], mask[:, None])
  return out.reshape(b, nq, h, dh), lse.reshape(b, nq, h)


# `cache_attention` reads only a prefix of the cache that holds every visible key: the whole
# cache, or its first S / 2, S / 4, .. slots, down to this many.
MIN_CACHE_PREFIX = 128


def cache_attention(q, kt, v, q_meta, k_meta, window, max_globals):
  """`dense_attention` against keys and values in the KV cache's layout (`kv_cache.py`).

  The two matmuls read kt and v as stored, batched over (B, K) with the G query heads of a kv
  head and the Q queries folded into one dim: no [B, S, K, Dh] -> [B, K, .., S] transpose of
  the cache (which a decode step would otherwise pay for every layer). Only the shortest of
  the prefixes S, S / 2, S / 4, .. (>= MIN_CACHE_PREFIX) that holds every visible key is read
  (a `lax.switch`): a full layer's entry i holds slot i, so early in a sequence most of a
  large cache is never touched.

  Args:
    q: [B, Q, H, Dh] (already scaled); kt: [B, K, Dh, S] keys; v: [B, K, S, Dh] values;
    q_meta, k_meta: as for `dense_attention` (S keys).
  Returns:
    out [B, Q, H, Dh] float32 (zero for queries with no visible key), lse [B, Q, H] float32
    (NEG_INF for those).
  """
  is_g, *k_rest = k_meta
  mask = visible(
    tuple(x[:, :, None] for x in q_meta),
    (is_g[None, None, :],) + tuple(x[:, None, :] for x in k_rest),
    window,
    max_globals,
  )  # [B, Q, S]
  s = kt.shape[-1]
  sizes = [s]
  while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= MIN_CACHE_PREFIX:
    sizes.append(sizes[-1] // 2)
  if len(sizes) == 1:
    return _attend_cache(q, kt, v, mask)
  # The last index any query sees, and the number of halvings that still cover it.
  last = jnp.max(jnp.where(jnp.any(mask, axis=(0, 1)), jnp.arange(s), 0))
  halvings = jnp.sum(last < jnp.asarray(sizes[1:]))
  branches = [lambda n=n: _attend_cache(q, kt[..., :n], v[:, :, :n], mask[..., :n]) for n in sizes]
  return jax.lax.switch(halvings, branches)


def _attend_cache(q, kt, v, mask):
  """The attention of `cache_attention` over all S keys of kt [B, K, Dh, S], v [B, K, S, Dh]
  with mask [B, Q, S]."""
  b, nq, h, dh = q.shape
  kh = kt.shape[1]
  g = h // kh
  qt = q.reshape(b, nq, kh, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, kh, nq * g, dh)
  logits = jnp.einsum("bkqd,bkds->bkqs", qt, kt, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, kh, nq, g, -1)  # [B, K, Q, G, S]
  m = mask[:, None, :, None, :]
  logits = jnp.where(m, logits, NEG_INF)
  mx = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  p = jnp.exp(logits - mx)  # masked entries: exp(-1e30 - mx) = 0; all-masked rows: 1
  ssum = jnp.sum(p, axis=-1, keepdims=True)
  probs = (p / ssum).astype(v.dtype).reshape(b, kh, nq * g, -1)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v, preferred_element_type=jnp.float32)
  out = out.reshape(b, kh, nq, g, dh).transpose(0, 2, 1, 3, 4)  # [B, Q, K, G, Dh]
  lse = (jnp.log(ssum) + mx)[..., 0].transpose(0, 2, 1, 3)  # [B, Q, K, G]
  any_key = jnp.any(mask, axis=-1)  # [B, Q]
  out = jnp.where(any_key[..., None, None, None], out, 0.0)
  lse = jnp.where(any_key[..., None, None], lse, NEG_INF)
  return out.reshape(b, nq, h, dh), lse.reshape(b, nq, h)


def chunk_meta(layout: Layout, seg, gseg):
  """Query and key metadata (see `visible`) of a chunk's real tokens followed by its globals.

  Args:
    seg: [B, L]; gseg: [B, Ng].
  Returns:
    q_meta (anchor, time, count, seg), each [B, L + Ng]; k_meta (is_global [L + Ng], slot,
    number, seg, valid, each [B, L + Ng]).
  """
  b = seg.shape[0]
  t = jnp.broadcast_to(layout.real_slots, (b, layout.num_real))
  u = layout.glob_slots
  slot = jnp.concatenate([t, u], axis=1)
  anchor = jnp.concatenate([t, u - 1], axis=1)
  count = jnp.concatenate([layout.count, layout.glob_number], axis=1)
  is_g = jnp.arange(layout.num_real + layout.num_globals) >= layout.num_real
  valid = jnp.concatenate([jnp.ones_like(t, bool), layout.glob_valid], axis=1)
  seg_all = jnp.concatenate([seg, gseg], axis=1)
  return (anchor, slot, count, seg_all), (is_g, slot, count, seg_all, valid)


def _pad_axis1(x, front, back, value=0):
  pad = [(0, 0)] * x.ndim
  pad[1] = (front, back)
  return jnp.pad(x, pad, constant_values=value)


def sparse_attention(q, k, v, seg, qg, kg, vg, gseg, layout, window, max_globals, block):
  """Blockwise sliding-window + globals attention within one chunk.

  Args:
    q: [B, L, H, Dh] real queries (scaled); k, v: [B, L, K, Dh]; seg: [B, L] ints.
    qg: [B, Ng, H, Dh] global queries; kg, vg: [B, Ng, K, Dh]; gseg: [B, Ng] (Ng may be 0),
      in the layout's per-row global slot order.
    layout: the chunk's Layout; window w >= 1; max_globals M (0 = all); block b.
  Returns:
    (out [B, L, H, Dh], lse [B, L, H]) for real queries and the same for global queries
    (None without globals), float32. Unused global slots give arbitrary finite values.
  """
  b_, l, h, dh = q.shape
  kh = k.shape[2]
  gq = h // kh
  w, m_cap = spans(window, max_globals)
  bs = min(block, l)
  nb = -(-l // bs)
  lp = nb * bs
  num_prev_blocks = min(-(-(w - 1) // bs), nb - 1)  # previous key blocks covering the window
  # --- real queries: the band of own + num_prev_blocks previous key blocks. [B, N, b, ...]
  qb = _pad_axis1(q, 0, lp - l).reshape(b_, nb, bs, kh, gq, dh)
  qseg = _pad_axis1(seg, 0, lp - l, -1).reshape(b_, nb, bs)

  def band(x, value=0):  # [B, L, ...] -> [B, N, (num_prev_blocks+1)*b, ...]
    xp = _pad_axis1(x, num_prev_blocks * bs, lp - l, value)
    xp = xp.reshape((b_, num_prev_blocks + nb, bs) + x.shape[2:])
    return jnp.concatenate([xp[:, i : i + nb] for i in range(num_prev_blocks + 1)], axis=2)

  kb, vb, kseg = band(k), band(v), band(seg, -1)
  qo = jnp.arange(nb)[:, None] * bs + jnp.arange(bs)[None, :]  # [N, b] chunk offsets
  ko = (jnp.arange(nb)[:, None] - num_prev_blocks) * bs + jnp.arange((num_prev_blocks + 1) * bs)[
    None, :
  ]
  mask = (
    (ko[:, None, :] <= qo[:, :, None])
    & (ko[:, None, :] > qo[:, :, None] - w)
    & (ko[:, None, :] >= 0)
    & (ko[:, None, :] < l)
  )[None] & (qseg[..., :, None] == kseg[..., None, :])  # [B, N, b, S1]
  ng = layout.num_globals
  if ng:
    g = layout.every
    seen_globals = min(m_cap, ng)
    # Globals one query block can see: the seen_globals most recent at its first query plus those
    # placed before its other b - 1 queries (at most min(D, b - 1) documents start there).
    d_blk = min(layout.max_docs, bs - 1)
    globals_per_block = min(seen_globals + (bs - 1 + d_blk * (g - 1)) // g, ng)
    if globals_per_block == ng:
      gidx = jnp.broadcast_to(jnp.arange(ng), (b_, nb, ng))
    else:
      lo = layout.seen[:, ::bs] - seen_globals  # [B, N]
      gidx = lo[..., None] + jnp.arange(globals_per_block)  # [B, N, globals_per_block] global slot
    inside = (gidx >= 0) & (gidx < ng)
    gidx_c = jnp.clip(gidx, 0, ng - 1).reshape(b_, nb * globals_per_block)

    def pick(x):  # [B, Ng, ...] -> [B, N, globals_per_block, ...]
      return _rows(x, gidx_c).reshape((b_, nb, globals_per_block) + x.shape[2:])

    query_count = _pad_axis1(layout.count, 0, lp - l).reshape(b_, nb, bs)[..., None]  # [B, N, b, 1]
    jn = pick(layout.glob_number)[:, :, None, :]  # [B, N, 1, globals_per_block]
    gmask = (
      (inside & pick(layout.glob_valid))[:, :, None, :]
      & (pick(layout.glob_offset)[:, :, None, :] <= qo[None, :, :, None])
      & (jn <= query_count)
      & (jn > query_count - m_cap)
      & (qseg[..., :, None] == pick(gseg)[:, :, None, :])
    )
    kb = jnp.concatenate([kb, pick(kg)], axis=2)
    vb = jnp.concatenate([vb, pick(vg)], axis=2)
    mask = jnp.concatenate([mask, gmask], axis=-1)
  out, lse = attend(qb, kb, vb, mask)
  out = out.reshape(b_, lp, h, dh)[:, :l]
  lse = lse.reshape(b_, lp, h)[:, :l]
  if not ng:
    return (out, lse), None
  # --- global queries: gathered window of real keys before each global + recent globals.
  anchor = layout.glob_offset - 1  # [B, Ng] anchor as a chunk offset
  window_len = min(w, l)
  ridx = (
    anchor[..., None] - window_len + 1 + jnp.arange(window_len) if window_len < l else jnp.arange(l)
  )
  ridx = jnp.broadcast_to(ridx, (b_, ng, window_len))
  ridx_c = jnp.clip(ridx, 0, l - 1).reshape(b_, ng * window_len)
  rmask = (
    (ridx >= 0) & (ridx <= anchor[..., None]) & (ridx > anchor[..., None] - w)
  )  # [B, Ng, window_len]

  def window_of(x):  # [B, L, ...] -> [B, Ng, window_len, ...]
    return _rows(x, ridx_c).reshape((b_, ng, window_len) + x.shape[2:])

  mg = min(m_cap, ng)
  global_slot = jnp.arange(ng)
  visible_slot = (
    global_slot[:, None] - mg + 1 + jnp.arange(mg)[None, :] if mg < ng else global_slot[None, :]
  )
  visible_slot = jnp.broadcast_to(
    visible_slot, (ng, mg)
  )  # a global's own and earlier slots (same row)
  gg_c = jnp.clip(visible_slot, 0, ng - 1)
  jq = layout.glob_number[:, :, None]  # [B, Ng, 1]
  jk = jnp.take(layout.glob_number, gg_c, axis=1)  # [B, Ng, mg]
  visible_mask = (
    ((visible_slot >= 0) & (visible_slot <= global_slot[:, None]))[None]
    & (jk <= jq)
    & (jk > jq - m_cap)
  )
  visible_mask = visible_mask & jnp.take(layout.glob_valid, gg_c, axis=1)
  kw = jnp.concatenate([window_of(k), jnp.take(kg, gg_c, axis=1)], axis=2)
  vw = jnp.concatenate([window_of(v), jnp.take(vg, gg_c, axis=1)], axis=2)
  kwseg = jnp.concatenate([window_of(seg), jnp.take(gseg, gg_c, axis=1)], axis=2)
  wmask = jnp.concatenate([rmask, visible_mask], axis=-1) & (gseg[:, :, None] == kwseg)
  qgb = qg.reshape(b_, ng, 1, kh, gq, dh)
  gout, glse = attend(qgb, kw, vw, wmask[:, :, None, :])
  return (out, lse), (gout.reshape(b_, ng, h, dh), glse.reshape(b_, ng, h))
