"""Per-row sampling (`qwen3_jax/infer/sampling.py`) against numpy references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen3_jax.infer.sampling import (
  MAX_TOP_LOGPROBS,
  RowParams,
  SamplingParams,
  add_counts,
  fold_seed,
  max_top_logprobs,
  row_keys,
  row_params,
  sample,
)

sample_jit = jax.jit(sample, static_argnames=("top_n", "cap", "block"))
# Most tests run this one compiled shape: B = 8, V = 300, penalties, 3 alternatives, and a cap
# small enough that some rows take the bisection path.
B, V, STATIC = 8, 300, {"top_n": 3, "cap": 16, "block": 32}


def draws(logits_V, p: SamplingParams, n: int, counts_V=None, **static):
  """n tokens of one request at token indices 0..n-1 (one batch of n copies of the row)."""
  rows = row_params([p] * n, [0] * n, n)
  logits = np.broadcast_to(logits_V, (n, logits_V.size))
  counts = None if counts_V is None else np.broadcast_to(counts_V, (n, counts_V.size))
  out = sample_jit(logits, rows, jnp.arange(n, dtype=jnp.int32), counts, **static)
  return np.asarray(out.token)


def softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def penalised(logits_V, p: SamplingParams, counts_V=None):
  x = logits_V.astype(np.float64)
  if counts_V is not None:
    x = x - p.presence_penalty * (counts_V > 0) - p.frequency_penalty * counts_V
  return x


def allowed(logits_V, p: SamplingParams, counts_V=None, slack=0.0):
  """[V] bool: tokens top-k, then top-p (renormalised after top-k), then min-p let through.

  slack > 0 widens the top-p and min-p boundaries a little (a superset robust to float32).
  """
  s = penalised(logits_V, p, counts_V) / p.temperature
  keep = np.ones(s.size, bool)
  if 0 < p.top_k < s.size:
    keep &= s >= np.sort(s)[::-1][p.top_k - 1]  # ties at the k-th value all kept
  if p.top_p < 1:
    prob = softmax(np.where(keep, s, -np.inf))
    order = np.argsort(-prob, kind="stable")
    cum = np.cumsum(prob[order])
    j = np.argmax(cum >= p.top_p - slack) if (cum >= p.top_p - slack).any() else s.size - 1
    keep &= s >= s[order[j]]
  if p.min_p > 0:
    prob = softmax(s)
    keep &= prob >= (p.min_p - slack) * prob.max()
  return keep


def filtered_probs(logits_V, p: SamplingParams):
  s = penalised(logits_V, p) / p.temperature
  return softmax(np.where(allowed(logits_V, p), s, -np.inf))


FILTERS = [
  SamplingParams(top_k=5),
  SamplingParams(top_k=40, temperature=2.0),  # beyond cap=8: bisection
  SamplingParams(top_p=0.5),
  SamplingParams(top_p=0.9, temperature=1.5),  # a nucleus beyond cap=8: bisection
  SamplingParams(min_p=0.2),
  SamplingParams(top_k=30, top_p=0.8, min_p=0.05),
  SamplingParams.qwen3(thinking=True),
  SamplingParams.qwen3(thinking=False),
]


@pytest.mark.parametrize("cap", [256, 8])
def test_filters_never_emit_an_excluded_token(cap):
  rng = np.random.default_rng(0)
  n = 1024
  logits = rng.normal(size=200).astype(np.float32) * 2
  logits[[3, 17]] = logits.max()  # a tie at the top
  for p in FILTERS:
    got = np.unique(draws(logits, p, n, cap=cap, block=16))
    assert allowed(logits, p, slack=1e-5)[got].all(), p
    # Every kept token with a fair share of the mass shows up in 1024 draws.
    likely = allowed(logits, p) & (filtered_probs(logits, p) > 0.02)
    assert set(np.flatnonzero(likely)) <= set(got), p


def test_fast_path_and_bisection_find_the_same_set():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(B, V)).astype(np.float32) * 3
  counts = np.zeros((B, V), np.int32)
  ps = [SamplingParams(top_p=t) for t in (0.3, 0.6, 0.9, 0.99)]
  ps += [SamplingParams(top_k=k, top_p=0.95) for k in (1, 7, 50, 299)]
  rows = row_params(ps, [0] * B, B)
  for t in range(4):
    index = jnp.full((B,), t, jnp.int32)
    fast = sample_jit(logits, rows, index, counts, **{**STATIC, "cap": V})
    slow = sample_jit(logits, rows, index, counts, **STATIC)
    np.testing.assert_array_equal(fast.token, slow.token)


def test_tiny_temperature_is_greedy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(B, V)).astype(np.float32) * 2
  counts = rng.integers(0, 3, size=(B, V)).astype(np.int32)
  tiny = [SamplingParams(temperature=1e-4, presence_penalty=0.5, frequency_penalty=0.3)] * B
  greedy = [SamplingParams.greedy(presence_penalty=0.5, frequency_penalty=0.3)] * B
  index = jnp.arange(B, dtype=jnp.int32)
  a = sample_jit(logits, row_params(tiny, list(range(B)), B), index, counts, **STATIC)
  b = sample_jit(logits, row_params(greedy, list(range(B)), B), index, counts, **STATIC)
  np.testing.assert_array_equal(a.token, b.token)
  want = np.argmax(logits - 0.5 * (counts > 0) - 0.3 * counts, -1)
  np.testing.assert_array_equal(b.token, want)


def chi2_critical(df: int) -> float:
  """The 0.999 quantile of chi-square(df): scipy's, else the Wilson-Hilferty approximation
  (within 1% of the exact value for df >= 3; z_0.999 = 3.0902)."""
  try:
    from scipy.stats import chi2
  except ImportError:
    return df * (1 - 2 / (9 * df) + 3.0902 * np.sqrt(2 / (9 * df))) ** 3
  return float(chi2.ppf(0.999, df))


@pytest.mark.parametrize(
  "p",
  [
    SamplingParams(temperature=0.8, seed=7),
    SamplingParams(top_k=6, min_p=0.05, seed=3),
    SamplingParams(top_p=0.7, temperature=1.3, seed=11),
  ],
)
def test_empirical_distribution_matches_the_softmax(p):
  # V = 13 in blocks of 4 (the last one padded): the two-level draw must still be exact.
  logits = np.linspace(-2.0, 1.5, 13).astype(np.float32)
  logits = np.random.default_rng(3).permutation(logits)
  n = 6000
  counts = np.bincount(draws(logits, p, n, block=4), minlength=13)
  probs = filtered_probs(logits, p)
  assert counts[probs == 0].sum() == 0
  expected = n * probs[probs > 0]
  chi2 = float(((counts[probs > 0] - expected) ** 2 / expected).sum())
  assert chi2 < chi2_critical(int((probs > 0).sum()) - 1), (counts, expected)


def test_logprobs_are_raw_and_top_n_sorted():
  rng = np.random.default_rng(4)
  top_n = STATIC["top_n"]
  logits = rng.normal(size=(B, V)).astype(np.float32) * 3
  counts = rng.integers(0, 4, size=(B, V)).astype(np.int32)
  ps = [
    SamplingParams.greedy(presence_penalty=1.0),
    SamplingParams(temperature=0.5, top_k=3, frequency_penalty=2.0),
    SamplingParams(temperature=1.7, top_p=0.3, min_p=0.2),
    SamplingParams.qwen3(thinking=True, presence_penalty=1.5),
    SamplingParams(temperature=1e-3),
    None,
    SamplingParams(top_k=100, seed=3),
    SamplingParams(top_p=0.99, temperature=2.0),
  ]
  rows, index = row_params(ps, [0] * B, B), jnp.zeros(B, jnp.int32)
  out = sample_jit(logits, rows, index, counts, **STATIC)
  for r, p in enumerate(ps):
    t = 1.0 if p is None or p.temperature == 0 else p.temperature
    x = logits[r].astype(np.float64) / t
    logp = x - x.max() - np.log(np.exp(x - x.max()).sum())
    np.testing.assert_allclose(out.logprob[r], logp[out.token[r]], rtol=1e-5, atol=1e-5)
    best = np.argsort(-logp, kind="stable")[:top_n]
    np.testing.assert_array_equal(out.top_tokens[r], best)
    np.testing.assert_allclose(out.top_logprobs[r], logp[best], rtol=1e-5, atol=1e-5)
  assert (np.diff(np.asarray(out.top_logprobs), axis=-1) <= 0).all()
  none = sample_jit(logits, rows, index, counts, **{**STATIC, "top_n": 0})
  assert none.top_tokens.shape == (B, 0) and none.top_logprobs.shape == (B, 0)
  np.testing.assert_array_equal(none.token, out.token)


def test_penalties_change_choices_as_specified():
  logits = np.array([5.0, 4.8, 4.5, 1, 0, 0, 0, 0, 0, 0], np.float32)
  counts = np.array([3, 1, 0, 0, 0, 0, 0, 0, 0, 0], np.int32)
  cases = [  # (presence, frequency) -> argmax of the penalised logits
    ((0.0, 0.0), 0),  # 5.0, 4.8, 4.5
    ((0.3, 0.0), 0),  # 4.7, 4.5, 4.5
    ((0.6, 0.0), 2),  # 4.4, 4.2, 4.5
    ((0.0, 0.2), 1),  # 4.4, 4.6, 4.5
    ((0.0, 0.5), 2),  # 3.5, 4.3, 4.5
    ((0.1, 0.15), 1),  # 4.45, 4.55, 4.5
    ((-1.0, 0.0), 0),  # 6.0, 5.8, 4.5: a negative penalty favours repeats
  ]
  for (pres, freq), want in cases:
    for p in (
      SamplingParams.greedy(presence_penalty=pres, frequency_penalty=freq),
      SamplingParams(top_k=1, presence_penalty=pres, frequency_penalty=freq),
    ):
      got = draws(logits, p, 64, counts_V=counts)
      ref = np.argmax(penalised(logits, p, counts).astype(np.float32))
      assert ref == want and (got == want).all(), (p, got)
  # Sampling rows filter the penalised softmax: 44, 42, 45 after T = 0.1, token 2 has 0.7
  # of the mass, so top-p 0.5 keeps only it.
  p = SamplingParams(top_p=0.5, temperature=0.1, presence_penalty=0.6)
  assert set(draws(logits, p, 64, counts_V=counts).tolist()) == {2}


def mixed_batch(seed: int):
  rng = np.random.default_rng(seed)
  ps = [
    SamplingParams(top_p=0.99, temperature=1.5, seed=int(rng.integers(1000))),  # bisection
    SamplingParams.greedy(presence_penalty=0.5),
    SamplingParams(top_k=100, seed=5),  # deep top-k: bisection
    SamplingParams(min_p=0.3, frequency_penalty=0.2),
    None,
    SamplingParams.qwen3(thinking=False, seed=9),
    SamplingParams(temperature=0.3, seed=2**40),
    SamplingParams(top_k=3, top_p=0.5, seed=1),
  ]
  logits = rng.normal(size=(B, V)).astype(np.float32) * 2
  counts = rng.integers(0, 2, size=(B, V)).astype(np.int32)
  index = rng.integers(0, 50, size=B).astype(np.int32)
  sample_index = [int(i) for i in rng.integers(0, 4, size=B)]
  return ps, sample_index, logits, counts, index


def test_row_results_do_not_depend_on_slot_batch_or_mesh():
  static = STATIC
  ps, si, logits, counts, index = mixed_batch(seed=5)
  other_ps, other_si, other_logits, other_counts, other_index = mixed_batch(seed=6)
  devices = jax.devices()
  assert len(devices) == 8
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))

  full = sample_jit(logits, row_params(ps, si, B), index, counts, **static)
  sharded_args = jax.tree.map(shard, (logits, row_params(ps, si, B), index, counts))
  sharded = sample_jit(*sharded_args, **static)
  assert sharded.token.sharding.spec == P("data")
  for r in range(B):
    alone = sample_jit(
      logits[r : r + 1], row_params([ps[r]], [si[r]], 1), index[r : r + 1], counts[r : r + 1],
      **static,
    )  # fmt: skip
    slot = (r + 3) % B  # the row at another slot, among other requests' rows
    mix = lambda a, b, slot=slot, r=r: np.concatenate([a[:slot], b[r : r + 1], a[slot + 1 :]])
    moved_ps = other_ps[:slot] + [ps[r]] + other_ps[slot + 1 :]
    moved_si = other_si[:slot] + [si[r]] + other_si[slot + 1 :]
    moved = sample_jit(
      mix(other_logits, logits), row_params(moved_ps, moved_si, B), mix(other_index, index),
      mix(other_counts, counts), **static,
    )  # fmt: skip
    for got, row in ((alone, 0), (moved, slot), (sharded, r)):
      for name in ("token", "logprob", "top_tokens", "top_logprobs"):
        want = np.asarray(getattr(full, name))[r]
        np.testing.assert_array_equal(np.asarray(getattr(got, name))[row], want, err_msg=name)


def test_row_keys_depend_on_seed_sample_and_token_only():
  seed = jnp.array([1, 1, 1, 2], jnp.int32)
  sample_index = jnp.array([0, 1, 0, 0], jnp.int32)
  token = jnp.array([5, 5, 6, 5], jnp.int32)
  keys = jax.random.key_data(row_keys(seed, sample_index, token))
  assert len({tuple(np.asarray(k)) for k in keys}) == 4
  again = jax.random.key_data(row_keys(seed[::-1], sample_index[::-1], token[::-1]))
  np.testing.assert_array_equal(keys, again[::-1])
  # Different sample indices of one request draw different tokens.
  logits = np.zeros((64, 1000), np.float32)
  ps = row_params([SamplingParams(seed=4)] * 64, list(range(64)), 64)
  tokens = sample_jit(logits, ps, jnp.zeros(64, jnp.int32)).token
  assert len(set(np.asarray(tokens).tolist())) > 50


def test_add_counts():
  counts = jnp.zeros((3, 5), jnp.int32)
  counts = add_counts(counts, jnp.array([1, 4, 1]))
  counts = add_counts(counts, jnp.array([1, 0, 2]), live=jnp.array([True, False, True]))
  want = [[0, 2, 0, 0, 0], [0, 0, 0, 0, 1], [0, 1, 1, 0, 0]]
  np.testing.assert_array_equal(counts, want)


@pytest.mark.parametrize(
  "field, value",
  [
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", "hot"),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", True),
    ("top_p", 0.0),
    ("top_p", 1.1),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("presence_penalty", float("inf")),
    ("frequency_penalty", None),
    ("seed", 1.5),
    ("top_logprobs", -1),
    ("top_logprobs", MAX_TOP_LOGPROBS + 1),
  ],
)
def test_sampling_params_validation(field, value):
  with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
    SamplingParams(**{field: value})


def test_presets_seeds_and_row_params():
  think, plain = SamplingParams.qwen3(thinking=True), SamplingParams.qwen3(thinking=False)
  assert (think.temperature, think.top_p, think.top_k, think.min_p) == (0.6, 0.95, 20, 0.0)
  assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p) == (0.7, 0.8, 20, 0.0)
  assert SamplingParams.qwen3(thinking=True, top_k=5, seed=3).top_k == 5
  assert fold_seed(12345) == 12345
  for big in (2**31, 2**64 + 7, -1):
    assert 0 <= fold_seed(big) < 2**31 and fold_seed(big) == fold_seed(big)
  assert fold_seed(2**40) != fold_seed(2**40 + 1)
  assert SamplingParams(seed=2**70).key_seed == fold_seed(2**70)

  ps = [SamplingParams(temperature=0.5, top_k=7, seed=2**33, top_logprobs=4), None]
  rows = row_params(ps, [2, 0], 4)
  assert isinstance(rows, RowParams)
  np.testing.assert_allclose(rows.temperature, [0.5, 0, 0, 0])
  np.testing.assert_array_equal(rows.top_k, [7, 0, 0, 0])
  np.testing.assert_array_equal(rows.seed, [fold_seed(2**33), 0, 0, 0])
  np.testing.assert_array_equal(rows.sample_index, [2, 0, 0, 0])
  assert {f.name: getattr(rows, f.name).dtype for f in dataclasses.fields(rows)} == {
    "temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "min_p": np.float32,
    "presence": np.float32, "frequency": np.float32, "seed": np.int32, "sample_index": np.int32,
    "banned": np.int32,
  }  # fmt: skip
  np.testing.assert_array_equal(rows.banned, [-1, -1, -1, -1])
  assert max_top_logprobs(ps) == 4 and max_top_logprobs([None]) == 0
  with pytest.raises(ValueError, match="batch of 1"):
    row_params(ps, [0, 0], 1)
  with pytest.raises(ValueError, match="sample indices"):
    row_params(ps, [0], 4)
