"""Sparse attention vs. an explicit dense reference, causality, and a sharded run.

The reference builds each row's interleaved sequence by walking the row (a global right before
every token whose offset in its document, a run of one nonzero segment id, is a multiple of g)
and its mask from the documented rule stated by counting in that order ("the key is at or before
the query, in its segment, and one of the last w real tokens / the last M globals of its
document"), independently of the cummax / anchor / count arithmetic of the implementation.
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
from qwen3_jax.model.global_tokens import check_documents, global_slots, make_layout
from qwen3_jax.model.sparse_attention import sparse_attention
from qwen3_jax.model.transformer import Qwen3

B, H, KH, DH = 2, 4, 2, 8
# Tiny programs: LLVM optimisation is most of their compile time, so skip it.
FAST = {"xla_backend_optimization_level": 0}
BLOCK = 8


def interleaved(seg_row, g):
  """(is_global, index, segment) of one row's interleaved order, found by walking the row."""
  rows, n_glob, off = [], 0, 0
  for t, s in enumerate(seg_row):
    off = off + 1 if t and seg_row[t - 1] == s else 0
    if g and s != 0 and off % g == 0:
      rows.append((True, n_glob, s))
      n_glob += 1
    rows.append((False, t, s))
  return rows


def reference_mask(rows, w, m):
  """[n, n] mask over one row's interleaved order, from the rule stated by counting."""
  n = len(rows)
  mask = np.zeros((n, n), bool)
  for qi in range(n):
    reals = [ki for ki in range(qi + 1) if not rows[ki][0]]
    globs = [ki for ki in range(qi + 1) if rows[ki][0] and rows[ki][2] == rows[qi][2]]
    for ki in set(reals[-w:] if w else reals) | set(globs[-m:] if m else globs):
      mask[qi, ki] = rows[qi][2] == rows[ki][2]
  return mask


def reference_attention(q, k, v, mask):
  """Plain softmax attention with an explicit [B, Q, S] mask. q [B, Q, H, Dh]."""
  kr = jnp.repeat(k, H // KH, axis=2)
  vr = jnp.repeat(v, H // KH, axis=2)
  logits = jnp.einsum("bqhd,bshd->bhqs", q, kr)
  logits = jnp.where(mask[:, None], logits, -1e30)
  return jnp.einsum("bhqs,bshd->bqhd", jax.nn.softmax(logits, axis=-1), vr)


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


def row_segments(parts, l):
  """[L] segment ids from (id, length) parts (id 0 = padding), padded with 0 to L."""
  seg = np.concatenate([np.full(n, i, np.int32) for i, n in parts] + [np.zeros(l, np.int32)])
  return seg[:l]


DOCS = {  # B = 2 rows of documents; many start inside a query block and off the g grid.
  "one": lambda l: np.ones((B, l), np.int32),
  "packed": lambda l: np.stack(
    [
      row_segments([(1, 7), (2, 5), (3, l - 12)], l),
      row_segments([(0, 3), (1, l - 5)], l),  # left padding, document, trailing padding
    ]
  ),
  "many": lambda l: np.stack(
    [
      row_segments([(1, 1), (2, 3), (3, 1), (4, 2), (5, 5), (6, l - 12)], l),
      row_segments([(0, 2), (1, 2), (2, 6), (3, 1), (4, l - 11)], l),
    ]
  ),
}

CASES = [
  # (L, global_every, window, max_globals, documents, max_docs: None = the rows' own count);
  # block size 8: windows 1, b-1, b, b+1.
  (16, 0, 1, 0, "one", None),
  (19, 0, BLOCK + 1, 0, "packed", None),
  (16, 4, BLOCK, 2, "packed", None),
  (19, 4, BLOCK - 1, 2, "one", None),
  (21, 4, BLOCK + 1, 3, "packed", None),
  (19, 4, 1, 2, "many", None),
  (19, 3, 2 * BLOCK + 1, 0, "many", 0),  # max_globals = 0: every earlier global; no doc cap
  (13, 5, 100, 1, "packed", 8),  # window longer than the sequence; a loose doc cap
  (21, 2, BLOCK, 1, "many", None),  # up to 5 documents start in one block, M = 1
]


@pytest.mark.parametrize("l,g,w,m,docs,cap", CASES)
def test_sparse_matches_dense_reference(l, g, w, m, docs, cap):
  seg = DOCS[docs](l)
  rows = [interleaved(list(seg[b]), g) for b in range(B)]
  n_docs = max(sum(1 for t in range(l) if s[t] and (t == 0 or s[t - 1] != s[t])) for s in seg)
  layout = make_layout(jnp.asarray(seg), g, n_docs if cap is None else cap)
  ng = layout.num_globals
  n_glob = [sum(r[0] for r in rr) for rr in rows]
  assert max(n_glob) <= ng == global_slots(l, g, n_docs if cap is None else cap)
  np.testing.assert_array_equal(np.asarray(layout.glob_valid).sum(1), n_glob)
  gvalid = np.arange(ng)[None, :] < np.array(n_glob)[:, None]  # [B, Ng]
  q, k, v, qg, kg, vg = random_qkv(l, ng, seed=l + 7 * w + g)
  off = np.clip(np.asarray(layout.glob_offset), 0, l - 1)
  gseg = np.where(gvalid, np.take_along_axis(seg, off, 1), 0)

  def ours(q, k, v, qg, kg, vg):
    (o, _), gl = sparse_attention(
      q, k, v, jnp.asarray(seg), qg, kg, vg, jnp.asarray(gseg), layout, w, m, BLOCK
    )
    return o, (gl[0] * gvalid[:, :, None, None] if gl is not None else qg)

  def ref(q, k, v, qg, kg, vg):
    outs, gouts = [], []
    for b in range(B):  # rows interleave differently: one row at a time

      def order(real, glob, b=b):
        return jnp.stack([glob[b, i] if is_g else real[b, i] for is_g, i, _ in rows[b]])[None]

      mask = jnp.asarray(reference_mask(rows[b], w, m))[None]
      o = reference_attention(order(q, qg), order(k, kg), order(v, vg), mask)[0]
      outs.append(o[jnp.asarray([i for i, r in enumerate(rows[b]) if not r[0]])])
      gpos = [i for i, r in enumerate(rows[b]) if r[0]]
      go = o[jnp.asarray(gpos, jnp.int32)] if gpos else jnp.zeros((0, H, DH))
      gouts.append(jnp.concatenate([go, jnp.zeros((ng - len(gpos), H, DH))]))
    return jnp.stack(outs), (jnp.stack(gouts) if ng else qg)

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


def test_global_slots_bound_holds_and_is_tight():
  """Random packings never need more than global_slots(L, g, D), and some packing needs it."""
  rng = np.random.default_rng(0)
  l, g = 23, 4
  for _ in range(20):
    cuts = np.sort(rng.choice(np.arange(1, l), rng.integers(0, 6), replace=False))
    seg = np.zeros(l, np.int32)
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, l], strict=True)):
      seg[a:b] = (i + 1) * int(rng.random() > 0.2)  # some runs are padding
    lay = make_layout(jnp.asarray(seg[None]), g, 6)
    n = sum(r[0] for r in interleaved(list(seg), g))
    assert int(lay.docs[0]) <= 6 and int(lay.seen[0, -1]) == n <= lay.num_globals
  tight = row_segments([(1, 5), (2, 1), (3, 9), (4, 8)], l)  # 2 + 1 + 3 + 2 = 8 globals
  assert int(make_layout(jnp.asarray(tight[None]), g, 4).seen[0, -1]) == global_slots(l, g, 4)


def test_too_many_documents_raise():
  """A row with more documents than max_docs raises, eagerly and inside jit."""
  seg = jnp.asarray(np.stack([row_segments([(1, 3), (2, 3), (3, 6)], 12)] * 2))
  check_documents(make_layout(seg, 4, 3))
  with pytest.raises(ValueError, match=r"holds 3 documents.*max_docs_per_row=2"):
    check_documents(make_layout(seg, 4, 2))

  @jax.jit
  def run(seg):
    layout = make_layout(seg, 4, 2)
    check_documents(layout)
    return layout.glob_offset

  with pytest.raises(Exception, match="max_docs_per_row=2"):
    jax.block_until_ready(run(seg))


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
  layout = make_layout(jnp.ones((1, l), jnp.int32), 4, 1)
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


@pytest.mark.parametrize("pattern", [("sparse",), ("sparse", "full")])
def test_document_logits_do_not_depend_on_its_row_offset(pattern):
  """One document at offsets 0, 5 and 37 of packed rows (next to other documents) gives the
  same logits: global tokens follow the document's own offsets, not the row's slots."""
  cfg = _tiny(pattern, max_docs_per_row=3)
  l, n = 48, 11  # global_every 4: the document holds 3 globals; 5 and 37 are off the grid
  rng = np.random.default_rng(4)
  doc = rng.integers(0, cfg.vocab_size, n)
  toks = rng.integers(0, cfg.vocab_size, (3, l))
  offsets, parts = (0, 5, 37), ([(9, n), (1, 20), (2, 17)], [(1, 5), (9, n)], [(1, 30), (2, 7)])
  seg = np.stack([row_segments(p, l) for p in parts])
  seg[1, 5 + n :], seg[2, 37:] = 2, 9  # row 1: a trailing document; row 2: ours at 37
  for r, o in enumerate(offsets):
    toks[r, o : o + n] = doc
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  fwd = jax.jit(
    lambda state, t, s: nnx.merge(*state)(t, segment_ids=s).logits, compiler_options=FAST
  )
  logits = np.asarray(fwd(nnx.split(model), jnp.asarray(toks), jnp.asarray(seg)))
  want = logits[0, :n]
  for r, o in enumerate(offsets[1:], 1):
    assert_close(logits[r, o : o + n], want, 1e-5, f"document at offset {o}")


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
  with pytest.raises(ValueError, match="max_docs_per_row"):
    C.AttentionConfig(max_docs_per_row=-1)
  with pytest.raises(ValueError, match="attention kind"):
    Attention(C.tiny(), kind="local", rngs=nnx.Rngs(0))


def test_param_count_includes_the_global_token():
  cfg = _tiny(("sparse", "full"))
  state = nnx.state(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  assert C.param_count(cfg)[0] == n == C.param_count(_tiny(("full",)))[0] + cfg.hidden_size
