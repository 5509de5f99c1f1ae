"""KV cache for decoding (`init_cache`): ring buffers of keys/values per layer, plus the global
tokens' K/V.

Layout of one layer's cache (a dict; leaves get a leading [R] repeat axis in `KVCache`):
  k:      [B, K, Dh, S]  real tokens' keys, transposed; v: [B, K, S, Dh] their values; slot t
                         lives at index t % S along S (K here is K * tp / K = tp heads when a
                         tensor axis tp > K repeats them: `init_cache`)
  seg:    [B, S] int32   their segment ids (-1 = never written)
  gk:     [B, K, Dh, Gs] global tokens' keys, gv: [B, K, Gs, Dh] values, per row: the row's
                         n-th global token (n counted over the row's life, `KVCache.globals`)
                         at index n % Gs
  gseg:   [B, Gs] int32  their segment ids (-1 = never written)
  gslot:  [B, Gs] int32  slot of the real token each global precedes
  gnum:   [B, Gs] int32  its number within its document (`global_tokens.py`)
The global entries exist only when the model has global tokens. Keys are kept transposed and
heads lead (B, K first) because those are the operand layouts of the two batched matmuls of
attention over the cache (queries x keys, probabilities x values): XLA:CPU then reads the
cache in place instead of transposing all of it at every decode step. Capacities: a `full` layer
keeps everything (S = max_len, Gs = ceil(max_len / g)) and writing past max_len is an error
(`check_room`), never a silent sliding window; a `sparse` layer keeps a ring of its
window (S = min(w, max_len)) and of its global cap (Gs = min(M, ceil(max_len / g)), all
globals when M = 0). A ring keeps a row's newest globals, and a query needs only the newest of
its own document (the row's last one), of which there are at most ceil(max_len / g): so these
capacities hold for rows with several documents too. Which slot a real entry holds is not
stored: it follows from the row's `KVCache.length` (the real tokens it has written so far),
because every chunk writes a row's tokens to consecutive slots starting at its length; globals
are placed per document, so rows differ and their slots and numbers are stored.

Per-layer form (`init_cache(..., per_layer=True)`, for decoding loops): `KVCache.layers` holds
one dict per layer, in layer order, without the [R] axis, to go with the unstacked layer
groups of `stack.unstack_groups` (each layer's cache its own buffer, written in place).

Per-row slots. Rows are independent: each has its own length, and a chunk may carry a
different number of tokens per row (`num_tokens` of `Qwen3.__call__`; the rest of the row's
chunk is ignored: not written, not counted). `reset` empties chosen rows, which then take a
new prompt while the others keep decoding (continuous batching).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax.config import ModelConfig, canonical_dtype
from qwen3_jax.model.global_tokens import Layout, global_every
from qwen3_jax.model.period import layer_period
from qwen3_jax.sharding import constrain, kv_head_repeats

# [B, K, Dh, S] keys, [B, K, S, Dh] values: rows over data, heads over tensor.
KV_AXES = ("batch", "kv_heads", None, None)


@dataclasses.dataclass
class KVCache:
  """Decoding state of a Qwen3 model; pass it to `Qwen3.__call__(..., cache=cache)`.

  Attributes:
    length: [B] int32, real tokens each row has processed = slot of its next token.
    layers: one dict per sub-layer of the scanned `LayerGroup` (`period.py`), leaves with a
      leading [R] (repeats) axis; or, per-layer form, one dict per layer without it. See the
      module docstring for the keys.
    seg: [B] int32 segment id of each row's last token (-1 before the first chunk).
    offset: [B] int32 document offset of each row's next token if it continues that segment.
    globals: [B] int32 global tokens each row holds so far (its global rings' write position).
  """

  length: jax.Array
  layers: tuple[dict[str, jax.Array], ...]
  seg: jax.Array
  offset: jax.Array
  globals: jax.Array


jax.tree_util.register_dataclass(
  KVCache, data_fields=["length", "layers", "seg", "offset", "globals"], meta_fields=[]
)


def init_cache(
  cfg: ModelConfig, batch: int, max_len: int, dtype=None, *, per_layer: bool = False
) -> KVCache:
  """An empty KV cache for `batch` rows and at most `max_len` real tokens per row.

  Full layers keep all `max_len` keys, sparse layers a ring of their window (and of their
  `max_globals` global tokens). Size it for prompt + generation: writing past `max_len` into a
  model with full layers raises (a ValueError when `cache.length` is concrete; under jit the
  call fails at run time with a JaxRuntimeError naming the overflow, see `check_room`); a
  model with only sparse layers just keeps wrapping its rings.
  dtype defaults to the compute dtype. per_layer: one dict per layer without the [R] axis
  (the module docstring), for a model whose layers are unstacked (`stack.unstack_groups`).
  Call it under the mesh you decode on: when its tensor axis tp exceeds the kv heads K, the
  cache holds each kv head tp / K times (as attention repeats them), split over `tensor`.
  """
  if batch < 1 or max_len < 1:
    raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
  period = layer_period(cfg)
  dtype = jnp.dtype(cfg.dtype if dtype is None else canonical_dtype(dtype, "init_cache dtype"))
  kv_heads = cfg.num_key_value_heads * kv_head_repeats(cfg.num_key_value_heads)
  if per_layer:
    layers = tuple(
      init_layer_cache(cfg, cfg.attention.kind_of_layer(i), batch, max_len, None, dtype, kv_heads)
      for i in range(cfg.num_hidden_layers)
    )
  else:
    repeats = cfg.num_hidden_layers // period
    layers = tuple(
      init_layer_cache(
        cfg, cfg.attention.kind_of_layer(j), batch, max_len, repeats, dtype, kv_heads
      )
      for j in range(period)
    )
  return KVCache(
    length=jnp.zeros((batch,), jnp.int32),
    layers=layers,
    seg=jnp.full((batch,), -1, jnp.int32),
    offset=jnp.zeros((batch,), jnp.int32),
    globals=jnp.zeros((batch,), jnp.int32),
  )


def advance(cache: KVCache, layers, layout: Layout, seg, num_tokens) -> KVCache:
  """The cache after a chunk: its layers, and each row's length / document / global state.

  Args:
    layers: the layers' updated dicts; layout: the chunk's `Layout`; seg: [B, L] its ids;
    num_tokens: [B] tokens of each row the chunk carries (its first ones; 0 = row untouched).
  """
  last = jnp.maximum(num_tokens - 1, 0)[:, None]  # [B, 1] each row's last token in the chunk
  took = num_tokens > 0
  at_last = lambda x: jnp.take_along_axis(x, last, axis=1)[:, 0]  # noqa: E731
  return KVCache(
    length=cache.length + num_tokens,
    layers=layers,
    seg=jnp.where(took, at_last(seg.astype(jnp.int32)), cache.seg),
    offset=jnp.where(took, at_last(layout.offset) + 1, cache.offset),
    globals=cache.globals + jnp.where(took, at_last(layout.seen), 0),
  )


def reset(cache: KVCache, rows) -> KVCache:
  """Empties the rows where `rows` [B] bool is true (their next chunk starts at slot 0 of a
  new document); the other rows are untouched. Stale keys need no clearing: an entry is valid
  only below its row's length (real tokens) or with a stored slot (globals, cleared here)."""
  rows = jnp.asarray(rows, bool)

  def clear(name, x):  # x [R, B, Gs] or [B, Gs] (per-layer form)
    if name not in ("gslot", "gseg"):
      return x
    return jnp.where(rows[:, None], -1, x)

  return KVCache(
    length=jnp.where(rows, 0, cache.length),
    layers=tuple({n: clear(n, x) for n, x in layer.items()} for layer in cache.layers),
    seg=jnp.where(rows, -1, cache.seg),
    offset=jnp.where(rows, 0, cache.offset),
    globals=jnp.where(rows, 0, cache.globals),
  )


def capacities(cfg: ModelConfig, kind: str, max_len: int) -> tuple[int, int]:
  """(S, Gs): real and global ring sizes of one layer of `kind` for `max_len` tokens."""
  g = global_every(cfg)
  n_glob = -(-max_len // g) if g else 0
  if kind == "full":
    return max_len, n_glob
  att = cfg.attention
  return min(att.window, max_len), min(att.max_globals or n_glob, n_glob)


def init_layer_cache(
  cfg, kind, batch, max_len, repeats, dtype, kv_heads=None
) -> dict[str, jax.Array]:
  """Empty cache of one sub-layer, stacked over `repeats` (None: one layer, no [R] axis),
  with `kv_heads` heads (default K; more when attention repeats kv heads over a larger
  tensor axis)."""
  s, gs = capacities(cfg, kind, max_len)
  kh, dh = kv_heads or cfg.num_key_value_heads, cfg.head_dim
  r = () if repeats is None else (repeats,)
  out = {
    "k": jnp.zeros((*r, batch, kh, dh, s), dtype),
    "v": jnp.zeros((*r, batch, kh, s, dh), dtype),
    "seg": jnp.full((*r, batch, s), -1, jnp.int32),
  }
  if gs:
    out["gk"] = jnp.zeros((*r, batch, kh, dh, gs), dtype)
    out["gv"] = jnp.zeros((*r, batch, kh, gs, dh), dtype)
    out["gseg"] = jnp.full((*r, batch, gs), -1, jnp.int32)
    out["gslot"] = jnp.full((*r, batch, gs), -1, jnp.int32)
    out["gnum"] = jnp.full((*r, batch, gs), -1, jnp.int32)
  return out


def _ring_index(count, cap: int) -> jax.Array:
  """Which item number (slot / global number) each ring entry holds after `count` writes."""
  s = jnp.arange(cap, dtype=jnp.int32)
  return s + cap * ((count - 1 - s) // cap)  # < 0: never written


def key_meta(layer: dict, length, written=0):
  """A layer's cached keys, values and their metadata for `sparse_attention.visible`: the
  entries of the tokens before each row's `length` (real ones and their globals).

  Args:
    layer: one sub-layer's cache dict (without the [R] axis); length: [B] each row's length
      before the current chunk; written: [B] (or 0) tokens of the current chunk already
      written to the layer (`write` before reading): their entries are marked invalid.

  Returns:
    (k [B, K, Dh, S + Gs], v [B, K, S + Gs, Dh], (is_global [S + Gs], slot, number, seg,
    valid: [B, S + Gs])).
  """
  k, v, seg = layer["k"], layer["v"], layer["seg"]
  b, s = seg.shape
  length = jnp.broadcast_to(jnp.asarray(length, jnp.int32).reshape(-1, 1), (b, 1))
  t = _ring_index(length + jnp.asarray(written, jnp.int32).reshape(-1, 1), s)  # [B, S]
  is_g = jnp.zeros((s,), bool)
  slot, number, valid = t, jnp.zeros_like(t), (t >= 0) & (t < length)
  if "gk" in layer:
    k = jnp.concatenate([k, layer["gk"]], axis=3)
    v = jnp.concatenate([v, layer["gv"]], axis=2)
    seg = jnp.concatenate([seg, layer["gseg"]], axis=1)
    is_g = jnp.concatenate([is_g, jnp.ones((layer["gseg"].shape[1],), bool)])
    slot = jnp.concatenate([slot, layer["gslot"]], axis=1)
    number = jnp.concatenate([number, layer["gnum"]], axis=1)
    gslot = layer["gslot"]  # a global before slot u is written with the chunk holding u
    valid = jnp.concatenate([valid, (gslot >= 0) & (gslot < length)], axis=1)
  return k, v, (is_g, slot, number, seg, valid)


def _set_rows(ring, idx, new):
  """ring [B, C, ...], idx [B, N] (C = dropped), new [B, N, ...] -> ring with rows set."""
  return jax.vmap(lambda r, i, x: r.at[i].set(x.astype(r.dtype), mode="drop"))(ring, idx, new)


def _set_keys(ring, idx, new):
  """ring [B, K, Dh, C] (keys), idx [B, N] (C = dropped), new [B, N, K, Dh] -> ring with the
  N entries set along C."""

  def one(r, i, x):  # [K, Dh, C], [N], [N, K, Dh]
    return r.at[:, :, i].set(x.transpose(1, 2, 0).astype(r.dtype), mode="drop")

  return jax.vmap(one)(ring, idx, new)


def _set_values(ring, idx, new):
  """ring [B, K, C, Dh] (values), idx [B, N] (C = dropped), new [B, N, K, Dh] -> ring set."""

  def one(r, i, x):  # [K, C, Dh], [N], [N, K, Dh]
    return r.at[:, i].set(x.transpose(1, 0, 2).astype(r.dtype), mode="drop")

  return jax.vmap(one)(ring, idx, new)


def write(layer: dict, k, v, seg, kg, vg, gseg, layout: Layout) -> dict:
  """Writes a chunk's K/V into the rings; only the newest S (Gs) items of each row are kept.

  Args:
    k, v: [B, L, K, Dh]; seg: [B, L]; kg, vg: [B, Ng, K, Dh]; gseg: [B, Ng] (the layout's
      per-row global slots; a row's n-th global of the chunk is its glob_start + n-th).
    Only each row's first `layout.num_tokens` tokens are written (the rest of the row's
    chunk is not a token and has no globals).
  """
  out = dict(layer)
  b, l = seg.shape
  cap = layer["seg"].shape[1]
  t = jnp.broadcast_to(layout.real_slots, (b, l))  # [B, L]
  n = layout.num_tokens[:, None]  # [B, 1]
  keep = (jnp.arange(l)[None, :] < n) & (t >= layout.row_start + n - cap)
  idx = jnp.where(keep, t % cap, cap)  # cap = out of range -> dropped
  out["k"] = _set_keys(layer["k"], idx, k)
  out["v"] = _set_values(layer["v"], idx, v)
  out["seg"] = _set_rows(layer["seg"], idx, seg.astype(jnp.int32))
  if "gk" in layer and layout.num_globals:
    gcap = layer["gseg"].shape[1]
    n = jnp.arange(layout.num_globals, dtype=jnp.int32)[None, :]  # [1, Ng]
    newest = n >= layout.seen[:, -1:] - gcap  # the chunk's newest gcap globals of each row
    pos = (layout.glob_start[:, None] + n) % gcap
    gidx = jnp.where(layout.glob_valid & newest, pos, gcap)
    out["gk"] = _set_keys(layer["gk"], gidx, kg)
    out["gv"] = _set_values(layer["gv"], gidx, vg)
    out["gseg"] = _set_rows(layer["gseg"], gidx, gseg)
    out["gslot"] = _set_rows(layer["gslot"], gidx, layout.glob_slots)
    out["gnum"] = _set_rows(layer["gnum"], gidx, layout.glob_number)
  for name in ("k", "v", "gk", "gv"):
    if name in out:
      out[name] = constrain(out[name], KV_AXES)
  return out


_RUNTIME_CHECK = contextvars.ContextVar("kv_cache_runtime_check", default=True)


@contextlib.contextmanager
def without_runtime_check():
  """Traces `check_room` without its host callback (a program for `jax.export`, which cannot
  serialise callbacks); the caller must then keep prompt + new tokens within max_len."""
  token = _RUNTIME_CHECK.set(False)
  try:
    yield
  finally:
    _RUNTIME_CHECK.reset(token)


def check_room(cfg: ModelConfig, cache: KVCache, num_new) -> None:
  """Raises if `num_new` more tokens ([B] per row, or one int for all) would overflow a full
  layer's cache (S = max_len slots) in some row.

  A full layer's ring would otherwise wrap and silently turn it into a sliding window; sparse
  layers' rings are meant to wrap and are not checked. With a concrete `cache.length` (eager
  code) this raises ValueError now. Under jit the length is traced: a host callback, run only
  when the cache overflows, raises the same message, and the jitted call fails with a
  `JaxRuntimeError` that carries it.
  """
  full = [j for j in range(len(cache.layers)) if cfg.attention.kind_of_layer(j) == "full"]
  if not full:
    return
  max_len = cache.layers[full[0]]["seg"].shape[-1]  # [R, B, S] or [B, S]

  def fail(length, new):
    length, new = np.broadcast_arrays(np.asarray(length), np.asarray(new))
    r = int(np.argmax(length + new))
    first, n = int(length[r]), int(new[r])
    raise ValueError(
      f"KV cache overflow: row {r} writes {n} token(s) at slots {first}..{first + n - 1} "
      f"but full-attention layers hold max_len={max_len} tokens; size init_cache(max_len=...) "
      "for prompt + generated tokens"
    )

  overflow = jnp.any(cache.length + num_new > max_len)
  if isinstance(overflow, jax.core.Tracer):
    if not _RUNTIME_CHECK.get():
      return
    args = (cache.length, jnp.asarray(num_new))
    jax.lax.cond(overflow, lambda: jax.debug.callback(fail, *args), lambda: None)
  elif bool(overflow):
    fail(cache.length, num_new)
