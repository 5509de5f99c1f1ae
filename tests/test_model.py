"""The full Qwen3 model: sharded runs agree with one device, parameter layouts follow the
rules, causality, packed-segment isolation, mixed dense/MoE layer stacks, scan and remat.

Every jitted function is compiled once per (config, mesh) and shared through module-scoped
caches: the file is dominated by ~15 compilations of the tiny model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import assert_close

from qwen3_jax import config as C
from qwen3_jax.config import MeshConfig, MoEConfig
from qwen3_jax.model import Qwen3
from qwen3_jax.model.global_tokens import default_positions, make_layout
from qwen3_jax.model.period import layer_period, moe_layer_indices
from qwen3_jax.sharding import RULES, create_sharded, make_mesh

B, L = 8, 16
NO_DROP = 8.0  # capacity factor with C = T (top-2 of 8 experts): nothing is ever dropped
# These programs run in milliseconds: LLVM optimisation is most of their compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def model_cfg(strategy="auto", **kw):
  moe = MoEConfig(
    strategy=strategy, capacity_factor=NO_DROP, router_z_loss_coef=1e-2, dynamic_loss_coef=1e-2
  )
  return C.tiny(moe=moe, **kw)


MESHES = {
  "data8": MeshConfig(data=8),
  "data2_expert4": MeshConfig(data=2, expert=4),
  "fsdp2_expert2_tensor2": MeshConfig(fsdp=2, expert=2, tensor=2),
}


def build(cfg, mesh=None, sharded=None):
  """The model and its jitted loss-and-grads; on a mesh, `sharded` is a `create_sharded` model
  of the same shapes (its layout is reused, values are set to the one-device model's).

  step(state, tokens, segment_ids, cotangent, aux_weight) -> (ModelOutput, grads) of
  sum(logits * cotangent) + aux_weight * aux_loss w.r.t. every parameter.
  """
  make = lambda: Qwen3(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  model = make()
  graphdef, state = nnx.split(model)
  if mesh is not None:
    # Same values as the eager one-device model (jit and eager sampling may differ in the
    # last ulp), kept on the shards `create_sharded` chose.
    state = jax.tree.map(
      lambda r, s: jax.device_put(np.asarray(r), s.sharding), state, nnx.state(sharded)
    )
    model = sharded

  @jax.jit(compiler_options=FAST_COMPILE)
  def step(state, tokens, segment_ids, cotangent, aux_weight):
    def loss(state):
      out = nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids)
      return jnp.sum(out.logits * cotangent) + aux_weight * out.aux["aux_loss"], out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return out, grads

  def run(*args):
    if mesh is None:
      return jax.device_get(step(state, *args))
    with jax.set_mesh(mesh):
      return jax.device_get(step(state, *args))

  return model, run


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, size=(B, L)).astype(np.int32)
  cot = rng.normal(size=(B, L, 256)).astype(np.float32)
  return tokens, np.ones((B, L), np.int32), cot


class Cache(dict):
  def get_or(self, key, fn):
    if key not in self:
      self[key] = fn()
    return self[key]


@pytest.fixture(scope="module")
def models():
  """Lazily built (model, run) per (strategy, mesh name or None, extra config)."""
  cache = Cache()

  def get(strategy, mesh_name=None, **kw):
    key = (strategy, mesh_name, tuple(sorted(kw.items())))

    def make():
      cfg = model_cfg(strategy, **kw)
      if not mesh_name:
        return build(cfg)
      mesh = make_mesh(MESHES[mesh_name])
      # One sharded construction per mesh and shapes (the strategy does not change them).
      sharded = cache.get_or(
        ("sharded", mesh_name, key[2]),
        lambda: create_sharded(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)), mesh),
      )
      return build(cfg, mesh, sharded)

    return cache.get_or(key, make)

  return get


@pytest.fixture(scope="module")
def outputs(models, inputs):
  """(ModelOutput, grads) with the aux loss included (weight 1), cached per model key."""
  cache = Cache()

  def get(strategy, mesh_name=None, **kw):
    key = (strategy, mesh_name, tuple(sorted(kw.items())))
    run = models(strategy, mesh_name, **kw)[1]
    return cache.get_or(key, lambda: run(*inputs, np.float32(1.0)))

  return get


def flat(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


# ----------------------------------------------------------------------------- sharded runs


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("strategy", ["auto", "dropless_ragged"])
def test_sharded_logits_and_grads_match_one_device(outputs, strategy, mesh_name):
  out_1, grads_1 = outputs(strategy)
  out_n, grads_n = outputs(strategy, mesh_name)
  assert np.abs(out_1.logits).max() > 0.1  # not a degenerate all-zero comparison
  assert_close(out_n.logits, out_1.logits, what="logits")
  for name in ("aux_loss", "load_balance_loss", "router_z_loss", "dynamic_loss"):
    np.testing.assert_allclose(out_n.aux[name], out_1.aux[name], rtol=1e-5, err_msg=name)
  np.testing.assert_array_equal(out_n.aux["tokens_per_expert"], out_1.aux["tokens_per_expert"])
  assert float(out_n.aux["dropped_fraction"]) == 0.0
  g1, gn = flat(grads_1), flat(grads_n)
  assert g1.keys() == gn.keys() and len(g1) == 15
  for name in g1:
    assert np.abs(g1[name]).max() > 0, name
    assert_close(gn[name], g1[name], what=name)


def test_sharded_init_equals_unsharded_init(models):
  model_1, _ = models("auto")
  model_n, _ = models("auto", "fsdp2_expert2_tensor2")
  p1, pn = flat(nnx.state(model_1, nnx.Param)), flat(nnx.state(model_n, nnx.Param))
  assert p1.keys() == pn.keys()
  for name in p1:  # equal up to jit-vs-eager rounding of the normal sampler
    np.testing.assert_allclose(pn[name], p1[name], rtol=1e-6, atol=1e-9, err_msg=name)


# Per-device shard shapes worked out by hand (R=2 scanned repeats lead the layer weights).
EXPECTED_SHARDS = {
  "fsdp2_expert2_tensor2": {
    "embed_tokens/embedding": (("tensor", "fsdp"), (128, 32)),
    "lm_head": (("fsdp", "tensor"), (32, 128)),
    "layers/sub_0/self_attn/q_proj": ((None, "fsdp", "tensor", None), (2, 32, 2, 16)),
    "layers/sub_0/self_attn/k_proj": ((None, "fsdp", "tensor", None), (2, 32, 1, 16)),
    "layers/sub_0/self_attn/o_proj": ((None, "tensor", None, "fsdp"), (2, 2, 16, 32)),
    "layers/sub_0/mlp/gate": ((None, "fsdp", None), (2, 32, 8)),
    "layers/sub_0/mlp/gate_proj": ((None, "expert", "fsdp", "tensor"), (2, 4, 32, 16)),
    "layers/sub_0/mlp/up_proj": ((None, "expert", "fsdp", "tensor"), (2, 4, 32, 16)),
    "layers/sub_0/mlp/down_proj": ((None, "expert", "tensor", "fsdp"), (2, 4, 16, 32)),
    "layers/sub_0/input_layernorm/weight": ((None, None), (2, 64)),
    "norm/weight": ((None,), (64,)),
  },
  "data2_expert4": {
    "layers/sub_0/mlp/gate_proj": ((None, "expert", None, None), (2, 2, 64, 32)),
    "layers/sub_0/mlp/down_proj": ((None, "expert", None, None), (2, 2, 32, 64)),
    "layers/sub_0/self_attn/q_proj": ((None, None, None, None), (2, 64, 4, 16)),
    "embed_tokens/embedding": ((None, None), (256, 64)),
  },
}


def _spec_axes(spec, ndim):
  """PartitionSpec entries padded with None to ndim."""
  return tuple(spec) + (None,) * (ndim - len(spec))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_parameters_are_sharded_as_the_rules_say(models, mesh_name):
  model, _ = models("auto", mesh_name)
  mesh = make_mesh(MESHES[mesh_name])
  sizes = dict(mesh.shape)
  params = {
    "/".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  assert len(params) == 15
  for name, var in params.items():
    value = var[...]
    sharding = value.sharding
    assert len(sharding.device_set) == 8, name  # every parameter lives on the whole mesh
    axes = var.get_metadata()["axes"]
    if len(axes) == value.ndim - 1:
      axes = ("layers",) + tuple(axes)
    # Independent of sharding.py's helpers: apply RULES by hand to get the local shape.
    local = []
    for dim, logical in zip(value.shape, axes, strict=True):
      mesh_axes = RULES.get(logical) if logical else None
      mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
      local.append(dim // int(np.prod([sizes[a] for a in mesh_axes])))
    assert sharding.shard_shape(value.shape) == tuple(local), name
    for shard in value.addressable_shards:
      assert shard.data.shape == tuple(local), name
    expected = EXPECTED_SHARDS.get(mesh_name, {}).get(name)
    if expected is not None:
      spec, shape = expected
      got = _spec_axes(sharding.spec, value.ndim)
      got = tuple(a if a is None or sizes[a] > 1 else None for a in got)
      assert got == spec, (name, sharding.spec)
      assert tuple(local) == shape, name
  if mesh_name == "data8":  # nothing but the batch is split on a pure data mesh
    for name, var in params.items():
      assert var[...].sharding.shard_shape(var.shape) == var.shape, name


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("strategy", ["auto", "dropless_ragged"])
def test_causality_gradient_wrt_later_tokens_is_zero(models, strategy):
  """Distinct token ids everywhere, so row v of d logits[:, t] / d embedding belongs to
  exactly one (sequence, position): it must be exactly zero for positions after t and
  non-zero for t and before."""
  _, run = models(strategy)
  rng = np.random.default_rng(1)
  tokens = rng.permutation(256)[: B * L].reshape(B, L).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  for t in (0, 6, L - 1):
    cot = np.zeros((B, L, 256), np.float32)
    cot[:, t] = rng.normal(size=(B, 256))
    _, grads = run(tokens, seg, cot, np.float32(0.0))
    g = np.asarray(grads["embed_tokens"]["embedding"][...])  # [V, D]
    norms = np.abs(g[tokens]).max(-1)  # [B, L]
    assert np.all(norms[:, t + 1 :] == 0.0), f"position {t} sees the future"
    assert np.all(norms[:, : t + 1] > 0.0), f"position {t} ignores its past"
    unused = np.setdiff1d(np.arange(256), tokens)
    assert np.all(g[unused] == 0.0)


def test_default_positions_restart_per_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0], [5, 5, 5, 5, 5, 5, 7, 7, 7, 7]])
  tokens = jnp.zeros_like(seg)
  np.testing.assert_array_equal(
    default_positions(tokens, seg),
    [[0, 1, 2, 0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]],
  )
  np.testing.assert_array_equal(default_positions(tokens, None), [list(range(10))] * 2)


@pytest.mark.parametrize("strategy", ["auto", "dropless_ragged"])
def test_segment_isolation(models, strategy):
  """Row 0 packs [doc A (6) | doc B (10)]; row 1 changes doc B; rows 2 and 3 hold A and B
  alone, followed by padding. Each document's logits must not depend on the other one."""
  _, run = models(strategy)
  rng = np.random.default_rng(2)
  a, b, b2 = (rng.integers(1, 256, size=n).astype(np.int32) for n in (6, 10, 10))
  tokens = rng.integers(1, 256, size=(B, L)).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  tokens[0], seg[0] = np.concatenate([a, b]), [1] * 6 + [2] * 10
  tokens[1], seg[1] = np.concatenate([a, b2]), [1] * 6 + [2] * 10
  tokens[2, :6], seg[2] = a, [1] * 6 + [0] * 10
  tokens[3, :10], seg[3] = b, [3] * 10 + [0] * 6
  out, _ = run(tokens, seg, np.zeros((B, L, 256), np.float32), np.float32(0.0))
  logits = np.asarray(out.logits)
  assert_close(logits[1, :6], logits[0, :6], rel=1e-6, what="doc A with another doc B")
  assert_close(logits[2, :6], logits[0, :6], rel=1e-6, what="doc A alone")
  assert_close(logits[3, :10], logits[0, 6:], rel=1e-6, what="doc B alone")
  assert np.abs(logits[1, 6:] - logits[0, 6:]).max() > 1e-3  # doc B's change is visible


def test_aux_loss_combines_the_layer_averages(outputs):
  out, _ = outputs("auto")
  aux = out.aux
  cfg = model_cfg()
  # Global balance per layer from the stacked statistics, then averaged over MoE layers.
  per_layer = cfg.num_experts * np.sum(aux["expert_fraction"] * aux["expert_prob"], axis=-1)
  assert aux["expert_fraction"].shape == (2, cfg.num_experts)
  np.testing.assert_allclose(aux["load_balance_loss"], per_layer.mean(), rtol=1e-6)
  np.testing.assert_allclose(aux["expert_fraction"].sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(aux["tokens_per_expert"].sum(-1), [B * L * 2] * 2)
  expected = (
    cfg.router_aux_loss_coef * aux["load_balance_loss"]
    + cfg.moe.router_z_loss_coef * aux["router_z_loss"]
    + cfg.moe.dynamic_loss_coef * aux["dynamic_loss"]
  )
  np.testing.assert_allclose(aux["aux_loss"], expected, rtol=1e-6)
  assert float(aux["router_z_loss"]) > 0 and float(aux["dynamic_loss"]) > 0


# ----------------------------------------------------------------------------- layer stacks


MIXED = [
  (dict(num_hidden_layers=4, decoder_sparse_step=2), [1, 3], 2),
  (dict(num_hidden_layers=6, mlp_only_layers=(2, 5)), [0, 1, 3, 4], 3),
  (dict(num_hidden_layers=3, mlp_only_layers=(0,)), [1, 2], 3),  # no period: one repeat
  (dict(num_hidden_layers=6, decoder_sparse_step=3, mlp_only_layers=(5,)), [2], 6),
  (dict(num_hidden_layers=8, decoder_sparse_step=2, mlp_only_layers=(1,)), [3, 5, 7], 8),
]


@pytest.mark.parametrize("kw, moe_layers, period", MIXED)
def test_mixed_layer_structure(kw, moe_layers, period):
  cfg = model_cfg(**kw)
  assert [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)] == moe_layers
  assert moe_layer_indices(cfg) == moe_layers
  assert layer_period(cfg) == period
  model = nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))
  repeats = cfg.num_hidden_layers // period
  for j in range(period):  # MoE sub-layers hold experts, the others a dense MLP
    shape = getattr(model.layers, f"sub_{j}").mlp.gate_proj.shape
    assert shape == ((repeats, 8, 64, 32) if cfg.is_moe_layer(j) else (repeats, 64, 96))


@pytest.mark.parametrize("kw, moe_layers, period", MIXED[:2])
def test_mixed_layers_match_an_unrolled_layer_loop(inputs, kw, moe_layers, period):
  cfg = model_cfg(**kw)
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  for j in range(period):
    w = np.asarray(getattr(model.layers, f"sub_{j}").mlp.gate_proj[...])
    assert not np.allclose(w[0], w[1]), "scanned repeats must be initialised independently"

  tokens = inputs[0]

  model_def, model_state = nnx.split(model)

  @jax.jit(compiler_options=FAST_COMPILE)
  def both(model_state, tokens):
    """The model's scanned forward and a plain Python loop over layers i = r * period + j."""
    model = nnx.merge(model_def, model_state)
    out = model(tokens)
    graphdef, state = nnx.split(model.layers)
    x = model.embed_tokens(tokens)
    pos = default_positions(tokens, None)
    seg = jnp.ones(tokens.shape, jnp.int32)
    layout = make_layout(seg, 0)  # full attention: no global tokens
    auxes = []
    for i in range(cfg.num_hidden_layers):
      r, j = divmod(i, period)
      unit = nnx.merge(graphdef, jax.tree.map(lambda a, r=r: a[r], state))
      x, aux = getattr(unit, f"sub_{j}")(x, pos, seg, layout)[:2]  # (x, aux, kv cache)
      assert (aux is not None) == (i in moe_layers)
      if aux is not None:
        auxes.append(aux)
    x = model.norm(x)
    logits = jnp.einsum("bld,dv->blv", x, model.lm_head[...])
    return out, logits, auxes

  out, logits, auxes = both(model_state, tokens)
  assert_close(out.logits, logits, rel=1e-6, what="scanned vs unrolled")
  assert out.aux["expert_fraction"].shape == (len(moe_layers), 8)
  for n, aux in enumerate(auxes):  # row n of the stacked stats is MoE layer moe_layers[n]
    np.testing.assert_array_equal(out.aux["tokens_per_expert"][n], aux["tokens_per_expert"])
    np.testing.assert_allclose(out.aux["expert_prob"][n], aux["expert_prob"], rtol=1e-6)
  lb = np.mean([float(a["load_balance_loss"]) for a in auxes])
  np.testing.assert_allclose(out.aux["load_balance_loss"], lb, rtol=1e-6)


@pytest.mark.parametrize("variant", [dict(scan_layers=True), dict(remat="full")])
def test_scan_and_remat_variants_are_identical(outputs, variant):
  out_1, grads_1 = outputs("auto")
  out_v, grads_v = outputs("auto", **variant)
  assert_close(out_v.logits, out_1.logits, rel=1e-6, what="logits")
  np.testing.assert_allclose(out_v.aux["aux_loss"], out_1.aux["aux_loss"], rtol=1e-6)
  g1, gv = flat(grads_1), flat(grads_v)
  assert g1.keys() == gv.keys()
  for name in g1:
    assert_close(gv[name], g1[name], rel=1e-5, what=name)


@pytest.mark.parametrize(
  "kw, scans, checkpoints",
  [
    (dict(), 0, 0),  # 2 layers: unrolled by depth
    (dict(num_hidden_layers=6), 1, 0),  # deeper than UNROLL_MAX_LAYERS: scanned
    (dict(scan_layers=True, remat="full"), 1, 1),
    (dict(scan_layers=False, remat="dots"), 0, 2),
  ],
)
def test_scan_and_remat_flags_reach_the_program(inputs, kw, scans, checkpoints):
  """The variants above are only meaningful if the flags change the traced program."""
  model = nnx.eval_shape(lambda: Qwen3(model_cfg(**kw), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, inputs[0])

  def primitives(jaxpr):  # every primitive, nested jaxprs (scan and checkpoint bodies) included
    for eqn in jaxpr.eqns:
      yield eqn.primitive.name
      for value in eqn.params.values():
        for sub in value if isinstance(value, tuple | list) else (value,):
          sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
          if hasattr(sub, "eqns"):
            yield from primitives(sub)

  names = list(primitives(jaxpr.jaxpr))
  assert names.count("scan") == scans and names.count("remat2") == checkpoints, (
    names
  )  # remat2: jax.checkpoint


def test_dense_model_has_no_moe_aux():
  cfg = C.tiny(num_experts=0)
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  out = nnx.jit(lambda m, t: m(t))(model, jnp.zeros((2, 4), jnp.int32))
  assert out.logits.shape == (2, 4, 256)
  assert float(out.aux["aux_loss"]) == 0.0
  assert moe_layer_indices(cfg) == []
  assert layer_period(cfg) == 1 and model.layers.sub_0.mlp.gate_proj.shape == (2, 64, 96)
