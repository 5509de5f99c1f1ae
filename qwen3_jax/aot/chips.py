"""Target devices of an ahead-of-time compile: TPU topologies (libtpu's compiler, which runs
on a CPU-only host) and simulated CPU devices, plus the published figures of each TPU chip.

libtpu is loaded only on demand (`topology_devices`), so processes that never ask for a TPU
topology never import it.
"""

from __future__ import annotations

import dataclasses
import os

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Google Cloud TPU docs) used by the roofline.

  peak_flops: dense bf16 FLOP/s; hbm_bytes: HBM capacity; hbm_bw: HBM bytes/s; ici_bw: the
  chip's total inter-chip interconnect bandwidth in bytes/s (Gbit/s published, / 8). The
  roofline charges every collective's wire bytes against all of `ici_bw` (optimistic: a ring
  over one torus axis uses only some of the links).
  """

  name: str
  peak_flops: float
  hbm_bytes: int
  hbm_bw: float
  ici_bw: float


GIB = 1 << 30
CHIPS = {
  "v5p": Chip("v5p", 459e12, 95 * GIB, 2765e9, 4800e9 / 8),
  "v5e": Chip("v5e", 197e12, 16 * GIB, 819e9, 1600e9 / 8),
  "v6e": Chip("v6e", 918e12, 32 * GIB, 1640e9, 3584e9 / 8),
}


def chip_of(topology: str) -> Chip:
  """The chip of a topology name such as "v5p:4x4x4" (the part before the colon)."""
  name = topology.split(":", 1)[0]
  if name not in CHIPS:
    raise ValueError(f"topology {topology!r}: unknown chip {name!r}; known: {sorted(CHIPS)}")
  return CHIPS[name]


class TopologyUnavailable(RuntimeError):
  """libtpu (the `tpu` extra) is not installed, so no TPU topology can be described."""


def libtpu_available() -> bool:
  """Whether libtpu is importable (without loading it)."""
  import importlib.util

  return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str) -> list[jax.Device]:
  """The devices of a TPU topology ("v5p:4x4x4", "v6e:16x16", ...) on any host.

  They can build a `Mesh` and compile for it, but hold no memory. Raises TopologyUnavailable
  when libtpu is missing (`pip install -e '.[tpu]'`), ValueError for an unknown chip.
  """
  chip_of(topology)
  if not libtpu_available():
    raise TopologyUnavailable(
      f"--topology={topology} needs libtpu's compiler: pip install -e '.[tpu]' "
      "(jax[tpu] at the core jax version)"
    )
  # A compile-only use holds no TPU: let it share libtpu with other processes (libtpu takes a
  # host-wide lock file otherwise, and a second AOT process would fail).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)


def cpu_devices(n: int) -> list[jax.Device]:
  """The first n CPU devices; simulate many with XLA_FLAGS=--xla_force_host_platform_device_count
  (or `jax.config.update("jax_num_cpu_devices", n)`) before JAX starts."""
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise ValueError(
      f"{n} CPU devices requested but this process has {len(devices)}: start it with "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={n}"
    )
  return devices[:n]
