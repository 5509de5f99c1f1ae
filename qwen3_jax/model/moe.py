"""Sparse Mixture-of-Experts layer: router, auxiliary losses and dispatch strategies.

Algorithm, per token x (all routing math in float32):
  1. logits = x @ gate; probs = softmax(logits) over all E experts.
  2. Fixed routing ("topk"): the k most probable experts. Dynamic routing ("topp",
     arXiv 2403.07652): experts in order of probability until their cumulative probability
     reaches p, at least 1 and at most `max_experts`. Slots past that are inactive (weight 0).
  3. Weights are the chosen probabilities, divided by their sum only if `norm_topk_prob`
     (HF order; with norm_topk_prob=False they are NOT renormalised).
  4. Dispatch: each active (token, expert) slot goes through that expert's SwiGLU; outputs are
     summed with the weights. The strategies (`dispatch.py`) differ only in how slots meet
     experts. The default `auto` is exact on every platform: `dropless_blocks` on CPU,
     `dropless_ragged` (grouped matmul) on GPU/TPU, chosen from the devices of the mesh the
     layer runs on (so an ahead-of-time compile for TPU from a CPU host gets the TPU path).
     `dense` is the reference; `capacity` DROPS slots past a per-expert capacity (opt-in).
     With a mesh `expert` axis > 1 the layer runs under `shard_map`. Exchanges (all exact but
     `capacity`): `dropless_ragged` on GPU/TPU sends each slot to its expert's device and back
     with `ragged_all_to_all`; the other exact strategies (and every strategy on CPU, where
     XLA lacks ragged_all_to_all) all-gather the expert group's tokens, run the local
     experts and reduce-scatter the outputs; `capacity` sends fixed [E, C, D] buffers with
     `all_to_all`. Buffer sizes and bytes moved per layer: README, "Expert parallelism".
  5. Aux losses: load balance L = E * sum_i f_i P_i with f_i the fraction of active slots sent
     to expert i and P_i the mean router probability, both over the global batch (summed over
     every data shard) or per sequence; router z-loss mean(logsumexp(logits)^2); dynamic
     (entropy) loss mean(-sum P log P). Also reported: `dropped_fraction` (of the active
     slots; 0 unless `capacity`) and `expert_rows_ratio` (expert rows multiplied, padding
     included, per active slot; 1.0 = no wasted rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.config import ModelConfig
from qwen3_jax.model.dispatch import (
  block_dispatch,
  capacity,
  capacity_dispatch,
  dense_dispatch,
  ragged_dispatch,
  ragged_exchange_dispatch,
  swiglu_experts,
)
from qwen3_jax.model.layers import param, weight
from qwen3_jax.sharding import BATCH_AXES, active_mesh, check_batch, shard_map

# ----------------------------------------------------------------------------- routing


def route(logits: jax.Array, cfg: ModelConfig):
  """Router choices from logits [T, E].

  Returns:
    ids [T, k] int32 expert ids (k = cfg.max_experts_per_token), weights [T, k] float32 (0 on
    inactive slots), active [T, k] bool, probs [T, E] float32.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  k = cfg.max_experts_per_token
  top_p, ids = jax.lax.top_k(probs, k)  # [T, k], descending
  if cfg.moe.routing == "topp":
    before = jnp.cumsum(top_p, axis=-1) - top_p  # cumulative probability before slot j
    active = before < cfg.moe.top_p  # slot 0 is always active
  else:
    active = jnp.ones_like(top_p, bool)
  weights = jnp.where(active, top_p, 0.0)
  if cfg.norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return ids.astype(jnp.int32), weights, active, probs


def load_balance_loss(fraction: jax.Array, prob: jax.Array) -> jax.Array:
  """E * sum_i f_i * P_i for f, P of shape [..., E]; 1.0 when perfectly balanced."""
  return fraction.shape[-1] * jnp.sum(fraction * prob, axis=-1)


def router_stats(
  logits, ids, active, probs, token_mask, num_experts, balance, seq_len, reduce_axes=()
):
  """Aux losses and statistics, summed over `reduce_axes` (the data-parallel mesh axes).

  Args:
    logits, probs: [T, E]; ids, active: [T, k]; token_mask: [T] (False for padding).
    balance: "global" or "micro_batch" (f, P over all tokens of this call) or "sequence" (per
      row of `seq_len` tokens).
    reduce_axes: mesh axes to psum over (inside shard_map), () otherwise.
  """
  psum = (lambda x: jax.lax.psum(x, reduce_axes)) if reduce_axes else (lambda x: x)
  m = token_mask.astype(jnp.float32)  # [T]
  slot = (active & token_mask[:, None]).astype(jnp.float32)  # [T, k]
  onehot = jax.nn.one_hot(ids, num_experts, dtype=jnp.float32) * slot[..., None]
  counts_t = onehot.sum(1)  # [T, E] slots of token t at expert e
  counts = psum(counts_t.sum(0))  # [E]
  n_tok = psum(m.sum())
  n_slot = jnp.maximum(counts.sum(), 1.0)
  fraction = jax.lax.stop_gradient(counts / n_slot)
  prob = psum((probs * m[:, None]).sum(0)) / jnp.maximum(n_tok, 1.0)  # [E]
  if balance != "sequence":
    lb = load_balance_loss(fraction, prob)
  else:  # per sequence, then averaged over (non-empty) sequences
    ms = m.reshape(-1, seq_len)
    f_s = counts_t.reshape(-1, seq_len, num_experts).sum(1)
    f_s = jax.lax.stop_gradient(f_s / jnp.maximum(f_s.sum(-1, keepdims=True), 1.0))
    p_s = (probs * m[:, None]).reshape(-1, seq_len, num_experts).sum(1)
    p_s = p_s / jnp.maximum(ms.sum(-1, keepdims=True), 1.0)
    has = (ms.sum(-1) > 0).astype(jnp.float32)
    lb = psum((load_balance_loss(f_s, p_s) * has).sum()) / jnp.maximum(psum(has.sum()), 1.0)
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  z = psum((lse**2 * m).sum()) / jnp.maximum(n_tok, 1.0)
  ent = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  dyn = psum((ent * m).sum()) / jnp.maximum(n_tok, 1.0)
  return {
    "load_balance_loss": lb,
    "router_z_loss": z,
    "dynamic_loss": dyn,
    "experts_per_token": counts.sum() / jnp.maximum(n_tok, 1.0),
    "expert_fraction": fraction,
    "expert_prob": prob,
    "tokens_per_expert": counts,
  }


def aux_losses(
  stats: dict,
  cfg: ModelConfig,
  *,
  fraction: jax.Array | None = None,
  tok_share: jax.Array | float = 1.0,
  seq_share: jax.Array | float = 1.0,
) -> dict[str, jax.Array]:
  """The MoE auxiliary loss: the one place its terms meet their coefficients.

    aux_loss = router_aux_loss_coef * load_balance + router_z_loss_coef * router_z
               + dynamic_loss_coef * dynamic

  "global" balance: load_balance = mean over MoE layers of `load_balance_loss(f, P)` (f sums
  to 1 per layer; HF's `router_aux_loss_coef` is k times smaller, see `hf.config_from_hf`).
  "micro_batch" balance: the same, always with this batch's own f (`fraction` is ignored), so
  under gradient accumulation the loss is sum_j share_j * E * sum_i f_ij P_ij over
  micro-batches j, f_ij and P_ij taken over micro-batch j alone.
  "sequence" balance: the layer mean of `stats["load_balance_loss"]` (per-sequence f, P).

  Args:
    stats: `router_stats` of one layer, or `ModelOutput.aux` (scalars averaged over MoE layers,
      `expert_fraction` / `expert_prob` stacked [n_moe, E]).
    fraction: [..., E] f to use instead of `stats["expert_fraction"]`, e.g. the f of the whole
      global batch when `stats` come from one micro-batch (P is linear, f is not).
    tok_share: this batch's share of the global batch's non-padding tokens: token means
      (P, z, entropy) are scaled by it, so micro-batch values sum to the global-batch value.
    seq_share: the same for non-empty sequences (scales the per-sequence balance).

  Returns:
    {"aux_loss", "load_balance_loss", "router_z_loss", "dynamic_loss"}: float32 scalars,
    each term already scaled by its share and the total weighted by the coefficients.
  """
  if cfg.moe.balance != "sequence":
    own = fraction is None or cfg.moe.balance == "micro_batch"
    f = stats["expert_fraction"] if own else fraction
    lb = jnp.mean(load_balance_loss(f, stats["expert_prob"])) * tok_share
  else:
    lb = stats["load_balance_loss"] * seq_share
  z = stats["router_z_loss"] * tok_share
  dyn = stats["dynamic_loss"] * tok_share
  total = (
    cfg.router_aux_loss_coef * lb + cfg.moe.router_z_loss_coef * z + cfg.moe.dynamic_loss_coef * dyn
  )
  return {"aux_loss": total, "load_balance_loss": lb, "router_z_loss": z, "dynamic_loss": dyn}


# ----------------------------------------------------------------------------- strategy


def target_platform() -> str:
  """Platform of the devices the layer runs on: the active mesh's ("tpu" for an ahead-of-time
  compile for a TPU topology on a CPU host), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh is None or mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def resolve_strategy(strategy: str, platform: str | None = None) -> str:
  """`auto` -> the dropless strategy for the target platform (never a dropping one).

  CPU: `dropless_blocks` (XLA:CPU runs ragged_dot 10-100x slower than plain matmuls);
  GPU/TPU: `dropless_ragged` (grouped matmul). Other strategies are returned unchanged.
  """
  if strategy != "auto":
    return strategy
  platform = platform or target_platform()
  return "dropless_blocks" if platform == "cpu" else "dropless_ragged"


class MoE(nnx.Module):
  """Router + E SwiGLU experts. Parameter names follow HF Qwen3-MoE (`gate`, `*_proj`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, e, f, dt = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.param_dtype
    self.gate = param(rngs, (d, e), ("embed", None), dt)
    self.gate_proj = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), dt)
    self.up_proj = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), dt)
    self.down_proj = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), dt)
    self.cfg = cfg

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None):
    """x: [B, L, D] -> (y [B, L, D], aux dict). segment_ids == 0 marks padding."""
    cfg = self.cfg
    b, l, d = x.shape
    dtype = x.dtype
    mask = (jnp.ones((b, l), bool) if segment_ids is None else segment_ids > 0).reshape(-1)
    weights = (
      self.gate[...],
      weight(self, "gate_proj", dtype),
      weight(self, "up_proj", dtype),
      weight(self, "down_proj", dtype),
    )
    mesh = active_mesh()
    fn = functools.partial(_moe_local, cfg=cfg, seq_len=l)
    if mesh is None:
      y, aux = fn(x.reshape(b * l, d), mask, weights, reduce_axes=(), ep_axis=None)
      return y.reshape(b, l, d), aux
    check_batch(b, mesh, "MoE: batch")
    tp = mesh.shape["tensor"]
    tok = ("batch", None)  # [T, D] tokens; D whole
    w_axes = (  # gate [D, E] replicated; experts split, D whole
      (),
      ("experts", None, "expert_mlp"),
      ("experts", None, "expert_mlp"),
      ("experts", "expert_mlp", None),
    )
    body = functools.partial(
      fn,
      reduce_axes=BATCH_AXES,
      ep_axis="expert" if mesh.shape["expert"] > 1 else None,
      tp_axis="tensor" if tp > 1 else None,
    )
    # check_vma=False: dropless_blocks' fori_loop carries start as non-varying zeros (dispatch.py)
    y, aux = shard_map(
      body, mesh=mesh, in_axes=(tok, ("batch",), w_axes), out_axes=(tok, ()), check_vma=False
    )(x.reshape(b * l, d), mask, weights)
    return y.reshape(b, l, d), aux


def _moe_local(x, mask, weights, *, cfg: ModelConfig, seq_len, reduce_axes, ep_axis, tp_axis=None):
  """The MoE layer on this device's tokens x [T, D] (and its expert shard, if any)."""
  gate, wg, wu, wd = weights
  e = cfg.num_experts
  t = x.shape[0]
  logits = jnp.einsum("td,de->te", x.astype(jnp.float32), gate.astype(jnp.float32))
  ids, weight, active, probs = route(logits, cfg)
  aux = router_stats(logits, ids, active, probs, mask, e, cfg.moe.balance, seq_len, reduce_axes)
  active = active & mask[:, None]  # padding is not routed: it neither computes nor drops
  weight = jnp.where(active, weight, 0.0)
  strategy = resolve_strategy(cfg.moe.strategy)
  w = (wg, wu, wd)
  dropped = jnp.zeros((), jnp.int32)
  if strategy == "capacity":
    cap = capacity(t, cfg.max_experts_per_token, e, cfg.moe.capacity_factor)
    expert_fn = functools.partial(swiglu_experts, wg=wg, wu=wu, wd=wd)
    if ep_axis is not None:
      expert_fn = functools.partial(_capacity_exchange, ep_axis=ep_axis, w=w)
    y, dropped, rows = capacity_dispatch(x, ids, weight, active, e, cap, expert_fn)
  else:
    local = EXACT_DISPATCH[strategy]
    if ep_axis is None:
      y, rows = local(x, ids, weight, active, w)
    elif strategy == "dropless_ragged" and target_platform() != "cpu":
      y, rows = ragged_exchange_dispatch(x, ids, weight, active, w, ep_axis)
    else:
      # Exact exchange: all-gather the expert group's tokens and choices, run the local
      # experts on the slots routed to them, reduce-scatter the outputs back.
      offset = jax.lax.axis_index(ep_axis) * wg.shape[0]
      group = [jax.lax.all_gather(a, ep_axis, tiled=True) for a in (x, ids, weight, active)]
      y, rows = local(*group, w, expert_offset=offset)
      y = jax.lax.psum_scatter(y, ep_axis, scatter_dimension=0, tiled=True)
  if tp_axis is not None:
    y = jax.lax.psum(y, tp_axis)  # experts' F dimension is split over `tensor`
  dropped, rows = dropped.astype(jnp.float32), jnp.asarray(rows, jnp.float32)
  if reduce_axes:
    dropped, rows = jax.lax.psum((dropped, rows), reduce_axes)
  n_active = jnp.maximum(aux["tokens_per_expert"].sum(), 1.0)
  aux["dropped_fraction"] = dropped / n_active
  aux["expert_rows_ratio"] = rows / n_active
  return y.astype(x.dtype), aux


def _capacity_exchange(buf, *, ep_axis, w):
  """[E, C, D] buffers by destination expert -> experts' devices -> computed -> back."""
  wg = w[0]
  e_loc, (e, cap, d) = wg.shape[0], buf.shape
  n_ep = e // e_loc
  buf = buf.reshape(n_ep, e_loc, cap, d)
  recv = jax.lax.all_to_all(buf, ep_axis, 0, 0, tiled=True)  # [n_ep(src), E_loc, C, D]
  recv = recv.transpose(1, 0, 2, 3).reshape(e_loc, n_ep * cap, d)
  out = swiglu_experts(recv, *w).reshape(e_loc, n_ep, cap, d).transpose(1, 0, 2, 3)
  return jax.lax.all_to_all(out, ep_axis, 0, 0, tiled=True).reshape(e, cap, d)


EXACT_DISPATCH = {
  "dense": dense_dispatch,
  "dropless_blocks": block_dispatch,
  "dropless_ragged": ragged_dispatch,
}
