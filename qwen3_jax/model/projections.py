"""The model's projection weights found by parameter path: what LoRA and quantisation act on.

A projection is one of `config.PROJECTIONS` (attention q/k/v/o, the dense MLP's and the
experts' gate/up/down, the untied LM head) held as an `nnx.Param` by some module. Its path is
the module path plus the parameter name, `/`-joined, e.g. `layers/sub_0/self_attn/q_proj`,
`layers/sub_1/mlp/down_proj` (an MoE layer's experts when that layer is MoE) or `lm_head`.
Stored shapes are `[*lead, *in, *out]`: lead = the scanned-layer axis [R] of stacked layers
and the expert axis [E] of expert weights (batch dims of the matmul), in = the dims the input
contracts with (`PROJECTIONS[name]` of them), out = the rest.
"""

from __future__ import annotations

import dataclasses
import re

from flax import nnx

from qwen3_jax.config import PROJECTIONS


@dataclasses.dataclass(frozen=True)
class Projection:
  path: str  # e.g. "layers/sub_0/self_attn/q_proj"
  module: nnx.Module  # the module holding the parameter
  name: str  # the attribute name ("q_proj")
  lead: int  # leading batch dims: [R] of stacked layers, [E] of expert weights
  n_in: int  # dims after `lead` contracted with the input
  axes: tuple  # logical axes of the dims after the [R] layer axis (the `axes` metadata)

  @property
  def is_expert(self) -> bool:
    return "experts" in self.axes

  def split_shape(self, shape) -> tuple[tuple, tuple, tuple]:
    """(lead, in, out) parts of `shape`."""
    return (
      shape[: self.lead],
      shape[self.lead : self.lead + self.n_in],
      shape[self.lead + self.n_in :],
    )

  def split_axes(self) -> tuple[tuple, tuple]:
    """(in axes, out axes): logical axes of the `in` and `out` dims."""
    e = int(self.is_expert)  # the expert axis leads `axes`; the [R] axis has no entry
    return self.axes[e : e + self.n_in], self.axes[e + self.n_in :]


def find(model: nnx.Module, pattern: str) -> list[Projection]:
  """Every projection of `model` whose path fully matches the regex `pattern`."""
  out = []
  for path, module in model.iter_modules():
    for name, n_in in PROJECTIONS.items():
      var = vars(module).get(name)
      if not isinstance(var, nnx.Param) or isinstance(var, nnx.LoRAParam):
        continue
      full = "/".join([*map(str, path), name])
      if not re.fullmatch(pattern, full):
        continue
      axes = tuple(var.get_metadata().get("axes", ()))
      stacked = len(var.shape) - len(axes)  # 1 for the scanned layers' [R] axis
      lead = stacked + int("experts" in axes)
      out.append(Projection(full, module, name, lead, n_in, axes))
  return out


def all_paths(model: nnx.Module) -> list[str]:
  """Paths of every projection (for error messages)."""
  return [p.path for p in find(model, ".*")]
