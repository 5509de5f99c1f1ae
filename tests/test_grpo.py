"""GRPO / DAPO / Dr. GRPO: advantages, aggregation and clip-higher by hand; k3 KL; chunked
log-probs against a plain log-softmax and against the engine's rollout log-probs; the RL step's
gradient against plain policy gradient (on policy, on a mesh, micro-batched); constant rewards
give no update; a one-token bandit learns its rewarded token."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3_jax import config as C
from qwen3_jax import sharding as shd
from qwen3_jax.data.tokenizer import train_tokenizer
from qwen3_jax.infer.engine import Engine, Request
from qwen3_jax.infer.sampling import SamplingParams
from qwen3_jax.rl import grpo
from qwen3_jax.rl.batch import rollout_batch
from qwen3_jax.rl.config import RLConfig
from qwen3_jax.rl.step import make_rl_program
from qwen3_jax.train.config import OptimConfig, TrainConfig
from qwen3_jax.train.fused_ce import fused_cross_entropy, token_logprobs

# ------------------------------------------------------------------ the objective by hand


def test_group_advantages_zero_variance_and_overlong_by_hand():
  r = jnp.asarray([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 1.0])
  # Group 1: mean 0.5, std 0.5; group 2: constant; group 3: mean 1, std sqrt(1.5).
  adv = grpo.group_advantages(r, 4, eps=0.0)
  s3 = np.sqrt(1.5)
  want = [1, -1, -1, 1, 0, 0, 0, 0, -1 / s3, 2 / s3, -1 / s3, 0]
  np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-7)
  adv_eps = grpo.group_advantages(r, 4, eps=0.5)
  np.testing.assert_allclose(adv_eps[:4], [0.5, -0.5, -0.5, 0.5], rtol=1e-6)
  dr = grpo.group_advantages(r, 4, scale_by_std=False)
  np.testing.assert_allclose(dr, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -1, 2, -1, 0], atol=1e-7)
  np.testing.assert_array_equal(grpo.zero_variance_groups(r, 4), [False, True, False])
  with pytest.raises(ValueError, match="multiple of group_size"):
    grpo.group_advantages(r, 5)
  # DAPO soft overlong penalty: L_max 10, L_cache 4: free up to 6, then -1/4 per token.
  pen = grpo.overlong_penalty(jnp.asarray([3, 6, 7, 9, 10, 12]), max_len=10, cache=4)
  np.testing.assert_allclose(pen, [0, 0, -0.25, -0.75, -1, -1])
  np.testing.assert_allclose(
    grpo.overlong_penalty(jnp.asarray([10, 11]), max_len=10, cache=0, factor=0.5), [0, -0.5]
  )


def test_aggregations_by_hand_and_micro_batch_shares():
  per_tok = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [7.0, 8.0, 9.0, 9.0]])
  mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
  # token: (1 + 2 + 3 + 5) / 4; sequence: (6 / 3 + 5 / 1) / 2 (the empty row not counted);
  # constant: 11 / (3 rows * T=4), or / (3 * 8) with norm_len 8.
  assert float(grpo.aggregate(per_tok, mask, "token")) == pytest.approx(11 / 4)
  assert float(grpo.aggregate(per_tok, mask, "sequence")) == pytest.approx(3.5)
  assert float(grpo.aggregate(per_tok, mask, "constant")) == pytest.approx(11 / 12)
  assert float(grpo.aggregate(per_tok, mask, "constant", norm_len=8)) == pytest.approx(11 / 24)
  # Split into row groups with the whole batch's totals: the shares sum to the whole.
  totals = grpo.loss_totals(mask)
  for agg in ("token", "sequence", "constant"):
    whole = grpo.aggregate(per_tok, mask, agg)
    parts = sum(
      grpo.aggregate(per_tok[rows], mask[rows], agg, totals=totals)
      for rows in (slice(0, 1), slice(1, 3))
    )
    assert float(parts) == pytest.approx(float(whole)), agg
  # An all-empty mask gives 0, not NaN.
  assert float(grpo.aggregate(per_tok, jnp.zeros_like(mask), "sequence")) == 0.0


def test_clip_higher_zeroes_the_gradient_of_the_right_tokens():
  """Ratios 0.5, 0.9, 1.1, 1.5 against bounds [0.8, 1.28]: with A > 0 only the ratio above
  1 + eps_high is clipped (zero gradient), with A < 0 only the one below 1 - eps_low; the other
  tokens get d loss / d logp = -A r / n (token-mean over n = 4)."""
  ratios = jnp.asarray([[0.5, 0.9, 1.1, 1.5]])
  old = jnp.asarray([[-1.0, -2.0, -0.5, -3.0]])
  logp = old + jnp.log(ratios)
  mask = jnp.ones((1, 4))

  def loss(lp, a):
    return grpo.policy_loss(lp, old, jnp.asarray([a]), mask, eps_low=0.2, eps_high=0.28)

  for a, clipped in ((1.0, 3), (-1.0, 0), (2.5, 3), (-0.5, 0)):
    g = jax.grad(lambda lp: loss(lp, a)[0])(logp)[0]  # noqa: B023
    want = -a * np.array(ratios[0]) / 4
    want[clipped] = 0.0
    np.testing.assert_allclose(g, want, rtol=1e-6, err_msg=f"A={a}")
    _, m = loss(logp, a)
    assert float(m["clip_frac_high"]) == (0.25 if a > 0 else 0.0)
    assert float(m["clip_frac_low"]) == (0.25 if a < 0 else 0.0)
    assert float(m["ratio_max"]) == pytest.approx(1.5)
    assert float(m["ratio_mean"]) == pytest.approx(1.0)
  # The value: -min(r A, clip(r) A) averaged; A = 1: -(0.5 + 0.9 + 1.1 + 1.28) / 4.
  assert float(loss(logp, 1.0)[0]) == pytest.approx(-(0.5 + 0.9 + 1.1 + 1.28) / 4)


def test_k3_kl_zero_at_the_reference_positive_elsewhere():
  rng = np.random.default_rng(0)
  logp = jnp.asarray(-rng.uniform(0.1, 3.0, (3, 5)), jnp.float32)
  mask = jnp.ones((3, 5))
  adv = jnp.asarray([1.0, -1.0, 0.5])
  kw = dict(eps_low=0.2, eps_high=0.2, beta=0.1)
  loss0, m0 = grpo.policy_loss(logp, logp, adv, mask, ref_logp=logp, **kw)
  assert float(m0["kl"]) == 0.0
  assert float(loss0) == pytest.approx(float(m0["pg_loss"]))
  ref = logp + jnp.asarray(rng.normal(0, 0.3, (3, 5)), jnp.float32)
  loss1, m1 = grpo.policy_loss(logp, logp, adv, mask, ref_logp=ref, **kw)
  d = np.asarray(ref - logp, np.float64)
  want_kl = (np.exp(d) - d - 1).mean()
  assert float(m1["kl"]) == pytest.approx(want_kl, rel=1e-5) and want_kl > 0
  assert float(loss1) == pytest.approx(float(m1["pg_loss"]) + 0.1 * want_kl, rel=1e-5)
  # d k3 / d logp = 1 - exp(ref - logp): pulls logp toward ref.
  g = jax.grad(lambda lp: grpo.policy_loss(lp, lp, 0 * adv, mask, ref_logp=ref, **kw)[0])(logp)
  np.testing.assert_allclose(g, 0.1 * (1 - np.exp(d)) / 15, rtol=1e-4, atol=1e-8)
  with pytest.raises(ValueError, match="needs ref_logp"):
    grpo.policy_loss(logp, logp, adv, mask, beta=0.1)


# ------------------------------------------------------------------ chunked log-probs


def _plain(hidden, head, vocab, t):
  logits = jnp.einsum("bld,dv->blv", hidden, head)[..., :vocab] / t
  return jax.nn.log_softmax(logits, -1)


@pytest.mark.parametrize(
  "mesh_cfg", [None, C.MeshConfig(data=2, expert=2), C.MeshConfig(2, 1, 1, 2)]
)
def test_token_logprobs_and_tempered_ce_equal_plain_log_softmax(mesh_cfg):
  """[4, 6] tokens, D 8, head 40 columns of which 37 real, T = 0.7, chunks of 5 rows (uneven):
  log-probs, entropies, and the gradient of sum(g * logp) equal plain autodiff; so do the
  fused CE's loss and gradients at temperature T. One device, tokens split over a mesh
  (shard_map), and a vocab-parallel mesh (tensor 2: the full-logits path)."""
  rng = np.random.default_rng(1)
  b, l, d, vp, v, t = 4, 6, 8, 40, 37, 0.7
  hidden = jnp.asarray(rng.normal(0, 1, (b, l, d)), jnp.float32)
  head = jnp.asarray(rng.normal(0, 1, (d, vp)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, l)), jnp.int32)
  g = jnp.asarray(rng.normal(0, 1, (b, l)), jnp.float32)
  w = jnp.asarray(rng.uniform(0, 1, (b, l)), jnp.float32)
  mesh = None if mesh_cfg is None else shd.make_mesh(mesh_cfg, jax.devices()[:4])

  def ours(h, wh):
    return token_logprobs(h, wh, targets, temperature=t, chunk_size=5, vocab_size=v)

  def ref(h, wh):
    lsm = _plain(h, wh, v, t)
    ent = -(jnp.exp(lsm) * lsm).sum(-1)
    return jnp.take_along_axis(lsm, targets[..., None], -1)[..., 0], ent

  with shd.use_mesh(mesh):
    lp, ent = jax.jit(ours)(hidden, head)
    grads = jax.jit(jax.grad(lambda h, wh: (g * ours(h, wh)[0]).sum(), (0, 1)))(hidden, head)
    ce_kw = dict(chunk_size=5, vocab_size=v, temperature=t, z_loss=1e-2)
    ce, ce_g = jax.jit(
      jax.value_and_grad(lambda h, wh: fused_cross_entropy(h, wh, targets, w, **ce_kw)[0], (0, 1))
    )(hidden, head)
  lp_ref, ent_ref = ref(hidden, head)
  np.testing.assert_allclose(lp, lp_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ent, ent_ref, rtol=1e-5, atol=1e-6)
  grads_ref = jax.grad(lambda h, wh: (g * ref(h, wh)[0]).sum(), (0, 1))(hidden, head)
  for a, r in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)

  def ce_ref(h, wh):
    lsm = _plain(h, wh, v, t)
    lse = jax.nn.logsumexp(jnp.einsum("bld,dv->blv", h, wh)[..., :v] / t, -1)
    nll = -jnp.take_along_axis(lsm, targets[..., None], -1)[..., 0]
    return (w * (nll + 1e-2 * lse**2)).sum()

  want, want_g = jax.value_and_grad(ce_ref, (0, 1))(hidden, head)
  np.testing.assert_allclose(ce, want, rtol=1e-6)
  for a, r in zip(ce_g, want_g, strict=True):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the RL step


VOCAB = 320  # the smallest byte-level BPE vocabulary the engine's tokenizer allows
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "12 * 7 = 84, 84 + 5 = 89."]
T = 0.8


def _model(vocab=VOCAB):
  moe = C.MoEConfig(strategy="dense", router_z_loss_coef=0.01)
  return C.tiny(vocab_size=vocab, num_hidden_layers=1, router_aux_loss_coef=0.1, moe=moe)


def _rows(b, l, prompt, seed=0, vocab=VOCAB):
  """b rows of l tokens: `prompt` prompt tokens, a completion, then padding of varying size."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, l)).astype(np.int32)
  lengths = rng.integers(prompt + 2, l + 1, b)
  lengths[0] = l
  pos = np.arange(l)[None, :]
  seg = (pos < lengths[:, None]).astype(np.int32)
  mask = (seg > 0) & (pos >= prompt)
  return tokens, seg, mask.astype(np.int32)


@pytest.fixture(scope="module")
def mesh4():
  return shd.make_mesh(C.MeshConfig(data=2, expert=2), jax.devices()[:4])


@pytest.fixture(scope="module")
def prog(mesh4):
  """One program for the policy-gradient, zero-update and engine tests (compiled once): MoE
  model on a data x expert mesh, 2 micro-batches, DAPO at T = 0.8 without the MoE aux loss
  (so zero advantages mean zero gradients), AdamW without weight decay."""
  optim = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.0)
  cfg = TrainConfig(
    num_steps=4, batch_size=8, seq_len=16, model=_model(), optim=optim, micro_batches=2
  )
  return make_rl_program(cfg, mesh4, RLConfig.dapo(temperature=T, moe_aux=False))


def test_on_policy_step_has_ratio_one_and_plain_policy_gradient(prog, mesh4):
  """The recomputed log-probs and entropies equal log_softmax(logits / T) of a plain forward;
  with old_logp = those, the ratio is exactly 1, nothing is clipped, the loss is -mean(A) over
  tokens, and the gradient equals the plain policy gradient -sum(m A grad logp) / n of an
  independent full-logits reference (2 micro-batches on a mesh vs one plain batch)."""
  state = prog.init()
  tokens, seg, mask = _rows(8, 16, prompt=5)
  logp, ent = prog.logprobs(state.params, tokens, seg)
  adv = grpo.group_advantages(jnp.asarray([1.0, 0, 0, 1, 0, 1, 1, 1]), 4)
  n = mask.sum()

  def plain(params):
    out = nnx.merge(prog.graphdef, params)(jnp.asarray(tokens), segment_ids=jnp.asarray(seg))
    lsm = jax.nn.log_softmax(out.logits[:, :-1] / T, -1)
    lp = jnp.take_along_axis(lsm, jnp.asarray(tokens)[:, 1:, None], -1)[..., 0]
    ent = -(jnp.exp(lsm) * lsm).sum(-1)
    lp, ent = jnp.pad(lp, ((0, 0), (1, 0))), jnp.pad(ent, ((0, 0), (1, 0)))
    return -(jnp.asarray(adv)[:, None] * lp * mask).sum() / n, (lp, ent)

  with shd.use_mesh(mesh4):
    g_ref, (lp_ref, ent_ref) = jax.jit(jax.grad(plain, has_aux=True))(state.params)
  on = mask > 0
  np.testing.assert_allclose(np.asarray(logp)[on], np.asarray(lp_ref)[on], atol=2e-6)
  np.testing.assert_allclose(np.asarray(ent)[on], np.asarray(ent_ref)[on], atol=2e-6)

  batch = dict(tokens=tokens, segment_ids=seg, loss_mask=mask, old_logp=logp, advantages=adv)
  grads, m = prog.grads(state.params, batch)
  assert float(m["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
  assert float(m["ratio_max"]) == pytest.approx(1.0, abs=1e-5)
  assert float(m["clip_frac_low"]) == 0.0 and float(m["clip_frac_high"]) == 0.0
  want_pg = -float((np.asarray(adv)[:, None] * mask).sum()) / n
  assert float(m["pg_loss"]) == pytest.approx(want_pg, abs=1e-6)
  np.testing.assert_allclose(m["entropy"], np.asarray(ent_ref)[on].mean(), rtol=1e-5)
  norm = float(jnp.sqrt(sum((x**2).sum() for x in jax.tree.leaves(g_ref))))
  assert norm > 1e-3  # a loss near 0 on policy, but not its gradient
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  # Two optimizer steps on the same rollouts: the second one is off policy (ratio != 1).
  state, m1 = prog.rl_step(state, batch)
  state, m2 = prog.rl_step(state, batch)
  assert bool(m1["finite"]) and int(state.step) == 2
  assert float(m1["ratio_max"]) == pytest.approx(1.0, abs=1e-5)
  assert float(m2["ratio_max"]) > 1.0 + 1e-4
  assert prog.rl_step.cache_size() == 1
  with pytest.raises(ValueError, match="ref_logp goes with beta"):
    prog.rl_step(state, {**batch, "ref_logp": logp})


def test_constant_rewards_give_zero_advantage_and_no_update(prog):
  """Equal rewards in every group: advantages exactly 0, so (old_logp off policy or not) the
  gradient is exactly 0 and an AdamW step without weight decay leaves every parameter as is."""
  state = prog.init()
  before = jax.tree.map(np.asarray, state.params)
  tokens, seg, mask = _rows(8, 16, prompt=3, seed=2)
  adv = grpo.group_advantages(jnp.asarray([0.7] * 4 + [0.0] * 4), 4)
  assert np.all(np.asarray(adv) == 0.0)
  assert np.all(np.asarray(grpo.zero_variance_groups(jnp.asarray([0.7] * 4 + [0.0] * 4), 4)))
  logp, _ = prog.logprobs(state.params, tokens, seg)
  batch = dict(tokens=tokens, segment_ids=seg, loss_mask=mask, old_logp=logp - 0.1, advantages=adv)
  state, m = prog.rl_step(state, batch)
  assert float(m["grad_norm"]) == 0.0 and float(m["loss"]) == 0.0
  assert float(m["ratio_mean"]) == pytest.approx(np.exp(0.1), rel=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_recomputed_logprobs_equal_the_engine_rollout(prog, mesh4):
  """The engine samples 2 prompts x 4 at T = 0.8 (top-k / top-p on) from the program's params
  on the same mesh; `rollout_batch` + `logprobs` recompute every generated token's log-prob
  within 2e-5, and an RL step on that batch starts at ratio 1."""
  tok = train_tokenizer(TEXTS * 4, VOCAB)
  state = prog.init()
  eng = Engine(nnx.merge(prog.graphdef, state.params), tok, mesh=mesh4, steps_per_call=4)
  eng.eos_ids = ()
  sp = SamplingParams(temperature=T, top_k=40, top_p=0.9, seed=3)
  rng = np.random.default_rng(3)
  reqs = [
    Request(rng.integers(10, VOCAB, n).tolist(), sampling=sp, max_new_tokens=6, n=4) for n in (5, 9)
  ]
  comps = [c for group in eng.generate(reqs) for c in group]
  assert len({tuple(c.token_ids) for c in comps}) > 1
  adv = grpo.group_advantages(jnp.asarray([float(c.token_ids[0] % 3) for c in comps]), 4)
  batch = rollout_batch(comps, adv, 16)
  logp, _ = prog.logprobs(state.params, batch["tokens"], batch["segment_ids"])
  on = batch["loss_mask"] > 0
  assert on.sum() == 8 * 6
  np.testing.assert_allclose(np.asarray(logp)[on], batch["old_logp"][on], atol=2e-5)
  _, m = prog.rl_step(state, batch)
  assert abs(float(m["ratio_max"]) - 1.0) < 1e-4 and abs(float(m["ratio_mean"]) - 1.0) < 1e-5


def test_one_token_bandit_learns_the_rewarded_token():
  """Vocab 16, a fixed 7-token prompt, one generated token, reward 1 for token 11: 4 groups of
  8 samples from the policy's own distribution per rollout, 2 optimizer steps per rollout
  (the second off policy), MoE aux loss on. p(11) rises from ~1/16 to > 0.9 in 25 rollouts."""
  vocab, target, prompt = 16, 11, [1, 2, 3, 4, 5, 6, 7]
  mesh = shd.make_mesh(C.MeshConfig(), jax.devices()[:1])
  optim = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
  cfg = TrainConfig(num_steps=100, batch_size=32, seq_len=8, model=_model(vocab), optim=optim)
  prog = make_rl_program(cfg, mesh, RLConfig.dapo())
  state = prog.init()
  # Row v holds prompt + (v mod 16): the last log-prob of each row is log p(v | prompt).
  cand = np.asarray([prompt + [v % vocab] for v in range(32)], np.int32)
  seg = np.ones_like(cand)
  mask = np.zeros_like(cand)
  mask[:, -1] = 1

  def dist(params):
    return np.asarray(prog.logprobs(params, cand, seg)[0])[:vocab, -1]  # [16] log p(v)

  p0 = np.exp(dist(state.params))[target]
  assert p0 < 0.2
  key = jax.random.key(0)
  for i in range(25):
    key, k = jax.random.split(key)
    logp_v = dist(state.params)
    sample = np.asarray(jax.random.categorical(k, jnp.asarray(logp_v), shape=(32,)))
    tokens = cand.copy()
    tokens[:, -1] = sample
    old_logp = np.zeros(tokens.shape, np.float32)
    old_logp[:, -1] = logp_v[sample]  # the sampling distribution's log-probs
    adv = grpo.group_advantages((sample == target).astype(np.float32), 8)
    batch = dict(tokens=tokens, segment_ids=seg, loss_mask=mask, old_logp=old_logp, advantages=adv)
    for _ in range(2):
      state, m = prog.rl_step(state, batch)
    if i == 0:  # the loss holds the MoE aux loss
      assert float(m["aux_loss"]) > 0
      assert float(m["loss"]) == pytest.approx(float(m["pg_loss"] + m["aux_loss"]), rel=1e-5)
  p = np.exp(dist(state.params))[target]
  assert p > 0.9, (p0, p)


def test_rl_config_presets_and_validation():
  assert RLConfig.grpo().aggregation == "sequence" and RLConfig.grpo().beta > 0
  assert RLConfig.dapo().eps_high == 0.28
  dr = RLConfig.dr_grpo(norm_len=512)
  assert dr.aggregation == "constant" and not dr.scale_by_std and dr.norm_len == 512
  with pytest.raises(ValueError, match="aggregation"):
    RLConfig(aggregation="mean")
  with pytest.raises(ValueError, match="temperature"):
    RLConfig(temperature=0.0)
  assert dataclasses.replace(RLConfig(), beta=0.1).beta == 0.1
