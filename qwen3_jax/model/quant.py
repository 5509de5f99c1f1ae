"""Weight-only int8 / int4 quantisation of the model's projections, by hand.

A quantised projection W [*lead, *in, *out] (`projections.py`) is stored as integer values
q (int8, or int4) and one float32 scale per output channel, s [*lead, 1.., *out] =
max |W| over the `in` dims / (qmax + 0.5) (qmax 127 or 7), q = round(W / s) clipped to
[-qmax - 1, qmax] (symmetric, round to nearest, the top bucket used in full: qwix's
weight-only PTQ, whose values these equal). `layers.weight` gives q * s in
the compute dtype, so every matmul (attention, dense MLP, the experts' dispatch, the LM head)
runs unchanged on the dequantised weight; parameters in memory shrink to 1 byte per value
(int4 arrays also take one byte per value in memory on XLA:CPU; 4 bits is their packed size).

Why by hand and not qwix's `PtqProvider`: our decoder layers run from `nnx.split` /
`nnx.merge` copies in a scan (or an unrolled loop over their [R] slices), so the weights qwix
swaps in during its first call never reach the model, and the expert weights are used inside
the dropless block loop and the expert-parallel `shard_map`. qwix does quantise one
`Attention` or `MLP` module on its own; the tests check this implementation against it there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.config import QuantConfig
from qwen3_jax.model import projections

SCALE = "_scale"
QMAX = {8: 127, 4: 7}
QTYPE = {8: jnp.int8, 4: jnp.int4}


def quantize_weight(w: jax.Array, lead: int, n_in: int, bits: int) -> tuple[jax.Array, jax.Array]:
  """(q, scale) of W [*lead, *in, *out]: q in QTYPE[bits], scale float32 [*lead, 1.., *out]."""
  axes = tuple(range(lead, lead + n_in))
  absmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axes, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / (QMAX[bits] + 0.5), 1.0)
  q = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -QMAX[bits] - 1, QMAX[bits])
  return q.astype(QTYPE[bits]), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """q * scale in `dtype`."""
  return (q.astype(jnp.float32) * scale).astype(dtype)


def convert(model: nnx.Module, cfg: QuantConfig) -> list[str]:
  """Replaces every projection whose path matches `cfg.targets` by its quantised values and
  adds `<name>_scale`; returns the converted paths. Raises when nothing matches."""
  found = projections.find(model, cfg.targets)
  if not found:
    raise ValueError(
      f"quant.targets={cfg.targets!r} matches no projection; paths are like "
      f"{projections.all_paths(model)[:8]}"
    )
  for p in found:
    q, scale = quantize_weight(getattr(p.module, p.name)[...], p.lead, p.n_in, cfg.bits)
    setattr(p.module, p.name, nnx.Param(q, axes=p.axes))
    setattr(p.module, p.name + SCALE, nnx.Param(scale, axes=p.axes))
  return [p.path for p in found]


def quantized(model: nnx.Module, cfg: QuantConfig) -> nnx.Module:
  """A copy of a float `Qwen3` with its projections quantised (`convert`) and `quant` set on
  its config, so `checkpoint.save_params` / `load_params` round-trip it."""
  if model.cfg.quant is not None or model.cfg.lora is not None:
    raise ValueError(
      "quantized: the model must be a float model without adapters (merge LoRA first); got "
      f"quant={model.cfg.quant}, lora={model.cfg.lora}"
    )
  out = nnx.clone(model)
  convert(out, cfg)
  out.cfg = model.cfg.replace(quant=cfg)
  return out


def param_bytes(model: nnx.Module) -> int:
  """Bytes of every parameter array of the model, as held in memory."""
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
