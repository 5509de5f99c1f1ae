"""LM head + cross-entropy fused over token chunks, with the gradient computed in the forward.

`fused_cross_entropy(hidden [B, L, D], head [D, V], targets, weights)` gives the same loss as
`sum(weights * (optax CE(hidden @ head) + z_loss * logsumexp^2))` on the full [B, L, V] float32
logits, and the same gradients, without ever holding those logits: tokens are flattened to
[T, D] and a `lax.scan` walks chunks of about `chunk_size` rows. Per chunk it computes the
float32 logits [C, V], their max-subtracted exp, logsumexp, the target logit, and, when
differentiated, right away the logit gradient
  dlogits = w * (softmax * (1 + 2 z lse) - onehot(target))          # [C, V]
and from it dh = dlogits @ head^T ([C, D]) and dhead += h^T @ dlogits ([D, V]). The custom
VJP's backward then only scales the saved (dh, dhead) by the incoming cotangent: three GEMMs
in all (the unfused autodiff recomputes nothing either, but it writes and reads [T, V] float32
logits, softmax and cotangent in memory, which costs more than the GEMMs' arithmetic on CPU).
Without differentiation (eval, forward-only) the primal runs: the same chunks, no gradient.

The head may carry vocab padding (`Qwen3.head_weight()` is [D, Vp]): columns from
`vocab_size` on get the logit NEG_INF, so they add nothing to the log-sum-exp, never count as
the max for accuracy, and get a zero gradient.

With a mesh `tensor` axis > 1 (the vocab is split over it) the plain path runs instead: full
[B, L, V] logits, vocab-parallel under the SPMD partitioner, autodiff gradient. Otherwise,
under a mesh the tokens stay where they are: the chunk scan runs under `shard_map` over this
device's tokens (batch split over the `batch` rule's mesh axes, the head replicated), and the
loss sums and dhead are reduced once at the end, not per chunk: dhead is reduce-scattered
over `fsdp` (it leaves split like the head parameter) and all-reduced over the other data
axes.

Shape letters: B batch, L length, D embed, V vocab (Vp padded), T = B * L tokens, C chunk rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qwen3_jax import sharding as shd
from qwen3_jax.model.sparse_attention import NEG_INF

CHUNK_SIZE = 1024  # Rows per chunk; on 2 CPU cores 1024 beat 256..4096 at D=512, V=8192.
METRICS = ("ce", "z_loss", "accuracy")


def fused_cross_entropy(
  hidden: jax.Array,
  head: jax.Array,
  targets: jax.Array,
  weights: jax.Array,
  *,
  z_loss: float = 0.0,
  chunk_size: int = CHUNK_SIZE,
  vocab_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted next-token cross-entropy (+ z-loss) straight from the final hidden states.

  Args:
    hidden: [B, L, D] hidden states after the final norm (any float dtype; the logits are
      computed as float32, `preferred_element_type`, so bf16 inputs give float32 logits).
    head: [D, Vp] LM-head weight in the compute dtype (`Qwen3.head_weight()`: embedding.T when
      tied, lm_head otherwise).
    targets: [B, L] int target token ids in [0, V) (a counted one outside gives a NaN loss).
    weights: [B, L] float per-token weights, e.g. loss_mask / number of loss tokens; 0 drops a
      token (its target may then be any id, e.g. -1).
    z_loss: weight of logsumexp(logits)^2 (a Python float: it is compiled in).
    chunk_size: about how many token rows per chunk (on each device under a mesh); the rows
      are split into ceil(T / chunk_size) equal chunks, padding at most one row per chunk with
      weight 0.
    vocab_size: V, the real vocabulary: head columns V..Vp-1 are padding, masked out. None:
      every column is real (V = Vp).

  Returns:
    (loss, metrics). loss: [] float32 = sum(weights * (ce + z_loss * lse^2)), differentiable
    w.r.t. hidden, head and weights with exact gradients. metrics: {"ce": sum(weights * ce),
    "z_loss": sum(weights * lse^2), "accuracy": sum(weights * (argmax(logits) == targets))},
    each [] float32; accuracy counts a token whose target ties for the max logit as correct
    (argmax would pick the first of the tied). The metrics carry NO gradient: a cotangent
    flowing into them is ignored (take the gradient of `loss`).
  """
  if hidden.ndim != 3 or head.ndim != 2 or hidden.shape[-1] != head.shape[0]:
    raise ValueError(
      f"fused_cross_entropy: hidden must be [B, L, D] and head [D, V], got {hidden.shape} "
      f"and {head.shape}"
    )
  if targets.shape != hidden.shape[:2] or weights.shape != hidden.shape[:2]:
    raise ValueError(
      f"fused_cross_entropy: targets {targets.shape} and weights {weights.shape} must both be "
      f"[B, L] = {hidden.shape[:2]}"
    )
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"fused_cross_entropy: targets must be integers, got {targets.dtype}")
  if chunk_size < 1:
    raise ValueError(f"fused_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
  vocab = head.shape[1] if vocab_size is None else int(vocab_size)
  if not 1 <= vocab <= head.shape[1]:
    raise ValueError(
      f"fused_cross_entropy: vocab_size={vocab_size} must be in [1, {head.shape[1]}] (head "
      f"{head.shape})"
    )
  weights = weights.astype(jnp.float32)
  mesh = shd.active_mesh()
  if mesh is not None and mesh.shape["tensor"] > 1:
    # The vocab is split over `tensor`: full logits let the SPMD partitioner keep the head and
    # its gradient vocab-parallel, where the fused scan would replicate them on every device.
    loss, metrics = _unfused(hidden, head, targets, weights, float(z_loss), vocab)
  else:
    loss, metrics = _fused(hidden, head, targets, weights, float(z_loss), chunk_size, vocab)
  return loss, dict(zip(METRICS, metrics, strict=True))


def _unfused(hidden, head, targets, weights, z_loss, vocab):
  """The same loss and metrics from materialised [B, L, Vp] float32 logits (plain autodiff)."""
  logits = jnp.einsum("bld,dv->blv", hidden, head, preferred_element_type=jnp.float32)
  logits = _mask_padding(shd.constrain(logits, ("batch", "seq", "vocab")), vocab)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
  y = _safe_targets(targets, weights, vocab, head.shape[1])
  target_logit = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
  nll = lse - target_logit
  loss = jnp.sum(weights * (nll + z_loss * lse**2))
  correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  metrics = tuple(jax.lax.stop_gradient(jnp.sum(weights * m)) for m in (nll, lse**2, correct))
  return loss, metrics


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(hidden, head, targets, weights, z_loss, chunk_size, vocab):
  loss, metrics, _ = _run(hidden, head, targets, weights, z_loss, chunk_size, vocab, grad=False)
  return loss, metrics


def _fused_fwd(hidden, head, targets, weights, z_loss, chunk_size, vocab):
  loss, metrics, grads = _run(hidden, head, targets, weights, z_loss, chunk_size, vocab, grad=True)
  return (loss, metrics), grads


def _fused_bwd(z_loss, chunk_size, vocab, grads, cotangents):
  del z_loss, chunk_size, vocab
  d_hidden, d_head, d_weights = grads
  g = cotangents[0]  # d(out)/d(loss); the metrics' cotangents are dropped (documented).
  return (
    (d_hidden * g.astype(d_hidden.dtype)),
    (d_head * g).astype(d_head.dtype),
    None,  # integer targets
    d_weights * g,
  )


_fused.defvjp(_fused_fwd, _fused_bwd)


def _run(hidden, head, targets, weights, z_loss, chunk_size, vocab, *, grad):
  """(loss, metrics tuple, (d_hidden, d_head, d_weights) or None): locally or under shard_map.

  Under a mesh, d_head leaves split like the head's `embed` dim when that dim is split over
  batch axes only (fsdp): those axes reduce-scatter it, the other batch axes all-reduce it, so
  no device ever holds the summed full-size gradient.
  """
  fn = functools.partial(_local, z_loss=z_loss, chunk_size=chunk_size, vocab=vocab, grad=grad)
  mesh = shd.active_mesh()
  if mesh is None:
    return fn(hidden, head, targets, weights, reduce_axes=(), scatter_axes=())
  shd.check_batch(hidden.shape[0], mesh, "fused_cross_entropy: batch")
  batch_axes = shd.rule_axes("batch")
  embed_axes = tuple(a for a in shd.rule_axes("embed") if mesh.shape[a] > 1)
  n_embed = math.prod(mesh.shape[a] for a in embed_axes)
  scatter = (
    embed_axes if set(embed_axes) <= set(batch_axes) and hidden.shape[-1] % n_embed == 0 else ()
  )
  tok = ("batch",)  # [B, ...] split over the batch axes, the rest whole
  grads_axes = (tok, ("embed",) if scatter else (), tok) if grad else None  # d_head [D, Vp]
  return shd.shard_map(
    functools.partial(
      fn,
      reduce_axes=tuple(a for a in batch_axes if a not in scatter),
      scatter_axes=scatter,
    ),
    mesh=mesh,
    in_axes=(tok, (), tok, tok),
    out_axes=((), (), grads_axes),
    check_vma=True,
  )(hidden, head, targets, weights)


def _local(
  hidden, head, targets, weights, *, z_loss, chunk_size, vocab, grad, reduce_axes, scatter_axes
):
  """The fused loss over this device's tokens. The sums are psum-ed over reduce_axes and
  scatter_axes; d_head is psum-ed over reduce_axes and reduce-scattered (dim 0) over
  scatter_axes."""
  all_axes = reduce_axes + scatter_axes
  b, l, d = hidden.shape
  v = head.shape[1]
  t = b * l
  n = -(-t // chunk_size)  # number of chunks
  c = -(-t // n)  # rows per chunk
  pad = n * c - t
  h = hidden.reshape(t, d)
  w = weights.reshape(t)
  y = _safe_targets(targets.reshape(t), w, vocab, v)
  if pad:  # weight-0 rows with target 0: they add nothing to any sum or gradient
    h = jnp.pad(h, ((0, pad), (0, 0)))
    y = jnp.pad(y, (0, pad))
    w = jnp.pad(w, (0, pad))
  xs = (h.reshape(n, c, d), y.reshape(n, c), w.reshape(n, c))

  def chunk(hb, yb, wb):
    """Per-chunk forward: weighted sums [4] and what the gradient needs."""
    logits = _mask_padding(jnp.dot(hb, head, preferred_element_type=jnp.float32), vocab)
    m = logits.max(-1)  # [C]
    e = jnp.exp(logits - m[:, None])  # [C, V]
    s = e.sum(-1)  # [C]
    lse = m + jnp.log(s)
    target_logit = jnp.take_along_axis(logits, yb[:, None], axis=-1)[:, 0]
    nll = lse - target_logit
    row = nll + z_loss * lse**2  # per-token loss = d loss / d weight
    # Correct = the target's logit is the max (argmax == target but for exact ties): a max
    # reduce is much cheaper on XLA:CPU than argmax, a variadic reduce.
    correct = (target_logit >= m).astype(jnp.float32)
    sums = jnp.stack([wb * row, wb * nll, wb * lse**2, wb * correct]).sum(-1)
    return sums, row, e, s, lse

  if not grad:

    def body_fwd(_, x):
      return None, chunk(*x)[0]

    _, sums = jax.lax.scan(body_fwd, None, xs)
    sums = _psum(sums.sum(0), all_axes)
    return sums[0], tuple(sums[1:]), None

  def body(d_head, x):
    hb, yb, wb = x
    sums, row, e, s, lse = chunk(hb, yb, wb)
    # d loss / d logits = w * (softmax * (1 + 2 z lse) - onehot(target)), [C, V] float32.
    scale = wb * (1.0 + 2.0 * z_loss * lse) / s  # [C]
    onehot = jnp.arange(v, dtype=jnp.int32)[None, :] == yb[:, None]
    dlogits = (e * scale[:, None] - jnp.where(onehot, wb[:, None], 0.0)).astype(head.dtype)
    dh = jnp.dot(dlogits, head.T, preferred_element_type=jnp.float32).astype(hidden.dtype)
    d_head = d_head + jnp.dot(hb.T, dlogits, preferred_element_type=jnp.float32)
    return d_head, (sums, row, dh)

  d_head0 = jnp.zeros((d, v), jnp.float32)
  if all_axes:  # the carry varies over the batch axes (as the tokens do) from the first chunk
    d_head0 = jax.lax.pcast(d_head0, all_axes, to="varying")
  d_head, (sums, rows, dh) = jax.lax.scan(body, d_head0, xs)
  sums = _psum(sums.sum(0), all_axes)
  d_head = _psum(d_head, reduce_axes)
  if scatter_axes:
    d_head = jax.lax.psum_scatter(d_head, scatter_axes, scatter_dimension=0, tiled=True)
  d_head = d_head.astype(head.dtype)
  dh = dh.reshape(n * c, d)[:t].reshape(b, l, d)  # [B, L, D]
  d_weights = rows.reshape(n * c)[:t].reshape(b, l)  # [B, L]
  return sums[0], tuple(sums[1:]), (dh, d_head, d_weights)


def _mask_padding(logits, vocab: int):
  """[..., Vp] logits with the padding columns (ids >= vocab) set to NEG_INF."""
  if vocab == logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, NEG_INF)


def _safe_targets(targets, weights, vocab: int, cols: int):
  """int32 targets where a weight-0 row's out-of-range id (e.g. -1 to ignore) reads 0. On a
  counted row an out-of-range id is kept (a padding id in [vocab, cols) becomes cols): it gives
  a NaN loss (the gather's fill value), not a silent clip."""
  y = targets.astype(jnp.int32)
  y = jnp.where((weights != 0) | ((y >= 0) & (y < vocab)), y, 0)
  return jnp.where(y >= vocab, cols, y)


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x
