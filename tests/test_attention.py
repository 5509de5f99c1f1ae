"""Sparse attention vs. an explicit dense reference, causality, and a sharded run.

The reference builds the interleaved sequence (global j right before real slot j*g) and its
mask from the documented rule stated by counting in that order ("the key is one of the last w
real tokens / last M globals at or before the query, same segment"), independently of the
anchor/count arithmetic used by the implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import assert_close

from qwen3_jax import config as C
from qwen3_jax import sharding
from qwen3_jax.model.attention import Attention, full_attention
from qwen3_jax.model.sparse_attention import make_layout, sparse_attention
from qwen3_jax.model.transformer import Qwen3

B, H, KH, DH = 2, 4, 2, 8
# Tiny programs: LLVM optimisation is most of their compile time, so skip it.
FAST = {"xla_backend_optimization_level": 0}
BLOCK = 8


def interleaved(l, g, seg):
  """Rows (is_global, index, segment) of the interleaved order for L real tokens."""
  rows = []
  for t in range(l):
    if g and t % g == 0:
      rows.append((True, t // g, seg[:, t]))
    rows.append((False, t, seg[:, t]))
  return rows


def reference_mask(l, g, seg, w, m):
  """[B, n, n] mask over the interleaved order, from the rule stated by counting."""
  rows = interleaved(l, g, seg)
  n = len(rows)
  mask = np.zeros((seg.shape[0], n, n), bool)
  for qi in range(n):
    reals = [ki for ki in range(qi + 1) if not rows[ki][0]]
    globs = [ki for ki in range(qi + 1) if rows[ki][0]]
    allowed = set(reals[-w:] if w else reals) | set(globs[-m:] if m else globs)
    for ki in allowed:
      mask[:, qi, ki] = rows[qi][2] == rows[ki][2]
  return rows, mask


def reference_attention(q, k, v, mask):
  """Plain softmax attention with an explicit [B, Q, S] mask. q [B, Q, H, Dh]."""
  kr = jnp.repeat(k, H // KH, axis=2)
  vr = jnp.repeat(v, H // KH, axis=2)
  logits = jnp.einsum("bqhd,bshd->bhqs", q, kr)
  logits = jnp.where(mask[:, None], logits, -1e30)
  return jnp.einsum("bhqs,bshd->bqhd", jax.nn.softmax(logits, axis=-1), vr)


def to_interleaved(rows, real, glob):
  """Gathers [B, L, ...] real and [B, Ng, ...] global arrays into the interleaved order."""
  return jnp.stack([glob[:, i] if is_g else real[:, i] for is_g, i, _ in rows], axis=1)


def random_qkv(l, ng, seed):
  # numpy randoms: jax.random would compile a kernel per shape (seconds each on 2 cores).
  rng = np.random.default_rng(seed)
  shapes = [(B, l, H, DH), (B, l, KH, DH), (B, l, KH, DH)]
  shapes += [(B, ng, H, DH), (B, ng, KH, DH), (B, ng, KH, DH)]
  return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def packed_segments(l, packed):
  seg = np.ones((B, l), np.int32)
  if packed:  # row 0: two documents split inside a block; row 1: trailing padding (0).
    seg[0, l // 2 - 1 :] = 2
    seg[1, l - 3 :] = 0
  return seg


CASES = [
  # (L, global_every, window, max_globals, packed); block size 8: windows 1, b-1, b, b+1.
  (16, 0, 1, 0, False),
  (19, 0, BLOCK + 1, 0, True),
  (16, 4, BLOCK, 2, True),
  (19, 4, BLOCK - 1, 2, False),
  (21, 4, BLOCK + 1, 3, True),
  (19, 4, 1, 2, False),
  (19, 3, 2 * BLOCK + 1, 0, False),  # max_globals = 0: every earlier global
  (13, 5, 100, 1, True),  # window longer than the sequence
]


@pytest.mark.parametrize("l,g,w,m,packed", CASES)
def test_sparse_matches_dense_reference(l, g, w, m, packed):
  layout = make_layout(l, 0, g)
  ng = layout.num_globals
  q, k, v, qg, kg, vg = random_qkv(l, ng, seed=l + 7 * w + g)
  seg = packed_segments(l, packed)
  gseg = seg[:, [j * g for j in range(ng)]] if ng else np.zeros((B, 0), np.int32)
  rows, mask = reference_mask(l, g, seg, w, m)
  real_pos = [i for i, r in enumerate(rows) if not r[0]]
  glob_pos = [i for i, r in enumerate(rows) if r[0]]

  def ours(q, k, v, qg, kg, vg):
    (o, _), gl = sparse_attention(
      q, k, v, jnp.asarray(seg), qg, kg, vg, jnp.asarray(gseg), layout, w, m, BLOCK
    )
    return o, (gl[0] if gl is not None else qg)

  def ref(q, k, v, qg, kg, vg):
    o = reference_attention(
      to_interleaved(rows, q, qg),
      to_interleaved(rows, k, kg),
      to_interleaved(rows, v, vg),
      jnp.asarray(mask),
    )
    return o[:, real_pos], (o[:, glob_pos] if ng else qg)

  args = (q, k, v, qg, kg, vg)
  rng = np.random.default_rng(1)
  ct, ctg = rng.standard_normal(q.shape), rng.standard_normal(qg.shape)

  def value_and_grads(fn):
    def loss(*a):
      out = fn(*a)
      return jnp.sum(out[0] * ct) + jnp.sum(out[1] * ctg), out

    grad_fn = jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)
    return jax.jit(grad_fn, compiler_options=FAST)(*args)

  (_, got), g_ours = value_and_grads(ours)
  (_, want), g_ref = value_and_grads(ref)
  np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], atol=2e-6, rtol=1e-5)
  for a, b_ in zip(g_ours, g_ref, strict=True):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b_, atol=5e-6, rtol=1e-5)


def test_fully_masked_rows_are_zero_not_nan():
  """A query whose segment has no visible key (its own is masked) gives 0 and finite grads."""
  from qwen3_jax.model.sparse_attention import attend

  q = jnp.ones((1, 1, 2, 1, 1, 4))
  k = jnp.ones((1, 1, 3, 1, 4))
  mask = jnp.array([[[[True, False, False], [False, False, False]]]])
  out, lse = attend(q, k, k, mask)
  assert np.all(out[0, 0, 1] == 0) and lse[0, 0, 1, 0, 0] <= -1e29
  grad = jax.grad(lambda q: jnp.sum(attend(q, k, k, mask)[0]))(q)
  assert np.all(np.isfinite(grad))


def dense_causal_reference(q, k, v, seg):
  """Softmax attention in float32 with an explicit [B, L, L] causal & same-segment mask."""
  h, kh = q.shape[2], k.shape[2]
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  kr, vr = jnp.repeat(k, h // kh, axis=2), jnp.repeat(v, h // kh, axis=2)
  l = q.shape[1]
  mask = np.tril(np.ones((l, l), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  logits = jnp.einsum("bqhd,bshd->bhqs", q, kr)
  logits = jnp.where(jnp.asarray(mask)[:, None], logits, -1e30)
  return jnp.einsum("bhqs,bshd->bqhd", jax.nn.softmax(logits, axis=-1), vr)


FULL_CASES = [
  # (L, H, K, block, packed): L not a multiple of the block, one block, MHA / GQA / MQA.
  (19, 4, 2, 8, True),
  (16, 4, 4, 8, False),
  (13, 6, 2, None, True),
  (21, 4, 1, 5, True),
]


def full_value_and_grads(fn, q, k, v, ct):
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * ct), out

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  (_, out), grads = jax.jit(grad_fn, compiler_options=FAST)(q, k, v)
  return out, grads


def random_qkv_ct(l, h, kh, seed, dtype=jnp.float32):
  """q [B, l, h, DH], k and v [B, l, kh, DH] in `dtype`; a float32 output cotangent."""
  rng = np.random.default_rng(seed)
  shapes = [(B, l, h, DH), (B, l, kh, DH), (B, l, kh, DH)]
  q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)
  return q, k, v, jnp.asarray(rng.standard_normal((B, l, h, DH)), jnp.float32)


@pytest.mark.parametrize("l,h,kh,block,packed", FULL_CASES)
def test_full_attention_matches_dense_reference(l, h, kh, block, packed):
  q, k, v, ct = random_qkv_ct(l, h, kh, seed=l + h + kh)
  seg = packed_segments(l, packed)  # packed: a document split mid-block, trailing padding (0)
  seg_arg = jnp.asarray(seg) if packed else None
  got, g_got = full_value_and_grads(lambda *a: full_attention(*a, seg_arg, block), q, k, v, ct)
  want, g_want = full_value_and_grads(lambda *a: dense_causal_reference(*a, seg), q, k, v, ct)
  assert_close(got, want, 1e-5, "out")
  for name, a, b_ in zip("qkv", g_got, g_want, strict=True):
    assert np.all(np.isfinite(a)), f"d{name} has non-finite values"
    assert_close(a, b_, 1e-5, f"d{name}")


@pytest.mark.parametrize("mesh_axes", [dict(data=2, tensor=2), dict(fsdp=2), dict(tensor=2)])
def test_full_attention_per_device_matches_reference(mesh_axes):
  """Under a mesh the core runs per device in shard_map (batch over data/fsdp, heads over
  tensor): outputs and gradients equal the dense reference."""
  l = 19
  q, k, v, ct = random_qkv_ct(l, 4, 2, seed=3)
  seg = packed_segments(l, True)
  n = int(np.prod(list(mesh_axes.values())))
  mesh = sharding.make_mesh(C.MeshConfig(**mesh_axes), jax.devices()[:n])
  with sharding.use_mesh(mesh):
    got, g_got = full_value_and_grads(
      lambda *a: full_attention(*a, jnp.asarray(seg), BLOCK), q, k, v, ct
    )
  want, g_want = full_value_and_grads(lambda *a: dense_causal_reference(*a, seg), q, k, v, ct)
  assert_close(got, want, 1e-5, "out")
  for name, a, b_ in zip("qkv", g_got, g_want, strict=True):
    assert_close(a, b_, 1e-5, f"d{name}")


def test_full_attention_bf16_inputs():
  """bf16 q/k/v: float32 softmax inside, output bf16, close to the float32 reference."""
  l = 19
  q, k, v, ct = random_qkv_ct(l, 4, 2, seed=11, dtype=jnp.bfloat16)
  seg = packed_segments(l, True)
  got, g_got = full_value_and_grads(
    lambda *a: full_attention(*a, jnp.asarray(seg), BLOCK), q, k, v, ct
  )
  want, g_want = full_value_and_grads(lambda *a: dense_causal_reference(*a, seg), q, k, v, ct)
  assert got.dtype == jnp.bfloat16
  assert_close(got, want, 2e-2, "out")
  for name, a, b_ in zip("qkv", g_got, g_want, strict=True):
    assert a.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(a, np.float32)))
    assert_close(a, b_, 3e-2, f"d{name}")


def test_full_attention_bad_shapes_raise():
  q, k = jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    full_attention(q, k, k)
  with pytest.raises(ValueError, match="segment_ids"):
    full_attention(k, k, k, jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="block"):
    full_attention(k, k, k, None, 0)


def _tiny(pattern, **att):
  attention = C.AttentionConfig(
    pattern=pattern, window=6, global_every=4, max_globals=2, block_size=4, **att
  )
  return C.tiny(attention=attention, moe=C.MoEConfig(strategy="dense"))


@pytest.mark.parametrize("kind", ["sparse", "full"])
def test_no_future_leakage_exact_zero_jacobian(kind):
  """d out[t] / d x[t'] == 0 exactly for t' > t (real tokens and globals in the order)."""
  cfg = _tiny((kind,))
  attn = Attention(cfg, kind=kind, rngs=nnx.Rngs(0))
  l = 14
  layout = make_layout(l, 0, 4)
  ng = layout.num_globals
  rng = np.random.default_rng(3)
  xg = jnp.asarray(rng.standard_normal((1, ng, cfg.hidden_size)), jnp.float32)
  pos = jnp.concatenate([jnp.arange(l), jnp.arange(0, l, 4)])[None]

  def f(x):  # real inputs -> real and global outputs
    y, _ = attn(jnp.concatenate([x, xg], axis=1), pos, None, layout)
    return y[0]

  x = jnp.asarray(rng.standard_normal((1, l, cfg.hidden_size)), jnp.float32)
  jac = np.asarray(jax.jit(jax.jacrev(f), compiler_options=FAST)(x))[:, :, 0]  # [L + Ng, D, L, D]
  per_pair = np.abs(jac).sum(axis=(1, 3))  # [L + Ng, L]
  for t in range(l):
    assert np.all(per_pair[t, t + 1 :] == 0), f"real output {t} depends on later input"
    assert per_pair[t, t] > 0
  for j in range(ng):  # global j sits before real slot 4j: it sees only slots < 4j
    assert np.all(per_pair[l + j, 4 * j :] == 0), f"global {j} depends on slot >= {4 * j}"
  if kind == "sparse":  # window 6: real t does not see slot t - 6.
    assert all(per_pair[t, t - 6] == 0 and per_pair[t, t - 5] > 0 for t in range(6, l))


def test_model_changing_future_tokens_leaves_past_logits_bitwise():
  cfg = _tiny(("sparse", "full"))
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  fwd = jax.jit(lambda state, t: nnx.merge(*state)(t).logits, compiler_options=FAST)
  state = nnx.split(model)
  toks = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 17)))
  base = fwd(state, toks)
  for t in (4, 9, 16):
    other = fwd(state, toks.at[:, t].set((toks[:, t] + 1) % cfg.vocab_size))
    np.testing.assert_array_equal(base[:, :t], other[:, :t])
    assert np.any(base[:, t] != other[:, t])


def test_sharded_8_devices_matches_one_device():
  cfg = _tiny(("sparse", "full")).replace(num_experts=0)
  toks = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (4, 19)))
  seg = jnp.asarray(np.repeat(packed_segments(19, True), 2, axis=0))

  def run(mesh):
    model = sharding.create_sharded(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)), mesh)
    with sharding.use_mesh(mesh):
      return nnx.jit(lambda m, t: m(t, segment_ids=seg).logits)(model, toks)

  mesh = sharding.make_mesh(C.MeshConfig(data=2, fsdp=2, tensor=2))
  sharding.validate(cfg, mesh, batch_size=4)
  sharded = run(mesh)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(run(None)), np.asarray(sharded), atol=2e-5, rtol=2e-5)


def test_bad_attention_config_raises():
  with pytest.raises(ValueError, match="attention.kind"):
    C.AttentionConfig(kind="local")
  with pytest.raises(ValueError, match="block_size"):
    C.AttentionConfig(block_size=0)
  with pytest.raises(ValueError, match="window"):
    C.AttentionConfig(window=0)
  with pytest.raises(ValueError, match="attention kind"):
    Attention(C.tiny(), kind="local", rngs=nnx.Rngs(0))


def test_param_count_includes_the_global_token():
  cfg = _tiny(("sparse", "full"))
  state = nnx.state(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  assert C.param_count(cfg)[0] == n == C.param_count(_tiny(("full",)))[0] + cfg.hidden_size
