"""MoE dispatch strategies: how routed (token, expert) slots meet the experts' SwiGLU.

Every strategy takes this device's tokens x [T, D], the router's choices ids / weights /
active [T, k] and the (local) expert weights, and returns y [T, D] = sum over active slots
of weight * expert(x). They differ only in how slots are laid out for the matmuls:

  dense            every expert on every token, weighted by a [T, E] combine matrix; the
                   numerical reference (E/k times the routed FLOPs).
  dropless_blocks  slots sorted by expert; each expert's group padded to a multiple of a block
                   of b rows; a loop over the *used* blocks multiplies each by its expert's
                   weights (read in place). Exact, static shapes, any backend; the CPU default.
                   At decode sizes (a few slots per expert) it runs one block per hit expert
                   instead, of the expert's own row count rounded up to a power of two.
  dropless_ragged  slots sorted by expert, grouped matmuls with `jax.lax.ragged_dot`. Exact;
                   the GPU/TPU default (XLA:CPU runs ragged_dot 10-100x slower than einsum).
  capacity         slots sorted into [E, C, D] buffers, C = ceil(cf * T * k / E); slots past C
                   are DROPPED (their output is zero) and counted. Opt-in only.

Each returns (y [T, D], rows): `rows` is the number of expert rows actually multiplied
(routed slots plus padding), so callers can report the work against the routed slots.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------- shared pieces


def swiglu_experts(x, wg, wu, wd):
  """Batched expert SwiGLU. x: [E, C, D]; wg, wu: [E, D, F]; wd: [E, F, D] -> [E, C, D]."""
  if wg.shape[-1] <= FUSE_GATE_UP_MAX_F:
    g, u = jnp.split(jnp.einsum("ecd,edf->ecf", x, jnp.concatenate([wg, wu], axis=-1)), 2, -1)
  else:
    g, u = jnp.einsum("ecd,edf->ecf", x, wg), jnp.einsum("ecd,edf->ecf", x, wu)
  return jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u, wd)


# Experts at most this wide run gate and up as one [.., D, 2F] matmul: for narrow experts one
# wider matmul beats two (docs/moe.md); at F = 512 and above it gains nothing.
FUSE_GATE_UP_MAX_F = 256


def sort_slots(ids, active, num_experts):
  """Sorts the T*k slots by expert, inactive slots last.

  Slots are numbered choice-major (slot s = j * T + t: all first choices, then all second
  choices), and the sort is stable, so within an expert first choices come first.

  Returns:
    order [S] slot number of each sorted position, sorted_e [S] expert of each sorted
    position (num_experts = inactive), counts [E] active slots per expert, starts [E] sorted
    position of each expert's first slot.
  """
  flat = jnp.where(active, ids, num_experts).T.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  counts = jnp.bincount(flat, length=num_experts + 1)[:num_experts]
  return order, flat[order], counts, jnp.cumsum(counts) - counts


def to_slots(order, sorted_values, k):
  """Values given per sorted position [S] -> per slot [T, k] (the inverse of the sort)."""
  flat = jnp.zeros_like(sorted_values).at[order].set(sorted_values)
  return flat.reshape(k, -1).T


def local_choices(ids, active, expert_offset, num_local):
  """Expert ids relative to this device's experts, and which slots are local and active."""
  local = ids - expert_offset
  return local, active & (local >= 0) & (local < num_local)


def combine(weights, keep, out_rows, dtype):
  """y [T, D] = sum_j weights[t, j] * out_rows[t, j] over kept slots; out_rows [T, k, D]."""
  w = jnp.where(keep, weights, 0.0).astype(dtype)
  return jnp.einsum("tk,tkd->td", w, out_rows)


# ----------------------------------------------------------------------------- dense


def dense_dispatch(x, ids, weights, active, w, expert_offset=0):
  """Every (local) expert on every token. x: [T, D]; w = (wg, wu, wd) with E_loc experts."""
  wg, wu, wd = w
  e_loc = wg.shape[0]
  local, keep = local_choices(ids, active, expert_offset, e_loc)
  onehot = jax.nn.one_hot(jnp.where(keep, local, e_loc), e_loc, dtype=x.dtype)  # [T, k, E]
  comb = jnp.einsum("tke,tk->te", onehot, jnp.where(keep, weights, 0.0).astype(x.dtype))
  h = jax.nn.silu(jnp.einsum("td,edf->tef", x, wg)) * jnp.einsum("td,edf->tef", x, wu)
  return jnp.einsum("tef,efd,te->td", h, wd, comb), x.shape[0] * e_loc


# ----------------------------------------------------------------------------- capacity


def capacity(num_tokens: int, k: int, num_experts: int, factor: float) -> int:
  """Slots per expert: ceil(factor * T * k / E), at least 1, at most T."""
  return int(max(1, min(num_tokens, math.ceil(factor * num_tokens * k / num_experts))))


def capacity_dispatch(x, ids, weights, active, num_experts, cap, expert_fn):
  """Sort-and-gather into [E, C, D] buffers, run `expert_fn`, gather back. DROPS overflow.

  Slots are ranked per expert first by choice (all 1st choices before 2nd) then by token, so
  overflow drops the least important slots. Returns (y [T, D], dropped slot count, rows).
  """
  t, k = ids.shape
  order, sorted_e, counts, starts = sort_slots(ids, active, num_experts)
  token_of_sorted = order % t
  src = starts[:, None] + jnp.arange(cap)[None, :]  # [E, C] index into sorted slots
  filled = jnp.arange(cap)[None, :] < counts[:, None]  # [E, C]
  src_tok = token_of_sorted[jnp.minimum(src, t * k - 1)]
  buf = jnp.where(filled[..., None], x[src_tok], 0)  # [E, C, D]
  out = expert_fn(buf).reshape(num_experts * cap, -1)  # [E*C, D]
  # Rank of each slot within its expert's sorted group [T, k].
  pos_sorted = jnp.arange(t * k) - starts[jnp.minimum(sorted_e, num_experts - 1)]
  pos = to_slots(order, pos_sorted.astype(jnp.int32), k)
  keep = active & (pos < cap)
  dest = jnp.where(keep, ids * cap + pos, 0)
  y = combine(weights, keep, out[dest], x.dtype)
  return y, jnp.sum(active & ~keep), num_experts * cap


# ----------------------------------------------------------------------------- ragged


def ragged_dispatch(x, ids, weights, active, w, expert_offset=0):
  """Sort slots by (local) expert and run grouped matmuls (`ragged_dot`). Exact.

  Slots whose expert is not local (expert parallel) or inactive sort to the end, outside
  every group: ragged_dot leaves those rows zero.
  """
  wg, wu, wd = w
  t, k = ids.shape
  e_loc = wg.shape[0]
  local, keep = local_choices(ids, active, expert_offset, e_loc)
  order, _, counts, _ = sort_slots(local, keep, e_loc)
  tok = order % t
  xs = x[tok]  # [S, D]
  g = jax.lax.ragged_dot(xs, wg, counts)
  u = jax.lax.ragged_dot(xs, wu, counts)
  out = jax.lax.ragged_dot(jax.nn.silu(g) * u, wd, counts)  # [S, D]
  w_sorted = jnp.where(keep, weights, 0.0).T.reshape(-1)[order].astype(x.dtype)
  y = jnp.zeros_like(x).at[tok].add(out * w_sorted[:, None])
  return y, jnp.sum(counts)


# ----------------------------------------------------------------------------- blocks


MAX_BLOCK = 128  # rows per block at training sizes
MIN_BLOCK = 8  # rows per block at decode sizes (a few tokens per step)


def block_size(num_slots: int, num_experts: int) -> int:
  """Rows per block b for `num_slots` routed slots over `num_experts` experts.

  A power of two near a quarter of the mean group size, clamped to [MIN_BLOCK, MAX_BLOCK].
  Padding costs about b/2 rows per hit expert, i.e. about E*b/(2*S) <= 1/8 of the routed rows
  when b = S/(4E); at decode sizes (S/E < 1) each hit expert gets one small block, so a step
  reads only the experts it uses, once.
  """
  target = max(1, num_slots // (4 * max(num_experts, 1)))
  b = 1 << (target.bit_length() - 1)  # largest power of two <= target
  return int(min(MAX_BLOCK, max(MIN_BLOCK, b)))


def num_blocks(num_slots: int, num_experts: int, b: int) -> int:
  """Static bound on blocks: sum_e ceil(c_e / b) <= ceil(S / b) + min(E, S) - 1."""
  return max(1, -(-num_slots // b) + min(num_experts, num_slots) - 1)


def block_dispatch(x, ids, weights, active, w, expert_offset=0, block=None):
  """Dropless MoE with static shapes: sorted slots in per-expert blocks of b rows.

  Layout: slots sorted by (local) expert; expert e's c_e slots fill ceil(c_e / b) blocks
  (the last one padded with zero rows); blocks of all experts follow each other, so
  NB = ceil(S / b) + E - 1 blocks bound every routing. Only the n_used = sum_e ceil(c_e / b)
  blocks are computed (a loop with a dynamic trip count): the padding costs at most b - 1 rows
  per hit expert and nothing else. Each block multiplies by its expert's weights read in place
  (no [NB, D, F] gather of weights); a custom VJP runs the backward as the same loop,
  accumulating each expert's weight gradient in place.

  Args:
    x: [T, D]; ids, weights, active: [T, k]; w = (wg [E_loc, D, F], wu, wd [E_loc, F, D]).
    expert_offset: first global expert id held here (expert parallel), else 0.
    block: rows per block; None = `block_size(T * k, E_loc)`.

  Returns:
    (y [T, D], rows computed = n_used * b).
  """
  wg, wu, wd = w
  t, k = ids.shape
  d = x.shape[-1]
  e_loc = wg.shape[0]
  s = t * k
  if block is None and s <= FEW_SLOTS_PER_EXPERT * e_loc:
    return expert_rows_dispatch(x, ids, weights, active, w, expert_offset)
  b = block or block_size(s, e_loc)
  nb = num_blocks(s, e_loc, b)
  local, keep = local_choices(ids, active, expert_offset, e_loc)
  order, sorted_e, counts, starts = sort_slots(local, keep, e_loc)
  blocks_e = -(-counts // b)  # [E] blocks per expert
  block_end = jnp.cumsum(blocks_e)
  first_row = (block_end - blocks_e) * b  # [E] first padded row of each expert
  n_used = block_end[-1]
  # Padded row of each sorted slot; inactive / non-local slots get row nb * b (out of range).
  safe_e = jnp.minimum(sorted_e, e_loc - 1)
  row_sorted = jnp.where(
    sorted_e < e_loc, first_row[safe_e] + jnp.arange(s) - starts[safe_e], nb * b
  )
  row_token = jnp.full((nb * b,), t, jnp.int32).at[row_sorted].set(order % t, mode="drop")
  xs = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[row_token]  # [NB*b, D]
  block_expert = jnp.minimum(
    jnp.searchsorted(block_end, jnp.arange(nb), side="right", method="compare_all"), e_loc - 1
  )
  out = expert_blocks(xs, wg, wu, wd, block_expert.astype(jnp.int32), n_used, b)  # [NB*b, D]
  row_of_slot = jnp.minimum(to_slots(order, row_sorted.astype(jnp.int32), k), nb * b - 1)
  return combine(weights, keep, out[row_of_slot], x.dtype), n_used * b


# Up to this many routed slots per (local) expert on average, `block_dispatch` runs
# `expert_rows_dispatch` (decode steps: T = batch tokens).
FEW_SLOTS_PER_EXPERT = 4


def expert_rows_dispatch(x, ids, weights, active, w, expert_offset=0):
  """Dropless MoE for a few tokens (a decode step): each hit expert runs once, on its rows.

  A loop over the (local) experts: expert e with c_e > 0 routed slots multiplies them as one
  block of m_e rows, m_e = the smallest power of two >= c_e (a `lax.switch` over the static
  sizes 1, 2, 4, .. >= T; an expert gets at most T slots; experts without slots take an empty
  branch). So each hit expert's weights are read once and at most 2 c_e - 1 rows are computed.
  At decode sizes this beats fixed blocks, which either pad every expert to b rows or read an
  expert's weights once per block. Exact; plain autodiff (no custom VJP: not a training path).

  Args / returns: as `block_dispatch` (rows computed = sum_e m_e).
  """
  wg, wu, wd = w
  t, k = ids.shape
  e_loc = wg.shape[0]
  sizes = [1 << i for i in range(max(t - 1, 0).bit_length() + 1)]  # 1, 2, .., >= T
  local, keep = local_choices(ids, active, expert_offset, e_loc)
  order, _, counts, starts = sort_slots(local, keep, e_loc)
  pad = sizes[-1]  # reads past the last expert's slots stay in range
  token = jnp.concatenate([order % t, jnp.full((pad,), t, order.dtype)])  # [S + pad]
  slot_w = jnp.where(keep, weights, 0.0).T.reshape(-1)[order]  # choice-major, as `order`
  slot_w = jnp.concatenate([slot_w, jnp.zeros((pad,), slot_w.dtype)]).astype(x.dtype)
  xp = jnp.concatenate([x, jnp.zeros((1, x.shape[-1]), x.dtype)])  # row T: zeros

  def run(m):
    def branch(y, e, start, c):
      valid = jnp.arange(m) < c
      tok = jnp.where(valid, jax.lax.dynamic_slice_in_dim(token, start, m), t)  # [m]
      wr = jnp.where(valid, jax.lax.dynamic_slice_in_dim(slot_w, start, m), 0)
      g, u = jnp.split(_gate_up(xp[tok], wg, wu, e), 2, axis=-1)  # [m, F] each
      out = ((jax.nn.silu(g) * u) @ wd[e]) * wr[:, None]  # [m, D]
      return y.at[tok].add(out, mode="drop")  # row T (padding) dropped

    return branch

  branches = [lambda y, e, start, c: y] + [run(m) for m in sizes]  # 0: no slot
  size_arr = jnp.asarray(sizes, jnp.int32)
  size_of = jnp.searchsorted(size_arr, counts, side="left")  # [E] index of m_e in sizes
  which = jnp.where(counts > 0, size_of + 1, 0)

  def body(e, y):
    return jax.lax.switch(which[e], branches, y, e, starts[e], counts[e])

  # A static trip count (every local expert) keeps the loop reverse-differentiable under jit.
  y = jax.lax.fori_loop(0, e_loc, body, jnp.zeros_like(x))
  return y, jnp.sum(jnp.where(counts > 0, size_arr[size_of], 0))


def _gate_up(xb, wg, wu, e):
  """xb [b, D] times expert e's gate and up weights -> [b, 2F] (gate | up).

  Narrow experts run one matmul against the two weights side by side (their slices are
  concatenated per block: copying the whole [E, D, 2F] per call would cost more than a decode
  step's work); wide ones run two.
  """
  if wg.shape[-1] <= FUSE_GATE_UP_MAX_F:
    return xb @ jnp.concatenate([wg[e], wu[e]], axis=-1)
  return jnp.concatenate([xb @ wg[e], xb @ wu[e]], axis=-1)


def _block_forward(xs, wg, wu, wd, block_expert, n_used, b):
  """Forward loop over the used blocks: (out [NB*b, D], gate/up activations [NB*b, 2F])."""

  def body(i, carry):
    out, gu = carry
    e = block_expert[i]
    xb = jax.lax.dynamic_slice_in_dim(xs, i * b, b)  # [b, D]
    gub = _gate_up(xb, wg, wu, e)  # [b, 2F]
    g, u = jnp.split(gub, 2, axis=-1)
    ob = (jax.nn.silu(g) * u) @ wd[e]  # [b, D]
    out = jax.lax.dynamic_update_slice_in_dim(out, ob, i * b, 0)
    gu = jax.lax.dynamic_update_slice_in_dim(gu, gub, i * b, 0)
    return out, gu

  init = (jnp.zeros_like(xs), jnp.zeros((xs.shape[0], 2 * wg.shape[-1]), xs.dtype))
  return jax.lax.fori_loop(0, n_used, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def expert_blocks(xs, wg, wu, wd, block_expert, n_used, b):
  """SwiGLU of the first n_used blocks of b rows of xs [NB*b, D], block i by expert
  block_expert[i] (wg, wu [E, D, F], wd [E, F, D]); rows of the other blocks come out zero.
  -> [NB*b, D]."""
  return _block_forward(xs, wg, wu, wd, block_expert, n_used, b)[0]


def _expert_blocks_fwd(xs, wg, wu, wd, block_expert, n_used, b):
  out, gu = _block_forward(xs, wg, wu, wd, block_expert, n_used, b)
  return out, (xs, wg, wu, wd, block_expert, n_used, gu)


def _expert_blocks_bwd(b, res, d_out):
  """The forward loop transposed: per used block, dx rows and the expert's weight gradients
  (accumulated in place, in float32), from the saved gate/up activations (no recompute)."""
  xs, wg, wu, wd, block_expert, n_used, gu = res
  f = wg.shape[-1]
  f32 = dict(preferred_element_type=jnp.float32)

  def body(i, carry):
    dxs, dwg, dwu, dwd = carry
    e = block_expert[i]
    xb = jax.lax.dynamic_slice_in_dim(xs, i * b, b)  # [b, D]
    g, u = jnp.split(jax.lax.dynamic_slice_in_dim(gu, i * b, b), 2, axis=-1)  # [b, F]
    dob = jax.lax.dynamic_slice_in_dim(d_out, i * b, b)  # [b, D]
    sig = jax.nn.sigmoid(g)
    sg = g * sig  # silu(g)
    dh = dob @ wd[e].T  # [b, F]
    dg, du = dh * u * sig * (1 + g * (1 - sig)), dh * sg
    if f <= FUSE_GATE_UP_MAX_F:
      dgu = jnp.concatenate([dg, du], axis=-1)  # [b, 2F]
      dxb = dgu @ jnp.concatenate([wg[e], wu[e]], axis=-1).T
      dw = jnp.matmul(xb.T, dgu, **f32)  # [D, 2F]
      dwg_e, dwu_e = dw[:, :f], dw[:, f:]
    else:
      dxb = dg @ wg[e].T + du @ wu[e].T
      dwg_e, dwu_e = jnp.matmul(xb.T, dg, **f32), jnp.matmul(xb.T, du, **f32)
    dxs = jax.lax.dynamic_update_slice_in_dim(dxs, dxb, i * b, 0)
    dwg = dwg.at[e].add(dwg_e)
    dwu = dwu.at[e].add(dwu_e)
    dwd = dwd.at[e].add(jnp.matmul((sg * u).T, dob, **f32))
    return dxs, dwg, dwu, dwd

  zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
  init = (jnp.zeros_like(xs), zeros(wg.shape), zeros(wu.shape), zeros(wd.shape))
  dxs, dwg, dwu, dwd = jax.lax.fori_loop(0, n_used, body, init)
  return dxs, dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype), None, None


expert_blocks.defvjp(_expert_blocks_fwd, _expert_blocks_bwd)


# ----------------------------------------------------------------------------- ragged exchange

# The collective the ragged exchange uses; XLA:CPU does not implement it (tests substitute an
# equivalent built from `all_to_all`).
RAGGED_ALL_TO_ALL = jax.lax.ragged_all_to_all


def ragged_exchange_dispatch(x, ids, weights, active, w, ep_axis):
  """Expert parallel, exact: slots travel to their experts' devices and back with
  `ragged_all_to_all`, and each device runs grouped matmuls over what it received.

  1. Sort this device's active slots by global expert (so by destination device, then by
     local expert); send each device its contiguous chunk.
  2. A receiver gets its chunks source by source, each ordered by local expert; it permutes
     them to expert-major order, runs `ragged_dot` per local expert, permutes back.
  3. The outputs return along the reverse exchange into the senders' sorted order, and are
     combined with the routing weights.
  The receive buffer holds n_ep * T * k rows: the worst case, every slot of the expert group
  routed to this device's experts, so nothing can overflow.

  Args:
    x: [T, D]; ids, weights, active: [T, k] (global expert ids); w = local expert weights
    (wg [E_loc, D, F], wu, wd); ep_axis: the mesh axis the experts are split over.

  Returns:
    (y [T, D], rows multiplied on this device).
  """
  wg, wu, wd = w
  t, k = ids.shape
  s = t * k
  e_loc = wg.shape[0]
  n = jax.lax.axis_size(ep_axis)
  me = jax.lax.axis_index(ep_axis)
  order, _, counts, _ = sort_slots(ids, active, n * e_loc)  # counts [E] per global expert
  send_sizes = counts.reshape(n, e_loc).sum(1).astype(jnp.int32)  # [n] rows to each device
  input_offsets = (jnp.cumsum(send_sizes) - send_sizes).astype(jnp.int32)
  xs = x[order % t]  # [S, D] rows sorted by global expert

  # What every device sends every other: sizes[src, dst]; per local expert: [src, dst, e].
  sizes = jax.lax.all_gather(send_sizes, ep_axis)  # [n_src, n_dst]
  recv_sizes = sizes[:, me]  # [n_src] rows from each source
  output_offsets = (jnp.cumsum(sizes, axis=0) - sizes)[me]  # where my chunk lands, per dst
  recv_counts = jax.lax.all_to_all(counts.reshape(n, e_loc), ep_axis, 0, 0, tiled=True)
  r = n * s  # receive buffer rows
  recv = RAGGED_ALL_TO_ALL(
    xs, jnp.zeros((r, x.shape[1]), x.dtype), input_offsets, send_sizes,
    output_offsets.astype(jnp.int32), recv_sizes, axis_name=ep_axis,
  )  # fmt: skip

  # Received rows are grouped (source, local expert); move them to (local expert, source).
  group_sizes = recv_counts.reshape(-1)  # [n * E_loc], source-major
  group_end = jnp.cumsum(group_sizes)
  row = jnp.arange(r)
  group = jnp.minimum(jnp.searchsorted(group_end, row, side="right", method="sort"), n * e_loc - 1)
  pos = row - (group_end - group_sizes)[group]
  src, e = group // e_loc, group % e_loc
  per_expert = recv_counts.sum(0)  # [E_loc]
  expert_start = jnp.cumsum(per_expert) - per_expert
  src_start = jnp.cumsum(recv_counts, axis=0) - recv_counts  # [n, E_loc]
  valid = row < group_end[-1]
  dest = jnp.where(valid, expert_start[e] + src_start[src, e] + pos, r)
  xe = jnp.zeros_like(recv).at[dest].set(recv, mode="drop")
  g = jax.lax.ragged_dot(xe, wg, per_expert)
  u = jax.lax.ragged_dot(xe, wu, per_expert)
  out_e = jax.lax.ragged_dot(jax.nn.silu(g) * u, wd, per_expert)  # [R, D]
  out = jnp.where(valid[:, None], out_e[jnp.minimum(dest, r - 1)], 0)  # back to recv order

  # Reverse exchange: each source's rows return to where it took them from.
  back_offsets = jax.lax.all_to_all(input_offsets, ep_axis, 0, 0, tiled=True)
  recv_offsets = (jnp.cumsum(recv_sizes) - recv_sizes).astype(jnp.int32)
  back = RAGGED_ALL_TO_ALL(
    out, jnp.zeros_like(xs), recv_offsets, recv_sizes, back_offsets, send_sizes,
    axis_name=ep_axis,
  )  # fmt: skip
  rows_of_slot = to_slots(order, jnp.arange(s, dtype=jnp.int32), k)  # [T, k] sorted row
  return combine(weights, active, back[rows_of_slot], x.dtype), jnp.sum(per_expert)


def emulated_ragged_all_to_all(
  operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
  """`ragged_all_to_all` semantics from a dense `all_to_all` of padded chunks, for tests on
  XLA:CPU (which lacks the real collective). Moves n x the operand's rows: tests only."""
  n = jax.lax.axis_size(axis_name)
  rows, d = operand.shape[0], operand.shape[1:]
  idx = jnp.arange(rows)
  # chunks[j] = my slice for device j, padded to `rows`; its destination offset rides along.
  src = input_offsets[:, None] + idx[None, :]  # [n, rows]
  keep = idx[None, :] < send_sizes[:, None]
  chunks = jnp.where(keep.reshape(n, rows, *([1] * len(d))), operand[jnp.minimum(src, rows - 1)], 0)
  got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # [n_src, rows, ...]
  where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # [n_src]
  dst = jnp.where(
    idx[None, :] < recv_sizes[:, None], where[:, None] + idx[None, :], output.shape[0]
  )
  return output.at[dst.reshape(-1)].set(got.reshape(n * rows, *d), mode="drop")
