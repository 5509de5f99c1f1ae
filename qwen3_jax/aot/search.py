"""Candidate meshes and remat policies for `scripts/aot.py --search`.

A mesh (data, fsdp, expert, tensor) is a candidate when the model and batch can be split over
it (`sharding.validate`). Candidates are ordered by a prior, cheapest communication first:
experts spread as widely as the pod allows (expert parallelism moves only the routed tokens),
then a small tensor axis (it all-reduces activations every layer), then FSDP over the rest
(it gathers each layer's weights), with data parallelism last (every chip keeps a replica of
what is not sharded). The caller compiles the first few and ranks them by MFU on paper.
"""

from __future__ import annotations

import itertools

from qwen3_jax.config import MeshConfig, ModelConfig
from qwen3_jax.sharding import validate

REMAT_ORDER = ("full", "dots", "none")


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


class _ShapeMesh:
  """The `.shape` of a mesh without devices, for `sharding.validate`."""

  def __init__(self, mesh: MeshConfig):
    self.shape = {a: getattr(mesh, a) for a in MeshConfig.AXES}


def valid(cfg: ModelConfig, mesh: MeshConfig, batch: int) -> bool:
  """Whether `cfg` with a global batch of `batch` rows splits over `mesh`."""
  try:
    validate(cfg, _ShapeMesh(mesh), batch)
  except ValueError:
    return False
  return True


def meshes(cfg: ModelConfig, chips: int, batch: int) -> list[MeshConfig]:
  """Every valid mesh of `chips` devices, in the prior order of the module docstring."""
  out = []
  for expert, tensor in itertools.product(_divisors(chips), (1, 2, 4, 8)):
    rest = chips // expert
    if rest % tensor or (not cfg.is_moe and expert > 1):
      continue
    for fsdp in _divisors(rest // tensor):
      mesh = MeshConfig(data=rest // tensor // fsdp, fsdp=fsdp, expert=expert, tensor=tensor)
      if valid(cfg, mesh, batch):
        out.append(mesh)
  return sorted(out, key=lambda m: (-m.expert, m.tensor, m.data))


def candidates(
  cfg: ModelConfig, chips: int, batch: int, remats=("full", "dots"), max_candidates: int = 8
) -> list[tuple[MeshConfig, str]]:
  """The first `max_candidates` (mesh, remat) pairs: each mesh with every remat policy in
  `remats`, meshes in prior order. Raises when no mesh fits the model and batch."""
  found = meshes(cfg, chips, batch)
  if not found:
    raise ValueError(
      f"no (data, fsdp, expert, tensor) mesh of {chips} chips splits this model with a batch "
      f"of {batch} rows (sharding.validate rejects all)"
    )
  pairs = [(m, r) for m in found for r in remats]
  return pairs[:max_candidates]
