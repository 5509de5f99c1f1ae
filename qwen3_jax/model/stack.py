"""The decoder's layer stack: blocks, the repeating `LayerGroup`, and the scan that runs it.

The L layers are `repeats` copies of a `LayerGroup` of `period` layers (`period.py`), built
with `nnx.vmap` so each parameter has a leading [R] axis, and run with `jax.lax.scan` over
that axis (or unrolled, `cfg.scanned=False`), optionally rematerialised (`cfg.remat`). A
KV cache travels with them: one dict per sub-layer, leaves with the same leading [R] axis.

Programs that run the stack many times in a loop (decoding) unstack it first
(`unstack_groups`): R groups with their own parameter arrays, run one after the other, with a
per-layer KV cache (`kv_cache.init_cache(..., per_layer=True)`). A slice of a stacked array is
a copy on XLA:CPU, and a `while` loop keeps slices of its loop-invariant inputs inside its
body: the stacked form would copy every layer's weights and cache at every decode step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.config import ModelConfig
from qwen3_jax.model.attention import Attention
from qwen3_jax.model.global_tokens import Layout
from qwen3_jax.model.layers import MLP, RMSNorm
from qwen3_jax.model.moe import MoE
from qwen3_jax.model.period import layer_period
from qwen3_jax.sharding import constrain

_REMAT = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
    """x [B, L + Ng, D] -> (x, MoE aux or None, updated attention cache or None)."""
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
    """-> (x, (MoE auxes of the group's MoE layers, updated caches per sub-layer or None))."""
    auxes, new_caches = [], []
    for j in range(self.period):
      cache = None if caches is None else caches[j]
      x, aux, cache = getattr(self, f"sub_{j}")(x, positions, segment_ids, layout, cache)
      new_caches.append(cache)
      if aux is not None:
        auxes.append(aux)
    return x, (auxes, None if caches is None else tuple(new_caches))


def stacked_groups(cfg: ModelConfig, *, rngs: nnx.Rngs) -> LayerGroup:
  """R = L // period `LayerGroup`s as one module whose parameters have a leading [R] axis."""
  period = layer_period(cfg)

  @nnx.split_rngs(splits=cfg.num_hidden_layers // period)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make_groups(rngs):
    return LayerGroup(cfg, period, rngs=rngs)

  return make_groups(rngs)


def unstack_groups(layers: LayerGroup, cfg: ModelConfig) -> list[LayerGroup]:
  """The R groups of `stacked_groups` as R modules, each with its own parameter arrays (the
  slices [r] of the stacked ones: copies). `run_stack` runs such a list in order."""
  graphdef, state = nnx.split(layers)
  repeats = cfg.num_hidden_layers // layer_period(cfg)
  return [nnx.merge(graphdef, jax.tree.map(lambda a, r=r: a[r], state)) for r in range(repeats)]


def run_stack(
  layers: LayerGroup | Sequence[LayerGroup],
  cfg: ModelConfig,
  x: jax.Array,
  positions: jax.Array,
  segment_ids: jax.Array,
  layout: Layout,
  caches=None,
):
  """Runs the stacked groups of `stacked_groups` (or the list of `unstack_groups`) over x in
  layer order.

  Args:
    x: [B, L + Ng, D]; positions, segment_ids: [B, L + Ng]; layout: the chunk's `Layout`.
    caches: `KVCache.layers` or None: one dict per sub-layer, leaves [R, ...], for stacked
      groups; one dict per layer (layer order, no [R] axis) for a list of groups.
  Returns:
    (x, (auxes, caches)): auxes a list (per MoE sub-layer of the group) of dicts of [R, ...]
    statistics, empty without MoE layers; caches updated like `caches` (None without).
  """
  repeats = cfg.num_hidden_layers // layer_period(cfg)
  if not isinstance(layers, LayerGroup):
    return _run_groups(layers, cfg, x, positions, segment_ids, layout, caches)
  graphdef, state = nnx.split(layers)

  def body(x, xs):  # per-sub-layer caches travel through the scan as xs / ys
    group_state, group_caches = xs
    group = nnx.merge(graphdef, group_state)
    return group(x, positions, segment_ids, layout, group_caches)

  if cfg.remat != "none":
    body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=False)
  if cfg.scanned:
    return jax.lax.scan(body, x, (state, caches))
  outs = []
  for r in range(repeats):
    x, out = body(x, jax.tree.map(lambda a, r=r: a[r], (state, caches)))
    outs.append(out)
  auxes = [o[0] for o in outs]
  auxes = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes[0] else []
  new = None if caches is None else jax.tree.map(lambda *a: jnp.stack(a), *[o[1] for o in outs])
  return x, (auxes, new)


def _run_groups(groups, cfg, x, positions, segment_ids, layout, caches):
  """`run_stack` over unstacked groups, with per-layer caches (no stacking: each layer's
  cache is its own buffer, updated in place when donated)."""
  period = layer_period(cfg)
  auxes, new = [], []
  for r, group in enumerate(groups):
    group_caches = None if caches is None else tuple(caches[r * period : (r + 1) * period])
    x, (aux, group_caches) = group(x, positions, segment_ids, layout, group_caches)
    auxes.append(aux)
    new.extend(group_caches or ())
  auxes = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes[0] else []
  return x, (auxes, None if caches is None else tuple(new))
