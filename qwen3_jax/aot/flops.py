"""Analytic model FLOPs of a train step and a decode step (the MFU numerator).

Model FLOPs count the matmuls the model needs, not what an implementation executes: no
rematerialisation, no padding, no replicated work. Per token, a matmul with P parameters costs
2 P FLOPs forward and 4 P backward (6 P for training); the input embedding is a lookup (no
FLOPs), the LM head is a matmul. Attention adds, per layer and token, 2 H Dh S for q k^T and
2 H Dh S for the weighted sum over S visible keys: S = L / 2 on average for causal full
attention over L tokens, min(window, L / 2) for a sliding-window layer (global tokens left
out), and the cache length for a decode step.
"""

from __future__ import annotations

from qwen3_jax.config import ModelConfig, param_count


def matmul_params(cfg: ModelConfig) -> int:
  """Active parameters per token that are multiplied (the input embedding is a lookup, so it
  is left out unless it is tied to the LM head)."""
  _, active = param_count(cfg)
  lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
  return active - lookup


def _visible_keys(cfg: ModelConfig, layer: int, seq_len: int) -> float:
  causal = seq_len / 2
  if cfg.attention.kind_of_layer(layer) == "sparse":
    return min(cfg.attention.window, causal)
  return causal


def attention_flops_per_token(cfg: ModelConfig, keys) -> float:
  """Forward q k^T and weighted-sum FLOPs of one token summed over layers; `keys(layer)` is
  the number of keys the token sees in that layer."""
  width = cfg.num_attention_heads * cfg.head_dim
  return sum(4.0 * width * keys(i) for i in range(cfg.num_hidden_layers))


def train_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
  """Model FLOPs of one training step over batch x seq_len tokens (forward + backward)."""
  attn = attention_flops_per_token(cfg, lambda i: _visible_keys(cfg, i, seq_len))
  return 3.0 * (2.0 * matmul_params(cfg) + attn) * batch * seq_len


def decode_flops(cfg: ModelConfig, batch: int, context: int) -> float:
  """Model FLOPs of one decode step: `batch` new tokens, each attending to `context` keys
  (capped by the window in sliding-window layers)."""

  def keys(i):
    sparse = cfg.attention.kind_of_layer(i) == "sparse"
    return min(cfg.attention.window, context) if sparse else context

  return (2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, keys)) * batch
