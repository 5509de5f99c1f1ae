"""Meshes, logical axis names and the one table that maps them onto mesh axes.

Model code names only logical axes (`batch`, `embed`, `experts`, ...). `RULES` below is the
single place that says which mesh axis each of them is split over. Parameters carry their
logical axes as nnx metadata (`axes=(...)`); a scanned layer stack has one more leading
dimension than its names, which is the `layers` axis (never split).

Shapes that do not divide the mesh (the tensor axis tp; H q heads, K kv heads, V vocab):
- Stored parameter shapes never depend on the mesh, so a checkpoint restores onto any mesh.
- `kv_heads` and `vocab` are `UNEVEN_REPLICATED`: given an array's shape, a dim of theirs that
  its mesh axes do not divide is replicated instead of split (`logical_to_spec(axes, shape,
  mesh)`, used by `constrain`, `state_shardings`, `state_specs`). With K < tp (tp % K == 0)
  the k/v projections [D, K, Dh] are therefore replicated over `tensor`, and attention repeats
  each kv head `kv_head_repeats(K)` = tp / K times at run time (query head h keeps kv head
  h // (H / K)), so every tensor shard holds exactly the kv head its query heads need; the
  KV cache stores the repeated heads, split over `tensor`. Per device this costs the full
  k/v projection weights (2 * D * K * Dh, not / tp), the k/v projection FLOPs of all K heads,
  and one cached kv head per device: the tensor group holds tp / K copies of each head.
- The vocabulary is padded to `ModelConfig.padded_vocab_size` (a multiple of 128, not of the
  mesh); only the [.., V] logits sliced back from it can be uneven, and those are replicated.
- `validate` rejects what cannot shard at all (K neither dividing nor divided by tp, H or the
  padded vocab not divisible by tp, ...), naming both numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qwen3_jax.config import VOCAB_MULTIPLE, MeshConfig, ModelConfig

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

# Logical axes whose dim is replicated, not split, when its mesh axes do not divide it (see
# the module docstring): kv heads fewer than the tensor axis, and the unpadded vocab of logits.
UNEVEN_REPLICATED = ("kv_heads", "vocab")

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


def _mesh_sizes(mesh) -> dict[str, int]:
  return {} if mesh is None else dict(mesh.shape)


def logical_to_spec(axes: Axes, shape: Sequence[int] | None = None, mesh=None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; a mesh axis may be used only once.

  Args:
    axes: one logical axis name (or None) per dim.
    shape: the array's shape; with it, a dim named in `UNEVEN_REPLICATED` that the sizes of
      its mesh axes on `mesh` do not divide is replicated (None) instead of split.
    mesh: a Mesh or AbstractMesh; defaults to the active mesh (only read when shape is given).
  """
  if shape is not None and len(shape) != len(axes):
    raise ValueError(f"logical_to_spec: shape {tuple(shape)} has no name for every dim: {axes}")
  sizes = _mesh_sizes(active_mesh() if mesh is None else mesh) if shape is not None else {}
  used: dict[str, str] = {}
  out = []
  for i, name in enumerate(axes):
    if name is None:
      out.append(None)
      continue
    if name not in RULES:
      raise KeyError(f"Logical axis {name!r} has no rule in qwen3_jax.sharding.RULES")
    mesh_axes = RULES[name]
    split = math.prod(sizes.get(m, 1) for m in rule_axes(name))
    if name in UNEVEN_REPLICATED and sizes and shape[i] % split:
      out.append(None)
      continue
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
  mesh = active_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def logical_specs(tree):
  """A pytree of logical axes -> the same pytree of PartitionSpecs, for `jax.shard_map`.

  Leaves are tuples of logical axis names, one per leading dim (a name or None; dims past the
  tuple are whole), e.g. `("batch", None)`; `()` is replicated. A None stays None (an argument
  that is None). Any other tuple or container holds leaves.
  """
  return jax.tree.map(logical_to_spec, tree, is_leaf=_is_axes)


def shard_map(fn: Callable, *, in_axes, out_axes, mesh=None, check_vma: bool = True) -> Callable:
  """`jax.shard_map(fn)` with its in/out specs named by logical axes (`logical_specs`), so the
  rules table decides which mesh axes each argument and output is split over.

  Args:
    fn: the per-device body; collectives in it name mesh axes (e.g. `rule_axes("batch")`).
    in_axes, out_axes: logical axes of the arguments / outputs (pytree prefixes of them).
    mesh: defaults to the active mesh.
    check_vma: as in `jax.shard_map` (type-checks which values vary over which mesh axes).
  """
  return jax.shard_map(
    fn,
    mesh=active_mesh() if mesh is None else mesh,
    in_specs=logical_specs(in_axes),
    out_specs=logical_specs(out_axes),
    check_vma=check_vma,
  )


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
    return var.replace(NamedSharding(mesh, logical_to_spec(variable_axes(var), var.shape, mesh)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_specs(state: nnx.State, mesh=None) -> nnx.State:
  """Like `state_shardings` but PartitionSpecs (for shard_map / abstract meshes); `mesh`
  (default: the active one) decides which uneven dims are replicated."""

  def one(var):
    return var.replace(logical_to_spec(variable_axes(var), var.shape, mesh))

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


def kv_head_repeats(kv_heads: int, q_heads: int | None = None, mesh=None) -> int:
  """How many times attention repeats each of `kv_heads` kv heads under `mesh` (default: the
  active mesh): tp / K when the tensor axis tp is larger than K, else 1.

  Raises when the heads cannot be laid out over tp: K neither divides nor is divided by tp,
  or (given `q_heads`) H is not divisible by tp.
  """
  tp = _mesh_sizes(active_mesh() if mesh is None else mesh).get("tensor", 1)
  if q_heads is not None and q_heads % tp:
    raise ValueError(
      f"num_attention_heads={q_heads} is not divisible by the mesh 'tensor' axis (size {tp})"
    )
  if kv_heads % tp == 0:
    return 1
  if tp % kv_heads:
    raise ValueError(
      f"num_key_value_heads={kv_heads} neither divides nor is divisible by the mesh 'tensor' "
      f"axis (size {tp}): kv heads are split over it, or replicated when fewer"
    )
  return tp // kv_heads


def validate(cfg: ModelConfig, mesh: Mesh | None, batch_size: int | None = None) -> None:
  """Fails before compiling when the model or batch cannot be split over `mesh`."""
  if mesh is None:
    return
  s = dict(mesh.shape)
  kv_head_repeats(cfg.num_key_value_heads, cfg.num_attention_heads, mesh)
  vp = cfg.padded_vocab_size
  if vp % s["tensor"]:
    raise ValueError(
      f"vocab_size={cfg.vocab_size}, padded to {vp} (a multiple of {VOCAB_MULTIPLE}), is not "
      f"divisible by the mesh 'tensor' axis (size {s['tensor']}); use a tensor axis that "
      f"divides {VOCAB_MULTIPLE}"
    )
  checks = [
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
