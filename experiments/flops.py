"""Training FLOPs per token of a config, from its shapes alone (the ablations' compute axis).

Counted as 6 x (multiply-adds of the matmuls a token passes through) for forward + backward
(the usual 2 forward + 4 backward FLOPs per weight and token):
  attention projections  D * Dh * (2H + 2K)                          per layer
  attention scores       2 * H * Dh * ctx (QK^T and AV)              per layer
  dense MLP              3 * D * I                                   per dense layer
  MoE                    D * E (router) + k_eff * 3 * D * F          per MoE layer
  LM head                D * V
ctx is the mean number of keys a query sees: (L + 1) / 2 for full causal attention; for a
sparse layer min(t + 1, window) plus its visible global tokens (at most `max_globals`),
averaged over the L positions of one document. k_eff is the measured mean number of experts
per token for dynamic routing, else k. Norms, softmaxes, the embedding lookup and the
optimizer are left out (small at these sizes and equal across the arms that are compared).
"""

from __future__ import annotations

import numpy as np

from qwen3_jax.config import ModelConfig


def mean_context(cfg: ModelConfig, layer: int, seq_len: int) -> float:
  """Mean keys seen per query of `layer` over one document of `seq_len` tokens."""
  t = np.arange(seq_len)
  att = cfg.attention
  if att.kind_of_layer(layer) == "full":
    return float((t + 1).mean())
  ctx = np.minimum(t + 1, att.window).astype(np.float64)
  if att.global_every:
    globals_seen = t // att.global_every + 1
    if att.max_globals:
      globals_seen = np.minimum(globals_seen, att.max_globals)
    ctx = ctx + globals_seen
  return float(ctx.mean())


def train_flops_per_token(
  cfg: ModelConfig, seq_len: int, experts_per_token: float | None = None
) -> float:
  """Forward + backward FLOPs per trained token (see the module docstring)."""
  d, hd, h, kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
  k_eff = cfg.num_experts_per_tok if experts_per_token is None else experts_per_token
  macs = d * cfg.vocab_size
  for layer in range(cfg.num_hidden_layers):
    macs += d * hd * (2 * h + 2 * kv) + 2 * h * hd * mean_context(cfg, layer, seq_len)
    if cfg.is_moe_layer(layer):
      macs += d * cfg.num_experts + k_eff * 3 * d * cfg.moe_intermediate_size
    else:
      macs += 3 * d * cfg.intermediate_size
  return 6.0 * macs
