"""Basic layers: RMSNorm, rotary embeddings, token embeddings, the SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.config import ModelConfig
from qwen3_jax.sharding import constrain

INIT_STD = 0.02  # HF `initializer_range`.


def param(rngs: nnx.Rngs, shape, axes, dtype, std: float = INIT_STD) -> nnx.Param:
  """A normal(0, std) parameter annotated with its logical axes."""
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.dtype(dtype)), axes=axes)


def linear(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
  """Contracts the last `n_in` dims of x with the first `n_in` dims of w.

  [B, L, *in] x [*in, *out] -> [B, L, *out]. The leading dims of x are flattened first
  because XLA:CPU runs the weight gradient of a 2-D matmul faster than that of a 3-D einsum
  contracting over (b, l) (docs/benchmarks.md). `w` enters the `dot_general` as it is (no
  reshape), so interceptors that look a matmul's weight up among the module's parameters
  (qwix's LoRA and quantisation providers) recognise it.
  """
  lead, ins = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
  x2 = x.reshape(-1, *ins)  # [T, *in]
  dims = (tuple(range(1, n_in + 1)), tuple(range(n_in)))
  y = jax.lax.dot_general(x2, w, (dims, ((), ())))  # [T, *out]
  return y.reshape(*lead, *w.shape[n_in:])


def weight(module: nnx.Module, name: str, dtype) -> jax.Array:
  """The projection `name` of `module` in `dtype`: the parameter itself, or q * scale when it
  is quantised (`quant.py`: an integer `name` plus a float `name + "_scale"`)."""
  w = getattr(module, name)[...]
  scale = getattr(module, name + "_scale", None)
  if scale is None:  # no cast when none is needed: qwix's quantised weights reach its matmul
    return w if w.dtype == jnp.dtype(dtype) else w.astype(dtype)
  return (w.astype(jnp.float32) * scale[...]).astype(dtype)


def project(module: nnx.Module, name: str, x: jax.Array, n_in: int = 1) -> jax.Array:
  """`linear(x, W)` for the projection `name` of `module` (`weight`), plus its LoRA update
  `module.lora_scale * (x A) B` when the module holds adapters `name_lora_a` / `_lora_b`
  (`lora.py`). x [B, L, *in] -> [B, L, *out]."""
  y = linear(x, weight(module, name, x.dtype), n_in)
  scale = getattr(module, "lora_scale", None)  # set with our adapters (not by qwix's)
  a = getattr(module, name + "_lora_a", None)
  if scale is None or a is None:
    return y
  h = linear(x, a[...].astype(x.dtype), n_in)  # [B, L, r]
  b = getattr(module, name + "_lora_b")[...].astype(x.dtype)  # [r, *out]
  return y + scale * linear(h, b)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * weight, computed in float32 (as HF Qwen3)."""

  def __init__(self, dim: int, eps: float, *, param_dtype: str = "float32"):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.dtype(param_dtype)), axes=("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (self.weight[...].astype(jnp.float32) * x).astype(dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF "rotate_half" layout. x: [B, L, N, Dh], positions: [B, L]."""
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))  # [Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
  # Materialised once: fused into the product, XLA:CPU recomputes cos and sin per head.
  cos, sin = jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def vocab_param(rngs: nnx.Rngs, cfg: ModelConfig, shape, axes, vocab_dim: int) -> nnx.Param:
  """An embedding-like parameter whose `vocab_dim` is the padded vocab Vp: normal(0, std)
  rows for the V real ids, zeros for the padding ids >= V (never looked up, masked out of
  the logits)."""
  w = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.dtype(cfg.param_dtype))
  if cfg.padded_vocab_size > cfg.vocab_size:
    real = jnp.arange(shape[vocab_dim]) < cfg.vocab_size  # [Vp]
    w = jnp.where(jnp.expand_dims(real, 1 - vocab_dim), w, 0)
  return nnx.Param(w, axes=axes)


class Embed(nnx.Module):
  """Token embedding table [Vp, D] (Vp = `cfg.padded_vocab_size`; its transpose is the LM head
  when tied: `Qwen3.head_weight`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.embedding = vocab_param(
      rngs, cfg, (cfg.padded_vocab_size, cfg.hidden_size), ("vocab", "embed"), vocab_dim=0
    )
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # Gather rows from a replicated view: a lookup into a (vocab, embed)-split table makes
    # the SPMD partitioner rematerialise the whole table anyway, with a warning.
    table = constrain(self.embedding[...], (None, None))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)  # [B, L, D]
    return constrain(x, ("batch", "seq", None))


class MLP(nnx.Module):
  """Dense SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, hidden: int, *, rngs: nnx.Rngs):
    d, dt = cfg.hidden_size, cfg.param_dtype
    self.gate_proj = param(rngs, (d, hidden), ("embed", "mlp"), dt)
    self.up_proj = param(rngs, (d, hidden), ("embed", "mlp"), dt)
    self.down_proj = param(rngs, (hidden, d), ("mlp", "embed"), dt)
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    g = project(self, "gate_proj", x)
    u = project(self, "up_proj", x)
    h = constrain(jax.nn.silu(g) * u, ("batch", "seq", "mlp"))
    return project(self, "down_proj", h)
