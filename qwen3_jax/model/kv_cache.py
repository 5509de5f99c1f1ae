"""KV cache for decoding: ring buffers of keys/values per layer, plus the global tokens' K/V.

Layout of one layer's cache (a dict; leaves get a leading [R] repeat axis in `KVCache`):
  k, v:   [B, S, K, Dh]  real tokens' keys/values; slot t lives at index t % S (K here is
          K * tp / K = tp heads when a tensor axis tp > K repeats them: `init_cache`)
  seg:    [B, S] int32   their segment ids (-1 = never written)
  gk, gv: [B, Gs, K, Dh] global tokens' keys/values; global number j at index j % Gs
  gseg:   [B, Gs] int32  (only when the model has global tokens)
Capacities: a `full` layer keeps everything (S = max_len, Gs = ceil(max_len / g)); a `sparse`
layer keeps a ring of its window (S = min(w, max_len)) and of its global cap (Gs = min(M,
ceil(max_len / g)), all globals when M = 0). Which slot or global number an entry holds is not
stored: it follows from `KVCache.length` (the number of real tokens written so far), because
every chunk writes consecutive slots starting at `length`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwen3_jax.config import ModelConfig
from qwen3_jax.model.sparse_attention import Layout
from qwen3_jax.sharding import constrain

KV_AXES = ("batch", None, "kv_heads", None)  # [B, S, K, Dh]: rows over data, heads over tensor


@dataclasses.dataclass
class KVCache:
  """Decoding state of a Qwen3 model; pass it to `Qwen3.__call__(..., cache=cache)`.

  Attributes:
    length: [] int32, real tokens processed so far = slot of the next token (same for every
      row; left-pad prompts with segment id 0 to align rows).
    layers: one dict per sub-layer of the scanned unit (see `layer_period`), leaves with a
      leading [R] (repeats) axis; see the module docstring for the keys.
  """

  length: jax.Array
  layers: tuple[dict[str, jax.Array], ...]


jax.tree_util.register_dataclass(KVCache, data_fields=["length", "layers"], meta_fields=[])


def global_every(cfg: ModelConfig) -> int:
  """g of the model: global tokens exist only when some layer is sparse."""
  att = cfg.attention
  return att.global_every if att.uses_sparse else 0


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
  """Empty cache of one sub-layer, stacked over `repeats`, with `kv_heads` heads (default
  K; more when attention repeats kv heads over a larger tensor axis)."""
  s, gs = capacities(cfg, kind, max_len)
  kh, dh = kv_heads or cfg.num_key_value_heads, cfg.head_dim
  out = {
    "k": jnp.zeros((repeats, batch, s, kh, dh), dtype),
    "v": jnp.zeros((repeats, batch, s, kh, dh), dtype),
    "seg": jnp.full((repeats, batch, s), -1, jnp.int32),
  }
  if gs:
    out["gk"] = jnp.zeros((repeats, batch, gs, kh, dh), dtype)
    out["gv"] = jnp.zeros((repeats, batch, gs, kh, dh), dtype)
    out["gseg"] = jnp.full((repeats, batch, gs), -1, jnp.int32)
  return out


def _ring_index(count, cap: int) -> jax.Array:
  """Which item number (slot / global number) each ring entry holds after `count` writes."""
  s = jnp.arange(cap, dtype=jnp.int32)
  return s + cap * ((count - 1 - s) // cap)  # < 0: never written


def key_meta(layer: dict, length, every: int):
  """(keys, values, (is_global [S], index [S], seg [B, S], valid [S])) of a layer's cache."""
  t = _ring_index(length, layer["k"].shape[1])
  k, v, seg = layer["k"], layer["v"], layer["seg"]
  is_g = jnp.zeros_like(t, bool)
  index = t
  if "gk" in layer:
    j = _ring_index((length + every - 1) // every, layer["gk"].shape[1])
    k = jnp.concatenate([k, layer["gk"]], axis=1)
    v = jnp.concatenate([v, layer["gv"]], axis=1)
    seg = jnp.concatenate([seg, layer["gseg"]], axis=1)
    is_g = jnp.concatenate([is_g, jnp.ones_like(j, bool)])
    index = jnp.concatenate([t, j])
  return k, v, (is_g, index, seg, index >= 0)


def write(layer: dict, k, v, seg, kg, vg, gseg, layout: Layout) -> dict:
  """Writes a chunk's K/V into the rings; only the newest S (Gs) items of the chunk are kept.

  Args:
    k, v: [B, L, K, Dh]; seg: [B, L]; kg, vg: [B, Ng, K, Dh]; gseg: [B, Ng].
  """
  out = dict(layer)
  cap = layer["k"].shape[1]
  t = layout.real_slots
  end = layout.start + layout.num_real
  idx = jnp.where(t >= end - cap, t % cap, cap)  # cap = out of range -> dropped
  out["k"] = layer["k"].at[:, idx].set(k.astype(layer["k"].dtype), mode="drop")
  out["v"] = layer["v"].at[:, idx].set(v.astype(layer["v"].dtype), mode="drop")
  out["seg"] = layer["seg"].at[:, idx].set(seg.astype(jnp.int32), mode="drop")
  if "gk" in layer and layout.num_globals:
    gcap = layer["gk"].shape[1]
    j = layout.global_numbers
    last = (end + layout.every - 1) // layout.every - 1  # newest global number written
    gidx = jnp.where(layout.global_valid & (j > last - gcap), j % gcap, gcap)
    out["gk"] = layer["gk"].at[:, gidx].set(kg.astype(layer["gk"].dtype), mode="drop")
    out["gv"] = layer["gv"].at[:, gidx].set(vg.astype(layer["gv"].dtype), mode="drop")
    out["gseg"] = layer["gseg"].at[:, gidx].set(gseg.astype(jnp.int32), mode="drop")
  for name in ("k", "v", "gk", "gv"):
    if name in out:
      out[name] = constrain(out[name], KV_AXES)
  return out
