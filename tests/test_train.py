"""Train step: gradient accumulation == big batch (MoE aux on), compile once, overfitting,
non-finite steps skipped, weight-decay mask, schedule, config validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common, pretrain
from qwen3_jax import config as C
from qwen3_jax import sharding as shd
from qwen3_jax.model import moe as moe_lib
from qwen3_jax.train import resume
from qwen3_jax.train.config import OptimConfig, TrainConfig
from qwen3_jax.train.optimizer import decay_mask, schedule
from qwen3_jax.train.step import make_program


def _model(**kw):
  moe = C.MoEConfig(strategy="dense", router_z_loss_coef=0.01)
  return C.tiny(router_aux_loss_coef=0.1, moe=moe, **kw)


def _batch(b, l, seed=0, vocab=256):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, l + 1)).astype(np.int32)
  seg = np.ones((b, l), np.int32)
  seg[:, l // 2 :] = 2  # two documents per row
  seg[0, -3:] = 0  # some padding
  mask = ((seg > 0) & (np.roll(seg, -1, 1) == seg)).astype(np.int32)
  mask[:, -1] = 0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "loss_mask": mask}


@pytest.fixture(scope="module")
def mesh8():
  return shd.make_mesh(C.MeshConfig(data=2, expert=4))


def test_grad_accumulation_equals_big_batch(mesh8):
  cfg = TrainConfig(num_steps=10, batch_size=32, seq_len=16, model=_model(), z_loss=1e-3)
  big = make_program(cfg, mesh8)
  acc = make_program(dataclasses.replace(cfg, micro_batches=4), mesh8)
  state = big.init()
  batch = jax.device_put(_batch(32, 16), big.batch_sharding)
  g1, m1 = big.grads(state.params, batch)
  g4, m4 = acc.grads(state.params, batch)

  # Independent reference: the model on the whole batch, its own aux_loss, plain optax CE.
  def ref_loss(params):
    out = nnx.merge(big.graphdef, params)(batch["inputs"], segment_ids=batch["segment_ids"])
    w = batch["loss_mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["targets"])
    z = jax.nn.logsumexp(out.logits, -1) ** 2
    return ((ce + 1e-3 * z) * w).sum() / w.sum() + out.aux["aux_loss"], out.aux

  with shd.use_mesh(mesh8):
    (ref, aux), g_ref = jax.jit(jax.value_and_grad(ref_loss, has_aux=True))(state.params)
  assert float(aux["load_balance_loss"]) > 0.5  # the aux term is really on
  np.testing.assert_allclose(float(m1["loss"]), float(ref), rtol=1e-6)
  np.testing.assert_allclose(float(m4["loss"]), float(ref), rtol=1e-6)
  np.testing.assert_allclose(float(m4["load_balance_loss"]), float(aux["load_balance_loss"]), 1e-6)
  for a, b, c in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_micro_batch_balance_hand_computed():
  """`moe.balance="micro_batch"`: each micro-batch's f and P, weighted by its token share."""
  cfg = C.tiny(num_experts=4, router_aux_loss_coef=1.0, moe=C.MoEConfig(balance="micro_batch"))
  # Micro-batch 1 (1/4 of the tokens): f = [1, 0, 0, 0], P = [.7, .1, .1, .1] -> 4 * 0.7 = 2.8.
  # Micro-batch 2 (3/4): f = [0, .5, .5, 0], P = [.1, .4, .4, .1] -> 4 * (.2 + .2) = 1.6.
  mbs = [
    ([1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1], 0.25),
    ([0.0, 0.5, 0.5, 0.0], [0.1, 0.4, 0.4, 0.1], 0.75),
  ]
  # The global batch's f (what "global" uses): 0.25 f1 + 0.75 f2; passing it must not matter.
  f_global = jnp.array([[0.25, 0.375, 0.375, 0.0]])
  glob = cfg.replace(moe=C.MoEConfig(balance="global"))
  total = total_g = 0.0
  for f, p, share in mbs:
    stats = {
      "expert_fraction": jnp.array([f]),
      "expert_prob": jnp.array([p]),
      "router_z_loss": jnp.float32(0),
      "dynamic_loss": jnp.float32(0),
    }
    total += moe_lib.aux_losses(stats, cfg, fraction=f_global, tok_share=share)["aux_loss"]
    total_g += moe_lib.aux_losses(stats, glob, fraction=f_global, tok_share=share)["aux_loss"]
  np.testing.assert_allclose(total, 0.25 * 2.8 + 0.75 * 1.6, rtol=1e-6)  # = 1.9
  # Global: P = .25 P1 + .75 P2 = [.25, .325, .325, .1] -> 4 * 0.30625 = 1.225.
  np.testing.assert_allclose(total_g, 1.225, rtol=1e-6)


def test_micro_batch_balance_in_the_train_step(mesh8):
  """With 2 micro-batches the step's load-balance loss is the token-share-weighted sum of the
  model's own (per-call) value on each micro-batch (rows j, j + 2, ...), not the global one."""
  model_cfg = _model().replace(moe=C.MoEConfig(strategy="dense", balance="micro_batch"))
  cfg = TrainConfig(num_steps=2, batch_size=16, seq_len=16, micro_batches=2, model=model_cfg)
  prog = make_program(cfg, mesh8)
  state = prog.init()
  batch = _batch(16, 16)
  _, m = prog.grads(state.params, jax.device_put(batch, prog.batch_sharding))
  lb = jax.jit(
    lambda p, x, s: nnx.merge(prog.graphdef, p)(x, segment_ids=s).aux["load_balance_loss"]
  )
  n_tok = (batch["segment_ids"] > 0).sum()
  ref = 0.0
  with shd.use_mesh(mesh8):
    for j in range(2):
      x, seg = batch["inputs"][j::2], batch["segment_ids"][j::2]
      ref += float(lb(state.params, x, seg)) * (seg > 0).sum() / n_tok
    whole = float(lb(state.params, batch["inputs"], batch["segment_ids"]))
  np.testing.assert_allclose(float(m["load_balance_loss"]), ref, rtol=1e-5)
  assert abs(ref - whole) > 1e-4  # really not the global value


def test_compiles_once_and_overfits():
  mesh = shd.make_mesh(C.MeshConfig(data=2, expert=2), jax.devices()[:4])
  optim = OptimConfig(lr=1e-2, warmup_steps=5, weight_decay=0.0)
  cfg = TrainConfig(num_steps=80, batch_size=4, seq_len=32, model=_model(), optim=optim)
  prog = make_program(cfg, mesh)
  state = prog.init()
  batch = jax.device_put(_batch(4, 32, seed=1), prog.batch_sharding)
  losses = []
  for _ in range(cfg.num_steps):
    state, m = prog.train_step(state, batch)
    losses.append(float(m["ce"]))
  assert int(state.step) == 80 and int(state.skipped) == 0
  assert losses[0] > 5.0 and losses[-1] < 0.2, (losses[0], losses[-1])
  # The state keeps the rule shardings (so step 2 saw the same input shardings as step 1).
  gp = state.params["layers"]["sub_0"]["mlp"]["gate_proj"]
  assert gp.sharding.spec == shd.logical_to_spec(("layers", "experts", "embed", "expert_mlp"))

  # A non-finite step is skipped: no parameter or optimizer update, counted.
  params = dict(state.params)
  params["norm"] = {"weight": state.params["norm"]["weight"].at[0].set(jnp.nan)}
  state = dataclasses.replace(state, params=jax.device_put(params, prog.state_shardings.params))
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  state, m = prog.train_step(state, batch)
  assert not bool(m["finite"]) and int(m["skipped"]) == 1 and int(m["bad_streak"]) == 1
  assert int(state.step) == 81
  after = jax.tree.map(np.asarray, (state.params, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert prog.train_step.cache_size() == 1  # 81 steps, one compilation


def test_non_finite_streak_stops_with_clear_message():
  resume.check_bad_streak(2, 3, 10, "/ckpts")  # below the limit: goes on
  with pytest.raises(
    resume.NonFiniteError,
    match="3 non-finite steps in a row at step 11.*last good checkpoint in /ckpts is intact",
  ):
    resume.check_bad_streak(3, 3, 11, "/ckpts")


def test_decay_mask_and_schedule():
  params = {
    "embed_tokens": {"embedding": 0},
    "norm": {"weight": 0},
    "layers": {"sub_0": {"input_layernorm": {"weight": 0}, "mlp": {"gate_proj": 0}}},
    "lm_head": 0,
  }
  m = decay_mask(params, OptimConfig())
  assert m == {
    "embed_tokens": {"embedding": False},
    "norm": {"weight": False},
    "layers": {"sub_0": {"input_layernorm": {"weight": False}, "mlp": {"gate_proj": True}}},
    "lm_head": True,
  }
  assert decay_mask(params, OptimConfig(decay_norms=True, decay_embeddings=True))["norm"]["weight"]
  s = schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 110)
  np.testing.assert_allclose([float(s(0)), float(s(5)), float(s(10))], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(float(s(60)), 0.1 + 0.9 * 0.5, atol=1e-6)  # cosine midpoint
  np.testing.assert_allclose(float(s(110)), 0.1, atol=1e-6)
  lin = schedule(OptimConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 100)
  np.testing.assert_allclose(float(lin(25)), 0.75, atol=1e-6)


def test_config_roundtrip_and_bad_fields():
  cd = pretrain.get_config("model=tiny,steps=7")
  cfg = common.to_train_config(cd)
  assert cfg.num_steps == 7 and cfg.model.vocab_size == 512 and cfg.optim.lr == 3e-3
  for mutate, msg in [
    (lambda c: c.__delitem__("seq_len"), "missing required fields \\['seq_len'\\]"),
    (lambda c: setattr(c, "batch_size", 0), "batch_size must be >= 1"),
    (lambda c: setattr(c.optim, "schedule", "exp"), "optim.schedule='exp'"),
    (lambda c: setattr(c, "micro_batches", 3), "not divisible by micro_batches=3"),
    (lambda c: c.model.__setitem__("num_experts_per_tok", 99), "num_experts_per_tok=99"),
    (lambda c: c.optim.__setitem__("lrr", 1.0), "unknown optim fields \\['lrr'\\]"),
    (lambda c: setattr(c.data, "loss_on", "x"), "data.loss_on='x'"),
  ]:
    cd = pretrain.get_config("model=tiny")
    with cd.unlocked():
      mutate(cd)
    with pytest.raises(ValueError, match=msg):
      common.to_train_config(cd)
  with pytest.raises(ValueError, match="unknown config arg 'modle'"):
    pretrain.get_config("modle=tiny")


def test_batch_not_divisible_by_mesh_fails_fast(mesh8):
  cfg = TrainConfig(num_steps=1, batch_size=12, seq_len=8, model=_model())
  with pytest.raises(ValueError, match="batch size 12 is not divisible"):
    make_program(cfg, mesh8)
