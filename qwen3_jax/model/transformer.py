"""Qwen3 decoder: blocks, scanned layer stack, LM head.

Layers are grouped into a repeating `LayerGroup` of `period` layers (the smallest period of
the per-layer structure: attention kind x MoE-or-dense), and the group is stacked `repeats`
times with a leading parameter axis and run with `jax.lax.scan`: one compiled group, not L
copies. Layer i lives at `layers.sub_{i % period}` in repeat `i // period`. A structure
with no period (e.g. irregular `mlp_only_layers`) has period = L and one repeat.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.config import ModelConfig, canonical_dtype
from qwen3_jax.model import kv_cache
from qwen3_jax.model.attention import Attention
from qwen3_jax.model.kv_cache import KVCache
from qwen3_jax.model.layers import MLP, Embed, RMSNorm, linear, param, vocab_param
from qwen3_jax.model.moe import MoE, aux_losses
from qwen3_jax.model.sparse_attention import Layout, check_documents, make_layout
from qwen3_jax.sharding import constrain, kv_head_repeats

# Scalars averaged over MoE layers, in `ModelOutput.aux`.
AUX_SCALARS = (
  "load_balance_loss",
  "router_z_loss",
  "dynamic_loss",
  "dropped_fraction",
  "expert_rows_ratio",
  "experts_per_token",
)
# Per-expert statistics stacked over MoE layers: [num_moe_layers, E].
AUX_PER_EXPERT = ("expert_fraction", "expert_prob", "tokens_per_expert")


@dataclasses.dataclass
class ModelOutput:
  """logits [B, L, V]; aux: scalar losses/stats and [num_moe_layers, E] router statistics;
  cache: the updated `KVCache` when one was passed in, else None; hidden: [B, L, D] final
  (normed) hidden states instead of logits (which are then None) when called with
  `return_hidden=True`, for losses that apply the head themselves (`Qwen3.head_weight`)."""

  logits: jax.Array | None
  aux: dict[str, jax.Array]
  cache: KVCache | None = None
  hidden: jax.Array | None = None


jax.tree_util.register_dataclass(
  ModelOutput, data_fields=["logits", "aux", "cache", "hidden"], meta_fields=[]
)


def layer_kinds(cfg: ModelConfig) -> list[tuple[str, bool]]:
  return [
    (cfg.attention.kind_of_layer(i), cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)
  ]


def layer_period(cfg: ModelConfig) -> int:
  """Smallest p dividing L with kinds[i] == kinds[i % p] for all layers."""
  kinds = layer_kinds(cfg)
  n = len(kinds)
  for p in range(1, n + 1):
    if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
      return p
  return n


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)); x + mlp_or_moe(norm(x))."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.self_attn = Attention(cfg, kind=cfg.attention.kind_of_layer(layer), rngs=rngs)
    self.post_attention_layernorm = RMSNorm(
      cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype
    )
    self.is_moe = cfg.is_moe_layer(layer)
    if self.is_moe:
      self.mlp = MoE(cfg, rngs=rngs)
    else:
      self.mlp = MLP(cfg, cfg.intermediate_size, rngs=rngs)

  def __call__(self, x, positions, segment_ids, layout=None, cache=None):
    """-> (x, MoE aux or None, updated attention cache or None)."""
    a, cache = self.self_attn(self.input_layernorm(x), positions, segment_ids, layout, cache)
    x = constrain(x + a, ("batch", "seq", None))
    h = self.post_attention_layernorm(x)
    if self.is_moe:
      h, aux = self.mlp(h, segment_ids)
    else:
      h, aux = self.mlp(h), None
    return constrain(x + h, ("batch", "seq", None)), aux, cache


class LayerGroup(nnx.Module):
  """`period` consecutive decoder layers: the body of the layer scan."""

  def __init__(self, cfg: ModelConfig, period: int, *, rngs: nnx.Rngs):
    for j in range(period):
      setattr(self, f"sub_{j}", DecoderLayer(cfg, j, rngs=rngs))
    self.period = period

  def __call__(self, x, positions, segment_ids, layout=None, caches=None):
    auxes, new_caches = [], []
    for j in range(self.period):
      cache = None if caches is None else caches[j]
      x, aux, cache = getattr(self, f"sub_{j}")(x, positions, segment_ids, layout, cache)
      new_caches.append(cache)
      if aux is not None:
        auxes.append(aux)
    return x, (auxes, None if caches is None else tuple(new_caches))


_REMAT = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Qwen3(nnx.Module):
  """Qwen3 / Qwen3-MoE causal LM."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.period = layer_period(cfg)
    self.repeats = cfg.num_hidden_layers // self.period
    self.embed_tokens = Embed(cfg, rngs=rngs)

    @nnx.split_rngs(splits=self.repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_groups(rngs):
      return LayerGroup(cfg, self.period, rngs=rngs)

    self.layers = make_groups(rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = vocab_param(
        rngs, cfg, (cfg.hidden_size, cfg.padded_vocab_size), ("embed", "vocab"), vocab_dim=1
      )
    if kv_cache.global_every(cfg):  # Learnable global token (sparse attention), [1, D].
      self.global_embedding = param(rngs, (1, cfg.hidden_size), (None, "embed"), cfg.param_dtype)

  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: Any = None,
    return_hidden: bool = False,
  ) -> ModelOutput:
    """tokens [B, L] int -> ModelOutput(logits [B, L, V] float32, aux, cache).

    positions default to each token's document offset: 0..L-1, restarting at each new
    segment when `segment_ids` are given, continuing the cached document with a cache.
    segment_ids: [B, L] ints, tokens attend only within their segment, 0 = padding; a
    document is a run of one nonzero id (see `sparse_attention.py`).
    cache: a `KVCache` from `init_cache`: the chunk's tokens occupy slots cache.length ..
    cache.length + L - 1, attend to everything cached before them, and the returned
    `ModelOutput.cache` holds them too (prefill: the prompt from an empty cache; decode: one
    token per call). Chunks may start and end anywhere: cached decoding in any chunking
    equals one full forward pass.
    return_hidden: give `hidden` [B, L, D] (after the final norm, compute dtype) and no
    logits; `linear(hidden, self.head_weight())[..., :V]` are the logits (before the float32
    cast; the head has Vp = `cfg.padded_vocab_size` columns).
    When some layer is sparse (and global_every = g > 0) a learnable global token is inserted
    before each document's tokens at document offsets 0, g, 2g, ... (with that token's
    position and segment) and its output dropped: it takes part in every layer, and full
    layers see it as an ordinary earlier position of its document. So a document's logits do
    not depend on where it sits in a packed row. Global slots per row are bounded by
    `attention.max_docs_per_row` (1 document per row without segment_ids); a row holding
    more documents raises (at run time under jit).
    """
    cfg = self.cfg
    tokens = constrain(tokens, ("batch", "seq"))
    b, l = tokens.shape
    if cache is not None:
      kv_cache.check_room(cfg, cache, l)
    seg = jnp.ones((b, l), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    max_docs = 1 if segment_ids is None else cfg.attention.max_docs_per_row
    g = kv_cache.global_every(cfg)
    if cache is None:
      layout = make_layout(seg, g, max_docs)
    else:
      layout = make_layout(
        seg,
        g,
        max_docs,
        start=cache.length,
        prev_seg=cache.seg,
        prev_offset=cache.offset,
        prev_globals=cache.globals,
      )
    check_documents(layout)
    if positions is None:
      positions = layout.offset
    real_seg = seg  # [B, L]
    x = self.embed_tokens(tokens)
    if layout.num_globals:
      off = jnp.clip(layout.glob_offset, 0, l - 1)  # [B, Ng] the real token after each global
      xg = jnp.broadcast_to(
        self.global_embedding[...].astype(x.dtype), (b, layout.num_globals, x.shape[-1])
      )
      x = jnp.concatenate([x, xg], axis=1)  # [B, L + Ng, D]
      gpos = jnp.take_along_axis(positions, off, axis=1)
      gseg = jnp.where(layout.glob_valid, jnp.take_along_axis(seg, off, axis=1), 0)
      positions = jnp.concatenate([positions, gpos], axis=1)
      seg = jnp.concatenate([seg, gseg], axis=1)
    x, (auxes, layers) = self._run_layers(
      x, positions, seg, layout, None if cache is None else cache.layers
    )
    if cache is not None:
      cache = kv_cache.advance(cache, layers, layout, real_seg)
    x = self.norm(x[:, :l])
    if return_hidden:
      x = constrain(x, ("batch", "seq", None))
      return ModelOutput(logits=None, aux=self._collect_aux(auxes), cache=cache, hidden=x)
    logits = linear(x, self.head_weight())  # [B, L, Vp]
    logits = constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
    if cfg.padded_vocab_size > cfg.vocab_size:  # padded ids are never real: drop them
      logits = constrain(logits[..., : cfg.vocab_size], ("batch", "seq", "vocab"))  # [B, L, V]
    return ModelOutput(logits=logits, aux=self._collect_aux(auxes), cache=cache)

  def head_weight(self) -> jax.Array:
    """The LM head as a [D, Vp] matrix in the compute dtype (embedding.T when tied); columns
    from `cfg.vocab_size` on are vocab padding, to be masked (`fused_ce`) or sliced off."""
    if self.cfg.tie_word_embeddings:
      return self.embed_tokens.embedding[...].astype(self.embed_tokens.dtype).T
    return self.lm_head[...].astype(jnp.dtype(self.cfg.dtype))

  def _run_layers(self, x, positions, segment_ids, layout: Layout, caches=None):
    """-> (x, (auxes, caches)); per-sub-layer caches travel through the scan as xs/ys."""
    graphdef, state = nnx.split(self.layers)

    def body(x, xs):
      group_state, group_caches = xs
      group = nnx.merge(graphdef, group_state)
      return group(x, positions, segment_ids, layout, group_caches)

    if self.cfg.remat != "none":
      body = jax.checkpoint(body, policy=_REMAT[self.cfg.remat], prevent_cse=False)
    if self.cfg.scanned:  # auxes: list (per sub-layer) of [R, ...] dicts
      return jax.lax.scan(body, x, (state, caches))
    outs = []
    for r in range(self.repeats):
      x, out = body(x, jax.tree.map(lambda a, r=r: a[r], (state, caches)))
      outs.append(out)
    auxes = [o[0] for o in outs]
    auxes = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes[0] else []
    new = None if caches is None else jax.tree.map(lambda *a: jnp.stack(a), *[o[1] for o in outs])
    return x, (auxes, new)

  def _collect_aux(self, auxes) -> dict[str, jax.Array]:
    cfg = self.cfg
    if not auxes:
      zero = jnp.zeros((), jnp.float32)
      out = {k: zero for k in AUX_SCALARS}
      out["aux_loss"] = zero
      return out
    # auxes[j][key]: [R, ...] for sub-layer j -> order layers as r * period + j.
    stack = {k: jnp.stack([a[k] for a in auxes], axis=1) for k in auxes[0]}  # [R, P_moe, ...]
    stack = {k: v.reshape((-1,) + v.shape[2:]) for k, v in stack.items()}  # [n_moe, ...]
    out = {k: jnp.mean(stack[k]) for k in AUX_SCALARS}
    out.update({k: stack[k] for k in AUX_PER_EXPERT})
    out.update(aux_losses(out, cfg))  # the weighted `aux_loss` (and the same terms)
    return out


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty KV cache for `batch` rows and at most `max_len` real tokens per row.

  Full layers keep all `max_len` keys, sparse layers a ring of their window (and of their
  `max_globals` global tokens). Size it for prompt + generation: writing past `max_len` into a
  model with full layers raises (a ValueError when `cache.length` is concrete; under jit the
  call fails at run time with a JaxRuntimeError naming the overflow, see
  `kv_cache.check_room`); a model with only sparse layers just keeps wrapping its rings.
  dtype defaults to the compute dtype.
  Call it under the mesh you decode on: when its tensor axis tp exceeds the kv heads K, the
  cache holds each kv head tp / K times (as attention repeats them), split over `tensor`.
  """
  if batch < 1 or max_len < 1:
    raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
  period = layer_period(cfg)
  dtype = jnp.dtype(cfg.dtype if dtype is None else canonical_dtype(dtype, "init_cache dtype"))
  kv_heads = cfg.num_key_value_heads * kv_head_repeats(cfg.num_key_value_heads)
  layers = tuple(
    kv_cache.init_layer_cache(
      cfg,
      cfg.attention.kind_of_layer(j),
      batch,
      max_len,
      cfg.num_hidden_layers // period,
      dtype,
      kv_heads,
    )
    for j in range(period)
  )
  return kv_cache.new_cache(layers, batch)


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


def moe_layer_indices(cfg: ModelConfig) -> list[int]:
  """Model layer index of each row of the stacked [num_moe_layers, E] aux statistics."""
  p = layer_period(cfg)
  subs = [j for j in range(p) if cfg.is_moe_layer(j)]
  return [r * p + j for r in range(cfg.num_hidden_layers // p) for j in subs]
