"""MoE aux loss: one definition (`moe.aux_losses`) and its coefficient in HF units.

`aux_losses` is checked against hand-computed numbers; the model's `aux["aux_loss"]` and the
training loss both go through it (tests/test_model.py and tests/test_train.py compare them).
The Hugging Face coefficient is checked against `transformers` itself: on a tiny random
Qwen3-MoE with ONE MoE layer, `coef * load_balance_loss` after import equals HF's
`router_aux_loss_coef * aux_loss`, and export writes the original coefficient back.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import config as C
from qwen3_jax import hf
from qwen3_jax.model import moe as moe_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _stats():
  """Two MoE layers of E=4: f, P stacked [2, 4] and the layer-averaged scalars."""
  return {
    "expert_fraction": jnp.array([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]]),
    "expert_prob": jnp.array([[0.45, 0.175, 0.175, 0.2], [0.1, 0.2, 0.3, 0.4]]),
    "load_balance_loss": jnp.float32(1.35),  # the per-sequence value (used by "sequence")
    "router_z_loss": jnp.float32(3.0),
    "dynamic_loss": jnp.float32(1.2),
  }


def test_aux_losses_hand_computed():
  moe = C.MoEConfig(router_z_loss_coef=0.01, dynamic_loss_coef=0.1)
  cfg = C.tiny(num_experts=4, router_aux_loss_coef=0.5, moe=moe)
  # Layer 0: 4 * 0.315625 = 1.2625 (test_moe's hand-computed case); layer 1: balanced f -> 1.
  t = moe_lib.aux_losses(_stats(), cfg)
  np.testing.assert_allclose(t["load_balance_loss"], (1.2625 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(t["aux_loss"], 0.5 * 1.13125 + 0.01 * 3.0 + 0.1 * 1.2, rtol=1e-6)
  # A global-batch f replaces the batch's own; token and sequence shares scale the terms.
  f = jnp.full((2, 4), 0.25)
  t = moe_lib.aux_losses(_stats(), cfg, fraction=f, tok_share=0.25, seq_share=0.5)
  np.testing.assert_allclose(t["load_balance_loss"], 0.25, rtol=1e-6)  # sum P = 1 per layer
  np.testing.assert_allclose(t["router_z_loss"], 0.75, rtol=1e-6)
  np.testing.assert_allclose(t["aux_loss"], 0.5 * 0.25 + 0.01 * 0.75 + 0.1 * 0.3, rtol=1e-6)
  # Per-sequence balance takes the model's per-sequence value, scaled by the sequence share.
  seq = cfg.replace(moe=C.MoEConfig(balance="sequence", router_z_loss_coef=0.0))
  t = moe_lib.aux_losses(_stats(), seq, tok_share=0.25, seq_share=0.5)
  np.testing.assert_allclose(t["load_balance_loss"], 0.675, rtol=1e-6)
  np.testing.assert_allclose(t["aux_loss"], 0.5 * 0.675, rtol=1e-6)


# ----------------------------------------------------------------------------- HF units

K, E, HF_COEF = 3, 4, 0.1  # k = 3 and 0.1: 0.1 * 3 / 3 != 0.1 in floats, the export must fix it


@pytest.fixture(scope="module")
def hf_one_moe_layer(tmp_path_factory):
  """A tiny random transformers Qwen3-MoE (one layer, so one MoE layer), saved; its outputs on
  a batch with right padding (attention_mask 0 = padding, excluded from the aux loss)."""
  torch.manual_seed(0)
  cfg = transformers.Qwen3MoeConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=40,
    moe_intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=E,
    num_experts_per_tok=K,
    norm_topk_prob=True,
    router_aux_loss_coef=HF_COEF,
    initializer_range=0.5,  # a far-from-uniform router, so the loss is far from its minimum
    attn_implementation="eager",
  )
  model = transformers.Qwen3MoeForCausalLM(cfg).eval()
  path = str(tmp_path_factory.mktemp("hf_moe1"))
  model.save_pretrained(path)
  tokens = np.random.RandomState(1).randint(0, 64, size=(2, 7)).astype(np.int32)
  mask = np.ones((2, 7), np.int32)
  mask[1, 4:] = 0
  with torch.no_grad():
    out = model(
      torch.tensor(tokens, dtype=torch.long),
      attention_mask=torch.tensor(mask),
      output_router_logits=True,
    )
  return path, tokens, mask, out


def test_hf_coefficient_gives_transformers_balancing_pressure(hf_one_moe_layer, tmp_path):
  path, tokens, mask, ref = hf_one_moe_layer
  model, cfg = hf.from_pretrained(path, moe=C.MoEConfig(strategy="dense"))
  assert cfg.router_aux_loss_coef == pytest.approx(K * HF_COEF, rel=1e-15)
  out = model(jnp.asarray(tokens), segment_ids=jnp.asarray(mask))
  ours = cfg.router_aux_loss_coef * float(out.aux["load_balance_loss"])
  theirs = HF_COEF * float(ref.aux_loss)
  assert float(ref.aux_loss) > 1.05 * K  # unbalanced: the comparison is not the trivial k * 1
  np.testing.assert_allclose(ours, theirs, rtol=1e-5)
  # The weighted aux loss (z and dynamic off by default) is the same number.
  np.testing.assert_allclose(float(out.aux["aux_loss"]), theirs, rtol=1e-5)

  # Export writes the coefficient back in HF units, digit for digit.
  assert hf.config_to_hf(cfg)["router_aux_loss_coef"] == HF_COEF
  hf.save_pretrained(model, cfg, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["router_aux_loss_coef"] == HF_COEF
  assert transformers.AutoConfig.from_pretrained(str(tmp_path)).router_aux_loss_coef == HF_COEF
