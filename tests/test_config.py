"""Config dataclasses: validation messages, presets, (de)serialisation, parameter counts."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3_jax import config as C
from qwen3_jax.config import AttentionConfig, MeshConfig, ModelConfig, MoEConfig
from qwen3_jax.model import Qwen3
from qwen3_jax.model.kv_cache import init_cache

# (constructor, substrings the error message must contain)
INVALID = [
  (lambda: MoEConfig(routing="topq"), ["moe.routing", "topq"]),
  (lambda: MoEConfig(balance="batch"), ["moe.balance", "batch"]),
  (lambda: MoEConfig(strategy="fast"), ["moe.strategy", "fast"]),
  (lambda: MoEConfig(top_p=0.0), ["moe.top_p", "0.0"]),
  (lambda: MoEConfig(top_p=1.5), ["moe.top_p", "1.5"]),
  (lambda: MoEConfig(max_experts=0), ["moe.max_experts", "0"]),
  (lambda: MoEConfig(capacity_factor=0.0), ["moe.capacity_factor"]),
  (lambda: MoEConfig(capacity_factor=-1.0), ["moe.capacity_factor", "-1.0"]),
  (lambda: MoEConfig(router_z_loss_coef=-1e-3), ["moe.router_z_loss_coef"]),
  (lambda: MoEConfig(dynamic_loss_coef=-0.5), ["moe.dynamic_loss_coef"]),
  (lambda: AttentionConfig(kind="linear"), ["attention.kind", "linear"]),
  (lambda: AttentionConfig(pattern=("full", "local")), ["attention.pattern", "local"]),
  (lambda: AttentionConfig(window=0), ["attention.window", "0"]),
  (lambda: AttentionConfig(global_every=-1), ["attention.global_every"]),
  (lambda: C.tiny(remat="some"), ["remat", "some"]),
  (lambda: C.tiny(vocab_size=0), ["vocab_size", "0"]),
  (lambda: C.tiny(hidden_size=-64), ["hidden_size", "-64"]),
  (lambda: C.tiny(num_hidden_layers=0), ["num_hidden_layers"]),
  (lambda: C.tiny(head_dim=0), ["head_dim"]),
  (
    lambda: C.tiny(num_attention_heads=6, num_key_value_heads=4),
    ["num_attention_heads=6", "num_key_value_heads=4"],
  ),
  (lambda: C.tiny(num_experts_per_tok=9), ["num_experts_per_tok=9", "num_experts=8"]),
  (lambda: C.tiny(num_experts_per_tok=0), ["num_experts_per_tok=0"]),
  (lambda: C.tiny(num_experts=-8), ["num_experts", "-8"]),
  (lambda: C.tiny(decoder_sparse_step=0), ["decoder_sparse_step", "0"]),
  (lambda: C.tiny(mlp_only_layers=(0, 2)), ["mlp_only_layers", "[2]", "[0, 2)"]),
  (lambda: C.tiny(moe_intermediate_size=0), ["moe_intermediate_size", "0"]),
  (lambda: C.tiny(intermediate_size=0), ["intermediate_size", "0"]),
  (lambda: C.tiny(rope_theta=0.0), ["rope_theta"]),
  (lambda: C.tiny(rms_norm_eps=-1e-6), ["rms_norm_eps"]),
  (lambda: C.tiny(router_aux_loss_coef=-0.01), ["router_aux_loss_coef"]),
  (lambda: C.tiny(dtype="float17"), ["dtype", "float17"]),
  (lambda: C.tiny(param_dtype="int8"), ["param_dtype", "int8"]),
  (lambda: C.tiny(dtype=jnp.int8), ["dtype", "int8", "not a supported dtype"]),
  (lambda: C.tiny(param_dtype=np.float64), ["param_dtype", "float64"]),
  (lambda: C.tiny(dtype=None), ["dtype=None"]),
  (lambda: C.preset("qwen4"), ["qwen4", "tiny", "qwen3_30b_a3b"]),
  (lambda: C.from_dict({**C.to_dict(C.tiny()), "hiden_size": 3}), ["hiden_size"]),
]


@pytest.mark.parametrize("make, words", INVALID, ids=[" ".join(w[:1]) for _, w in INVALID])
def test_invalid_values_raise_naming_the_field(make, words):
  with pytest.raises(ValueError) as err:
    make()
  for word in words:
    assert word in str(err.value), (word, str(err.value))


def test_valid_edge_values_are_accepted():
  MoEConfig(top_p=1.0, max_experts=1, capacity_factor=0.01)
  C.tiny(num_experts=0, num_experts_per_tok=0)  # a dense model ignores the MoE fields
  C.tiny(num_experts_per_tok=8, mlp_only_layers=(0, 1), dtype="bfloat16", param_dtype="bfloat16")
  AttentionConfig(kind="sparse", global_every=0, max_globals=0, pattern=("sparse", "full"))


@pytest.mark.parametrize(
  "mesh, words",
  [
    (MeshConfig(data=-1, expert=-1), ["-1", "data", "expert"]),
    (MeshConfig(data=0), ["sizes", "0"]),
    (MeshConfig(data=2, expert=2), ["needs 4 devices", "8"]),
    (MeshConfig(data=-1, expert=3), ["data", "8", "3"]),
  ],
)
def test_mesh_config_errors_name_the_numbers(mesh, words):
  with pytest.raises(ValueError) as err:
    mesh.resolve(8)
  for word in words:
    assert word in str(err.value), (word, str(err.value))


def test_mesh_config_fills_minus_one():
  assert MeshConfig(data=-1, expert=4).resolve(8) == dict(data=2, fsdp=1, expert=4, tensor=1)
  assert MeshConfig(tensor=-1).resolve(1) == dict(data=1, fsdp=1, expert=1, tensor=1)
  assert MeshConfig(fsdp=2, expert=2, tensor=2).resolve(8)["fsdp"] == 2


def _custom():
  return C.tiny(
    num_hidden_layers=6,
    mlp_only_layers=(0, 5),
    decoder_sparse_step=2,
    tie_word_embeddings=True,
    moe=MoEConfig(routing="topp", top_p=0.6, max_experts=3, balance="sequence", strategy="dense"),
    attention=AttentionConfig(kind="sparse", window=64, pattern=("sparse", "sparse", "full")),
    dtype="bfloat16",
  )


@pytest.mark.parametrize("cfg", [*(f() for f in C.PRESETS.values()), _custom()])
def test_dict_round_trip(cfg):
  assert C.from_dict(C.to_dict(cfg)) == cfg
  # Through JSON, where tuples become lists.
  assert C.from_dict(json.loads(json.dumps(C.to_dict(cfg)))) == cfg
  assert hash(C.from_dict(C.to_dict(cfg))) == hash(cfg)  # usable as a static jit argument


def test_from_dict_partial_uses_defaults():
  cfg = C.from_dict({"hidden_size": 32, "moe": {"strategy": "dropless_blocks"}})
  assert cfg.hidden_size == 32 and cfg.moe.strategy == "dropless_blocks"
  assert cfg.moe.top_p == MoEConfig().top_p and cfg.num_hidden_layers == 48
  with pytest.raises(TypeError, match="capacity"):
    C.from_dict({"moe": {"capacity": 2}})


def test_hf_layer_rules():
  cfg = C.tiny(num_hidden_layers=8, decoder_sparse_step=2, mlp_only_layers=(3,))
  assert [i for i in range(8) if cfg.is_moe_layer(i)] == [1, 5, 7]
  assert not any(C.tiny(num_experts=0).is_moe_layer(i) for i in range(2))
  assert C.tiny().max_experts_per_token == 2
  assert C.tiny(moe=MoEConfig(routing="topp", max_experts=5)).max_experts_per_token == 5
  assert C.tiny(moe=MoEConfig(routing="topp", max_experts=20)).max_experts_per_token == 8
  att = AttentionConfig(pattern=("sparse", "sparse", "full"))
  assert [att.kind_of_layer(i) for i in range(5)] == [
    "sparse",
    "sparse",
    "full",
    "sparse",
    "sparse",
  ]


def test_param_count_of_published_models():
  # Hugging Face model cards: 30.5B total / 3.3B activated; 235B / 22B.
  total, active = C.param_count(C.qwen3_30b_a3b())
  assert total == pytest.approx(30.5e9, rel=0.01) and active == pytest.approx(3.3e9, rel=0.03)
  total, active = C.param_count(C.qwen3_235b_a22b())
  assert total == pytest.approx(235e9, rel=0.01) and active == pytest.approx(22e9, rel=0.03)
  total, _ = C.param_count(C.qwen3_max_like())
  assert 1.0e12 <= total <= 1.1e12  # the documented ~1T guess
  # Published architecture numbers of Qwen3-30B-A3B.
  cfg = C.qwen3_30b_a3b()
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts) == (2048, 48, 128)
  assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_experts_per_tok) == (32, 4, 8)


def _count(cfg):
  """Parameters of the real module (abstract init: no memory, no compute)."""
  state = nnx.state(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


@pytest.mark.parametrize(
  "cfg",
  [
    C.tiny(),
    C.tiny(tie_word_embeddings=True),
    C.tiny(num_hidden_layers=4, decoder_sparse_step=2),
    C.tiny(num_hidden_layers=3, mlp_only_layers=(1,)),
    C.tiny(num_experts=0),
  ],
)
def test_param_count_matches_the_module(cfg):
  total, active = C.param_count(cfg)
  assert total == _count(cfg)
  # Active: the same model with only k of its E experts in every MoE layer.
  n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
  inactive = n_moe * (cfg.num_experts - cfg.num_experts_per_tok) * 3 * 64 * 32
  assert active == total - inactive


def test_tiny_param_count_by_hand():
  # embed 256*64 + lm_head 64*256 + final norm 64; per layer: q 64*4*16, k, v 64*2*16 each,
  # o 4*16*64, q/k norms 16 each, 2 layer norms 64 each, router 64*8, experts 3*8*64*32.
  layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 16 + 2 * 64 + 64 * 8 + 3 * 8 * 64 * 32
  assert C.param_count(C.tiny())[0] == 2 * 256 * 64 + 64 + 2 * layer


def test_configs_are_frozen():
  cfg = C.tiny()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.hidden_size = 3
  assert cfg.replace(hidden_size=32).hidden_size == 32 and cfg.hidden_size == 64
  assert isinstance(C.preset("small"), ModelConfig)
  assert np.isclose(C.preset("tiny", rope_theta=5.0).rope_theta, 5.0)


@pytest.mark.parametrize(
  "dtype, name",
  [
    (jnp.float32, "float32"),
    (np.float32, "float32"),
    (jnp.bfloat16, "bfloat16"),
    (jnp.dtype("bfloat16"), "bfloat16"),
    (np.dtype("float16"), "float16"),
    ("float16", "float16"),
  ],
)
def test_dtypes_as_jax_users_write_them(dtype, name):
  cfg = C.tiny(dtype=dtype, param_dtype=dtype)
  assert cfg.dtype == cfg.param_dtype == name  # stored as the canonical string
  assert cfg == C.tiny(dtype=name, param_dtype=name) and C.from_dict(C.to_dict(cfg)) == cfg
  assert C.tiny().replace(dtype=dtype).dtype == name  # e.g. load_params(..., dtype=jnp.bfloat16)
  cache = init_cache(C.tiny(), 1, 4, dtype=dtype)
  assert cache.layers[0]["k"].dtype == jnp.dtype(name)


def test_init_cache_rejects_unsupported_dtype():
  with pytest.raises(ValueError, match="init_cache dtype=.*int8.* is not a supported dtype"):
    init_cache(C.tiny(), 1, 4, dtype=jnp.int8)
