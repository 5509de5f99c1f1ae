"""Meshes, logical axis names and the one table that maps them onto mesh axes.

Model code names only logical axes (`batch`, `embed`, `experts`, ...). `RULES` below is the
single place that says which mesh axis each of them is split over. Parameters carry their
logical axes as nnx metadata (`axes=(...)`); a scanned layer stack has one more leading
dimension than its names, which is the `layers` axis (never split).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qwen3_jax.config import MeshConfig, ModelConfig

MESH_AXES = MeshConfig.AXES
BATCH_AXES = ("data", "fsdp", "expert")  # Outside the MoE layer `expert` is data parallelism.

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": BATCH_AXES,
  "seq": None,
  "embed": "fsdp",  # Parameters only; activations keep the embed dim whole.
  "vocab": "tensor",
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  "mlp": "tensor",
  "experts": "expert",
  "expert_mlp": "tensor",
  "layers": None,
  "norm": None,
}

Axes = Sequence[str | None]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a 4-axis (data, fsdp, expert, tensor) mesh with Auto axis types."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = cfg.resolve(len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # Non-TPU topologies or odd shapes: a plain reshape is fine.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rule_axes(name: str) -> tuple[str, ...]:
  """The mesh axes a logical axis maps to, as a tuple (empty when replicated)."""
  rule = RULES[name]
  return (rule,) if isinstance(rule, str) else tuple(rule or ())


def logical_to_spec(axes: Axes) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; a mesh axis may be used only once."""
  used: dict[str, str] = {}
  out = []
  for name in axes:
    if name is None:
      out.append(None)
      continue
    if name not in RULES:
      raise KeyError(f"Logical axis {name!r} has no rule in qwen3_jax.sharding.RULES")
    mesh_axes = RULES[name]
    for m in rule_axes(name):
      if m in used:
        raise ValueError(
          f"Logical axes {used[m]!r} and {name!r} both map to mesh axis {m!r} in {tuple(axes)}"
        )
      used[m] = name
    out.append(mesh_axes)
  return PartitionSpec(*out)


def active_mesh():
  """The mesh set by `jax.set_mesh`, or None when there is none (or it has one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return None
  return mesh


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """`with_sharding_constraint` by logical axes; a no-op without an active mesh."""
  if active_mesh() is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...]:
  """Logical axes of a parameter; a leading extra dimension is the scanned `layers` axis."""
  axes = tuple(var.get_metadata().get("axes", ()))
  ndim = len(var.shape)
  if len(axes) == ndim - 1:
    axes = ("layers",) + axes
  if len(axes) != ndim:
    axes = (None,) * ndim  # Unannotated: replicated.
  return axes


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """A tree like `state` whose leaves are the NamedShardings the rules give."""

  def one(var):
    return var.replace(NamedSharding(mesh, logical_to_spec(variable_axes(var))))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_specs(state: nnx.State) -> nnx.State:
  """Like `state_shardings` but PartitionSpecs (for shard_map / abstract meshes)."""

  def one(var):
    return var.replace(logical_to_spec(variable_axes(var)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make: Callable[[], nnx.Module], mesh: Mesh | None) -> nnx.Module:
  """Builds a module with every parameter created directly on its shards.

  The constructor runs under `jit` with `out_shardings` from the rules, so no device ever
  holds a full unsharded copy of a sharded parameter.
  """
  if mesh is None:
    return make()
  graphdef, abs_state = nnx.split(nnx.eval_shape(make))
  shardings = state_shardings(abs_state, mesh)

  @jax.jit
  def init():
    return jax.lax.with_sharding_constraint(nnx.state(make()), shardings)

  with use_mesh(mesh):
    state = init()
  return nnx.merge(graphdef, state)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
  """`jax.set_mesh(mesh)`, or nothing when mesh is None."""
  if mesh is None:
    yield
  else:
    with jax.set_mesh(mesh):
      yield


def check_batch(batch: int, mesh, what: str) -> None:
  """Raises (at trace time) when `batch` rows cannot be split over the data-parallel axes;
  `what` starts the message (e.g. "MoE: batch")."""
  sizes = [dict(mesh.shape).get(a, 1) for a in BATCH_AXES]
  n = math.prod(sizes)
  if batch % n:
    raise ValueError(
      f"{what} {batch} is not divisible by the data-parallel mesh axes {BATCH_AXES} "
      f"(size {n}): " + " x ".join(map(str, sizes)) + " devices"
    )


def validate(cfg: ModelConfig, mesh: Mesh | None, batch_size: int | None = None) -> None:
  """Fails before compiling when the model or batch cannot be split over `mesh`."""
  if mesh is None:
    return
  s = dict(mesh.shape)
  checks = [
    ("num_key_value_heads", cfg.num_key_value_heads, "tensor"),
    ("num_attention_heads", cfg.num_attention_heads, "tensor"),
    ("vocab_size", cfg.vocab_size, "tensor"),
    ("hidden_size", cfg.hidden_size, "fsdp"),
    ("intermediate_size", cfg.intermediate_size, "tensor"),
  ]
  if cfg.is_moe:
    checks += [
      ("num_experts", cfg.num_experts, "expert"),
      ("moe_intermediate_size", cfg.moe_intermediate_size, "tensor"),
    ]
  for name, value, axis in checks:
    if value % s.get(axis, 1):
      raise ValueError(
        f"{name}={value} is not divisible by the mesh '{axis}' axis (size {s[axis]})"
      )
  if batch_size is not None:
    check_batch(batch_size, mesh, "batch size")


def describe(model: nnx.Module) -> list[tuple[str, tuple[int, ...], str, str]]:
  """(path, shape, partition spec, per-device shape) of every parameter, for printing."""
  rows = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value() if hasattr(var, "get_value") else var.value
    sharding = getattr(value, "sharding", None)
    spec = getattr(sharding, "spec", PartitionSpec())
    local = sharding.shard_shape(value.shape) if sharding is not None else value.shape
    rows.append(("/".join(map(str, path)), tuple(value.shape), str(spec), str(tuple(local))))
  return rows
