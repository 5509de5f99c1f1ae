"""Qwen3 decoder: blocks, scanned layer stack, LM head.

Layers are grouped into a repeating unit of `period` layers (the smallest period of the
per-layer structure: attention kind x MoE-or-dense), and the unit is stacked `repeats`
times with a leading parameter axis and run with `jax.lax.scan`: one compiled unit, not L
copies. Layer i lives at `layers.sub_{i % period}` in repeat `i // period`. A structure
with no period (e.g. irregular `mlp_only_layers`) has period = L and one repeat.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.config import ModelConfig
from qwen3_jax.model.attention import Attention
from qwen3_jax.model.layers import MLP, Embed, RMSNorm, param
from qwen3_jax.model.moe import MoE
from qwen3_jax.sharding import constrain

# Scalars averaged over MoE layers, in `ModelOutput.aux`.
AUX_SCALARS = (
  "load_balance_loss",
  "router_z_loss",
  "dynamic_loss",
  "dropped_fraction",
  "experts_per_token",
)
# Per-expert statistics stacked over MoE layers: [num_moe_layers, E].
AUX_PER_EXPERT = ("expert_fraction", "expert_prob", "tokens_per_expert")


@dataclasses.dataclass
class ModelOutput:
  """logits [B, L, V]; aux: scalar losses/stats and [num_moe_layers, E] router statistics."""

  logits: jax.Array
  aux: dict[str, jax.Array]


jax.tree_util.register_dataclass(ModelOutput, data_fields=["logits", "aux"], meta_fields=[])


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

  def __call__(self, x, positions, segment_ids):
    x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids)
    x = constrain(x, ("batch", "seq", None))
    h = self.post_attention_layernorm(x)
    if self.is_moe:
      h, aux = self.mlp(h, segment_ids)
    else:
      h, aux = self.mlp(h), None
    return constrain(x + h, ("batch", "seq", None)), aux


class Unit(nnx.Module):
  """`period` consecutive decoder layers: the body of the layer scan."""

  def __init__(self, cfg: ModelConfig, period: int, *, rngs: nnx.Rngs):
    for j in range(period):
      setattr(self, f"sub_{j}", DecoderLayer(cfg, j, rngs=rngs))
    self.period = period

  def __call__(self, x, positions, segment_ids):
    auxes = []
    for j in range(self.period):
      x, aux = getattr(self, f"sub_{j}")(x, positions, segment_ids)
      if aux is not None:
        auxes.append(aux)
    return x, auxes


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
    def make_units(rngs):
      return Unit(cfg, self.period, rngs=rngs)

    self.layers = make_units(rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = param(
        rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype
      )

  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: Any = None,
  ) -> ModelOutput:
    """tokens [B, L] int -> ModelOutput(logits [B, L, V] float32, aux).

    positions default to 0..L-1 (restarting at each new segment when `segment_ids` are
    given); segment_ids: [B, L] ints, tokens attend only within their segment, 0 = padding.
    """
    if cache is not None:
      raise NotImplementedError("KV-cache decoding is not implemented yet")
    cfg = self.cfg
    tokens = constrain(tokens, ("batch", "seq"))
    if positions is None:
      positions = default_positions(tokens, segment_ids)
    x = self.embed_tokens(tokens)
    x, auxes = self._run_layers(x, positions, segment_ids)
    x = self.norm(x)
    if cfg.tie_word_embeddings:
      logits = self.embed_tokens.attend(x)
    else:
      logits = jnp.einsum("bld,dv->blv", x, self.lm_head[...].astype(x.dtype))
    logits = constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
    return ModelOutput(logits=logits, aux=self._collect_aux(auxes))

  def _run_layers(self, x, positions, segment_ids):
    graphdef, state = nnx.split(self.layers)

    def body(x, unit_state):
      unit = nnx.merge(graphdef, unit_state)
      return unit(x, positions, segment_ids)

    if self.cfg.remat != "none":
      body = jax.checkpoint(body, policy=_REMAT[self.cfg.remat], prevent_cse=False)
    if self.cfg.scan_layers:
      return jax.lax.scan(body, x, state)  # auxes: list (per sub-layer) of [R, ...] dicts
    outs = []
    for r in range(self.repeats):
      x, aux = body(x, jax.tree.map(lambda a, r=r: a[r], state))
      outs.append(aux)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs[0] else []

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
    out["aux_loss"] = (
      cfg.router_aux_loss_coef * out["load_balance_loss"]
      + cfg.moe.router_z_loss_coef * out["router_z_loss"]
      + cfg.moe.dynamic_loss_coef * out["dynamic_loss"]
    )
    return out


def default_positions(tokens: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """0..L-1 per row, restarting at every segment boundary when segment_ids are given."""
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
