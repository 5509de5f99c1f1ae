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
With `temperature` T every logit is divided by T first (the loss of softmax(logits / T)), and
dlogits above gets the factor 1 / T.

`token_logprobs(hidden, head, targets)` gives the per-token log-probabilities
log softmax(logits / T)[target] ([B, L], what RL's importance ratios need) and entropies with
the same chunked pass; its gradient for a per-token cotangent g is the fused CE's with
weights -g (a second chunked pass in the backward, four GEMMs in all).

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
  temperature: float = 1.0,
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
    temperature: T > 0 (a Python float, compiled in): every term is of the logits / T, e.g.
      ce = -log softmax(logits / T)[target].

  Returns:
    (loss, metrics). loss: [] float32 = sum(weights * (ce + z_loss * lse^2)), differentiable
    w.r.t. hidden, head and weights with exact gradients. metrics: {"ce": sum(weights * ce),
    "z_loss": sum(weights * lse^2), "accuracy": sum(weights * (argmax(logits) == targets))},
    each [] float32; accuracy counts a token whose target ties for the max logit as correct
    (argmax would pick the first of the tied). The metrics carry NO gradient: a cotangent
    flowing into them is ignored (take the gradient of `loss`).
  """
  vocab, temperature = _check_common(
    "fused_cross_entropy", hidden, head, targets, chunk_size, vocab_size, temperature
  )
  if weights.shape != hidden.shape[:2]:
    raise ValueError(
      f"fused_cross_entropy: weights {weights.shape} must be [B, L] = {hidden.shape[:2]}"
    )
  weights = weights.astype(jnp.float32)
  if _vocab_parallel():
    # The vocab is split over `tensor`: full logits let the SPMD partitioner keep the head and
    # its gradient vocab-parallel, where the fused scan would replicate them on every device.
    loss, metrics = _unfused(hidden, head, targets, weights, float(z_loss), vocab, temperature)
  else:
    loss, metrics = _fused(
      hidden, head, targets, weights, float(z_loss), chunk_size, vocab, temperature
    )
  return loss, dict(zip(METRICS, metrics, strict=True))


def token_logprobs(
  hidden: jax.Array,
  head: jax.Array,
  targets: jax.Array,
  *,
  temperature: float = 1.0,
  chunk_size: int = CHUNK_SIZE,
  vocab_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-token log-probabilities and entropies of softmax(logits / T), chunked like the CE.

  With z = (hidden @ head) / T in float32 (padding columns masked) and p = softmax(z):
    logp[b, l] = z[target] - logsumexp(z)        entropy[b, l] = logsumexp(z) - sum_v p_v z_v
  ( = -sum_v p_v log p_v), without materialising [B, L, V].

  Args:
    hidden, head, targets, chunk_size, vocab_size: as in `fused_cross_entropy`; every target
      must be in [0, V) (one outside gives NaN).
    temperature: T > 0 (a Python float, compiled in).

  Returns:
    (logp, entropy), both [B, L] float32. `logp` is differentiable w.r.t. hidden and head (the
    backward runs `fused_cross_entropy` with weights = -cotangent, one more chunked pass);
    `entropy` carries NO gradient (a metric: its cotangent is ignored).
  """
  vocab, temperature = _check_common(
    "token_logprobs", hidden, head, targets, chunk_size, vocab_size, temperature
  )
  if _vocab_parallel():
    logits = jnp.einsum("bld,dv->blv", hidden, head, preferred_element_type=jnp.float32)
    z = _mask_padding(shd.constrain(logits, ("batch", "seq", "vocab")) / temperature, vocab)
    logp, ent = _logp_entropy(z, _bad_to_nan_index(targets, vocab, z.shape[-1]))
    return logp, jax.lax.stop_gradient(ent)
  return _token_logprobs(hidden, head, targets, temperature, chunk_size, vocab)


def _check_common(name, hidden, head, targets, chunk_size, vocab_size, temperature):
  """Validates the shared arguments; returns (V, T as a float)."""
  if hidden.ndim != 3 or head.ndim != 2 or hidden.shape[-1] != head.shape[0]:
    raise ValueError(
      f"{name}: hidden must be [B, L, D] and head [D, V], got {hidden.shape} and {head.shape}"
    )
  if targets.shape != hidden.shape[:2]:
    raise ValueError(f"{name}: targets {targets.shape} must be [B, L] = {hidden.shape[:2]}")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"{name}: targets must be integers, got {targets.dtype}")
  if chunk_size < 1:
    raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
  vocab = head.shape[1] if vocab_size is None else int(vocab_size)
  if not 1 <= vocab <= head.shape[1]:
    raise ValueError(
      f"{name}: vocab_size={vocab_size} must be in [1, {head.shape[1]}] (head {head.shape})"
    )
  if not temperature > 0:
    raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
  return vocab, float(temperature)


def _vocab_parallel() -> bool:
  mesh = shd.active_mesh()
  return mesh is not None and mesh.shape["tensor"] > 1


def _unfused(hidden, head, targets, weights, z_loss, vocab, temperature):
  """The same loss and metrics from materialised [B, L, Vp] float32 logits (plain autodiff)."""
  logits = jnp.einsum("bld,dv->blv", hidden, head, preferred_element_type=jnp.float32)
  logits = shd.constrain(logits, ("batch", "seq", "vocab")) / temperature
  logits = _mask_padding(logits, vocab)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
  y = _safe_targets(targets, weights, vocab, head.shape[1])
  target_logit = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
  nll = lse - target_logit
  loss = jnp.sum(weights * (nll + z_loss * lse**2))
  correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  metrics = tuple(jax.lax.stop_gradient(jnp.sum(weights * m)) for m in (nll, lse**2, correct))
  return loss, metrics


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(hidden, head, targets, weights, z_loss, chunk_size, vocab, temperature):
  loss, metrics, _ = _run(
    hidden, head, targets, weights, z_loss, chunk_size, vocab, temperature, grad=False
  )
  return loss, metrics


def _fused_fwd(hidden, head, targets, weights, z_loss, chunk_size, vocab, temperature):
  loss, metrics, grads = _run(
    hidden, head, targets, weights, z_loss, chunk_size, vocab, temperature, grad=True
  )
  return (loss, metrics), grads


def _fused_bwd(z_loss, chunk_size, vocab, temperature, grads, cotangents):
  del z_loss, chunk_size, vocab, temperature
  d_hidden, d_head, d_weights = grads
  g = cotangents[0]  # d(out)/d(loss); the metrics' cotangents are dropped (documented).
  return (
    (d_hidden * g.astype(d_hidden.dtype)),
    (d_head * g).astype(d_head.dtype),
    None,  # integer targets
    d_weights * g,
  )


_fused.defvjp(_fused_fwd, _fused_bwd)


def _run(hidden, head, targets, weights, z_loss, chunk_size, vocab, temperature, *, grad):
  """(loss, metrics tuple, (d_hidden, d_head, d_weights) or None): locally or under shard_map.

  Under a mesh, d_head leaves split like the head's `embed` dim when that dim is split over
  batch axes only (fsdp): those axes reduce-scatter it, the other batch axes all-reduce it, so
  no device ever holds the summed full-size gradient.
  """
  fn = functools.partial(
    _local, z_loss=z_loss, chunk_size=chunk_size, vocab=vocab, temperature=temperature, grad=grad
  )
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
  hidden,
  head,
  targets,
  weights,
  *,
  z_loss,
  chunk_size,
  vocab,
  temperature,
  grad,
  reduce_axes,
  scatter_axes,
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
    logits = _chunk_logits(hb, head, vocab, temperature)
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
    # d loss / d logits = w * (softmax * (1 + 2 z lse) - onehot(target)) / T, [C, V] float32.
    scale = wb * (1.0 + 2.0 * z_loss * lse) / (s * temperature)  # [C]
    onehot = jnp.arange(v, dtype=jnp.int32)[None, :] == yb[:, None]
    wt = wb[:, None] / temperature
    dlogits = (e * scale[:, None] - jnp.where(onehot, wt, 0.0)).astype(head.dtype)
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


def _chunk_logits(hb, head, vocab: int, temperature: float):
  """[C, D] x [D, Vp] -> float32 logits / T [C, Vp], padding columns NEG_INF."""
  logits = jnp.dot(hb, head, preferred_element_type=jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  return _mask_padding(logits, vocab)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _token_logprobs(hidden, head, targets, temperature, chunk_size, vocab):
  return _token_run(hidden, head, targets, temperature, chunk_size, vocab)


def _token_logprobs_fwd(hidden, head, targets, temperature, chunk_size, vocab):
  out = _token_run(hidden, head, targets, temperature, chunk_size, vocab)
  return out, (hidden, head, targets)


def _token_logprobs_bwd(temperature, chunk_size, vocab, res, cotangents):
  hidden, head, targets = res
  g = cotangents[0].astype(jnp.float32)  # d out / d logp [B, L]; entropy's is dropped
  # sum(g * logp) = -sum(g * ce): its gradient is the fused CE's with weights -g.
  _, vjp = jax.vjp(
    lambda h, w: _fused(h, w, targets, -g, 0.0, chunk_size, vocab, temperature)[0], hidden, head
  )
  d_hidden, d_head = vjp(jnp.ones((), jnp.float32))
  return d_hidden, d_head, None


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def _token_run(hidden, head, targets, temperature, chunk_size, vocab):
  """(logp, entropy) [B, L]: locally, or under shard_map over this device's tokens."""
  fn = functools.partial(_token_local, temperature=temperature, chunk_size=chunk_size, vocab=vocab)
  mesh = shd.active_mesh()
  if mesh is None:
    return fn(hidden, head, targets)
  shd.check_batch(hidden.shape[0], mesh, "token_logprobs: batch")
  tok = ("batch",)
  return shd.shard_map(fn, mesh=mesh, in_axes=(tok, (), tok), out_axes=(tok, tok))(
    hidden, head, targets
  )


def _token_local(hidden, head, targets, *, temperature, chunk_size, vocab):
  """Per-token (logp, entropy) [B, L] of this device's tokens, a scan over row chunks."""
  b, l, d = hidden.shape
  t = b * l
  n = -(-t // chunk_size)
  c = -(-t // n)
  pad = n * c - t
  h = hidden.reshape(t, d)
  y = _bad_to_nan_index(targets.reshape(t), vocab, head.shape[1])
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    y = jnp.pad(y, (0, pad))

  def body(_, x):
    hb, yb = x
    return None, _logp_entropy(_chunk_logits(hb, head, vocab, temperature), yb)

  _, (logp, ent) = jax.lax.scan(body, None, (h.reshape(n, c, d), y.reshape(n, c)))
  return logp.reshape(n * c)[:t].reshape(b, l), ent.reshape(n * c)[:t].reshape(b, l)


def _logp_entropy(z, y):
  """z [..., Vp] float32 (padding NEG_INF), y [...] -> (log softmax(z)[y], entropy), [...].

  With m = max z, s = sum exp(z - m): logp = (z_y - m) - log s and H = log s - E_p[z - m], two
  terms >= 0 (lse - E_p[z] would cancel large logits when p is peaked). Padding columns have
  exp(z - m) == 0 and a finite z: they add 0.
  """
  zm = z - jax.lax.stop_gradient(z.max(-1, keepdims=True))  # <= 0
  e = jnp.exp(zm)
  s = e.sum(-1)
  log_s = jnp.log(s)
  logp = jnp.take_along_axis(zm, y[..., None], axis=-1, mode="fill", fill_value=jnp.nan)[..., 0]
  return logp - log_s, log_s - (e * zm).sum(-1) / s


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


def _bad_to_nan_index(targets, vocab: int, cols: int):
  """int32 targets with every id outside [0, vocab) set to `cols`: out of bounds, so the
  gather (mode="fill") gives NaN for it."""
  y = targets.astype(jnp.int32)
  return jnp.where((y < 0) | (y >= vocab), cols, y)


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x
