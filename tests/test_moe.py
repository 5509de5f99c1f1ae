"""MoE layer: routing, dispatch strategies, dropped tokens, padding, aux losses.

Every number is checked against an independent float64 numpy reference that routes one token
at a time (softmax -> top-k or top-p -> renormalise iff norm_topk_prob) and runs the chosen
experts' SwiGLU one by one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import assert_close

from qwen3_jax import config as C
from qwen3_jax.config import MeshConfig, MoEConfig
from qwen3_jax.model import dispatch
from qwen3_jax.model import moe as moe_lib
from qwen3_jax.model.moe import MoE
from qwen3_jax.sharding import make_mesh, use_mesh

D, F, E, K = 64, 32, 8, 2  # the tiny preset's MoE shapes
B, L = 4, 8  # T = 32 tokens
T = B * L
NO_DROP_CF = float(E)  # C = min(T, ceil(cf * T * k / E)) = T: nothing can overflow
# These programs run in milliseconds: LLVM optimisation is most of their compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def moe_cfg(strategy="dense", **moe_kw):
  norm = moe_kw.pop("norm_topk_prob", True)
  moe_kw.setdefault("capacity_factor", NO_DROP_CF)
  return C.tiny(norm_topk_prob=norm, moe=MoEConfig(strategy=strategy, **moe_kw))


# Routing variants x strategies of the equivalence tests.
ROUTINGS = {
  "topk_norm": dict(norm_topk_prob=True),
  "topk_nonorm": dict(norm_topk_prob=False),
  "topp": dict(routing="topp", top_p=0.5, max_experts=4),
  "topp_nonorm": dict(routing="topp", top_p=0.7, max_experts=3, norm_topk_prob=False),
}
STRATEGIES = ("dense", "capacity", "dropless_blocks", "dropless_ragged")


# ----------------------------------------------------------------------------- helpers


def random_weights(seed, gate_scale=3.0):
  """Expert weights of unit-ish scale and a router sharp enough that top-k is not a near-tie."""
  rng = np.random.default_rng(seed)
  w = {
    "gate": rng.normal(size=(D, E)) * gate_scale / np.sqrt(D),
    "gate_proj": rng.normal(size=(E, D, F)) / np.sqrt(D),
    "up_proj": rng.normal(size=(E, D, F)) / np.sqrt(D),
    "down_proj": rng.normal(size=(E, F, D)) / np.sqrt(F),
  }
  return {k: v.astype(np.float32) for k, v in w.items()}


def _apply(cfg, w, x, segment_ids):
  layer = MoE(cfg, rngs=nnx.Rngs(0))  # traced init, overwritten below (dead code for XLA)
  for name, value in w.items():
    getattr(layer, name)[...] = value
  return layer(x, segment_ids)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def moe_forward(cfg, w, x, segment_ids):
  """(y [B, L, D], aux) of an MoE layer with weights `w`."""
  return _apply(cfg, w, x, segment_ids)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def moe_grad(cfg, w, x, segment_ids, cotangent):
  """y, aux and the gradients of sum(y * cotangent) w.r.t. (weights, x)."""

  def loss(w, x):
    y, aux = _apply(cfg, w, x, segment_ids)
    return jnp.sum(y * cotangent), (y, aux)

  (_, (y, aux)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(w, x)
  return y, aux, grads


def silu(v):
  return v / (1.0 + np.exp(-v))


def softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def ref_route(cfg, probs_t):
  """One token's (expert ids, weights), walking experts in order of probability."""
  order = np.argsort(-probs_t, kind="stable")
  chosen, total = [], 0.0
  for e in order:
    chosen.append(int(e))
    total += probs_t[e]
    if cfg.moe.routing == "topk" and len(chosen) == cfg.num_experts_per_tok:
      break
    if cfg.moe.routing == "topp" and (
      total >= cfg.moe.top_p or len(chosen) == min(cfg.moe.max_experts, cfg.num_experts)
    ):
      break
  wts = probs_t[chosen]
  if cfg.norm_topk_prob:
    wts = wts / wts.sum()
  return chosen, wts


def ref_expert(w, e, x_t):
  h = silu(x_t @ w["gate_proj"][e]) * (x_t @ w["up_proj"][e])
  return h @ w["down_proj"][e]


def reference_moe(cfg, w, x, mask=None, keep=None):
  """Per-token loop. x: [T, D]. keep(t, j, e) -> bool lets a test drop slot j of token t.

  Returns y [T, D], logits [T, E], probs [T, E] and the routing (ids, weights) per token.
  """
  w = {k: v.astype(np.float64) for k, v in w.items()}
  x = np.asarray(x, np.float64)
  logits = x @ w["gate"]
  probs = softmax(logits)
  y = np.zeros_like(x)
  routes = []
  for t in range(x.shape[0]):
    if mask is not None and not mask[t]:
      routes.append(([], np.zeros(0)))
      continue
    chosen, wts = ref_route(cfg, probs[t])
    routes.append((chosen, wts))
    for j, (e, wt) in enumerate(zip(chosen, wts, strict=True)):
      if keep is None or keep(t, j, e):
        y[t] += wt * ref_expert(w, e, x[t])
  return y, logits, probs, routes


def ref_balance(probs, routes, mask, seq_len):
  """Numpy load-balance loss: (global, per-sequence mean) for E * sum_i f_i P_i."""
  mask = np.asarray(mask, bool)

  def lb(rows):
    counts = np.zeros(E)
    for t in rows:
      for e in routes[t][0]:
        counts[e] += 1
    f = counts / max(counts.sum(), 1)
    p = probs[rows].mean(0)
    return E * np.sum(f * p)

  real = np.flatnonzero(mask)
  per_seq = []
  for s in range(len(mask) // seq_len):
    rows = [t for t in range(s * seq_len, (s + 1) * seq_len) if mask[t]]
    if rows:
      per_seq.append(lb(rows))
  return lb(real), float(np.mean(per_seq))


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  cot = rng.normal(size=(B, L, D)).astype(np.float32)
  return random_weights(0), x, cot


@pytest.fixture(scope="module")
def results(data):
  """moe_grad for every (routing, strategy), computed once: {(routing, strategy): out}."""
  w, x, cot = data
  seg = np.ones((B, L), np.int32)
  return {
    (r, s): moe_grad(moe_cfg(s, **ROUTINGS[r]), w, x, seg, cot)
    for r in ROUTINGS
    for s in STRATEGIES
  }


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_strategy_matches_per_token_reference(data, results, routing, strategy):
  w, x, _ = data
  cfg = moe_cfg(strategy, **ROUTINGS[routing])
  y, aux, _ = results[(routing, strategy)]
  y_ref, logits, probs, routes = reference_moe(cfg, w, x.reshape(T, D))
  if cfg.moe.routing == "topp":  # keep the test away from float ties at the threshold
    cum = np.cumsum(-np.sort(-probs, axis=-1), axis=-1)
    assert np.abs(cum - cfg.moe.top_p).min() > 1e-4
  assert_close(y.reshape(T, D), y_ref, what=f"{routing}/{strategy} output")
  counts = np.bincount(np.concatenate([r[0] for r in routes]), minlength=E)
  np.testing.assert_array_equal(np.asarray(aux["tokens_per_expert"]), counts)
  n_slots = sum(len(r[0]) for r in routes)
  np.testing.assert_allclose(aux["experts_per_token"], n_slots / T, rtol=1e-6)
  assert float(aux["dropped_fraction"]) == 0.0
  lb_global, _ = ref_balance(probs, routes, np.ones(T), L)
  np.testing.assert_allclose(aux["load_balance_loss"], lb_global, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_strategy_matches_dense_outputs_and_gradients(results, routing, strategy):
  y_d, aux_d, (gw_d, gx_d) = results[(routing, "dense")]
  y, aux, (gw, gx) = results[(routing, strategy)]
  assert_close(y, y_d, what="output")
  assert_close(gx, gx_d, what="grad x")
  assert set(gw) == {"gate", "gate_proj", "up_proj", "down_proj"}
  for name in gw:
    assert np.abs(np.asarray(gw_d[name])).max() > 0, name  # the test sees every weight
    assert_close(gw[name], gw_d[name], what=f"grad {name}")
  for name in ("load_balance_loss", "router_z_loss", "dynamic_loss", "experts_per_token"):
    np.testing.assert_allclose(aux[name], aux_d[name], rtol=1e-6, err_msg=name)


def test_norm_topk_prob_false_keeps_raw_probabilities(data, results):
  """Without renormalisation the output is the sum of prob-weighted experts (weights < 1)."""
  w, x, _ = data
  cfg_n, cfg_r = moe_cfg(**ROUTINGS["topk_norm"]), moe_cfg(**ROUTINGS["topk_nonorm"])
  y_norm = np.asarray(results[("topk_norm", "dense")][0]).reshape(T, D)
  y_raw = np.asarray(results[("topk_nonorm", "dense")][0]).reshape(T, D)
  _, _, probs, routes = reference_moe(cfg_r, w, x.reshape(T, D))
  for t in range(T):
    mass = probs[t, routes[t][0]].sum()  # y_raw = mass * y_norm exactly, for each token
    assert mass < 0.999
    np.testing.assert_allclose(y_raw[t], mass * y_norm[t], rtol=1e-4, atol=1e-6)
  assert ref_route(cfg_n, probs[0])[1].sum() == pytest.approx(1.0)


def test_auto_strategy_per_platform():
  assert moe_lib.resolve_strategy("auto", "cpu") == "dropless_blocks"
  assert moe_lib.resolve_strategy("auto", "gpu") == "dropless_ragged"
  assert moe_lib.resolve_strategy("auto", "tpu") == "dropless_ragged"
  assert moe_lib.resolve_strategy("dense", "gpu") == "dense"


# ----------------------------------------------------------------------------- drops, padding


def forced_routing_inputs(types):
  """Weights and x whose router sends a type-0 token to experts (0, 1), type-1 to (1, 0).

  Only x[:, 0] and x[:, 1] reach the router: logits are [10, 5, 0, ...] for type 0 and
  [5, 10, 0, ...] for type 1, whatever the other features are.
  """
  w = random_weights(3)
  w["gate"] = np.zeros((D, E), np.float32)
  w["gate"][0, :2] = [10.0, 5.0]
  w["gate"][1, :2] = [5.0, 10.0]
  x = np.random.default_rng(4).normal(size=(T, D)).astype(np.float32)
  x[:, 0] = np.asarray(types) == 0
  x[:, 1] = np.asarray(types) == 1
  return w, x


def kept_slots(types, cap, shards):
  """Independent model of the documented policy: on each shard (a contiguous block of tokens,
  with its own capacity), every expert keeps its `cap` first slots ranked by (choice, token)."""
  kept, n = set(), len(types) // shards
  for s in range(shards):
    toks = range(s * n, (s + 1) * n)
    slots = sorted((j, t, e) for t in toks for j, e in enumerate([types[t], 1 - types[t]]))
    seen = np.zeros(E, int)
    for j, t, e in slots:
      if seen[e] < cap:
        kept.add((t, j))
      seen[e] += 1
  return kept


@pytest.mark.parametrize(
  "cf, cap, expected_dropped",
  [
    # 16 type-0 + 16 type-1 tokens, k=2: each of experts 0 and 1 receives 16 first choices
    # and 16 second choices (64 slots). C = ceil(cf * 32 * 2 / 8).
    (1.0, 8, 48),  # each keeps 8 first choices: 64 - 16 dropped
    (2.5, 20, 24),  # each keeps 16 first + 4 second choices: 64 - 40 dropped
  ],
)
def test_capacity_drops_are_counted_and_zeroed(cf, cap, expected_dropped):
  types = np.arange(T) % 2  # alternating 0, 1
  w, x = forced_routing_inputs(types)
  cfg = moe_cfg("capacity", capacity_factor=cf)
  assert moe_lib.capacity(T, K, E, cf) == cap
  y, aux = moe_forward(cfg, w, x.reshape(B, L, D), np.ones((B, L), np.int32))
  kept = kept_slots(types, cap, shards=1)
  assert 2 * T - len(kept) == expected_dropped
  y_ref, _, _, routes = reference_moe(cfg, w, x, keep=lambda t, j, e: (t, j) in kept)
  assert [r[0] for r in routes] == [[s, 1 - s] for s in types]  # the forcing worked
  np.testing.assert_allclose(aux["dropped_fraction"], expected_dropped / (2 * T), rtol=1e-6)
  np.testing.assert_array_equal(aux["tokens_per_expert"], [T, T] + [0] * (E - 2))
  y = np.asarray(y).reshape(T, D)
  assert_close(y, y_ref, what="kept slots")
  fully_dropped = [t for t in range(T) if (t, 0) not in kept and (t, 1) not in kept]
  assert len(fully_dropped) == (T - 2 * cap if cap < T // 2 else 0)
  assert np.all(y[fully_dropped] == 0.0)


def test_capacity_drops_under_expert_parallelism():
  """(data=2, expert=2, tensor=2): 4 batch shards of one row (8 tokens) each, C = 2 per shard.
  Drops are counted per shard (capacity is per device) and summed over the mesh."""
  types = np.arange(T) % 2
  w, x = forced_routing_inputs(types)
  cfg = moe_cfg("capacity", capacity_factor=1.0)
  assert moe_lib.capacity(T // 4, K, E, 1.0) == 2
  mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
  with use_mesh(mesh):
    y, aux = jax.device_get(moe_forward(cfg, w, x.reshape(B, L, D), np.ones((B, L), np.int32)))
  kept = kept_slots(types, 2, shards=4)
  assert len(kept) == 4 * 4  # per shard: experts 0 and 1 keep 2 slots each
  np.testing.assert_allclose(aux["dropped_fraction"], 1 - len(kept) / (2 * T), rtol=1e-6)
  y_ref, _, _, _ = reference_moe(cfg, w, x, keep=lambda t, j, e: (t, j) in kept)
  assert_close(np.asarray(y).reshape(T, D), y_ref, what="kept slots under EP")


def test_padding_is_not_routed_and_takes_no_capacity():
  """8 padding tokens in front, all tokens forced to experts (0, 1), C = 8."""
  types = np.zeros(T, int)
  w, x = forced_routing_inputs(types)
  seg = np.ones(T, np.int32)
  seg[:8] = 0
  cfg = moe_cfg("capacity", capacity_factor=1.0)
  y, aux = moe_forward(cfg, w, x.reshape(B, L, D), seg.reshape(B, L))
  y = np.asarray(y).reshape(T, D)
  # 24 real tokens x 2 slots = 48; experts 0 and 1 keep the first 8 real tokens (8..15) each.
  np.testing.assert_array_equal(aux["tokens_per_expert"], [24, 24] + [0] * (E - 2))
  np.testing.assert_allclose(aux["dropped_fraction"], 32 / 48, rtol=1e-6)
  np.testing.assert_allclose(aux["experts_per_token"], 2.0, rtol=1e-6)
  y_ref, _, probs, _ = reference_moe(cfg, w, x, mask=seg > 0, keep=lambda t, j, e: t < 16)
  assert np.all(y[:8] == 0.0) and np.all(y[16:] == 0.0)
  assert_close(y, y_ref, what="padded batch")
  np.testing.assert_allclose(aux["expert_prob"], probs[8:].mean(0), rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_padding_in_every_strategy(data, strategy):
  """Random routing with ragged padding: pads output 0, real tokens match the reference."""
  w, x, cot = data
  rng = np.random.default_rng(5)
  seg = np.ones((B, L), np.int32)
  for b in range(B):
    seg[b, rng.integers(1, L) :] = 0
  cfg = moe_cfg(strategy)
  y, aux, _ = moe_grad(cfg, w, x, seg, cot)  # same compiled function as the equivalence tests
  mask = seg.reshape(-1) > 0
  y_ref, logits, probs, routes = reference_moe(cfg, w, x.reshape(T, D), mask=mask)
  y = np.asarray(y).reshape(T, D)
  assert np.all(y[~mask] == 0.0)
  assert_close(y, y_ref, what="real tokens")
  assert float(aux["tokens_per_expert"].sum()) == K * mask.sum()
  lb_global, lb_seq = ref_balance(probs, routes, mask, L)
  np.testing.assert_allclose(aux["load_balance_loss"], lb_global, rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(aux["router_z_loss"], np.mean(lse[mask] ** 2), rtol=1e-5)


# ----------------------------------------------------------------------------- dropless


@pytest.mark.parametrize("on_mesh", [False, True])
def test_dropless_is_exact_when_every_token_picks_the_same_experts(on_mesh):
  """Every token is forced to experts (0, 1): 32 slots each, 4x a balanced share, so the
  blocked layout needs several blocks per expert and a capacity of 1.25 would drop 44 of the
  64 slots. Default settings (`auto`) equal the per-token reference, outputs and gradients,
  with nothing dropped; on the (data 2, expert 2, tensor 2) mesh all of a device group's slots
  go to one device's experts, the worst case of the exchange's static bound."""
  types = np.zeros(T, int)
  w, x = forced_routing_inputs(types)
  seg = np.ones((B, L), np.int32)
  cot = np.random.default_rng(6).normal(size=(B, L, D)).astype(np.float32)
  mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2)) if on_mesh else None
  with use_mesh(mesh):
    y, aux, (gw, gx) = jax.device_get(moe_grad(C.tiny(), w, x.reshape(B, L, D), seg, cot))
    y_d, _, (gw_d, gx_d) = jax.device_get(
      moe_grad(moe_cfg("dense"), w, x.reshape(B, L, D), seg, cot)
    )
  y_ref, _, _, routes = reference_moe(C.tiny(), w, x)
  assert [r[0] for r in routes] == [[0, 1]] * T  # the forcing worked
  assert_close(np.asarray(y).reshape(T, D), y_ref, what="dropless output")
  assert float(aux["dropped_fraction"]) == 0.0
  np.testing.assert_array_equal(aux["tokens_per_expert"], [T, T] + [0] * (E - 2))
  assert_close(gx, gx_d, what="grad x")
  for name in gw:
    assert_close(gw[name], gw_d[name], what=f"grad {name}")
  # The opt-in capacity strategy still drops, and counts it: C = ceil(1.25 * 32 * 2 / 8) = 10
  # per expert (per device group of 8 tokens on the mesh: C = 3).
  with use_mesh(mesh):
    _, aux_c = moe_forward(moe_cfg("capacity", capacity_factor=1.25), w, x.reshape(B, L, D), seg)
  kept = 2 * (3 * 4 if on_mesh else 10)
  np.testing.assert_allclose(aux_c["dropped_fraction"], 1 - kept / (2 * T), rtol=1e-6)


@pytest.mark.parametrize("types", ["alternating", "all_same"])
def test_ragged_exchange_matches_dense(data, types, monkeypatch):
  """The GPU/TPU expert-parallel exchange (`ragged_all_to_all` there), run here with an
  equivalent collective built from `all_to_all` (XLA:CPU lacks the real one) on the (data 2,
  expert 2, tensor 2) mesh: outputs and gradients equal the unsharded dense reference, for
  random routing and for every slot sent to one device's experts (the buffer's worst case)."""
  w, x, cot = data
  if types == "all_same":
    w, xf = forced_routing_inputs(np.zeros(T, int))
    x = xf.reshape(B, L, D)
  monkeypatch.setattr(dispatch, "RAGGED_ALL_TO_ALL", dispatch.emulated_ragged_all_to_all)
  monkeypatch.setattr(moe_lib, "target_platform", lambda: "gpu")
  seg = np.ones((B, L), np.int32)
  cfg = moe_cfg("dropless_ragged")
  mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
  with use_mesh(mesh):
    y, aux, (gw, gx) = jax.device_get(moe_grad.__wrapped__(cfg, w, x, seg, cot))
  y_d, _, (gw_d, gx_d) = moe_grad(moe_cfg("dense"), w, x, seg, cot)
  assert_close(y, y_d, what="output")
  assert_close(gx, gx_d, what="grad x")
  for name in gw:
    assert_close(gw[name], gw_d[name], what=f"grad {name}")
  assert float(aux["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(aux["expert_rows_ratio"], 1.0)  # no padding rows


def test_ragged_exchange_lowers_to_ragged_all_to_all():
  """For a GPU mesh the layer's program (forward and backward) uses the real collective."""
  device = jax.sharding.AbstractDevice(device_kind="gpu", num_cores=None, platform="gpu")
  mesh = jax.sharding.AbstractMesh(
    (2, 1, 2, 2), ("data", "fsdp", "expert", "tensor"), abstract_device=device
  )
  w, x = random_weights(0), np.zeros((B, L, D), np.float32)

  def loss(w, x):
    return jnp.sum(_apply(C.tiny(), w, x, None)[0])

  with jax.sharding.use_abstract_mesh(mesh):
    forward = str(jax.make_jaxpr(loss)(w, x))
    backward = str(jax.make_jaxpr(jax.grad(loss))(w, x))
  assert forward.count("ragged_all_to_all") == 2  # there and back
  assert backward.count("ragged_all_to_all") > 2  # and transposed in the backward pass


@pytest.mark.parametrize("tokens, experts, block", [(1, 16, 8), (8, 16, 8), (4096, 16, 128)])
def test_block_size_follows_the_step(tokens, experts, block):
  """Decode steps (a few tokens) get small blocks, training sizes 128-row blocks."""
  assert dispatch.block_size(tokens * 2, experts) == block


def test_block_bound_holds_for_any_routing():
  """sum_e ceil(c_e / b) never exceeds the static block count, for random and extreme
  per-expert counts (all slots on one expert, one slot per expert, ...)."""
  rng = np.random.default_rng(0)
  for _ in range(2000):
    e = int(rng.integers(1, 65))
    s = int(rng.integers(1, 4096))
    b = int(rng.choice([1, 8, 32, 128]))
    cuts = np.sort(rng.integers(0, s + 1, size=e - 1))
    counts = np.diff(np.concatenate([[0], cuts, [s]]))
    assert np.sum(-(-counts // b)) <= dispatch.num_blocks(s, e, b)
  assert dispatch.num_blocks(64, 8, 8) == 8 + 8 - 1


@pytest.mark.parametrize("tokens, experts, k", [(1, 16, 2), (5, 8, 2), (7, 64, 8)])
def test_few_tokens_run_each_hit_expert_once(tokens, experts, k):
  """Decode sizes (at most FEW_SLOTS_PER_EXPERT slots per expert): `block_dispatch` runs each
  hit expert once, on its rows padded to a power of two. Outputs and gradients equal the dense
  reference, also with the experts split over two shards (expert_offset), and the rows
  computed are the padded counts."""
  rng = np.random.default_rng(tokens)
  x = jnp.asarray(rng.normal(size=(tokens, D)), jnp.float32)
  shapes = ((experts, D, F), (experts, D, F), (experts, F, D))
  w = tuple(jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.float32) for s in shapes)
  ids = jnp.asarray(np.argsort(-rng.normal(size=(tokens, experts)), -1)[:, :k], jnp.int32)
  weights = jnp.asarray(rng.uniform(size=(tokens, k)), jnp.float32)
  active = jnp.asarray(rng.uniform(size=(tokens, k)) > 0.2)
  assert tokens * k <= dispatch.FEW_SLOTS_PER_EXPERT * experts

  def run(fn, w):
    return fn(x, ids, weights, active, w)[0]

  y, rows = dispatch.block_dispatch(x, ids, weights, active, w)
  assert_close(y, run(dispatch.dense_dispatch, w), what="output")
  h = experts // 2
  halves = sum(
    dispatch.block_dispatch(x, ids, weights, active, tuple(a[o : o + h] for a in w), o)[0]
    for o in (0, h)
  )
  assert_close(halves, y, what="two expert shards")
  counts = np.bincount(np.asarray(ids)[np.asarray(active)], minlength=experts)
  want_rows = sum(1 << int(np.ceil(np.log2(c))) for c in counts if c)
  assert int(rows) == want_rows
  # Under jit (the routing traced): the loop must be reverse-differentiable.
  grads = jax.jit(jax.grad(lambda w: jnp.sum(run(dispatch.block_dispatch, w) ** 2)))(w)
  want = jax.grad(lambda w: jnp.sum(run(dispatch.dense_dispatch, w) ** 2))(w)
  for name, a, b in zip(("gate", "up", "down"), grads, want, strict=True):
    assert_close(a, b, what=f"grad {name}")


def test_blocks_with_large_blocks_match_dense():
  """T = 512 tokens (b = 16 rows per block) under top-1 routing of 8 experts biased towards
  expert 3: blocks equal the dense reference, outputs and gradients, and the reported rows
  include exactly the padding to whole blocks."""
  rng = np.random.default_rng(7)
  w = random_weights(8)
  cfg_kw = dict(num_experts_per_tok=1, norm_topk_prob=False)  # so the gate gets a gradient
  x = rng.normal(size=(4, 128, D)).astype(np.float32)
  x[..., 0] = 1.0  # a constant feature: the router's bias towards expert 3
  w["gate"][0] = 0.0
  w["gate"][0, 3] = 3.0
  cot = rng.normal(size=x.shape).astype(np.float32)
  seg = np.ones((4, 128), np.int32)
  blocks = C.tiny(**cfg_kw)
  dense = C.tiny(**cfg_kw, moe=MoEConfig(strategy="dense"))
  y, aux, (gw, gx) = moe_grad(blocks, w, x, seg, cot)
  y_d, _, (gw_d, gx_d) = moe_grad(dense, w, x, seg, cot)
  assert_close(y, y_d, what="output")
  assert_close(gx, gx_d, what="grad x")
  for name in gw:
    assert_close(gw[name], gw_d[name], what=f"grad {name}")
  counts = np.asarray(aux["tokens_per_expert"])
  b = dispatch.block_size(512, E)
  assert b == 16 and counts.max() > 2 * counts.mean()  # biased, several blocks per expert
  np.testing.assert_allclose(aux["expert_rows_ratio"], np.sum(-(-counts // b) * b) / 512)


@pytest.mark.parametrize("platform, primitive", [("tpu", "ragged_dot"), ("gpu", "ragged_dot"),
                                                 ("cpu", "while")])  # fmt: skip
def test_auto_follows_the_platform_of_the_mesh(platform, primitive):
  """Tracing for an abstract TPU or GPU mesh on this CPU host picks the accelerator path
  (grouped matmul), as an ahead-of-time compile for a pod needs; a CPU mesh picks blocks."""
  device = jax.sharding.AbstractDevice(device_kind=platform, num_cores=None, platform=platform)
  mesh = jax.sharding.AbstractMesh(
    (2, 1, 2, 2), ("data", "fsdp", "expert", "tensor"), abstract_device=device
  )
  w, x, _ = random_weights(0), np.zeros((B, L, D), np.float32), None
  with jax.sharding.use_abstract_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(lambda w, x: _apply(C.tiny(), w, x, None))(w, x))
  assert primitive in jaxpr
  assert ("ragged_dot" in jaxpr) == (platform != "cpu")


# ----------------------------------------------------------------------------- dynamic routing


def _topp_cfg(p, max_experts=8, norm=True, num_experts=E):
  return C.tiny(
    num_experts=num_experts,
    norm_topk_prob=norm,
    moe=MoEConfig(routing="topp", top_p=p, max_experts=max_experts),
  )


def test_topp_hand_computed():
  probs = np.array(
    [[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.1, 0.7, 0.1, 0.1]], np.float32
  )
  logits = jnp.log(probs)
  # p -> (active count per token, expected weights of token 0 with renormalisation)
  cases = {
    0.4: ([1, 1, 1], [1.0, 0.0, 0.0]),  # 0.5 >= 0.4 after one expert
    0.6: ([2, 2, 1], [0.5 / 0.8, 0.3 / 0.8, 0.0]),  # 0.5 < 0.6 <= 0.8
    0.85: ([3, 3, 3], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]),  # 0.8 < 0.85 <= 0.95
    0.99: ([3, 3, 3], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]),  # would need 4: capped at 3
  }
  for p, (n_active, w0) in cases.items():
    cfg = _topp_cfg(p, max_experts=3, num_experts=4)
    ids, weights, active, out_probs = moe_lib.route(logits, cfg)
    np.testing.assert_allclose(out_probs, probs, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(active).sum(-1), n_active, err_msg=f"p={p}")
    np.testing.assert_array_equal(ids[0], [0, 1, 2])
    np.testing.assert_array_equal(ids[1], [3, 2, 1])
    assert int(ids[2, 0]) == 1
    np.testing.assert_allclose(weights[0], w0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
  # Exactly at the threshold (uniform probabilities 1/4, exact in float32): experts are added
  # until the cumulative probability REACHES p, so p = 0.5 takes 2 experts, not 3.
  uniform = jnp.zeros((1, 4), jnp.float32)
  for p, n in ((0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)):
    _, weights, active, _ = moe_lib.route(uniform, _topp_cfg(p, max_experts=4, num_experts=4))
    assert int(np.asarray(active).sum()) == n, p
    np.testing.assert_allclose(weights[0, :n], 1.0 / n, rtol=1e-6)
  # Without renormalisation the weights are the raw probabilities of the active experts.
  _, weights, _, _ = moe_lib.route(logits, _topp_cfg(0.6, 3, norm=False, num_experts=4))
  np.testing.assert_allclose(weights, [[0.5, 0.3, 0], [0.5, 0.3, 0], [0.7, 0, 0]], rtol=1e-6)


def test_topp_count_between_one_and_max_and_grows_with_p():
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(size=(512, E)) * 1.5, jnp.float32)
  probs = softmax(np.asarray(logits, np.float64))
  means, prev = [], None
  for p in (0.2, 0.4, 0.6, 0.8, 0.95):
    cfg = _topp_cfg(p, max_experts=6)
    _, weights, active, _ = moe_lib.route(logits, cfg)
    n = np.asarray(active).sum(-1)
    assert n.min() >= 1 and n.max() <= 6
    assert np.all((np.asarray(weights) > 0) == np.asarray(active))
    expected = np.array([len(ref_route(cfg, probs[t])[0]) for t in range(len(probs))])
    np.testing.assert_array_equal(n, expected)
    if prev is not None:
      assert np.all(n >= prev)  # per token, a larger p never activates fewer experts
    prev = n
    means.append(n.mean())
  assert all(a < b for a, b in zip(means[:-1], means[1:], strict=True)), means
  assert means[0] < 1.5 and means[-1] > 4, means  # the range really is used
  # The cap binds: p=1 would need all 8 experts.
  _, _, active, _ = moe_lib.route(logits, _topp_cfg(1.0, max_experts=3))
  assert np.all(np.asarray(active).sum(-1) == 3)


# ----------------------------------------------------------------------------- aux losses


def test_router_stats_hand_computed():
  """E=4, k=2, T=4 tokens in 2 sequences of 2, every number below worked out by hand."""
  probs = np.array(
    [
      [0.4, 0.3, 0.2, 0.1],
      [0.5, 0.1, 0.3, 0.1],
      [0.6, 0.2, 0.1, 0.1],
      [0.3, 0.1, 0.1, 0.5],
    ],
    np.float32,
  )
  ids = jnp.array([[0, 1], [0, 2], [0, 1], [3, 0]], jnp.int32)
  active = jnp.ones((4, 2), bool)
  shift = np.array([1.0, 2.0, 0.0, -1.0], np.float32)  # logsumexp of each row's logits
  logits = jnp.asarray(np.log(probs) + shift[:, None])
  mask = jnp.ones(4, bool)

  def stats(balance, token_mask=mask):
    return moe_lib.router_stats(logits, ids, active, probs, token_mask, 4, balance, seq_len=2)

  g = stats("global")
  # counts [4, 2, 1, 1] / 8 slots; P = column means [0.45, 0.175, 0.175, 0.2]
  np.testing.assert_allclose(g["expert_fraction"], [0.5, 0.25, 0.125, 0.125])
  np.testing.assert_allclose(g["expert_prob"], [0.45, 0.175, 0.175, 0.2], rtol=1e-6)
  # 4 * (0.5*0.45 + 0.25*0.175 + 0.125*0.175 + 0.125*0.2) = 4 * 0.315625
  np.testing.assert_allclose(g["load_balance_loss"], 1.2625, rtol=1e-6)
  np.testing.assert_allclose(g["router_z_loss"], (1 + 4 + 0 + 1) / 4, rtol=1e-5)
  ent = -(probs * np.log(probs)).sum(-1).mean()
  np.testing.assert_allclose(g["dynamic_loss"], ent, rtol=1e-6)
  np.testing.assert_allclose(g["experts_per_token"], 2.0)
  np.testing.assert_array_equal(g["tokens_per_expert"], [4, 2, 1, 1])
  # Per sequence: seq 1 f=[.5,.25,.25,0], P=[.45,.2,.25,.1] -> 4*0.3375 = 1.35;
  # seq 2 f=[.5,.25,0,.25], P=[.45,.15,.1,.3] -> 4*0.3375 = 1.35.
  np.testing.assert_allclose(stats("sequence")["load_balance_loss"], 1.35, rtol=1e-6)
  # Masking token 3: counts [3, 2, 1, 0] / 6, P = [0.5, 0.2, 0.2, 0.1] -> 4 * 0.35 = 1.4.
  m = stats("global", jnp.array([True, True, True, False]))
  np.testing.assert_allclose(m["load_balance_loss"], 1.4, rtol=1e-6)
  np.testing.assert_allclose(m["router_z_loss"], (1 + 4 + 0) / 3, rtol=1e-5)
  # Perfect balance gives exactly 1.
  np.testing.assert_allclose(moe_lib.load_balance_loss(jnp.full(4, 0.25), jnp.full(4, 0.25)), 1.0)


def imbalanced_batch():
  """Sequence b routes (almost) only to experts 2b and 2b+1: balanced over the batch, not within
  a sequence. Router logits come from x[:, :4] alone (one-hot of the sequence)."""
  w = random_weights(7)
  w["gate"] = np.zeros((D, E), np.float32)
  for b in range(B):
    w["gate"][b, 2 * b] = 4.0
    w["gate"][b, 2 * b + 1] = 3.0
  x = np.random.default_rng(8).normal(size=(B, L, D)).astype(np.float32)
  x[:, :, :B] = np.eye(B, dtype=np.float32)[:, None, :] + 0.3 * x[:, :, :B]
  return w, x


@pytest.fixture(scope="module")
def sharded_balance():
  """{(balance, n_data): aux} for the imbalanced batch on meshes (data=n) of the first n CPUs."""
  w, x = imbalanced_batch()
  seg = np.ones((B, L), np.int32)
  out = {}
  for balance in ("global", "sequence"):
    cfg = moe_cfg("capacity", balance=balance)
    for n in (1, 2, 4):
      mesh = make_mesh(MeshConfig(data=n), jax.devices()[:n])
      with use_mesh(mesh):
        out[(balance, n)] = jax.device_get(moe_forward(cfg, w, x, seg)[1])
  return out


def test_global_balance_is_independent_of_data_sharding(sharded_balance):
  w, x = imbalanced_batch()
  _, _, probs, routes = reference_moe(moe_cfg(), w, x.reshape(T, D))
  lb_global, lb_seq = ref_balance(probs, routes, np.ones(T), L)
  for balance, expected in (("global", lb_global), ("sequence", lb_seq)):
    for n in (1, 2, 4):
      aux = sharded_balance[(balance, n)]
      np.testing.assert_allclose(aux["load_balance_loss"], expected, rtol=1e-5, err_msg=f"{n}")
      np.testing.assert_allclose(
        aux["router_z_loss"], sharded_balance[("global", 1)]["router_z_loss"], rtol=1e-6
      )
  # The batch is built so that the variants differ a lot: every sequence is imbalanced on
  # its own (2 of 8 experts), the global batch much less so.
  assert lb_seq > 2.5 * lb_global, (lb_seq, lb_global)
  # A per-shard (unsynchronised) average would differ from the global value: the psum matters.
  half = T // 2
  local = [
    ref_balance(probs[s], routes[s], np.ones(half), L)[0] for s in (slice(0, half), slice(half, T))
  ]
  assert abs(np.mean(local) - lb_global) > 0.5


def test_z_and_dynamic_loss_against_numpy(data, results):
  w, x, _ = data
  _, logits, probs, _ = reference_moe(moe_cfg(), w, x.reshape(T, D))
  aux = results[("topp", "dense")][1]
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(aux["router_z_loss"], np.mean(lse**2), rtol=1e-5)
  entropy = -(probs * np.log(probs)).sum(-1)
  np.testing.assert_allclose(aux["dynamic_loss"], entropy.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["expert_prob"], probs.mean(0), rtol=1e-5)


# ----------------------------------------------------------------------------- expert parallel


@pytest.fixture(scope="module")
def ep_results(data):
  """Every strategy on an 8-device (data=2, expert=2, tensor=2) mesh, top-k routing."""
  w, x, cot = data
  seg = np.ones((B, L), np.int32)
  mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
  out = {}
  with use_mesh(mesh):
    for s in STRATEGIES:
      out[s] = jax.device_get(moe_grad(moe_cfg(s), w, x, seg, cot))
  return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expert_parallel_matches_unsharded_dense(results, ep_results, strategy):
  y_d, aux_d, (gw_d, gx_d) = results[("topk_norm", "dense")]
  y, aux, (gw, gx) = ep_results[strategy]
  assert_close(y, y_d, what="output")
  assert_close(gx, gx_d, what="grad x")
  for name in gw:
    assert_close(gw[name], gw_d[name], what=f"grad {name}")
  np.testing.assert_allclose(aux["load_balance_loss"], aux_d["load_balance_loss"], rtol=1e-6)
  np.testing.assert_array_equal(aux["tokens_per_expert"], aux_d["tokens_per_expert"])
  assert float(aux["dropped_fraction"]) == 0.0
