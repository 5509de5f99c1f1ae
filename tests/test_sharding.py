"""Meshes, the logical-axis rules, layout validation and sharded construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from qwen3_jax import config as C
from qwen3_jax import sharding as S
from qwen3_jax.config import MeshConfig
from qwen3_jax.model import Qwen3
from qwen3_jax.model.layers import param


def mesh_of(**sizes):
  n = int(np.prod(list(sizes.values())))
  return S.make_mesh(MeshConfig(**sizes), jax.devices()[:n])


def test_make_mesh_axes_sizes_and_devices():
  mesh = S.make_mesh(MeshConfig(data=-1, expert=4))
  assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
  assert dict(mesh.shape) == dict(data=2, fsdp=1, expert=4, tensor=1)
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  small = mesh_of(data=2)
  assert small.size == 2 and set(small.devices.flat) == set(jax.devices()[:2])
  with pytest.raises(ValueError, match="needs 4 devices"):
    S.make_mesh(MeshConfig(data=4), jax.devices()[:2])


def test_logical_to_spec_follows_the_rules():
  assert S.logical_to_spec(("batch", "seq", None)) == PartitionSpec(
    ("data", "fsdp", "expert"), None, None
  )
  assert S.logical_to_spec(("vocab", "embed")) == PartitionSpec("tensor", "fsdp")
  assert S.logical_to_spec(("layers", "experts", "embed", "expert_mlp")) == PartitionSpec(
    None, "expert", "fsdp", "tensor"
  )
  assert S.logical_to_spec(("embed", "heads", "head_dim")) == PartitionSpec("fsdp", "tensor", None)
  for name, target in S.RULES.items():  # every rule is a mesh axis (or tuple of them) or None
    axes = (target,) if isinstance(target, str) else (target or ())
    assert set(axes) <= set(S.MESH_AXES), name


@pytest.mark.parametrize(
  "axes, words",
  [
    (("heads", "kv_heads"), ["heads", "kv_heads", "tensor"]),
    (("batch", "embed"), ["batch", "embed", "fsdp"]),
    (("experts", "batch"), ["experts", "batch", "expert"]),
  ],
)
def test_logical_to_spec_rejects_reused_mesh_axes(axes, words):
  with pytest.raises(ValueError) as err:
    S.logical_to_spec(axes)
  for word in words:
    assert repr(word) in str(err.value)


def test_logical_to_spec_rejects_unknown_names():
  with pytest.raises(KeyError, match="hidden"):
    S.logical_to_spec(("hidden",))


def test_shard_map_takes_logical_axes():
  P = PartitionSpec
  tree = (("batch", None), (), None, [("experts", None, "expert_mlp")])
  want = (P(S.BATCH_AXES, None), P(), None, [P("expert", None, "tensor")])
  assert S.logical_specs(tree) == want
  mesh = S.make_mesh(MeshConfig(data=2, expert=2, tensor=2))
  x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
  with S.use_mesh(mesh):
    f = S.shard_map(lambda a: jax.lax.psum(a.sum(), S.BATCH_AXES), in_axes=("batch",), out_axes=())
    total = jax.jit(f)(x)
  assert float(total) == float(x.sum())  # each device summed its 2 rows, then all of them


@pytest.mark.parametrize(
  "sizes, cfg_kw, batch, words",
  [
    (dict(expert=3), {}, None, ["num_experts=8", "'expert'", "size 3"]),
    (dict(tensor=2), dict(num_attention_heads=6, num_key_value_heads=3), None, ["heads=3", "2)"]),
    (dict(tensor=4), dict(num_attention_heads=6), None, ["num_attention_heads=6", "size 4"]),
    (dict(tensor=3), dict(num_attention_heads=6, num_key_value_heads=3), None, ["256", "ze 3"]),
    (dict(fsdp=3), {}, None, ["hidden_size=64", "'fsdp'", "size 3"]),
    (dict(tensor=2), dict(moe_intermediate_size=33), None, ["moe_intermediate_size=33", "2"]),
    (dict(data=2, expert=2), {}, 6, ["batch size 6", "size 4", "2 x 1 x 2"]),
    (dict(data=2, fsdp=2, expert=2), {}, 12, ["batch size 12", "size 8"]),
  ],
)
def test_validate_names_both_numbers(sizes, cfg_kw, batch, words):
  cfg = C.tiny(**cfg_kw)
  with pytest.raises(ValueError) as err:
    S.validate(cfg, mesh_of(**sizes), batch_size=batch)
  for word in words:
    assert word in str(err.value), (word, str(err.value))


def test_validate_accepts_good_layouts():
  S.validate(C.tiny(), None, batch_size=7)
  S.validate(C.tiny(), mesh_of(data=2, expert=2), batch_size=8)
  S.validate(C.tiny(), S.make_mesh(MeshConfig(fsdp=2, expert=2, tensor=2)), batch_size=4)
  S.validate(C.tiny(num_experts=0, moe_intermediate_size=33), mesh_of(tensor=2))
  # kv heads fewer than the tensor axis (replicated), an odd vocabulary (padded to 384).
  S.validate(C.tiny(num_key_value_heads=1, vocab_size=257), mesh_of(tensor=4))
  S.validate(C.tiny(num_key_value_heads=2), mesh_of(tensor=4))


def test_model_rejects_indivisible_batch_before_compiling():
  """The MoE layer checks the batch at trace time (no XLA compilation happens)."""
  mesh = mesh_of(data=2, expert=2)
  model = nnx.eval_shape(lambda: Qwen3(C.tiny(), rngs=nnx.Rngs(0)))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"batch 6 .*\(size 4\)"):
    nnx.eval_shape(lambda m: m(jnp.zeros((6, 8), jnp.int32)), model)


def test_constrain_and_active_mesh():
  x = jnp.ones((8, 4))
  assert S.active_mesh() is None
  assert S.constrain(x, ("batch", None)) is x  # no mesh: untouched
  with jax.set_mesh(mesh_of(data=1)):
    assert S.active_mesh() is None  # a 1-device mesh counts as none
  mesh = mesh_of(data=4, expert=2)
  with jax.set_mesh(mesh):
    assert S.active_mesh().shape == mesh.shape
    y = jax.jit(lambda x: S.constrain(x * 2, ("batch", None)))(x)
  assert y.sharding.shard_shape(y.shape) == (1, 4)
  np.testing.assert_array_equal(y, 2 * np.ones((8, 4)))


class _Toy(nnx.Module):
  def __init__(self, rngs, record):
    self.table = param(rngs, (256, 64), ("vocab", "embed"), "float32")
    self.free = nnx.Param(jnp.zeros((3,)))  # no axes: replicated
    record.append(isinstance(self.table[...], jax.core.Tracer))


def test_variable_axes_and_state_specs():
  model = nnx.eval_shape(lambda: Qwen3(C.tiny(), rngs=nnx.Rngs(0)))
  q = model.layers.sub_0.self_attn.q_proj
  assert S.variable_axes(q) == ("layers", "embed", "heads", "head_dim")  # scanned: + layers
  assert S.variable_axes(model.lm_head) == ("embed", "vocab")
  specs = S.state_specs(nnx.state(model, nnx.Param))
  assert specs["layers"]["sub_0"]["mlp"]["down_proj"].get_value() == PartitionSpec(
    None, "expert", "tensor", "fsdp"
  )
  toy = _Toy(nnx.Rngs(0), [])
  assert S.logical_to_spec(S.variable_axes(toy.free)) == PartitionSpec(None)  # replicated


def test_create_sharded_builds_on_shards_without_a_full_copy():
  mesh = S.make_mesh(MeshConfig(fsdp=4, tensor=2))
  calls = []
  toy = S.create_sharded(lambda: _Toy(nnx.Rngs(0), calls), mesh)
  assert calls and all(calls)  # the constructor only ever ran traced (eval_shape / jit)
  table = toy.table[...]
  assert table.sharding.spec == PartitionSpec("tensor", "fsdp")
  assert {s.data.shape for s in table.addressable_shards} == {(128, 16)}
  assert len(table.sharding.device_set) == 8
  assert toy.free[...].sharding.is_fully_replicated
  eager = _Toy(nnx.Rngs(0), [])
  np.testing.assert_allclose(table, eager.table[...], rtol=1e-6, atol=1e-9)
  unsharded = S.create_sharded(lambda: _Toy(nnx.Rngs(0), []), None)
  assert isinstance(unsharded.table[...], jax.Array)
  rows = {r[0]: r for r in S.describe(toy)}
  assert rows["table"][1:] == ((256, 64), str(PartitionSpec("tensor", "fsdp")), "(128, 16)")


# ----------------------------------------------------------------------------- uneven shapes

FAST = {"xla_backend_optimization_level": 0}  # tiny programs: skip LLVM optimisation


def test_uneven_kv_heads_and_vocab_are_replicated_other_axes_split():
  mesh = mesh_of(tensor=4)
  spec = lambda axes, shape: S.logical_to_spec(axes, shape, mesh)  # noqa: E731
  assert spec(("embed", "kv_heads", "head_dim"), (64, 2, 16)) == PartitionSpec("fsdp", None, None)
  assert spec(("embed", "kv_heads", "head_dim"), (64, 8, 16)) == PartitionSpec(
    "fsdp", "tensor", None
  )
  assert spec(("batch", "seq", "vocab"), (2, 3, 257)) == PartitionSpec(
    ("data", "fsdp", "expert"), None, None
  )
  assert spec(("embed", "heads"), (64, 6)) == PartitionSpec("fsdp", "tensor")  # validate's job
  assert S.logical_to_spec(("kv_heads",), (1,)) == PartitionSpec("tensor")  # no mesh: the rule
  assert S.kv_head_repeats(1, 4, mesh) == 4 and S.kv_head_repeats(8, 8, mesh) == 1
  assert S.kv_head_repeats(1, 4) == 1  # no active mesh


def _param_shapes(model):
  return {k: tuple(v.shape) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _logits(model, toks, mesh):
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits, compiler_options=FAST)
  with S.use_mesh(mesh):
    return np.asarray(fwd(state, toks))


def test_mqa_and_odd_vocab_on_tensor_meshes_match_one_device_and_move_between_meshes(tmp_path):
  """One kv head (replicated over tensor, repeated inside attention) and vocab 257 (stored
  padded to 384, logits sliced to 257) on tensor=4 and tensor=2 meshes: the same logits as one
  device, the same stored shapes on every mesh, and a checkpoint saved on tensor=4 restores
  on one device and on tensor=2. Sparse and full layers, one kv head for 4 query heads."""
  from qwen3_jax import checkpoint

  att = C.AttentionConfig(pattern=("sparse", "full"), window=5, global_every=4, max_globals=2)
  cfg = C.tiny(vocab_size=257, num_key_value_heads=1, num_experts=0, attention=att)
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 13)), jnp.int32)
  make = lambda: Qwen3(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  one = make()
  want = _logits(one, toks, None)
  assert want.shape == (2, 13, 257)
  assert one.embed_tokens.embedding.shape == (384, 64) and one.lm_head.shape == (64, 384)
  assert float(np.abs(np.asarray(one.lm_head[...][:, 257:])).max()) == 0.0  # zero padding

  m4 = mesh_of(data=2, tensor=4)
  S.validate(cfg, m4, batch_size=2)
  four = S.create_sharded(make, m4)
  assert _param_shapes(four) == _param_shapes(one)
  attn = four.layers.sub_0.self_attn
  assert attn.k_proj[...].sharding.is_fully_replicated  # [R, D, K=1, Dh]: K replicated
  assert attn.q_proj[...].sharding.shard_shape(attn.q_proj.shape)[2] == 1  # 4 heads / 4
  got = _logits(four, toks, m4)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))

  checkpoint.save_params(str(tmp_path / "p"), four, cfg)
  back, cfg1 = checkpoint.load_params(str(tmp_path / "p"))  # tensor 4 -> one device
  assert cfg1 == cfg
  ref = jax.tree.map(np.asarray, nnx.state(four, nnx.Param).to_pure_dict())
  jax.tree.map(np.testing.assert_array_equal, nnx.state(back, nnx.Param).to_pure_dict(), ref)
  m2 = mesh_of(tensor=2)
  two, _ = checkpoint.load_params(str(tmp_path / "p"), m2)  # tensor 4 -> tensor 2
  assert _param_shapes(two) == _param_shapes(one)
  got2 = _logits(two, toks, m2)
  np.testing.assert_allclose(got2, want, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(got2.argmax(-1), want.argmax(-1))
