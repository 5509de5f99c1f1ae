"""KV-cache decoding equals the full forward pass (full, sparse and mixed layer patterns)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3_jax import config as C
from qwen3_jax.model.kv_cache import init_cache
from qwen3_jax.model.transformer import Qwen3

L, PAD = 19, 3  # row 1 is left-padded with PAD tokens of segment 0 (as in batched rollouts)
FAST = {"xla_backend_optimization_level": 0}  # tiny programs: skip LLVM optimisation


def _cfg(pattern, **att):
  attention = C.AttentionConfig(
    pattern=pattern, window=6, global_every=4, max_globals=2, block_size=4, **att
  )
  return C.tiny(attention=attention, moe=C.MoEConfig(strategy="dense"))


@pytest.mark.parametrize("pattern", [("full",), ("sparse",), ("sparse", "full")])
def test_cached_decode_equals_full_forward(pattern):
  """Prefill 8 tokens, a 4-token chunk, then 1 token per step up to 19 tokens.

  Window 6 < 19 wraps the sparse rings; global tokens are inserted during decoding before
  slots 12 and 16; max_globals 2 < 5 globals wraps the global ring.
  """
  cfg = _cfg(pattern)
  graphdef, state = nnx.split(Qwen3(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, L)))
  seg = np.ones((2, L), np.int32)
  seg[1, :PAD] = 0
  pos = np.tile(np.arange(L), (2, 1))
  pos[1] = np.maximum(pos[1] - PAD, 0)
  seg, pos = jnp.asarray(seg), jnp.asarray(pos)

  @jax.jit(compiler_options=FAST)
  def forward(state, toks, pos, seg, cache):
    out = nnx.merge(graphdef, state)(toks, positions=pos, segment_ids=seg, cache=cache)
    return out.logits, out.cache

  want, none = forward(state, toks, pos, seg, None)
  assert none is None
  cache = init_cache(cfg, 2, 24)
  got = []
  for a, b in [(0, 8), (8, 12)] + [(t, t + 1) for t in range(12, L)]:
    logits, cache = forward(state, toks[:, a:b], pos[:, a:b], seg[:, a:b], cache)
    assert (np.asarray(cache.length) == b).all()
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, 1), want, atol=2e-5, rtol=2e-5)
  if "sparse" in pattern:  # sparse layers keep a ring of the window and of max_globals.
    sub0 = cache.layers[0]
    assert sub0["k"].shape[-1] == 6 and sub0["gk"].shape[-1] == 2  # [R, B, K, Dh, S]


@pytest.mark.parametrize("batch", [1, 8])
def test_default_moe_decode_equals_full_forward(batch):
  """Default settings (`auto` MoE dispatch): a 6-token prefill then 1-token steps, where a
  step routes only `batch` tokens, equal one full forward. A token-dropping dispatch fails this
  (a step's per-expert capacity is tiny); top-1 routing makes collisions on an expert likely."""
  cfg = C.tiny(num_experts_per_tok=1)
  graphdef, state = nnx.split(Qwen3(cfg, rngs=nnx.Rngs(3)))
  toks = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (batch, 12)))

  @jax.jit(compiler_options=FAST)
  def forward(state, toks, cache):
    out = nnx.merge(graphdef, state)(toks, cache=cache)
    return out.logits, out.cache, out.aux["dropped_fraction"]

  want, _, _ = forward(state, toks, None)
  cache, got = init_cache(cfg, batch, 12), []
  for a, b in [(0, 6)] + [(t, t + 1) for t in range(6, 12)]:
    logits, cache, dropped = forward(state, toks[:, a:b], cache)
    assert float(dropped) == 0.0
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, 1), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("pattern", [("full",), ("sparse", "full")])
def test_cache_prefix_reads_equal_full_forward(pattern, monkeypatch):
  """Attention over the cache reads only the shortest prefix (S, S / 2, ..) that holds every
  visible key. With MIN_CACHE_PREFIX lowered to 2, a 32-slot cache takes every prefix in turn
  as the rows grow (row 1 left-padded): decoding still equals the full forward pass."""
  from qwen3_jax.model import sparse_attention

  monkeypatch.setattr(sparse_attention, "MIN_CACHE_PREFIX", 2)
  cfg = _cfg(pattern)
  graphdef, state = nnx.split(Qwen3(cfg, rngs=nnx.Rngs(1)))
  toks = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, L)))
  seg = np.ones((2, L), np.int32)
  seg[1, :PAD] = 0
  seg = jnp.asarray(seg)

  @jax.jit(compiler_options=FAST)
  def forward(state, toks, seg, cache):
    out = nnx.merge(graphdef, state)(toks, segment_ids=seg, cache=cache)
    return out.logits, out.cache

  want, _ = forward(state, toks, seg, None)
  cache, got = init_cache(cfg, 2, 32), []
  for a, b in [(0, 3), (3, 4)] + [(t, t + 1) for t in range(4, L)]:
    logits, cache = forward(state, toks[:, a:b], seg[:, a:b], cache)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, 1), want, atol=2e-5, rtol=2e-5)


def test_packed_rows_in_unaligned_chunks_equal_full_forward():
  """Rows holding two documents (row 0: 6 + 13 tokens) or left padding + one document (row 1),
  decoded in chunks that start off the global grid (0-5, 5-6, 6-13, 13-14, 14-19), with the
  default positions (document offsets, continued across chunks): equal to one full forward
  pass. Globals sit at each document's offsets 0, 4, 8, ...; a chunk may begin mid-document
  (5, 13, 14) or start a new one (6)."""
  cfg = _cfg(("sparse", "full"), max_docs_per_row=2)  # sparse rings wrap; full keeps all
  graphdef, state = nnx.split(Qwen3(cfg, rngs=nnx.Rngs(2)))
  toks = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, L)))
  seg = np.ones((2, L), np.int32)
  seg[0, 6:], seg[1, :PAD] = 2, 0
  seg = jnp.asarray(seg)

  @jax.jit(compiler_options=FAST)
  def forward(state, toks, seg, cache):
    out = nnx.merge(graphdef, state)(toks, segment_ids=seg, cache=cache)
    return out.logits, out.cache

  want, _ = forward(state, toks, seg, None)
  cache, got = init_cache(cfg, 2, L), []
  for a, b in [(0, 5), (5, 6), (6, 13), (13, 14), (14, 19)]:
    logits, cache = forward(state, toks[:, a:b], seg[:, a:b], cache)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, 1), want, atol=2e-5, rtol=2e-5)
  # Row 0: 2 + 4 globals (documents of 6 and 13 tokens); row 1: 4 (16 tokens after padding).
  np.testing.assert_array_equal(cache.globals, [6, 4])
  np.testing.assert_array_equal(cache.offset, [13, 16])


def test_global_token_changes_logits_and_bad_cache_args_raise():
  """The global tokens are live: zeroing their embedding changes later logits only."""
  cfg = _cfg(("sparse",))
  model = Qwen3(cfg, rngs=nnx.Rngs(1))
  toks = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 9)))
  fwd = jax.jit(lambda state, t: nnx.merge(*state)(t).logits, compiler_options=FAST)
  base = fwd(nnx.split(model), toks)
  model.global_embedding[...] = jnp.zeros_like(model.global_embedding[...]) + 1.0
  other = fwd(nnx.split(model), toks)
  assert np.all(np.abs(np.asarray(base - other)).max(-1) > 0)  # global 0 precedes slot 0
  with pytest.raises(ValueError, match="max_len"):
    init_cache(cfg, 1, 0)


def test_sharded_decode_matches_one_device():
  """Mixed pattern on a (data=2, fsdp=2, tensor=2) mesh: prefill 4, decode 3 (a global at 4)."""
  from qwen3_jax import sharding

  cfg = _cfg(("sparse", "full")).replace(num_experts=0)
  toks = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (4, 7)))

  def run(mesh):
    model = sharding.create_sharded(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)

    @jax.jit(compiler_options=FAST)
    def step(state, toks, cache):
      out = nnx.merge(graphdef, state)(toks, cache=cache)
      return out.logits, out.cache

    with sharding.use_mesh(mesh):
      cache, got = init_cache(cfg, 4, 8), []
      for a, b in [(0, 4), (4, 5), (5, 6), (6, 7)]:
        logits, cache = step(state, toks[:, a:b], cache)
        got.append(logits)
    return np.concatenate(got, 1), cache

  want, _ = run(None)
  got, cache = run(sharding.make_mesh(C.MeshConfig(data=2, fsdp=2, tensor=2)))
  assert len(cache.layers[0]["k"].sharding.device_set) == 8
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_full_layer_cache_overflow_raises():
  """Past max_len a full layer's ring would silently become a sliding window: it raises."""
  from qwen3_jax.model import kv_cache

  mixed, sparse = _cfg(("sparse", "full")), _cfg(("sparse",))
  cache = init_cache(mixed, 1, 6)
  kv_cache.check_room(mixed, cache, 6)  # exactly full is fine
  with pytest.raises(
    ValueError, match=r"overflow: row 0 writes 7 token\(s\) at slots 0..6 .*max_len=6"
  ):
    kv_cache.check_room(mixed, cache, 7)  # concrete length: raises before anything runs
  kv_cache.check_room(sparse, init_cache(sparse, 1, 6), 50)  # sparse rings wrap by design

  cfg = _cfg(("full",)).replace(num_experts=0, num_hidden_layers=1)
  graphdef, state = nnx.split(Qwen3(cfg, rngs=nnx.Rngs(0)))
  toks = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 4)))

  @jax.jit(compiler_options=FAST)
  def forward(state, toks, cache):
    return nnx.merge(graphdef, state)(toks, cache=cache).cache

  cache = forward(state, toks, init_cache(cfg, 1, 6))  # slots 0..3 of 6
  assert (np.asarray(cache.length) == 4).all()
  with pytest.raises(
    jax.errors.JaxRuntimeError, match=r"KV cache overflow: row 0 writes 4 token\(s\) at slots 4..7"
  ):
    jax.block_until_ready(forward(state, toks, cache))  # traced length: fails at run time


def test_decode_with_fewer_kv_heads_than_tensor_equals_full_forward():
  """2 kv heads on a tensor=4 mesh (each repeated twice), vocab 257: the cache holds the 4
  repeated heads split over tensor, and cached decoding equals the one-device forward pass."""
  from qwen3_jax import sharding

  cfg = _cfg(("sparse", "full")).replace(num_experts=0, vocab_size=257)
  toks = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 7)))
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  want = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits, compiler_options=FAST)(state, toks)
  assert want.shape == (2, 7, 257)

  mesh = sharding.make_mesh(C.MeshConfig(data=2, tensor=4))
  sharding.validate(cfg, mesh, batch_size=2)
  state = jax.device_put(state, sharding.state_shardings(state, mesh))

  @jax.jit(compiler_options=FAST)
  def step(state, toks, cache):
    out = nnx.merge(graphdef, state)(toks, cache=cache)
    return out.logits, out.cache

  off_mesh = init_cache(cfg, 2, 8)  # K = 2 heads: wrong for the tensor=4 mesh
  with sharding.use_mesh(mesh):
    cache, got = init_cache(cfg, 2, 8), []
    assert cache.layers[1]["k"].shape == (1, 2, 4, cfg.head_dim, 8)  # [R, B, K * 2, Dh, S]
    for a, b in [(0, 4), (4, 5), (5, 6), (6, 7)]:
      logits, cache = step(state, toks[:, a:b], cache)
      got.append(logits)
    k = cache.layers[1]["k"]
    assert k.sharding.shard_shape(k.shape)[2] == 1  # one (repeated) kv head per tensor shard
    with pytest.raises(ValueError, match="holds 2 kv heads"):
      jax.eval_shape(step, state, toks[:, :1], off_mesh)
  got = np.concatenate(got, 1)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(got.argmax(-1), np.asarray(want).argmax(-1))


def _per_row_schedule(cfg, seqs, refill, mesh=None, width=5):
  """Decodes rows of different lengths through one cache with per-row `num_tokens`.

  Each row prefills in chunks of `width` (not a multiple of global_every=4, so chunks start
  off the global grid), then decodes 1 token per call; a finished row sits out (0 tokens).
  `refill` = (row, new sequence): when that row finishes it is reset and refilled while the
  others keep going. Returns the logits each row's tokens got, per sequence, in order.
  """
  from qwen3_jax import sharding
  from qwen3_jax.model import kv_cache

  model = sharding.create_sharded(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)), mesh)
  graphdef, state = nnx.split(model)

  @jax.jit(compiler_options=FAST)
  def step(state, toks, num, cache, reset):
    cache = kv_cache.reset(cache, reset)
    out = nnx.merge(graphdef, state)(toks, cache=cache, num_tokens=num)
    return out.logits, out.cache

  b = len(seqs)
  todo = [list(s) for s in seqs]  # sequences per row, the refill queued behind its row
  todo[refill[0]] = [todo[refill[0]], list(refill[1])]
  rows = [[s] if not isinstance(s[0], list) else s for s in todo]
  pos, got = [0] * b, [[[] for _ in r] for r in rows]
  cur = [0] * b
  with sharding.use_mesh(mesh):
    cache = init_cache(cfg, b, 32)
    reset = np.zeros(b, bool)
    while any(cur[r] < len(rows[r]) for r in range(b)):
      w = width if any(pos[r] == 0 and cur[r] < len(rows[r]) for r in range(b)) else 1
      toks, num = np.zeros((b, w), np.int32), np.zeros(b, np.int32)
      for r in range(b):
        if cur[r] < len(rows[r]):
          piece = rows[r][cur[r]][pos[r] : pos[r] + w]
          toks[r, : len(piece)], num[r] = piece, len(piece)
      logits, cache = step(state, jnp.asarray(toks), jnp.asarray(num), cache, jnp.asarray(reset))
      reset[:] = False
      for r in range(b):
        if num[r]:
          got[r][cur[r]].append(np.asarray(logits[r, : num[r]]))
          pos[r] += int(num[r])
          if pos[r] == len(rows[r][cur[r]]):
            cur[r], pos[r] = cur[r] + 1, 0
            reset[r] = cur[r] < len(rows[r])
  # Reference: every sequence alone in a row of one uncached forward, right-padded with
  # segment 0 (causal: padding after a document does not change its logits).
  flat = [(r, i, seq) for r in range(b) for i, seq in enumerate(rows[r])]
  n = max(len(seq) for _, _, seq in flat)
  toks, seg = np.zeros((len(flat), n), np.int32), np.zeros((len(flat), n), np.int32)
  for j, (_, _, seq) in enumerate(flat):
    toks[j, : len(seq)], seg[j, : len(seq)] = seq, 1
  want = jax.jit(
    lambda s, t, g: nnx.merge(graphdef, s)(t, segment_ids=g).logits, compiler_options=FAST
  )(state, jnp.asarray(toks), jnp.asarray(seg))
  for j, (r, i, seq) in enumerate(flat):
    np.testing.assert_allclose(np.concatenate(got[r][i]), want[j, : len(seq)], atol=3e-5, rtol=3e-5)
  return cache


@pytest.mark.parametrize(
  "pattern,mesh",
  [(("sparse",), None), (("sparse", "full"), None), (("sparse", "full"), "dx")],
)
def test_per_row_slots_equal_full_forward(pattern, mesh):
  """Eight rows of 13, 6, 19, 9, 4, 16, 7 and 1 tokens share one cache, each at its own
  length: prefill in unaligned 5-token chunks (row 1's second chunk carries 1 token, the others
  5), then 1-token steps in which finished rows carry 0 tokens; row 1 is reset and refilled
  with an 11-token prompt while the others decode. Every row's logits equal its own full
  forward pass. MoE (default dispatch) with sparse rings that wrap; also on a data=2 x
  expert=4 mesh."""
  from qwen3_jax import sharding

  cfg = _cfg(pattern).replace(moe=C.MoEConfig())
  rng = np.random.default_rng(5)
  lengths = [13, 6, 19, 9, 4, 16, 7, 1]
  seqs = [rng.integers(1, cfg.vocab_size, n) for n in lengths]
  refill = (1, rng.integers(1, cfg.vocab_size, 11))
  m = sharding.make_mesh(C.MeshConfig(data=2, expert=4)) if mesh else None
  cache = _per_row_schedule(cfg, seqs, refill, m)
  np.testing.assert_array_equal(cache.length, [13, 11] + lengths[2:])
