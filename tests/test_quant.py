"""Weight-only int8 / int4 projections: against qwix's weight-only PTQ on a standalone
attention module, logits within a stated tolerance of float32, a quantised checkpoint
round-trips, and the quantised model decodes on a mesh as on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3_jax import checkpoint
from qwen3_jax import config as C
from qwen3_jax import sharding as shd
from qwen3_jax.data.tokenizer import train_tokenizer
from qwen3_jax.infer.engine import Engine, Request
from qwen3_jax.infer.sampling import SamplingParams
from qwen3_jax.model import Qwen3, quant
from qwen3_jax.model.attention import Attention

# Relative error ||q - f|| / ||f|| of the tiny model's logits allowed per bit width: the
# measured values are ~0.02 (int8) and ~0.3 (int4) at init scale (0.02 normal weights).
TOLERANCE = {8: 0.05, 4: 0.5}


def _cfg(**kw):
  return C.tiny(moe=C.MoEConfig(strategy="dense"), **kw)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_attention_int8_equals_qwix():
  qwix = pytest.importorskip("qwix")
  cfg = C.tiny()
  x = jax.random.normal(jax.random.key(0), (2, 8, cfg.hidden_size))
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  float_out = Attention(cfg, rngs=nnx.Rngs(0))(x, pos)[0]
  rules = [qwix.QtRule(module_path=".*", weight_qtype="int8")]
  ref = qwix.quantize_model(Attention(cfg, rngs=nnx.Rngs(0)), qwix.PtqProvider(rules), x, pos)
  ours = Attention(cfg, rngs=nnx.Rngs(0))
  assert sorted(quant.convert(ours, C.QuantConfig(bits=8, targets=".*"))) == [
    "k_proj",
    "o_proj",
    "q_proj",
    "v_proj",
  ]
  for name in ("q_proj", "o_proj"):  # the same integers and scales as qwix's
    np.testing.assert_array_equal(getattr(ours, name)[...], getattr(ref, name).array.qvalue[...])
    np.testing.assert_array_equal(
      getattr(ours, name + "_scale")[...], getattr(ref, name).array.scale[...]
    )
  got, want = ours(x, pos)[0], ref(x, pos)[0]
  assert _rel(want, float_out) > 1e-3  # qwix really quantised
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_logits_close_to_float_and_checkpoint_round_trip(bits, tmp_path):
  model = Qwen3(_cfg(), rngs=nnx.Rngs(0))
  q = quant.quantized(model, C.QuantConfig(bits=bits))
  tok = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  want, got = model(tok).logits, q(tok).logits
  assert 1e-4 < _rel(got, want) < TOLERANCE[bits]
  assert quant.param_bytes(q) < 0.45 * quant.param_bytes(model)  # f32 -> 1 byte + scales
  checkpoint.save_params(str(tmp_path / "q"), q, q.cfg)
  back, cfg = checkpoint.load_params(str(tmp_path / "q"))
  assert cfg.quant == C.QuantConfig(bits=bits)
  np.testing.assert_array_equal(np.asarray(back(tok).logits), np.asarray(got))


def test_quantized_model_decodes_on_a_mesh():
  """Greedy decoding of the int8 model by the engine on data 2 x expert 2 x tensor 2 equals
  an uncached greedy loop of the same model on one device (one forward pass per token)."""
  tok = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 8], 300)
  cfg = _cfg(vocab_size=300, quant=C.QuantConfig(bits=8))
  mesh = shd.make_mesh(C.MeshConfig(data=2, expert=2, tensor=2))
  single = Qwen3(cfg, rngs=nnx.Rngs(0))
  sharded = shd.create_sharded(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)), mesh)
  assert sharded.layers.sub_0.self_attn.q_proj[...].dtype == jnp.int8
  prompt, n = [5, 17, 42, 99, 7], 6
  eng = Engine(sharded, tok, mesh=mesh, prefill_chunk=4, steps_per_call=3)
  eng.eos_ids = ()
  [[out]] = eng.generate(
    [Request(prompt, sampling=SamplingParams(temperature=0.0), max_new_tokens=n)]
  )
  buf = jnp.asarray([prompt + [0] * n])
  last = nnx.jit(lambda m, b, t: m(b).logits[0, t - 1].argmax())
  for t in range(len(prompt), len(prompt) + n):
    buf = buf.at[0, t].set(last(single, buf, t))
  np.testing.assert_array_equal(out.token_ids, np.asarray(buf[0, len(prompt) :]))
