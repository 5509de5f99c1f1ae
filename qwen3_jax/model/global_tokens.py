"""Documents and their global tokens: where a chunk's tokens sit, and the insertion of globals.

Documents. A document is a maximal run of equal, nonzero segment ids in a row (segment id 0
is padding). A token's document offset p counts from its document's first token (0, 1, ...;
with a KV cache it continues across chunks while the segment id does not change). These are
the default RoPE positions (`default_positions`, `Layout.offset`), but global placement uses
the offsets, not the positions given.

Global tokens. When some layer is sparse (`global_every`), a learnable global token sits, in
the causal order, immediately *before* each real token of document offset p = 0, g, 2g, ...
(g = `AttentionConfig.global_every`); it is number j = p / g of its document, takes that
token's RoPE position and segment, and belongs to that document. Padding gets none. It takes
part in every layer and its output is dropped; full layers see it as an ordinary earlier
position of its document, sparse layers see the `max_globals` most recent of the query's
document (the visibility rule is in `sparse_attention.py`). Placement therefore depends only
on the document, never on where the document sits in a packed row: the same document gives
the same logits at any row offset.

Two streams per chunk. The model works on L real tokens at slots start..start+L-1 (slot =
position in the row's token stream, the KV cache length at the chunk's start) followed along
the sequence axis by Ng global slots per row: row r's globals in causal order, then unused
slots (`insert_globals`). `Layout` records, per row, where each global goes.

Static bound on global slots. A piece of n tokens of one document holds at most ceil(n / g)
multiples of g among its offsets, whatever offset it starts at; a chunk of L tokens holding at
most D documents (pieces) therefore needs at most

  Ng = min(L, floor((L + D * (g - 1)) / g))    [= ceil(L / g) when D = 1]

global slots per row (`global_slots`; tight: D pieces of lengths = 1 mod g reach it). D is
`AttentionConfig.max_docs_per_row` (0 = no cap: D = L), or 1 when the caller passes no
segment ids. A row with more documents than D raises (`check_documents`), so a global is never
silently dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax.config import ModelConfig

_FAR = -(1 << 30)  # Before any slot.


def global_every(cfg: ModelConfig) -> int:
  """g of the model: global tokens exist only when some layer is sparse (0 = none)."""
  att = cfg.attention
  return att.global_every if att.uses_sparse else 0


def global_slots(num_real: int, every: int, max_docs: int) -> int:
  """Ng, the global slots a row of a chunk needs (module docstring).

  Args:
    num_real: L, real tokens in the chunk.
    every: g (0 = no global tokens).
    max_docs: D, most documents (pieces) in one row of the chunk; <= 0 or > L means L.
  """
  if not every:
    return 0
  d = num_real if max_docs <= 0 else min(max_docs, num_real)
  return min(num_real, (num_real + d * (every - 1)) // every)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the real and global tokens of one chunk sit, per row (static + traced).

  Attributes:
    num_real: L, real tokens in the chunk (static).
    num_globals: Ng global slots per row (static; 0 without globals), see `global_slots`.
    every: g, global_every (0 = no globals).
    max_docs: D, documents a row of the chunk may hold (static, 1 <= D <= L).
    start: [B] int32 (or a scalar for every row), slot of each row's first real token in the
      chunk (the row's KV cache length; 0 without a cache).
    glob_start: [B] int, global tokens each row held before the chunk (0 without a cache).
    offset: [B, L] int32 document offset of each real token.
    count: [B, L] int32 newest global number of its document a real token sees (offset // g).
    seen: [B, L] int32 the row's global slots at or before each real token (inclusive).
    docs: [B] int32 documents (pieces) in each row of the chunk.
    glob_offset: [B, Ng] chunk offset of the real token each global slot precedes; L for an
      unused slot (a row's globals come first, in causal order).
    glob_number: [B, Ng] the global's number j within its document.
    glob_valid: [B, Ng] bool, the slot holds a global.
    num_tokens: [B] int32 tokens each row of the chunk carries: its first ones; the rest of
      the row is not a token (no globals; a KV cache neither stores nor counts it).
  """

  num_real: int
  num_globals: int
  every: int
  max_docs: int
  start: jax.Array | int
  glob_start: jax.Array | int
  offset: jax.Array
  count: jax.Array
  seen: jax.Array
  docs: jax.Array
  glob_offset: jax.Array
  glob_number: jax.Array
  glob_valid: jax.Array
  num_tokens: jax.Array

  @property
  def row_start(self) -> jax.Array:  # [B, 1] or [1, 1]
    return jnp.reshape(jnp.asarray(self.start, jnp.int32), (-1, 1))

  @property
  def real_slots(self) -> jax.Array:  # [B, L] (or [1, L] for a scalar start)
    return self.row_start + jnp.arange(self.num_real, dtype=jnp.int32)

  @property
  def glob_slots(self) -> jax.Array:  # [B, Ng] slot of the real token after each global
    return self.row_start + self.glob_offset


def make_layout(
  seg,
  every: int,
  max_docs: int = 0,
  *,
  start=0,
  prev_seg=None,
  prev_offset=None,
  prev_globals=0,
  num_tokens=None,
) -> Layout:
  """The chunk's documents and the global slots of each row.

  Args:
    seg: [B, L] int segment ids of the chunk's real tokens (0 = padding, ids >= 0).
    every: g; 0 = no global tokens.
    max_docs: D, documents (pieces) a row of the chunk may hold; 0 = no cap (D = L).
    start: [B] (or []) slot of each row's first token (the KV cache lengths).
    prev_seg: [B] segment id of each row's token before the chunk (None or -1: none).
    prev_offset: [B] document offset the chunk's first token has if it continues that
      segment (None: 0).
    prev_globals: [B] global tokens each row already holds (the cache's ring position).
    num_tokens: [B] tokens each row carries (None: all L); the rest count as padding here.
  Returns:
    A `Layout`. A row holding more than D documents would get wrong global slots:
    `check_documents(layout)` raises for it (the model runs it).
  """
  b, l = seg.shape
  seg = seg.astype(jnp.int32)
  idx = jnp.arange(l, dtype=jnp.int32)
  if num_tokens is None:
    num_tokens = jnp.full((b,), l, jnp.int32)
  else:
    num_tokens = jnp.asarray(num_tokens, jnp.int32)
    seg = jnp.where(idx[None, :] < num_tokens[:, None], seg, 0)
  prev_seg = jnp.full((b,), -1, jnp.int32) if prev_seg is None else prev_seg
  prev_offset = jnp.zeros((b,), jnp.int32) if prev_offset is None else prev_offset
  before = jnp.concatenate([prev_seg[:, None].astype(jnp.int32), seg[:, :-1]], axis=1)
  new = seg != before  # [B, L] a document (or a padding run) starts here
  # Run start as a chunk offset; -prev_offset for the run that continues the cached one.
  run_start = jnp.maximum(
    jax.lax.cummax(jnp.where(new, idx, _FAR), axis=1), -prev_offset[:, None].astype(jnp.int32)
  )
  offset = idx - run_start  # [B, L]
  docs = jnp.sum((new | (idx == 0)) & (seg != 0), axis=1, dtype=jnp.int32)  # [B]
  d = l if max_docs <= 0 else min(max_docs, l)
  ng = global_slots(l, every, d)
  g = max(every, 1)
  needs = (seg != 0) & (offset % g == 0) & (every > 0)  # [B, L] a global precedes this token
  seen = jnp.cumsum(needs, axis=1, dtype=jnp.int32)
  rank = jnp.where(needs, seen - 1, ng)  # ng: out of range, dropped
  goff = jax.vmap(lambda r: jnp.full((ng,), l, jnp.int32).at[r].set(idx, mode="drop"))(rank)
  goff = goff if ng else jnp.zeros((b, 0), jnp.int32)
  valid = goff < l
  gnum = jnp.take_along_axis(offset, jnp.clip(goff, 0, l - 1), axis=1) // g
  return Layout(
    num_real=l,
    num_globals=ng,
    every=every,
    max_docs=d,
    start=start,
    glob_start=prev_globals,
    offset=offset,
    count=offset // g,
    seen=seen,
    docs=docs,
    glob_offset=goff,
    glob_number=jnp.where(valid, gnum, -1),
    glob_valid=valid,
    num_tokens=num_tokens,
  )


def _documents_error(docs, max_docs: int, num_real: int) -> str:
  return (
    f"sparse attention: a row holds {int(docs.max())} documents (runs of one nonzero segment "
    f"id) in a chunk of {num_real} tokens, more than attention.max_docs_per_row={max_docs}, "
    f"which sizes the global-token slots per row; raise attention.max_docs_per_row (0 = no "
    f"cap) or cap the packer's documents per row (data.max_docs_per_row). Documents per row: "
    f"{docs.tolist()}"
  )


def check_documents(layout: Layout) -> None:
  """Raises if some row holds more documents than the layout's global slots were sized for.

  With concrete segment ids this raises `ValueError` now; under `jit` it adds a host callback
  that raises when the program runs (surfacing as a runtime error carrying the same message).
  Nothing is added when the bound cannot be exceeded (no globals, or D = L).
  """
  if not layout.num_globals or layout.max_docs >= layout.num_real:
    return
  d, l = layout.max_docs, layout.num_real

  def check(docs):
    docs = np.asarray(docs)
    if docs.max(initial=0) > d:
      raise ValueError(_documents_error(docs, d, l))

  if isinstance(layout.docs, jax.core.Tracer):
    jax.debug.callback(check, layout.docs)
  else:
    check(layout.docs)


def chunk_layout(
  cfg: ModelConfig, seg: jax.Array, *, one_document: bool, cache: Any = None, num_tokens=None
) -> Layout:
  """The `Layout` of one chunk of the model's input, checked (`check_documents`).

  Args:
    seg: [B, L] int32 segment ids of the chunk's real tokens.
    one_document: the caller gave no segment ids (D = 1; else `max_docs_per_row`).
    cache: the model's `kv_cache.KVCache` or None; its length and each row's last segment,
      document offset and global count continue the rows' documents into the chunk.
    num_tokens: [B] tokens each row carries (None: all), see `Layout.num_tokens`.
  """
  g = global_every(cfg)
  max_docs = 1 if one_document else cfg.attention.max_docs_per_row
  if cache is None:
    layout = make_layout(seg, g, max_docs, num_tokens=num_tokens)
  else:
    layout = make_layout(
      seg,
      g,
      max_docs,
      start=cache.length,
      prev_seg=cache.seg,
      prev_offset=cache.offset,
      prev_globals=cache.globals,
      num_tokens=num_tokens,
    )
  check_documents(layout)
  return layout


def insert_globals(x, embedding, positions, seg, layout: Layout):
  """Appends a chunk's global slots after its real tokens (the two streams of the docstring).

  Args:
    x: [B, L, D] real tokens' embeddings; embedding: [1, D] the learnable global token.
    positions: [B, L] RoPE positions; seg: [B, L] int32 segment ids; layout: the chunk's.
  Returns:
    (x [B, L + Ng, D], positions [B, L + Ng], seg [B, L + Ng]): each global slot holds the
    global token with the position and segment of the real token it precedes; unused slots
    get segment 0. Unchanged when the layout has no global slots.
  """
  if not layout.num_globals:
    return x, positions, seg
  b, l = seg.shape
  off = jnp.clip(layout.glob_offset, 0, l - 1)  # [B, Ng] the real token after each global
  xg = jnp.broadcast_to(embedding.astype(x.dtype), (b, layout.num_globals, x.shape[-1]))
  gpos = jnp.take_along_axis(positions, off, axis=1)
  gseg = jnp.where(layout.glob_valid, jnp.take_along_axis(seg, off, axis=1), 0)
  return (
    jnp.concatenate([x, xg], axis=1),
    jnp.concatenate([positions, gpos], axis=1),
    jnp.concatenate([seg, gseg], axis=1),
  )


def default_positions(tokens: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """0..L-1 per row, restarting at every segment boundary when segment_ids are given.

  The model's default positions (`Layout.offset`, which also continues a cached document).
  """
  b, l = tokens.shape
  idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  if segment_ids is None:
    return idx
  start = jnp.concatenate(
    [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  seg_start = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return idx - seg_start
