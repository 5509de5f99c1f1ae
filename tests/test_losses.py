"""Fused LM head + cross-entropy (qwen3_jax/train/fused_ce.py) against optax on full logits.

Loss, metrics and gradients (hidden, head, weights) with a loss mask, z-loss and a token count
that no chunk size divides; float32 and bf16; on 1 device and on 8-device meshes (the sharded
run equals the 1-device run); through the model with tied and untied heads.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from numerics import assert_close

from qwen3_jax import config as C
from qwen3_jax import sharding as shd
from qwen3_jax.model import Qwen3
from qwen3_jax.model.layers import linear
from qwen3_jax.train.fused_ce import fused_cross_entropy

B, L, D, V = 8, 13, 24, 96  # T = 104 tokens: chunk 16 -> 7 chunks of 15 rows + 1 padded row
Z = 1e-2
MESHES = {
  "data8": C.MeshConfig(data=8),
  "data2_expert4": C.MeshConfig(data=2, expert=4),
  "fsdp2_expert2_tensor2": C.MeshConfig(fsdp=2, expert=2, tensor=2),
  "data2_fsdp4": C.MeshConfig(data=2, fsdp=4),
}


def reference(h, w, y, wt, z):
  """sum(wt * (CE + z lse^2)) and the metrics, from full float32 logits with optax."""
  logits = jnp.einsum("bld,dv->blv", h.astype(jnp.float32), w.astype(jnp.float32))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  lse = jax.nn.logsumexp(logits, -1)
  acc = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
  metrics = {"ce": (wt * ce).sum(), "z_loss": (wt * lse**2).sum(), "accuracy": (wt * acc).sum()}
  return (wt * (ce + z * lse**2)).sum(), metrics


def fused(h, w, y, wt, z, chunk=16):
  return fused_cross_entropy(h, w, y, wt, z_loss=z, chunk_size=chunk)


def value_and_grads(fn):
  """jit(value_and_grad) over (hidden, head, weights); targets and z passed through."""
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 3), has_aux=True), static_argnums=4)


@pytest.fixture(scope="module")
def data():
  k = jax.random.split(jax.random.key(0), 4)
  h = jax.random.normal(k[0], (B, L, D), jnp.float32)
  w = 0.5 * jax.random.normal(k[1], (D, V), jnp.float32)
  y = jax.random.randint(k[2], (B, L), 0, V)
  # Half the targets are the argmax, so accuracy is neither 0 nor 1.
  y = jnp.where(jnp.arange(L) % 2 == 0, jnp.argmax(h @ w, -1), y)
  mask = jax.random.uniform(k[3], (B, L)) > 0.3
  wt = mask.astype(jnp.float32) / mask.sum()
  return h, w, y, wt


@pytest.fixture(scope="module")
def expected(data):
  return value_and_grads(reference)(*data, Z)


@pytest.fixture(scope="module")
def fused_grads():
  return value_and_grads(fused)


def check(got, want, rel=1e-5, grad_rel=1e-5):
  (loss, metrics), grads = got
  (loss_r, metrics_r), grads_r = want
  assert_close(loss, loss_r, rel=rel, what="loss")
  for k in metrics_r:
    assert_close(metrics[k], metrics_r[k], rel=rel, what=k)
  for name, g, g_r in zip(("d_hidden", "d_head", "d_weights"), grads, grads_r, strict=True):
    assert np.abs(np.asarray(g_r)).max() > 0, name
    assert_close(g, g_r, rel=grad_rel, what=name)


@pytest.mark.parametrize("z", [0.0, Z])
def test_matches_optax_on_full_logits(data, expected, fused_grads, z):
  want = expected if z == Z else value_and_grads(reference)(*data, z)
  (_, m), _ = want
  assert 0.1 < float(m["accuracy"]) < 0.9  # accuracy really is compared
  check(fused_grads(*data, z), want)


def test_chunk_sizes_and_forward_only(data, expected):
  h, w, y, wt = data
  (loss_r, metrics_r), _ = expected
  for chunk in (1, 7, 104, 1000):  # one row per chunk, padding, exactly one chunk, larger
    check(value_and_grads(lambda *a, c=chunk: fused(*a, chunk=c))(*data, Z), expected)
  # Without differentiation the primal (chunked forward only) runs: same values.
  loss, metrics = jax.jit(fused, static_argnums=(4, 5))(h, w, y, wt, Z, 16)
  assert_close(loss, loss_r, what="forward-only loss")
  for k in metrics_r:
    assert_close(metrics[k], metrics_r[k], what=f"forward-only {k}")


def test_masked_tokens_do_not_matter(data, fused_grads):
  """Zero-weight rows contribute nothing, even with garbage hidden states."""
  h, w, y, wt = data
  h2 = jnp.where((wt > 0)[..., None], h, 1e3)
  (loss, _), (dh, dw, _) = fused_grads(h, w, y, wt, Z)
  (loss2, _), (dh2, dw2, _) = fused_grads(h2, w, y, wt, Z)
  assert_close(loss2, loss, what="loss")
  assert_close(dw2, dw, what="d_head")
  assert_close(dh2, dh, what="d_hidden")
  assert float(jnp.abs(jnp.where((wt > 0)[..., None], 0.0, dh2)).max()) == 0.0
  # Their targets are never read (-1 = an ignore id), but a counted bad target poisons the loss.
  (loss3, _), (dh3, dw3, _) = fused_grads(h, w, jnp.where(wt > 0, y, -1), wt, Z)
  assert_close(loss3, loss, what="loss, ignored targets -1")
  assert_close(dw3, dw, what="d_head, ignored targets -1")
  (loss4, _), _ = fused_grads(h, w, y.at[0, 0].set(V), wt.at[0, 0].set(0.1), Z)
  assert not np.isfinite(float(loss4))


def test_metrics_carry_no_gradient(data):
  h, w, y, wt = data
  g = jax.grad(lambda h: fused(h, w, y, wt, Z)[1]["ce"])(h)
  assert float(jnp.abs(g).max()) == 0.0


def test_bf16_inputs(data):
  """bf16 hidden / head: float32 logits inside; equals the float32 reference on the same
  (bf16-rounded) values up to bf16 rounding of the gradients."""
  h, w, y, wt = data
  hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  want = value_and_grads(reference)(hb.astype(jnp.float32), wb.astype(jnp.float32), y, wt, Z)
  got = value_and_grads(fused)(hb, wb, y, wt, Z)
  assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.bfloat16
  check(got, want, rel=1e-5, grad_rel=2e-2)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_matches_one_device(data, expected, fused_grads, mesh_name):
  mesh = shd.make_mesh(MESHES[mesh_name])
  h, w, y, wt = data
  put = lambda x, axes: jax.device_put(x, NamedSharding(mesh, shd.logical_to_spec(axes)))  # noqa: E731
  args = (
    put(h, ("batch", "seq", None)),
    put(w, ("embed", "vocab")),
    put(y, ("batch", "seq")),
    put(wt, ("batch", "seq")),
  )
  with shd.use_mesh(mesh):
    got = value_and_grads(fused)(*args, Z)
  one = fused_grads(*data, Z)
  check(got, one, rel=1e-6, grad_rel=1e-6)
  check(got, expected)
  assert got[1][0].sharding.spec == shd.logical_to_spec(("batch", "seq", None))
  if mesh_name == "data2_fsdp4":  # d_head reduce-scattered over fsdp: split like the head
    assert got[1][1].sharding.spec[0] in ("fsdp", ("fsdp",))
    assert got[1][1].addressable_shards[0].data.shape == (w.shape[0] // 4, w.shape[1])
  with shd.use_mesh(shd.make_mesh(C.MeshConfig(data=8))):
    with pytest.raises(ValueError, match="batch 4 is not divisible"):
      fused(h[:4], w, y[:4], wt[:4], Z)


@pytest.mark.parametrize("mesh_name", [None, "fsdp2_expert2_tensor2"])
def test_padded_vocab_columns_are_masked(data, mesh_name):
  """A head with 32 padding columns (V = 96 real of Vp = 128) whose logits would win every
  row (a constant-1 hidden feature gives them +100): with vocab_size=96 the loss, metrics and
  gradients equal the reference on the true [D + 1, V] head, and the padding columns get a
  zero gradient. Fused (1 device) and vocab-parallel (tensor=2) paths."""
  h, w, y, wt = data
  h1 = jnp.concatenate([h, jnp.ones((B, L, 1), h.dtype)], axis=-1)  # [B, L, D + 1]
  w1 = jnp.pad(w, ((0, 1), (0, 0)))  # [D + 1, V], the extra feature adds 0 to real logits
  pad = 0.5 * jax.random.normal(jax.random.key(1), (D + 1, 32)).at[D].set(100.0)
  wp = jnp.concatenate([w1, pad], axis=1)  # [D + 1, Vp]
  assert np.all(np.asarray(jnp.argmax(h1 @ wp, -1)) >= V)  # unmasked, a padded id would win
  want = value_and_grads(reference)(h1, w1, y, wt, Z)
  mesh = shd.make_mesh(MESHES[mesh_name]) if mesh_name else None
  fn = lambda *a: fused_cross_entropy(*a[:4], z_loss=a[4], chunk_size=16, vocab_size=V)  # noqa: E731
  with shd.use_mesh(mesh):
    (loss, metrics), (dh, dw, dwt) = value_and_grads(fn)(h1, wp, y, wt, Z)
  check(((loss, metrics), (dh, dw[:, :V], dwt)), want)
  assert 0.1 < float(metrics["accuracy"]) < 0.9
  assert float(jnp.abs(dw[:, V:]).max()) == 0.0
  # A counted padding id as target is an error (NaN), never a silent class.
  bad = fn(h1, wp, y.at[0, 0].set(V + 3), wt.at[0, 0].set(0.1), Z)[0]
  assert not np.isfinite(float(bad))
  with pytest.raises(ValueError, match="vocab_size=129"):
    fused_cross_entropy(h1, wp, y, wt, vocab_size=129)


def test_bad_inputs_raise(data):
  h, w, y, wt = data
  with pytest.raises(ValueError, match="hidden must be"):
    fused(h, w.T, y, wt, Z)
  with pytest.raises(ValueError, match="targets"):
    fused(h, w, y[:, :-1], wt, Z)
  with pytest.raises(ValueError, match="integers"):
    fused(h, w, y.astype(jnp.float32), wt, Z)
  with pytest.raises(ValueError, match="chunk_size"):
    fused(h, w, y, wt, Z, chunk=0)


# ------------------------------------------------------------------------- through the model


@pytest.mark.parametrize(
  "tie, mesh_name, vocab",
  [
    (False, None, 256),
    (True, None, 256),
    (True, "data2_expert4", 256),
    (False, "fsdp2_expert2_tensor2", 257),  # vocab-parallel head padded to 384
  ],
)
def test_model_hidden_and_head_give_exact_loss_and_grads(tie, mesh_name, vocab):
  """model(return_hidden=True) + head_weight() + fused loss == optax CE on model logits, on
  every parameter's gradient (tied: the embedding gets both the lookup and the head part;
  padded vocab: the [B, L, V] logits against the masked [D, Vp] head)."""
  cfg = C.tiny(num_experts=0, num_hidden_layers=1, tie_word_embeddings=tie, vocab_size=vocab)
  mesh = shd.make_mesh(MESHES[mesh_name]) if mesh_name else None
  model = shd.create_sharded(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)), mesh)
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 12)), jnp.int32)
  y = jnp.roll(tokens, -1, axis=1)
  wt = jnp.ones((8, 12), jnp.float32).at[:, -1].set(0.0) / (8 * 11)

  def ref_loss(p):
    logits = nnx.merge(graphdef, p)(tokens).logits
    return reference_logits(logits, y, wt)

  def fused_loss(p):
    m = nnx.merge(graphdef, p)
    out = m(tokens, return_hidden=True)
    assert out.logits is None and out.hidden.shape == (8, 12, cfg.hidden_size)
    head = m.head_weight()
    assert head.shape == (cfg.hidden_size, cfg.padded_vocab_size)
    return fused_cross_entropy(
      out.hidden, head, y, wt, z_loss=Z, chunk_size=40, vocab_size=cfg.vocab_size
    )[0]

  def hidden_logits(p):
    m = nnx.merge(graphdef, p)
    hidden = m(tokens, return_hidden=True).hidden
    return linear(hidden, m.head_weight())[..., : cfg.vocab_size], m(tokens).logits

  with shd.use_mesh(mesh):
    loss_r, g_r = jax.jit(jax.value_and_grad(ref_loss))(params)
    loss, g = jax.jit(jax.value_and_grad(fused_loss))(params)
    from_hidden, logits = jax.jit(hidden_logits)(params)
  assert_close(from_hidden, logits, rel=1e-6, what="linear(hidden, head_weight) vs logits")
  assert_close(loss, loss_r, rel=1e-6, what="loss")
  flat_r, flat = nnx.to_flat_state(g_r), dict(nnx.to_flat_state(g))
  assert len(flat_r) == len(flat) and (("lm_head",) in flat) == (not tie)
  for path, v in flat_r:
    assert np.abs(np.asarray(v[...])).max() > 0, path
    assert_close(flat[path][...], v[...], rel=1e-5, what=str(path))


def reference_logits(logits, y, wt):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return (wt * (ce + Z * jax.nn.logsumexp(logits, -1) ** 2)).sum()
