"""Low-rank adapters (LoRA, arXiv 2106.09685) on the model's projections, by hand.

A projection W [*lead, *in, *out] (`projections.py`) with an adapter computes
`x W + (alpha / r) (x A) B`, A [*lead, *in, r] (uniform +-sqrt(6 / prod(in)), as qwix's
he_uniform) and B [*lead, r, *out] (zeros), so a fresh adapter leaves the model unchanged. A
and B are `nnx.LoRAParam`s (a subclass of `nnx.Param`) named `<name>_lora_a` / `_lora_b` on
the module that holds W (qwix's names), with W's logical axes on their `in` / `out` dims
(the rank dim replicated), so they shard, checkpoint and scan with the layer like any
parameter.

Why by hand and not qwix: qwix creates its adapters while intercepting the matmuls of a first
eager call, inside the module that runs them. Our decoder layers run from `nnx.split` /
`nnx.merge` copies inside a scan (or an unrolled loop over the [R] slices), so what qwix adds
there never reaches the model, and the expert weights are used inside the dropless block loop
and the expert-parallel `shard_map`. qwix does handle one `Attention` or `MLP` module on its
own; the tests check this implementation against it there.

Only attention q/k/v/o and the dense MLP's gate/up/down take adapters: MoE expert weights
(inside the dispatch loop) and the LM head are refused by name.

The pure-dict functions (`split_params`, `join_params`, `merge_params`) work on
`nnx.State.to_pure_dict()` trees: what the training state and checkpoints hold.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.config import PROJECTIONS, LoraConfig
from qwen3_jax.model import projections

SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"


def add_adapters(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> list[str]:
  """Adds A, B adapters to every projection whose path matches `cfg.targets`; returns the
  adapted paths. Raises when nothing matches or an expert weight / the LM head matches."""
  found = projections.find(model, cfg.targets)
  if not found:
    raise ValueError(
      f"lora.targets={cfg.targets!r} matches no projection; paths are like "
      f"{projections.all_paths(model)[:8]}"
    )
  refused = [p.path for p in found if p.is_expert or p.name == "lm_head"]
  if refused:
    raise ValueError(
      f"lora.targets={cfg.targets!r} matches {refused}: MoE expert weights and the LM head "
      "take no LoRA adapters here (attention q/k/v/o_proj and dense-MLP gate/up/down_proj do)"
    )
  for p in found:
    w = getattr(p.module, p.name)
    lead, ins, outs = p.split_shape(w.shape)
    in_axes, out_axes = p.split_axes()
    lim = math.sqrt(6.0 / math.prod(ins))
    dtype = w.dtype
    a = jax.random.uniform(rngs.params(), (*lead, *ins, cfg.rank), dtype, -lim, lim)
    b = jnp.zeros((*lead, cfg.rank, *outs), dtype)
    setattr(p.module, p.name + SUFFIX_A, nnx.LoRAParam(a, axes=(*in_axes, None)))
    setattr(p.module, p.name + SUFFIX_B, nnx.LoRAParam(b, axes=(None, *out_axes)))
    p.module.lora_scale = cfg.scale
  return [p.path for p in found]


def is_adapter(name: str) -> bool:
  return name.endswith(SUFFIX_A) or name.endswith(SUFFIX_B)


def split_params(params: dict) -> tuple[dict, dict]:
  """(base, adapters): the pure-dict tree cut in two by parameter name (empty sub-dicts are
  dropped)."""

  def cut(d: dict, keep) -> dict:
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        sub = cut(v, keep)
        if sub:
          out[k] = sub
      elif keep(str(k)):
        out[k] = v
    return out

  return cut(params, lambda k: not is_adapter(k)), cut(params, is_adapter)


def trainable(params: dict) -> tuple[dict, dict]:
  """(frozen, trainable) parts of a model's pure-dict params: with adapters, the base is
  frozen and only the adapters train; without, everything trains (frozen = {})."""
  base, adapters = split_params(params)
  return (base, adapters) if adapters else ({}, params)


def join_params(base: dict, adapters: dict) -> dict:
  """Inverse of `split_params`: the two trees merged into one."""
  out = dict(base)
  for k, v in adapters.items():
    out[k] = join_params(out.get(k, {}), v) if isinstance(v, dict) else v
  return out


def fold(w: jax.Array, a: jax.Array, b: jax.Array, n_in: int, scale: float) -> jax.Array:
  """W + scale * A B for W [*lead, *in, *out], A [*lead, *in, r], B [*lead, r, *out]
  (computed in float32, returned in W's dtype)."""
  r = a.shape[-1]
  lead = a.shape[: a.ndim - 1 - n_in]
  a2 = a.astype(jnp.float32).reshape(*lead, -1, r)  # [*lead, prod(in), r]
  b2 = b.astype(jnp.float32).reshape(*lead, r, -1)  # [*lead, r, prod(out)]
  delta = jnp.matmul(a2, b2).reshape(w.shape)
  return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def merge_params(params: dict, scale: float) -> dict:
  """The pure-dict params with every adapter folded into its base weight (`fold`) and the
  adapter entries removed: the parameters of the same model without LoRA."""
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      out[k] = merge_params(v, scale)
    elif not is_adapter(str(k)):
      a, b = params.get(f"{k}{SUFFIX_A}"), params.get(f"{k}{SUFFIX_B}")
      out[k] = v if a is None else fold(v, a, b, PROJECTIONS[str(k)], scale)
  return out


def count(params: dict) -> tuple[int, int]:
  """(adapter parameters, all parameters) of a pure-dict tree (arrays or shape structs)."""
  base, adapters = split_params(params)
  n = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))  # noqa: E731
  return n(adapters), n(base) + n(adapters)
