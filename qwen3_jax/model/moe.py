"""Sparse Mixture-of-Experts layer: router, auxiliary losses and dispatch strategies.

Algorithm, per token x (all routing math in float32):
  1. logits = x @ gate; probs = softmax(logits) over all E experts.
  2. Fixed routing ("topk"): the k most probable experts. Dynamic routing ("topp",
     arXiv 2403.07652): experts in order of probability until their cumulative probability
     reaches p, at least 1 and at most `max_experts`. Slots past that are inactive (weight 0).
  3. Weights are the chosen probabilities, divided by their sum only if `norm_topk_prob`
     (HF order; with norm_topk_prob=False they are NOT renormalised).
  4. Dispatch: each active (token, expert) slot goes through that expert's SwiGLU; outputs are
     summed with the weights. Strategies differ only in how slots meet experts:
       dense     every expert on every token, weighted by a [T, E] combine matrix (reference);
       capacity  sort slots by expert into [E, C, D] buffers, batched einsum, gather back;
                 slots past capacity C = ceil(cf * T * k / E) are dropped and counted;
       dropless  sort slots by expert, grouped matmul `jax.lax.ragged_dot`; nothing dropped.
     With a mesh `expert` axis > 1 the layer runs under `shard_map`: `capacity` sends buffers
     to the experts' devices with `all_to_all`; `dense` and `dropless` all-gather the expert
     group's tokens and reduce-scatter the outputs.
  5. Aux losses: load balance L = E * sum_i f_i P_i with f_i the fraction of active slots sent
     to expert i and P_i the mean router probability, both over the global batch (summed over
     every data shard) or per sequence; router z-loss mean(logsumexp(logits)^2); dynamic
     (entropy) loss mean(-sum P log P).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwen3_jax.config import ModelConfig
from qwen3_jax.model.layers import param
from qwen3_jax.sharding import BATCH_AXES, active_mesh, check_batch

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
    balance: "global" (f, P over all tokens) or "sequence" (per row of `seq_len` tokens).
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
  if balance == "global":
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
  if cfg.moe.balance == "global":
    f = stats["expert_fraction"] if fraction is None else fraction
    lb = jnp.mean(load_balance_loss(f, stats["expert_prob"])) * tok_share
  else:
    lb = stats["load_balance_loss"] * seq_share
  z = stats["router_z_loss"] * tok_share
  dyn = stats["dynamic_loss"] * tok_share
  total = (
    cfg.router_aux_loss_coef * lb + cfg.moe.router_z_loss_coef * z + cfg.moe.dynamic_loss_coef * dyn
  )
  return {"aux_loss": total, "load_balance_loss": lb, "router_z_loss": z, "dynamic_loss": dyn}


# ----------------------------------------------------------------------------- experts


# Experts at most this wide run gate and up as one [E, D, 2F] matmul: for narrow experts the
# wider matmul is faster than two (XLA:CPU, E64 F128 C640 fwd+bwd: 1.24 s vs 1.49 s under the
# same load) while the weight concatenation costs little; at F=512 it gains nothing.
FUSE_GATE_UP_MAX_F = 256


def swiglu_experts(x, wg, wu, wd):
  """Batched expert SwiGLU. x: [E, C, D]; wg, wu: [E, D, F]; wd: [E, F, D] -> [E, C, D]."""
  if wg.shape[-1] <= FUSE_GATE_UP_MAX_F:
    g, u = jnp.split(jnp.einsum("ecd,edf->ecf", x, jnp.concatenate([wg, wu], axis=-1)), 2, -1)
  else:
    g, u = jnp.einsum("ecd,edf->ecf", x, wg), jnp.einsum("ecd,edf->ecf", x, wu)
  return jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u, wd)


def dense_dispatch(x, ids, weights, active, w, expert_offset=0):
  """Every (local) expert on every token. x: [T, D]; w: local weights with E_loc experts."""
  wg, wu, wd = w
  e_loc = wg.shape[0]
  combine = jnp.sum(
    jax.nn.one_hot(ids - expert_offset, e_loc, dtype=x.dtype) * weights[..., None].astype(x.dtype),
    axis=1,
  )  # [T, E_loc]
  h = jax.nn.silu(jnp.einsum("td,edf->tef", x, wg)) * jnp.einsum("td,edf->tef", x, wu)
  return jnp.einsum("tef,efd,te->td", h, wd, combine)


def _sort_slots(ids, active, num_experts):
  """Sorts the T*k slots by expert (inactive last). Returns order, sorted ids, group starts."""
  t, k = ids.shape
  flat = jnp.where(active, ids, num_experts).T.reshape(-1)  # choice-major: 1st choices first
  order = jnp.argsort(flat, stable=True)  # [S]
  sorted_e = flat[order]
  counts = jnp.bincount(flat, length=num_experts + 1)[:num_experts]  # [E]
  starts = jnp.cumsum(counts) - counts
  return order, sorted_e, counts, starts


def capacity(num_tokens: int, k: int, num_experts: int, factor: float) -> int:
  """Slots per expert: ceil(factor * T * k / E), at least 1, at most T."""
  return int(max(1, min(num_tokens, math.ceil(factor * num_tokens * k / num_experts))))


def capacity_dispatch(x, ids, weights, active, num_experts, cap, expert_fn):
  """Sort-and-gather into [E, C, D] buffers, run `expert_fn`, gather back.

  Slots are ranked per expert first by choice (all 1st choices before 2nd) then by token, so
  overflow drops the least important slots. Returns (y [T, D], dropped slot count).
  """
  t, k = ids.shape
  order, sorted_e, counts, starts = _sort_slots(ids, active, num_experts)
  token_of_sorted = order % t  # slot s = j * T + t
  # Buffer slot (e, c) holds the c-th slot of expert e, if there is one.
  src = starts[:, None] + jnp.arange(cap)[None, :]  # [E, C] index into sorted slots
  filled = jnp.arange(cap)[None, :] < counts[:, None]  # [E, C]
  src_tok = token_of_sorted[jnp.minimum(src, t * k - 1)]
  buf = jnp.where(filled[..., None], x[src_tok], 0)  # [E, C, D]
  out = expert_fn(buf).reshape(num_experts * cap, -1)  # [E*C, D]
  # Destination of every original slot (t, j): row e * C + position, or dropped.
  pos_sorted = jnp.arange(t * k) - starts[jnp.minimum(sorted_e, num_experts - 1)]
  pos = jnp.zeros(t * k, jnp.int32).at[order].set(pos_sorted.astype(jnp.int32))
  pos = pos.reshape(k, t).T  # [T, k]
  keep = active & (pos < cap)
  dest = jnp.where(keep, ids * cap + pos, 0)
  y = jnp.einsum("tk,tkd->td", jnp.where(keep, weights, 0.0).astype(x.dtype), out[dest])
  dropped = jnp.sum(active & ~keep)
  return y, dropped


def dropless_dispatch(x, ids, weights, active, w, expert_offset=0):
  """Sort slots by expert and run grouped matmuls (`ragged_dot`) over the local experts.

  Slots whose expert is not local (expert parallel) sort to the end, outside every group:
  ragged_dot leaves those rows zero.
  """
  wg, wu, wd = w
  t, k = ids.shape
  e_loc = wg.shape[0]
  local = ids - expert_offset
  is_local = (local >= 0) & (local < e_loc) & active
  order, _, counts, _ = _sort_slots(local, is_local, e_loc)
  tok = order % t
  xs = x[tok]  # [S, D]
  g = jax.lax.ragged_dot(xs, wg, counts)
  u = jax.lax.ragged_dot(xs, wu, counts)
  out = jax.lax.ragged_dot(jax.nn.silu(g) * u, wd, counts)  # [S, D]
  w_sorted = jnp.where(is_local, weights, 0.0).T.reshape(-1)[order].astype(x.dtype)
  return jnp.zeros_like(x).at[tok].add(out * w_sorted[:, None])


# ----------------------------------------------------------------------------- layer


def resolve_strategy(strategy: str, backend: str | None = None) -> str:
  """`auto` -> the fastest correct strategy for the backend.

  CPU: `capacity` (ragged_dot is 10-100x slower there than batched einsum over buffers);
  GPU/TPU: `dropless` (grouped matmul, no drops).
  """
  if strategy != "auto":
    return strategy
  backend = backend or jax.default_backend()
  return "capacity" if backend == "cpu" else "dropless"


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
      self.gate_proj[...].astype(dtype),
      self.up_proj[...].astype(dtype),
      self.down_proj[...].astype(dtype),
    )
    mesh = active_mesh()
    fn = functools.partial(_moe_local, cfg=cfg, seq_len=l)
    if mesh is None:
      y, aux = fn(x.reshape(b * l, d), mask, weights, reduce_axes=(), ep_axis=None)
      return y.reshape(b, l, d), aux
    check_batch(b, mesh, "MoE: batch")
    tp = mesh.shape["tensor"]
    tok = P(BATCH_AXES, None)
    w_specs = (
      P(),
      P("expert", None, "tensor"),
      P("expert", None, "tensor"),
      P("expert", "tensor", None),
    )
    body = functools.partial(
      fn,
      reduce_axes=BATCH_AXES,
      ep_axis="expert" if mesh.shape["expert"] > 1 else None,
      tp_axis="tensor" if tp > 1 else None,
    )
    y, aux = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(tok, P(BATCH_AXES), w_specs),
      out_specs=(tok, P()),
      check_vma=False,
    )(x.reshape(b * l, d), mask, weights)
    return y.reshape(b, l, d), aux


def _moe_local(x, mask, weights, *, cfg: ModelConfig, seq_len, reduce_axes, ep_axis, tp_axis=None):
  """The MoE layer on this device's tokens x [T, D] (and its expert shard, if any)."""
  gate, wg, wu, wd = weights
  e = cfg.num_experts
  t = x.shape[0]
  logits = jnp.einsum("td,de->te", x.astype(jnp.float32), gate.astype(jnp.float32))
  ids, rw, active, probs = route(logits, cfg)
  aux = router_stats(logits, ids, active, probs, mask, e, cfg.moe.balance, seq_len, reduce_axes)
  active = active & mask[:, None]  # padding is not routed: it neither computes nor drops
  rw = jnp.where(active, rw, 0.0)
  strategy = resolve_strategy(cfg.moe.strategy)
  w = (wg, wu, wd)
  dropped = jnp.zeros((), jnp.float32)
  if ep_axis is None:
    if strategy == "dense":
      y = dense_dispatch(x, ids, rw, active, w)
    elif strategy == "dropless":
      y = dropless_dispatch(x, ids, rw, active, w)
    else:
      cap = capacity(t, cfg.max_experts_per_token, e, cfg.moe.capacity_factor)
      y, dropped = capacity_dispatch(
        x, ids, rw, active, e, cap, lambda buf: swiglu_experts(buf, *w)
      )
  else:
    n_ep = jax.lax.axis_size(ep_axis)
    e_loc = e // n_ep
    if strategy == "capacity":
      cap = capacity(t, cfg.max_experts_per_token, e, cfg.moe.capacity_factor)

      def exchange(buf):  # [E, C, D] by destination expert -> computed -> back
        d = buf.shape[-1]
        buf = buf.reshape(n_ep, e_loc, cap, d)
        recv = jax.lax.all_to_all(buf, ep_axis, 0, 0, tiled=True)  # [n_ep(src), E_loc, C, D]
        recv = recv.transpose(1, 0, 2, 3).reshape(e_loc, n_ep * cap, d)
        out = swiglu_experts(recv, *w).reshape(e_loc, n_ep, cap, d).transpose(1, 0, 2, 3)
        return jax.lax.all_to_all(out, ep_axis, 0, 0, tiled=True).reshape(e, cap, d)

      y, dropped = capacity_dispatch(x, ids, rw, active, e, cap, exchange)
    else:
      # All-gather the expert group's tokens, run the local experts, reduce-scatter back.
      offset = jax.lax.axis_index(ep_axis) * e_loc
      gx, gids, grw, gact = (
        jax.lax.all_gather(a, ep_axis, tiled=True) for a in (x, ids, rw, active)
      )
      local = dense_dispatch if strategy == "dense" else dropless_dispatch
      gy = local(gx, gids, grw, gact, w, expert_offset=offset)
      y = jax.lax.psum_scatter(gy, ep_axis, scatter_dimension=0, tiled=True)
  if tp_axis is not None:
    y = jax.lax.psum(y, tp_axis)  # experts' F dimension is split over `tensor`
  if reduce_axes:
    dropped = jax.lax.psum(dropped, reduce_axes)
  n_active = jnp.maximum(aux["tokens_per_expert"].sum(), 1.0)
  aux["dropped_fraction"] = dropped.astype(jnp.float32) / n_active
  return y.astype(x.dtype), aux
