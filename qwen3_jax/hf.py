"""Import and export of Hugging Face Qwen3 / Qwen3-MoE checkpoints (safetensors only).

Loading streams one checkpoint tensor at a time: for every parameter of the abstract model
(`nnx.eval_shape`, no memory), the matching Hugging Face tensors of one layer are read lazily
with `safetensors.safe_open`, converted to our layout in numpy (transpose, reshape) and each
device's slice is copied to that device; the scanned `layers` axis is filled in on the devices.
Host memory therefore holds about one layer of one parameter at a time (stacked parameters
under `STREAM_BYTES` are assembled on the host first), never the whole model.

Layouts (ours <- Hugging Face `[out, in]` linear weights):
  q_proj [D, H, Dh] <- [H*Dh, D];  k_proj, v_proj [D, K, Dh] <- [K*Dh, D]
  o_proj [H, Dh, D] <- [D, H*Dh];  dense gate_proj / up_proj [D, F] <- [F, D], down_proj [F, D]
  MoE gate [D, E] <- mlp.gate.weight [E, D]
  experts gate_proj / up_proj [E, D, F] <- mlp.experts.{j}.{gate,up}_proj.weight [F, D] each,
    or the fused mlp.experts.gate_up_proj [E, 2F, D] (gate rows first, then up rows)
  experts down_proj [E, F, D] <- mlp.experts.{j}.down_proj.weight [D, F] each,
    or the fused mlp.experts.down_proj [E, D, F]
  embed_tokens.embedding [Vp, D] <- model.embed_tokens.weight [V, D] + zero padding rows;
  lm_head [D, Vp] <- lm_head.weight [V, D] (+ zero padding columns); export strips the padding
  (Vp = `ModelConfig.padded_vocab_size`)
Layer i of the model is `layers.sub_{i % period}` at index `i // period` (see
`qwen3_jax.model.period.layer_period`).

`save_pretrained` writes the per-expert layout that the Hugging Face hub uses, into a temporary
directory renamed into place at the end; models Hugging Face cannot represent (sparse
attention, global tokens, top-p routing) are refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from jax.typing import DTypeLike
from safetensors import safe_open
from safetensors.numpy import save_file

from qwen3_jax import sharding
from qwen3_jax.config import ModelConfig
from qwen3_jax.model.period import layer_period
from qwen3_jax.model.transformer import Qwen3

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers some old writers saved; they are recomputed from the config, never weights.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Stacked parameters larger than this stream to the devices one layer at a time.
STREAM_BYTES = 64 << 20

# ----------------------------------------------------------------------------- config


def _get(d: dict, name: str, default: Any = KeyError) -> Any:
  if name in d and d[name] is not None:
    return d[name]
  if default is KeyError:
    raise ValueError(f"config.json: required field {name!r} is missing")
  return default


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """A `ModelConfig` from a Hugging Face `config.json` dict.

  Accepts both spellings seen in the wild (`num_experts` / `num_local_experts`, `rope_theta` /
  `rope_parameters.rope_theta`). Anything the model cannot represent raises, naming the field.
  `overrides` replace ModelConfig fields afterwards (e.g. `dtype`, `moe`).
  """
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ValueError(
      f"config.json: unsupported model_type={model_type!r}; supported: {sorted(ARCHITECTURES)}"
    )
  scaling = hf.get("rope_scaling") or {}
  if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
    raise ValueError(f"config.json: rope_scaling={scaling!r} is not supported")
  rope_params = hf.get("rope_parameters") or {}
  rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"config.json: rope_parameters.rope_type={rope_type!r} is not supported")
  thetas = {float(v) for v in (hf.get("rope_theta"), rope_params.get("rope_theta")) if v}
  if len(thetas) != 1:
    raise ValueError(
      "config.json: need exactly one value of rope_theta / rope_parameters.rope_theta, got "
      f"{hf.get('rope_theta')!r} and {rope_params.get('rope_theta')!r}"
    )
  if hf.get("attention_bias"):
    raise ValueError("config.json: attention_bias=true is not supported (Qwen3 has no bias)")
  if hf.get("use_sliding_window"):
    raise ValueError("config.json: use_sliding_window=true is not supported")
  other = [t for t in hf.get("layer_types") or () if t != "full_attention"]
  if other:
    raise ValueError(f"config.json: layer_types {sorted(set(other))} are not supported")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"config.json: hidden_act={act!r} is not supported (SwiGLU uses silu)")

  hidden, heads = _get(hf, "hidden_size"), _get(hf, "num_attention_heads")
  kw = dict(
    vocab_size=_get(hf, "vocab_size"),
    hidden_size=hidden,
    intermediate_size=_get(hf, "intermediate_size"),
    num_hidden_layers=_get(hf, "num_hidden_layers"),
    num_attention_heads=heads,
    num_key_value_heads=_get(hf, "num_key_value_heads", heads),
    head_dim=_get(hf, "head_dim", hidden // heads),
    rope_theta=thetas.pop(),
    rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
    tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
    num_experts=0,
  )
  if model_type == "qwen3_moe":
    counts = {hf[k] for k in ("num_experts", "num_local_experts") if hf.get(k) is not None}
    if len(counts) != 1:
      raise ValueError(
        "config.json: need exactly one value of num_experts / num_local_experts, got "
        f"{hf.get('num_experts')!r} and {hf.get('num_local_experts')!r}"
      )
    kw.update(
      num_experts=counts.pop(),
      num_experts_per_tok=_get(hf, "num_experts_per_tok"),
      moe_intermediate_size=_get(hf, "moe_intermediate_size"),
      norm_topk_prob=bool(_get(hf, "norm_topk_prob", False)),  # HF's default is False.
      decoder_sparse_step=_get(hf, "decoder_sparse_step", 1),
      mlp_only_layers=tuple(_get(hf, "mlp_only_layers", ())),
      # HF's load-balancing loss has f summing to k (top-k slots per token), ours to 1: the
      # same pressure needs a k times larger coefficient here (`moe.aux_losses`).
      router_aux_loss_coef=float(_get(hf, "router_aux_loss_coef", 0.001))
      * _get(hf, "num_experts_per_tok"),
    )
  kw.update(overrides)
  return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig, extra: dict | None = None) -> dict:
  """The `config.json` dict of `cfg` (hub spelling; transformers 4.x and 5.x read it).

  `extra` adds fields we do not model (token ids, max_position_embeddings, ...); it may not
  change any field derived from `cfg`. Raises, naming the fields, for a model that a Hugging
  Face Qwen3 / Qwen3-MoE would compute differently.
  """
  unsupported = []
  if cfg.attention.uses_sparse:
    unsupported.append(
      f"sparse attention (attention.kind={cfg.attention.kind!r}, attention.pattern="
      f"{cfg.attention.pattern!r}: sliding window"
      + (
        f" + global tokens every {cfg.attention.global_every})"
        if cfg.attention.global_every
        else ")"
      )
    )
  if cfg.is_moe and cfg.moe.routing != "topk":
    unsupported.append(f'moe.routing="{cfg.moe.routing}" (Hugging Face routes top-k)')
  if cfg.lora is not None:
    unsupported.append("lora adapters (fold them in first: adapters.merged)")
  if cfg.quant is not None:
    unsupported.append(f"quant (int{cfg.quant.bits} weights; export the float model)")
  if unsupported:
    raise ValueError(
      "This model cannot be exported as a Hugging Face Qwen3 / Qwen3-MoE, which would compute "
      "something else: " + "; ".join(unsupported)
    )
  moe = cfg.is_moe
  hf = {
    "architectures": [ARCHITECTURES["qwen3_moe" if moe else "qwen3"]],
    "model_type": "qwen3_moe" if moe else "qwen3",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_hidden_layers,
    "num_attention_heads": cfg.num_attention_heads,
    "num_key_value_heads": cfg.num_key_value_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "attention_bias": False,
    "rms_norm_eps": cfg.rms_norm_eps,
    "rope_theta": cfg.rope_theta,
    "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    "tie_word_embeddings": cfg.tie_word_embeddings,
    "use_sliding_window": False,
    "dtype": cfg.param_dtype,
    "torch_dtype": cfg.param_dtype,
  }
  if moe:
    hf.update(
      num_experts=cfg.num_experts,
      num_experts_per_tok=cfg.num_experts_per_tok,
      moe_intermediate_size=cfg.moe_intermediate_size,
      norm_topk_prob=cfg.norm_topk_prob,
      decoder_sparse_step=cfg.decoder_sparse_step,
      mlp_only_layers=list(cfg.mlp_only_layers),
      # Back to HF's units (f sums to k); 15 digits: an imported value is written back as read.
      router_aux_loss_coef=float(f"{cfg.router_aux_loss_coef / cfg.num_experts_per_tok:.15g}"),
    )
  for key, value in (extra or {}).items():
    if key in hf and hf[key] != value and key not in ("dtype", "torch_dtype", "architectures"):
      raise ValueError(f"extra config field {key}={value!r} contradicts the model ({hf[key]!r})")
    hf.setdefault(key, value)
  return hf


def read_config(path: str) -> dict:
  """The raw `config.json` dict of a Hugging Face directory."""
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file} does not exist")
  with open(file) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- name table


@dataclasses.dataclass(frozen=True)
class _Src:
  """A Hugging Face tensor (or a slice of it along axis 1) with its full expected shape."""

  name: str
  shape: tuple[int, ...]
  rows: tuple[int, int] | None = None  # Read only [:, rows[0]:rows[1]] (fused experts).


@dataclasses.dataclass(frozen=True)
class _Rule:
  """How one of our per-layer (or top-level) arrays maps to Hugging Face tensors."""

  srcs: tuple[_Src, ...]
  to_ours: Callable[[list[np.ndarray]], np.ndarray]
  to_hf: Callable[[np.ndarray], list[np.ndarray]]


def _linear(name, out_dim, in_dim):  # ours [in, out] <- HF [out, in]
  return _Rule((_Src(name, (out_dim, in_dim)),), lambda a: a[0].T, lambda w: [w.T])


def _vector(name, dim):
  return _Rule((_Src(name, (dim,)),), lambda a: a[0], lambda w: [w])


def _layer_rules(cfg: ModelConfig, i: int, fused: bool) -> dict[tuple[str, ...], _Rule]:
  """Rules for layer i, keyed by the parameter path inside a `DecoderLayer`."""
  d, h, kh, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  p = f"model.layers.{i}"

  def heads_in(name, n):  # ours [D, n, Dh] <- HF [n*Dh, D]
    return _Rule(
      (_Src(name, (n * dh, d)),),
      lambda a: a[0].reshape(n, dh, d).transpose(2, 0, 1),
      lambda w: [w.transpose(1, 2, 0).reshape(n * dh, d)],
    )

  rules = {
    ("input_layernorm", "weight"): _vector(f"{p}.input_layernorm.weight", d),
    ("post_attention_layernorm", "weight"): _vector(f"{p}.post_attention_layernorm.weight", d),
    ("self_attn", "q_proj"): heads_in(f"{p}.self_attn.q_proj.weight", h),
    ("self_attn", "k_proj"): heads_in(f"{p}.self_attn.k_proj.weight", kh),
    ("self_attn", "v_proj"): heads_in(f"{p}.self_attn.v_proj.weight", kh),
    ("self_attn", "o_proj"): _Rule(  # ours [H, Dh, D] <- HF [D, H*Dh]
      (_Src(f"{p}.self_attn.o_proj.weight", (d, h * dh)),),
      lambda a: a[0].reshape(d, h, dh).transpose(1, 2, 0),
      lambda w: [w.transpose(2, 0, 1).reshape(d, h * dh)],
    ),
    ("self_attn", "q_norm", "weight"): _vector(f"{p}.self_attn.q_norm.weight", dh),
    ("self_attn", "k_norm", "weight"): _vector(f"{p}.self_attn.k_norm.weight", dh),
  }
  if not cfg.is_moe_layer(i):
    f = cfg.intermediate_size
    rules[("mlp", "gate_proj")] = _linear(f"{p}.mlp.gate_proj.weight", f, d)
    rules[("mlp", "up_proj")] = _linear(f"{p}.mlp.up_proj.weight", f, d)
    rules[("mlp", "down_proj")] = _linear(f"{p}.mlp.down_proj.weight", d, f)
    return rules
  e, f = cfg.num_experts, cfg.moe_intermediate_size
  rules[("mlp", "gate")] = _linear(f"{p}.mlp.gate.weight", e, d)
  if fused:
    gate_up = f"{p}.mlp.experts.gate_up_proj"
    swap = lambda a: a[0].transpose(0, 2, 1)  # noqa: E731  [E, out, in] -> [E, in, out]
    unused = lambda w: [w]  # noqa: E731  (export always writes per-expert tensors)
    rules[("mlp", "gate_proj")] = _Rule((_Src(gate_up, (e, 2 * f, d), (0, f)),), swap, unused)
    rules[("mlp", "up_proj")] = _Rule((_Src(gate_up, (e, 2 * f, d), (f, 2 * f)),), swap, unused)
    down = _Src(f"{p}.mlp.experts.down_proj", (e, d, f))
    rules[("mlp", "down_proj")] = _Rule((down,), swap, unused)
    return rules

  def experts(proj, out_dim, in_dim):  # ours [E, in, out] <- E x HF [out, in]
    srcs = tuple(_Src(f"{p}.mlp.experts.{j}.{proj}.weight", (out_dim, in_dim)) for j in range(e))
    return _Rule(srcs, lambda a: np.stack([x.T for x in a]), lambda w: [x.T for x in w])

  rules[("mlp", "gate_proj")] = experts("gate_proj", f, d)
  rules[("mlp", "up_proj")] = experts("up_proj", f, d)
  rules[("mlp", "down_proj")] = experts("down_proj", d, f)
  return rules


def _plan(cfg: ModelConfig, fused_layers: Sequence[int] = ()) -> dict[tuple, list[_Rule]]:
  """Our flat parameter path -> one rule per stacked index (top-level params: one rule)."""
  d, v, pad = cfg.hidden_size, cfg.vocab_size, cfg.padded_vocab_size - cfg.vocab_size
  pad_rows = lambda a: np.pad(a, ((0, pad), (0, 0)))  # noqa: E731  [V, D] -> [Vp, D], zeros
  plan: dict[tuple, list[_Rule]] = {
    ("embed_tokens", "embedding"): [
      _Rule(
        (_Src("model.embed_tokens.weight", (v, d)),),
        lambda a: pad_rows(a[0]),
        lambda w: [w[:v]],
      )
    ],
    ("norm", "weight"): [_vector("model.norm.weight", d)],
  }
  if not cfg.tie_word_embeddings:  # ours [D, Vp] <- HF [V, D]
    plan[("lm_head",)] = [
      _Rule(
        (_Src("lm_head.weight", (v, d)),),
        lambda a: pad_rows(a[0]).T,
        lambda w: [w[:, :v].T],
      )
    ]
  period = layer_period(cfg)
  for j in range(period):
    per_layer = [
      _layer_rules(cfg, i, i in fused_layers)
      for i in range(j, cfg.num_hidden_layers, period)  # i = r * period + j
    ]
    for sub_path in per_layer[0]:
      plan[("layers", f"sub_{j}") + sub_path] = [rules[sub_path] for rules in per_layer]
  return plan


# ----------------------------------------------------------------------------- reading


class _Checkpoint:
  """Lazy reader over one `model.safetensors` or a sharded set with an index."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, INDEX)
    single = os.path.join(path, SAFETENSORS)
    if os.path.exists(index):
      with open(index) as f:
        self.where = dict(json.load(f)["weight_map"])
      for file in sorted(set(self.where.values())):
        if not os.path.exists(os.path.join(path, file)):
          raise FileNotFoundError(f"{INDEX} names {file}, which is not in {path}")
    elif os.path.exists(single):
      with safe_open(single, framework="np") as f:
        self.where = {k: SAFETENSORS for k in f.keys()}
    else:
      pickles = [n for n in sorted(os.listdir(path)) if n.endswith(_PICKLE_SUFFIXES)]
      hint = f" (found {pickles}: pickle-based formats are never loaded)" if pickles else ""
      raise FileNotFoundError(f"No {SAFETENSORS} or {INDEX} in {path}{hint}")
    self._files: dict[str, Any] = {}

  def _file(self, name: str):
    file = self.where[name]
    if file not in self._files:
      self._files[file] = safe_open(os.path.join(self.path, file), framework="np")
    return self._files[file]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._file(name).get_slice(name).get_shape())

  def read(self, src: _Src) -> np.ndarray:
    if src.rows is None:
      return self._file(src.name).get_tensor(src.name)
    return self._file(src.name).get_slice(src.name)[:, src.rows[0] : src.rows[1]]


def _fused_layers(cfg: ModelConfig, keys) -> list[int]:
  return [
    i
    for i in range(cfg.num_hidden_layers)
    if cfg.is_moe_layer(i) and f"model.layers.{i}.mlp.experts.gate_up_proj" in keys
  ]


def _check_names_and_shapes(ckpt: _Checkpoint, plan, cfg: ModelConfig) -> None:
  """Raises, naming tensors, on missing / unexpected tensors and shape mismatches."""
  expected: dict[str, tuple[int, ...]] = {}
  for rules in plan.values():
    for rule in rules:
      for src in rule.srcs:
        expected[src.name] = src.shape
  have = set(ckpt.where)
  missing = sorted(set(expected) - have)
  if missing:
    raise ValueError(f"{len(missing)} tensor(s) missing from {ckpt.path}: {_short(missing)}")
  # A tied checkpoint may still carry lm_head.weight: checked for equality below.
  extra = sorted(
    n for n in have - set(expected) if not n.endswith(_DERIVED_SUFFIXES) and n != "lm_head.weight"
  )
  if extra:
    raise ValueError(f"{len(extra)} unexpected tensor(s) in {ckpt.path}: {_short(extra)}")
  for name, shape in expected.items():
    got = ckpt.shape(name)
    if got != shape:
      raise ValueError(f"Tensor {name} has shape {got}, but config.json implies {shape}")
  if cfg.tie_word_embeddings and "lm_head.weight" in have:
    # Some writers store the tied head anyway: accept it only if it really is the embedding.
    emb, head = (ckpt.read(_Src(n, ())) for n in ("model.embed_tokens.weight", "lm_head.weight"))
    if head.shape != emb.shape or not np.array_equal(head, emb):
      raise ValueError(
        "Tensor lm_head.weight differs from model.embed_tokens.weight, but config.json says "
        "tie_word_embeddings=true"
      )


def _short(names: list[str], n: int = 8) -> str:
  return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _to_device(array: np.ndarray, device) -> jax.Array:
  # may_alias=False: on CPU a device buffer could otherwise alias (and keep alive) the staging
  # array. Transfers are asynchronous and hold their host buffer: wait, so none pile up.
  x = np.ascontiguousarray(array)
  return jax.device_put(x, device, may_alias=False).block_until_ready()


def _layer_array(ckpt: _Checkpoint, rule: _Rule, shape, dtype, what: str) -> np.ndarray:
  array = np.asarray(rule.to_ours([ckpt.read(s) for s in rule.srcs]), dtype)
  if array.shape != tuple(shape):
    raise RuntimeError(f"{what}: built {array.shape}, the model expects {tuple(shape)}")
  return array


def _load_param(ckpt: _Checkpoint, rules: list[_Rule], var, named, stacked: bool) -> jax.Array:
  """One parameter, straight onto its shards.

  A stacked parameter [R, ...] above `STREAM_BYTES` is sent layer by layer: each layer goes to
  its shards and is written in place into the (donated) device stack, so the host holds one
  layer of it at a time. Smaller ones are assembled on the host first (fewer transfers).
  """
  shape, dtype = tuple(var.shape), var.dtype
  index_map = named.addressable_devices_indices_map(shape)  # device -> slices of the full shape
  if not stacked or np.prod(shape) * np.dtype(dtype).itemsize <= STREAM_BYTES:
    if stacked:
      array = np.empty(shape, dtype)
      for r, rule in enumerate(rules):
        array[r] = _layer_array(ckpt, rule, shape[1:], dtype, f"layer {r}")
    else:
      array = _layer_array(ckpt, rules[0], shape, dtype, "tensor")
    shards = [_to_device(array[idx], d) for d, idx in index_map.items()]
    return jax.make_array_from_single_device_arrays(shape, named, shards)
  if isinstance(named, NamedSharding):
    if len(named.spec) and named.spec[0] is not None:
      raise RuntimeError(f"the stacked layers axis is split ({named.spec}); cannot stream it")
    layer_sharding = NamedSharding(named.mesh, PartitionSpec(*named.spec[1:]))
  else:
    layer_sharding = named
  layer_map = layer_sharding.addressable_devices_indices_map(shape[1:])
  stack = jnp.zeros(shape, dtype, device=named)
  for r, rule in enumerate(rules):
    layer = _layer_array(ckpt, rule, shape[1:], dtype, f"layer {r}")
    shards = [_to_device(layer[idx], d) for d, idx in layer_map.items()]
    del layer
    piece = jax.make_array_from_single_device_arrays(shape[1:], layer_sharding, shards)
    del shards
    stack = _set_layer(named)(stack, piece, r)  # in place (donated) on the devices
    del piece
  return stack.block_until_ready()


@functools.cache
def _set_layer(named):
  """stack[r] = layer, updating the donated stack in place; one compile per shape/sharding."""

  def set_layer(stack, layer, r):
    return jax.lax.dynamic_update_index_in_dim(stack, layer, r, axis=0)

  return jax.jit(set_layer, donate_argnums=0, out_shardings=named)


def from_pretrained(
  path: str,
  *,
  mesh: Mesh | None = None,
  dtype: DTypeLike = "float32",
  param_dtype: DTypeLike | None = None,
  **overrides,
) -> tuple[Qwen3, ModelConfig]:
  """Loads a Hugging Face Qwen3 / Qwen3-MoE directory into a (sharded) `Qwen3`.

  Args:
    path: directory with `config.json` and `model.safetensors` or a sharded set with
      `model.safetensors.index.json`; per-expert or fused expert tensors.
    mesh: a mesh with axes data, fsdp, expert, tensor; every parameter is placed directly on
      its shards. None: the default device.
    dtype: compute dtype (`ModelConfig.dtype`): "bfloat16", jnp.bfloat16, np.float32,
      jnp.dtype("float16"), ...
    param_dtype: storage dtype of the parameters (same spellings); defaults to `dtype`.
    **overrides: other ModelConfig fields to set (e.g. `moe=MoEConfig(...)`, `remat`).

  Returns:
    (model, config).
  """
  hf = read_config(path)
  cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype or dtype, **overrides)
  sharding.validate(cfg, mesh)
  ckpt = _Checkpoint(path)
  plan = _plan(cfg, _fused_layers(cfg, ckpt.where))
  _check_names_and_shapes(ckpt, plan, cfg)

  abstract = nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = []
  for key, var in nnx.to_flat_state(state):
    name = "/".join(map(str, key))
    if key not in plan:
      raise RuntimeError(f"No Hugging Face mapping for parameter {name}")
    if mesh is None:
      named = SingleDeviceSharding(jax.devices()[0])
    else:
      spec = sharding.logical_to_spec(sharding.variable_axes(var), var.shape, mesh)
      named = NamedSharding(mesh, spec)
    try:
      value = _load_param(ckpt, plan[key], var, named, stacked=key[0] == "layers")
    except RuntimeError as e:
      raise RuntimeError(f"{name}: {e}") from e
    flat.append((key, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat)), cfg


# ----------------------------------------------------------------------------- writing


def _hf_tensors(model: Qwen3, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) of every Hugging Face tensor; stacked parameters come a layer at a time."""
  plan = _plan(cfg)
  for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if key not in plan:
      raise ValueError(f"Parameter {'/'.join(map(str, key))} has no Hugging Face name")
    value, rules = var.get_value(), plan[key]
    if not getattr(value, "is_fully_addressable", True):  # multi-process: not supported yet
      raise ValueError(f"{'/'.join(key)}: save_pretrained needs fully addressable arrays")
    if key[0] == "layers" and len(rules) != value.shape[0]:
      raise ValueError(f"{'/'.join(key)}: {value.shape[0]} stacked layers, expected {len(rules)}")
    for r, rule in enumerate(rules):
      part = np.asarray(jax.device_get(value[r] if key[0] == "layers" else value))
      for src, array in zip(rule.srcs, rule.to_hf(part), strict=True):
        yield src.name, np.ascontiguousarray(array)
      del part


def save_pretrained(
  model: Qwen3,
  cfg: ModelConfig,
  path: str,
  *,
  max_shard_bytes: int = 4 << 30,
  extra_config: dict | None = None,
) -> None:
  """Writes `config.json` and safetensors (per-expert layout) that `transformers` loads.

  Tensors keep the parameters' dtype, so `from_pretrained` gives back the same bits; the
  vocabulary padding is stripped ([V, D] tables). Files above `max_shard_bytes` are split
  into `model-0000i-of-0000n.safetensors` with an index. `extra_config` adds config.json
  fields we do not model (see `config_to_hf`, which also refuses models Hugging Face cannot
  represent).

  Everything is written into a temporary directory next to `path`, then renamed to `path`, so
  a failed export never leaves a half-written `path`. An existing `path` is replaced; its
  files other than config.json and weights (tokenizer, generation config, ...) are kept.
  """
  hf_config = config_to_hf(cfg, extra_config)  # raises before anything is written
  path = os.path.abspath(path)
  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
  try:
    _write_export(model, cfg, tmp, hf_config, max_shard_bytes)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; make it like any other output
    _replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


def _is_export_file(name: str) -> bool:
  """Files an export writes (and so replaces): config.json, safetensors, the index."""
  return name in ("config.json", INDEX) or name.endswith(".safetensors")


def _replace_dir(new: str, path: str) -> None:
  """Moves the finished export `new` to `path`. An existing `path` keeps its other files:
  they are copied into `new`, the old directory is renamed aside, `new` renamed in its place,
  and the old one removed; at every moment one complete export sits at `path` or aside."""
  if not os.path.exists(path):
    os.rename(new, path)
    return
  if not os.path.isdir(path):
    raise NotADirectoryError(f"save_pretrained: {path} exists and is not a directory")
  for name in os.listdir(path):
    if _is_export_file(name):
      continue
    src, dst = os.path.join(path, name), os.path.join(new, name)
    if os.path.isdir(src):
      shutil.copytree(src, dst, symlinks=True)
    else:
      shutil.copy2(src, dst, follow_symlinks=False)
  old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
  os.rmdir(old)
  os.rename(path, old)
  try:
    os.rename(new, path)
  except BaseException:
    os.rename(old, path)
    raise
  shutil.rmtree(old, ignore_errors=True)


def _write_export(model: Qwen3, cfg: ModelConfig, path: str, hf_config: dict, max_shard_bytes):
  """config.json + safetensors (+ index when sharded) into the empty directory `path`."""
  shards: list[list[str]] = []
  pending: dict[str, np.ndarray] = {}
  size = total = 0
  files = []

  def flush():
    nonlocal pending, size
    if pending:
      name = f"shard-{len(files):05d}.tmp"
      save_file(pending, os.path.join(path, name), metadata={"format": "pt"})
      files.append(name)
      shards.append(sorted(pending))
      pending, size = {}, 0

  for name, array in _hf_tensors(model, cfg):
    if pending and size + array.nbytes > max_shard_bytes:
      flush()
    pending[name] = array
    size += array.nbytes
    total += array.nbytes
  flush()
  umask = _umask()
  for name in files:  # safetensors writes 0600 files; make them like any other output
    os.chmod(os.path.join(path, name), 0o666 & ~umask)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  if len(files) == 1:
    os.replace(os.path.join(path, files[0]), os.path.join(path, SAFETENSORS))
    return
  weight_map = {}
  n = len(files)
  for i, (tmp, names) in enumerate(zip(files, shards, strict=True)):
    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(path, tmp), os.path.join(path, final))
    weight_map.update({name: final for name in names})
  with open(os.path.join(path, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
