"""Typed, frozen configuration for qwen3_jax models and meshes.

Field names of `ModelConfig` follow the Hugging Face `Qwen3Config` / `Qwen3MoeConfig` so that
weight conversion is a table; our own knobs live in `MoEConfig` and `AttentionConfig`.
Shape letters used across the package: B batch, L length, D embed, H q heads, K kv heads,
Dh head dim, E experts, C capacity, F (expert) hidden, V vocab, T tokens (B*L).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

STRATEGIES = ("auto", "dense", "dropless_blocks", "dropless_ragged", "capacity")
ROUTINGS = ("topk", "topp")
BALANCES = ("global", "micro_batch", "sequence")
REMATS = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_KINDS = ("full", "sparse")
# Deepest stack that `scan_layers=None` unrolls: at 4 layers the unrolled `small` train step is
# faster than the scanned one on XLA:CPU (`scripts/benchmark.py --suite=layers`); deeper
# stacks are scanned so compile time does not grow with depth.
UNROLL_MAX_LAYERS = 4
# The embedding and LM head hold the vocabulary padded to a multiple of this (independent of
# the mesh, so stored shapes never depend on it); padded logits are masked or sliced off.
VOCAB_MULTIPLE = 128


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {choices}")


def canonical_dtype(dtype: Any, name: str = "dtype") -> str:
  """The canonical name ("float32", "bfloat16", "float16") of a dtype as JAX users write it.

  Accepts strings, `jnp.float32` / `np.float32` scalar types and `jnp.dtype(...)` objects;
  anything else (None, int8, float64, a typo) raises ValueError naming `name`.
  """
  try:
    canonical = None if dtype is None else jnp.dtype(dtype).name
  except TypeError:
    canonical = None
  if canonical not in DTYPES:
    raise ValueError(
      f"{name}={dtype!r} is not a supported dtype; use one of {DTYPES} (as a string, "
      "jnp.bfloat16, np.float32 or jnp.dtype(...))"
    )
  return canonical


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Our MoE knobs (the HF-shaped ones are on `ModelConfig`)."""

  routing: str = "topk"  # "topk": fixed k experts; "topp": dynamic top-p (arXiv 2403.07652).
  top_p: float = 0.4  # topp: activate experts until their cumulative probability >= top_p.
  max_experts: int = 8  # topp: never more than this many experts per token (at least 1).
  dynamic_loss_coef: float = 0.0  # Weight of the router-entropy loss (topp routing).
  router_z_loss_coef: float = 0.0  # Weight of the router z-loss (ST-MoE), logsumexp^2.
  # Load-balance statistics (f, P): over the "global" batch (every data shard and every
  # micro-batch of a gradient-accumulation step), over each "micro_batch" separately (every
  # data shard, one micro-batch: what most frameworks do), or per "sequence".
  balance: str = "global"
  # Dispatch (qwen3_jax/model/dispatch.py). "auto" = exact (dropless) on every platform:
  # dropless_blocks on CPU, dropless_ragged on GPU/TPU. "dense" = every expert on every token
  # (reference). "capacity" DROPS slots past C = ceil(capacity_factor * T * k / E) per expert.
  strategy: str = "auto"
  capacity_factor: float = 1.25  # capacity only.

  def __post_init__(self):
    _check_choice("moe.routing", self.routing, ROUTINGS)
    _check_choice("moe.balance", self.balance, BALANCES)
    _check_choice("moe.strategy", self.strategy, STRATEGIES)
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"moe.top_p must be in (0, 1], got {self.top_p}")
    if self.max_experts < 1:
      raise ValueError(f"moe.max_experts must be >= 1, got {self.max_experts}")
    if self.capacity_factor <= 0:
      raise ValueError(f"moe.capacity_factor must be > 0, got {self.capacity_factor}")
    for name in ("dynamic_loss_coef", "router_z_loss_coef"):
      if getattr(self, name) < 0:
        raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Attention kind per layer. `sparse` = causal sliding window + global tokens.

  Placement of global tokens in qwen3_jax/model/global_tokens.py, the exact visibility rule in
  qwen3_jax/model/sparse_attention.py. Global tokens exist only when some layer is sparse;
  full layers then see them as ordinary earlier positions.
  """

  kind: str = "full"  # Default kind for every layer when `pattern` is empty.
  # sparse: each query sees the last `window` real tokens, itself included (real slot t sees
  # slots t-window+1..t; globals are not counted in the window).
  window: int = 512
  # A learnable global token is inserted before each document's tokens at document offsets
  # 0, g, 2g, ... (g = global_every; not in padding, segment id 0); it takes that token's
  # position and segment and sees only earlier tokens of its document. 0 = none.
  global_every: int = 64
  max_globals: int = 64  # sparse: a query sees at most this many most recent globals; 0 = all.
  # Most documents (runs of one nonzero segment id) in one row of a packed batch; sizes the
  # global slots per row: min(L, (L + D * (g - 1)) // g) for L tokens, D = this (1 without
  # segment ids). A row holding more raises. 0 = no cap (L slots: exact for any packing).
  # The training pipeline packs no more documents per row (train/inputs.py:build_data).
  max_docs_per_row: int = 16
  block_size: int = 128  # sparse: query/key block length of the blockwise computation.
  pattern: tuple[
    str, ...
  ] = ()  # Per-layer kinds, repeated over the layers, e.g. 3x sparse, 1x full.

  def __post_init__(self):
    _check_choice("attention.kind", self.kind, ATTENTION_KINDS)
    for kind in self.pattern:
      _check_choice("attention.pattern entry", kind, ATTENTION_KINDS)
    if self.window < 1:
      raise ValueError(f"attention.window must be >= 1, got {self.window}")
    if self.global_every < 0 or self.max_globals < 0:
      raise ValueError("attention.global_every and attention.max_globals must be >= 0")
    if self.max_docs_per_row < 0:
      raise ValueError(
        f"attention.max_docs_per_row must be >= 0 (0 = no cap), got {self.max_docs_per_row}"
      )
    if self.block_size < 1:
      raise ValueError(f"attention.block_size must be >= 1, got {self.block_size}")

  def kind_of_layer(self, layer: int) -> str:
    return self.pattern[layer % len(self.pattern)] if self.pattern else self.kind

  @property
  def uses_sparse(self) -> bool:
    return self.kind == "sparse" if not self.pattern else "sparse" in self.pattern


# Projections that can take LoRA adapters or be quantised, by parameter name -> how many of
# their leading (non-batch) dims are contracted with the input: attention q/k/v/o, the dense
# MLP's and the experts' gate/up/down, the untied LM head.
PROJECTIONS = {
  "q_proj": 1,
  "k_proj": 1,
  "v_proj": 1,
  "o_proj": 2,
  "gate_proj": 1,
  "up_proj": 1,
  "down_proj": 1,
  "lm_head": 1,
}
QUANT_BITS = (8, 4)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters W + (alpha / rank) A B on the projections whose parameter path (e.g.
  `layers/sub_0/self_attn/q_proj`, see `qwen3_jax.model.lora`) fully matches `targets`.

  Adaptable: attention q/k/v/o_proj and the dense MLP's gate/up/down_proj. MoE expert weights
  and the router are never adapted (see the README's LoRA section).
  """

  rank: int = 8  # r: A is [*in, r], B is [r, *out].
  alpha: float = 16.0  # The update is scaled by alpha / rank.
  targets: str = r".*self_attn/(q_proj|v_proj)"  # Regex over parameter paths (re.fullmatch).

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
    if not self.alpha > 0:
      raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Weight-only quantisation of the projections whose parameter path fully matches `targets`
  (`qwen3_jax.model.quant`): symmetric, one float32 scale per output channel."""

  bits: int = 8  # 8 (int8) or 4 (int4 values, held one per int8 byte).
  targets: str = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|lm_head)"

  def __post_init__(self):
    _check_choice("quant.bits", self.bits, QUANT_BITS)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Qwen3 (dense) or Qwen3-MoE model; field meanings as in the Hugging Face configs."""

  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 6144  # Dense MLP hidden size (dense models, mlp_only_layers).
  moe_intermediate_size: int = 768  # Hidden size F of each expert.
  num_hidden_layers: int = 48
  num_attention_heads: int = 32
  num_key_value_heads: int = 4
  head_dim: int = 128
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  num_experts: int = 128  # 0 = dense model.
  num_experts_per_tok: int = 8
  norm_topk_prob: bool = True  # Renormalise the k routing weights to sum to 1.
  decoder_sparse_step: int = 1  # Layer i is MoE iff (i + 1) % step == 0 (and not mlp_only).
  mlp_only_layers: tuple[int, ...] = ()  # Layers that use the dense MLP in an MoE model.
  router_aux_loss_coef: float = 0.001  # Load-balance weight (f sums to 1: HF value x k).
  moe: MoEConfig = MoEConfig()
  attention: AttentionConfig = AttentionConfig()
  lora: LoraConfig | None = None  # Low-rank adapters (None = none): `model/lora.py`.
  quant: QuantConfig | None = None  # Weight-only int8 / int4 projections: `model/quant.py`.
  # Dtypes may be given as strings, jnp/np types or jnp.dtype(...); stored as the name.
  dtype: str = "float32"  # Compute dtype of activations and matmuls.
  param_dtype: str = "float32"  # Storage dtype of parameters (master weights).
  remat: str = "none"  # none | full | dots: rematerialisation of each decoder layer.
  # One compiled block scanned over the layers (True) or the layers unrolled (False). None =
  # by depth: unrolled up to UNROLL_MAX_LAYERS layers (faster steps on XLA:CPU, a few seconds
  # more compile time), scanned above (compile time independent of depth). Either way the
  # parameters are stored the same, so checkpoints do not depend on it.
  scan_layers: bool | None = None

  def __post_init__(self):
    _check_choice("remat", self.remat, REMATS)
    for name in ("dtype", "param_dtype"):  # frozen: normalise through object.__setattr__
      object.__setattr__(self, name, canonical_dtype(getattr(self, name), name))
    for name in (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "num_key_value_heads",
      "head_dim",
    ):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("rope_theta", "rms_norm_eps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
    if self.num_experts < 0 or self.router_aux_loss_coef < 0:
      raise ValueError(
        f"num_experts={self.num_experts} and router_aux_loss_coef={self.router_aux_loss_coef} "
        "must be >= 0"
      )
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads={self.num_attention_heads} is not a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}"
      )
    if self.num_experts:
      if not 1 <= self.num_experts_per_tok <= self.num_experts:
        raise ValueError(
          f"num_experts_per_tok={self.num_experts_per_tok} must be in "
          f"[1, num_experts={self.num_experts}]"
        )
      if self.decoder_sparse_step < 1:
        raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
      if self.moe_intermediate_size < 1:
        raise ValueError(f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")
    if self.lora is not None and self.quant is not None:
      raise ValueError("lora and quant together (QLoRA) are not supported: set one of them")
    bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
    if bad:
      raise ValueError(f"mlp_only_layers {bad} outside [0, {self.num_hidden_layers})")

  @property
  def scanned(self) -> bool:
    """Whether the layers run as a scan (`scan_layers`, or by depth when it is None)."""
    if self.scan_layers is None:
      return self.num_hidden_layers > UNROLL_MAX_LAYERS
    return self.scan_layers

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def is_moe_layer(self, layer: int) -> bool:
    """HF rule: MoE iff not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0."""
    return (
      self.is_moe
      and layer not in self.mlp_only_layers
      and (layer + 1) % self.decoder_sparse_step == 0
    )

  @property
  def padded_vocab_size(self) -> int:
    """Vp: rows of the embedding / columns of the LM head, `vocab_size` rounded up to a
    multiple of VOCAB_MULTIPLE. Ids >= vocab_size are never real tokens."""
    return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  @property
  def max_experts_per_token(self) -> int:
    """Static upper bound on experts a token is sent to (k, or the top-p cap)."""
    if self.moe.routing == "topp":
      return min(self.moe.max_experts, self.num_experts)
    return self.num_experts_per_tok

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; one may be -1 (take the remaining devices)."""

  data: int = 1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1

  AXES = ("data", "fsdp", "expert", "tensor")

  def resolve(self, num_devices: int) -> dict[str, int]:
    """Returns {axis: size} with a -1 filled in; raises if sizes do not multiply out."""
    sizes = {a: getattr(self, a) for a in self.AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
      raise ValueError(f"At most one mesh axis may be -1, got {fill}")
    if any(s < 1 and s != -1 for s in sizes.values()):
      raise ValueError(f"Mesh axis sizes must be >= 1 or -1, got {sizes}")
    known = 1
    for s in sizes.values():
      if s != -1:
        known *= s
    if fill:
      if num_devices % known:
        raise ValueError(
          f"Cannot fill mesh axis '{fill[0]}': {num_devices} devices are not a "
          f"multiple of the other axes' product {known}"
        )
      sizes[fill[0]] = num_devices // known
    elif known != num_devices:
      raise ValueError(f"Mesh {sizes} needs {known} devices, but {num_devices} are available")
    return sizes


# ----------------------------------------------------------------------------- presets


def tiny(**kw) -> ModelConfig:
  """Tests: 2 layers, 8 experts top-2, every shape distinct so transposes show up."""
  base = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=1e4,
    num_experts=8,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.01,
  )
  return dataclasses.replace(base, **kw)


def small(**kw) -> ModelConfig:
  """CPU benchmarks: vocab 8192, hidden 512, 4 layers (unrolled, by depth), 8 q / 4 kv heads,
  E16 k2 F512."""
  base = ModelConfig(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    rope_theta=1e6,
    num_experts=16,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.01,
  )
  return dataclasses.replace(base, **kw)


def mini(**kw) -> ModelConfig:
  """The `make run` post-training recipe on 2 CPU cores: vocab 1024, hidden 192, 4 layers,
  6 q / 2 kv heads, E8 k2 F192 (4.3M parameters, 1.7M active)."""
  base = ModelConfig(
    vocab_size=1024,
    hidden_size=192,
    intermediate_size=512,
    moe_intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=32,
    rope_theta=1e4,
    num_experts=8,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.01,
  )
  return dataclasses.replace(base, **kw)


def qwen3_30b_a3b(**kw) -> ModelConfig:
  """Qwen3-30B-A3B as in its Hugging Face config."""
  base = ModelConfig(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    rope_theta=1e6,
    num_experts=128,
    num_experts_per_tok=8,
    router_aux_loss_coef=0.008,  # HF's 0.001 x k (`hf.config_from_hf`)
    dtype="bfloat16",
    remat="full",
  )
  return dataclasses.replace(base, **kw)


def qwen3_235b_a22b(**kw) -> ModelConfig:
  """Qwen3-235B-A22B as in its Hugging Face config."""
  base = ModelConfig(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    moe_intermediate_size=1536,
    num_hidden_layers=94,
    num_attention_heads=64,
    num_key_value_heads=4,
    head_dim=128,
    rope_theta=1e6,
    num_experts=128,
    num_experts_per_tok=8,
    router_aux_loss_coef=0.008,  # HF's 0.001 x k (`hf.config_from_hf`)
    dtype="bfloat16",
    remat="full",
  )
  return dataclasses.replace(base, **kw)


def qwen3_max_like(**kw) -> ModelConfig:
  """A ~1T-parameter MoE in the Qwen3 family. OUR GUESS: Qwen3-Max's architecture is not public.

  We scale 235B-A22B: hidden 6144, 104 layers, 96 q / 8 kv heads, 256 experts top-8 with
  F=2048, which gives ~1.02T total and ~50B active parameters (see `param_count`).
  """
  base = ModelConfig(
    vocab_size=151936,
    hidden_size=6144,
    intermediate_size=16384,
    moe_intermediate_size=2048,
    num_hidden_layers=104,
    num_attention_heads=96,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=1e6,
    num_experts=256,
    num_experts_per_tok=8,
    router_aux_loss_coef=0.008,  # HF's 0.001 x k (`hf.config_from_hf`)
    dtype="bfloat16",
    remat="full",
  )
  return dataclasses.replace(base, **kw)


PRESETS = {
  "tiny": tiny,
  "small": small,
  "mini": mini,
  "qwen3_30b_a3b": qwen3_30b_a3b,
  "qwen3_235b_a22b": qwen3_235b_a22b,
  "qwen3_max_like": qwen3_max_like,
}


def preset(name: str, **kw) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name](**kw)


def param_count(cfg: ModelConfig) -> tuple[int, int]:
  """(total, active-per-token) parameter counts, computed from the config alone; the
  embedding and LM head count the true vocab_size rows (not the padding rows of the module)."""
  d, hd = cfg.hidden_size, cfg.head_dim
  attn = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 2 * hd + d * 2
  dense_mlp = 3 * d * cfg.intermediate_size
  expert = 3 * d * cfg.moe_intermediate_size
  total = active = 0
  for i in range(cfg.num_hidden_layers):
    total += attn
    active += attn
    if cfg.is_moe_layer(i):
      total += cfg.num_experts * expert + d * cfg.num_experts
      active += cfg.num_experts_per_tok * expert + d * cfg.num_experts
    else:
      total += dense_mlp
      active += dense_mlp
  emb = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d
  if cfg.attention.uses_sparse and cfg.attention.global_every:
    emb += d  # the learnable global token of sparse attention
  return total + emb, active + emb


def to_dict(cfg: ModelConfig) -> dict:
  """JSON-able dict of a ModelConfig (nested configs as dicts, tuples as lists)."""
  return dataclasses.asdict(cfg)


def from_dict(d: dict) -> ModelConfig:
  """Inverse of `to_dict`; unknown keys raise so a typo never goes unnoticed."""
  d = dict(d)
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"Unknown ModelConfig fields: {unknown}")
  if "moe" in d:
    d["moe"] = MoEConfig(**d["moe"])
  if "attention" in d:
    att = dict(d["attention"])
    att["pattern"] = tuple(att.get("pattern", ()))
    d["attention"] = AttentionConfig(**att)
  if d.get("lora") is not None:
    d["lora"] = LoraConfig(**d["lora"])
  if d.get("quant") is not None:
    d["quant"] = QuantConfig(**d["quant"])
  if "mlp_only_layers" in d:
    d["mlp_only_layers"] = tuple(d["mlp_only_layers"])
  return ModelConfig(**d)
