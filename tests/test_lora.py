"""LoRA adapters: fresh adapters leave the model unchanged, the update against qwix on a
standalone attention module, merged == unmerged, only adapters train (and hold optimizer
state), adapter files round-trip onto a base, all of it on a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3_jax import adapters
from qwen3_jax import config as C
from qwen3_jax import sharding as shd
from qwen3_jax.model import Qwen3, lora
from qwen3_jax.model.attention import Attention
from qwen3_jax.train.config import OptimConfig, TrainConfig
from qwen3_jax.train.step import make_program

ALL = r".*self_attn/(q|k|v|o)_proj|layers/sub_0/mlp/(gate|up|down)_proj"


def _cfg(targets=ALL, **kw):
  # Layer 0 dense (its MLP can take adapters), layer 1 MoE; dense dispatch = exact reference.
  moe = C.MoEConfig(strategy="dense")
  lcfg = C.LoraConfig(rank=4, alpha=8.0, targets=targets)
  return C.tiny(mlp_only_layers=(0,), moe=moe, lora=lcfg, **kw)


def _tokens(b=4, l=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, l), 0, 256)


def _randomise_b(model, seed=1):
  """Non-zero B everywhere (a trained adapter), so the update is really exercised."""
  state = nnx.state(model, nnx.LoRAParam)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
  state = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape), state)
  nnx.update(model, state)


def test_fresh_adapters_equal_base_exactly():
  cfg = _cfg()
  base = Qwen3(cfg.replace(lora=None), rngs=nnx.Rngs(0))
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  n_lora, n_all = lora.count(nnx.state(model, nnx.Param).to_pure_dict())
  assert 0 < n_lora < n_all
  tok = _tokens()
  np.testing.assert_array_equal(np.asarray(model(tok).logits), np.asarray(base(tok).logits))


def test_targets_validated():
  with pytest.raises(ValueError, match="matches no projection"):
    Qwen3(_cfg(targets=r".*nothing"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expert weights"):
    Qwen3(_cfg(targets=r".*mlp/gate_proj"), rngs=nnx.Rngs(0))  # layer 1's are experts


def test_attention_lora_equals_qwix():
  qwix = pytest.importorskip("qwix")
  cfg = C.tiny()
  x = jax.random.normal(jax.random.key(0), (2, 8, cfg.hidden_size))
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  ref = qwix.apply_lora_to_model(
    Attention(cfg, rngs=nnx.Rngs(0)),
    qwix.LoraProvider(module_path=".*", rank=4, alpha=8.0),
    x,
    pos,
    rngs=nnx.Rngs(1),
  )
  ours = Attention(cfg, rngs=nnx.Rngs(0))
  paths = lora.add_adapters(ours, C.LoraConfig(rank=4, alpha=8.0, targets=".*"), nnx.Rngs(2))
  assert sorted(paths) == ["k_proj", "o_proj", "q_proj", "v_proj"]
  # qwix keeps A [prod(in), r], B [r, prod(out)]; ours keep the projection's own dims.
  keys = iter(jax.random.split(jax.random.key(3), 8))
  for name in paths:
    for suffix in ("_lora_a", "_lora_b"):
      mine = getattr(ours, name + suffix)
      value = jax.random.normal(next(keys), mine.shape) * 0.1
      mine[...] = value
      getattr(ref, name + suffix)[...] = value.reshape(getattr(ref, name + suffix).shape)
  got, want = ours(x, pos)[0], ref(x, pos)[0]
  assert float(jnp.abs(want - Attention(cfg, rngs=nnx.Rngs(0))(x, pos)[0]).max()) > 1e-2
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained():
  """A LoRA model with non-zero adapters, tokens and its logits (shared by the tests below)."""
  model = Qwen3(_cfg(), rngs=nnx.Rngs(0))
  _randomise_b(model)
  tok = _tokens()
  return model, tok, model(tok).logits


def test_merged_equals_unmerged(trained):
  model, tok, want = trained
  plain = adapters.merged(model)
  assert plain.cfg.lora is None and not nnx.state(plain, nnx.LoRAParam)
  assert (
    float(jnp.abs(want - Qwen3(_cfg().replace(lora=None), rngs=nnx.Rngs(0))(tok).logits).max())
    > 1e-3
  )
  np.testing.assert_allclose(np.asarray(plain(tok).logits), np.asarray(want), atol=2e-5)


def test_adapters_save_alone_and_load_onto_base(trained, tmp_path):
  model, tok, want = trained
  adapters.save_adapters(str(tmp_path / "a"), model)
  base = Qwen3(_cfg().replace(lora=None), rngs=nnx.Rngs(0))
  back = adapters.load_adapters(str(tmp_path / "a"), base)
  np.testing.assert_array_equal(np.asarray(back(tok).logits), np.asarray(want))
  other = Qwen3(C.tiny(hidden_size=32), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="were trained on"):
    adapters.load_adapters(str(tmp_path / "a"), other)


def test_only_adapters_train_sharded():
  """On data 2 x expert 2 x tensor 2: one step changes only adapters, the optimizer holds
  state for adapters only, and the loss equals the single-device model's."""
  mesh = shd.make_mesh(C.MeshConfig(data=2, expert=2, tensor=2))
  optim = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0)
  cfg = TrainConfig(num_steps=3, batch_size=4, seq_len=12, model=_cfg(), optim=optim)
  prog = make_program(cfg, mesh)
  state = prog.init()
  before = jax.device_get(state.params)
  tok = np.asarray(_tokens(4, 13, seed=5), np.int32)
  batch = {
    "inputs": tok[:, :-1],
    "targets": tok[:, 1:],
    "segment_ids": np.ones((4, 12), np.int32),
    "loss_mask": np.ones((4, 12), np.int32),
  }
  batch = jax.device_put(batch, prog.batch_sharding)
  opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  n_lora, n_all = lora.count(before)
  assert sum(x.size for x in opt_leaves) == 2 * n_lora  # Adam's mu and nu, adapters only
  for _ in range(2):
    state, _ = prog.train_step(state, batch)
  after = jax.device_get(state.params)
  base0, ad0 = lora.split_params(before)
  base1, ad1 = lora.split_params(after)
  for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(base1), strict=True):
    np.testing.assert_array_equal(a, b)
  changed = [
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(ad0), jax.tree.leaves(ad1), strict=True)
  ]
  assert all(changed)
  # The trained LoRA model on the mesh gives the single-device model's logits.
  model = nnx.merge(prog.graphdef, after)
  with shd.use_mesh(mesh):
    sharded = jax.jit(lambda p, t: nnx.merge(prog.graphdef, p)(t).logits)(state.params, tok[:, :-1])
  np.testing.assert_allclose(
    np.asarray(sharded), np.asarray(model(jnp.asarray(tok[:, :-1])).logits), atol=2e-5
  )


def test_merged_model_exports_to_transformers(trained, tmp_path):
  """save_pretrained of the merged model loads in transformers with the LoRA model's logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from qwen3_jax import hf

  model, tok, want = trained
  with pytest.raises(ValueError, match="lora adapters"):
    hf.save_pretrained(model, model.cfg, str(tmp_path / "refused"))
  plain = adapters.merged(model)
  hf.save_pretrained(plain, plain.cfg, str(tmp_path / "hf"))
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  with torch.no_grad():
    got = ref(torch.tensor(np.asarray(tok), dtype=torch.long)).logits.numpy()
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
