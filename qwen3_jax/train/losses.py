"""Next-token cross-entropy with a loss mask, output z-loss, and the MoE aux losses.

Every term is written as a *sum over this micro-batch divided by a global-batch total*, so the
sum of micro-batch losses equals the loss of the whole batch exactly. The MoE terms and their
coefficients come from `moe.aux_losses`, the function that also gives the model's own
`aux["aux_loss"]`. The load-balance loss is L = E * sum_i f_i P_i per MoE layer, averaged over
layers, with f (stop-gradient) taken from the whole global batch (`f_global`, summed over
micro-batches in a forward pre-pass) and P the micro-batch's mean router probability weighted by
its share of the tokens: linear in P, so the micro-batch sum is the big-batch loss. With
`moe.balance="micro_batch"` each micro-batch takes its own f instead (no pre-pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3_jax.config import ModelConfig
from qwen3_jax.model.moe import aux_losses
from qwen3_jax.train.fused_ce import fused_cross_entropy

# Batch keys, all [B, L] int32: model inputs, next-token targets, segment ids (0 = padding),
# loss mask (1 = this target counts; 0 for padding, segment ends and e.g. SFT prompts).
BATCH_KEYS = ("inputs", "targets", "segment_ids", "loss_mask")


def batch_totals(batch: dict) -> dict:
  """Global-batch normalisers: loss tokens, non-padding tokens, non-empty sequences."""
  seg = batch["segment_ids"] > 0
  return {
    "n_loss": jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0),
    "n_tok": jnp.maximum(seg.astype(jnp.float32).sum(), 1.0),
    "n_seq": jnp.maximum(seg.any(-1).astype(jnp.float32).sum(), 1.0),
  }


def fraction_from_counts(tokens_per_expert: jax.Array) -> jax.Array:
  """f [n_moe, E]: share of routed slots per expert and layer (stop-gradient)."""
  c = jax.lax.stop_gradient(tokens_per_expert.astype(jnp.float32))
  return c / jnp.maximum(c.sum(-1, keepdims=True), 1.0)


def loss_terms(
  hidden: jax.Array,
  head: jax.Array,
  aux: dict,
  batch: dict,
  totals: dict,
  cfg: ModelConfig,
  *,
  z_loss: float = 0.0,
  f_global: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """This micro-batch's share of the global-batch loss, and its (additive) metrics.

  The LM head and cross-entropy run fused over token chunks (`fused_ce`): the [B, L, V]
  logits are never materialised, the gradient is exact.

  Args:
    hidden: [B, L, D] final hidden states (`model(..., return_hidden=True).hidden`).
    head: [D, Vp] LM-head weight (`model.head_weight()`; columns >= cfg.vocab_size are
      padding, masked out).
    aux: the model's aux dict; batch: BATCH_KEYS arrays [B, L].
    totals: `batch_totals` of the *global* batch (all micro-batches).
    z_loss: weight of mean(logsumexp(logits)^2) over loss tokens.
    f_global: [n_moe, E] expert fractions of the global batch; None = this micro-batch's own
      (exact when there is one micro-batch).

  Returns:
    (loss, metrics): every metric is this micro-batch's contribution, summing to the batch value.
  """
  w = batch["loss_mask"].astype(jnp.float32) / totals["n_loss"]  # [B, L]
  # loss = sum(w * (ce + z_loss * lse^2)); metrics (no gradient): ce, z_loss, accuracy parts.
  loss, metrics = fused_cross_entropy(
    hidden, head, batch["targets"], w, z_loss=z_loss, vocab_size=cfg.vocab_size
  )
  if cfg.is_moe:
    aux_loss, terms = moe_terms(aux, batch["segment_ids"], totals, cfg, f_global=f_global)
    loss = loss + aux_loss
    metrics.update(terms)
  metrics["loss"] = loss
  return loss, metrics


def moe_terms(
  aux: dict,
  segment_ids: jax.Array,
  totals: dict,
  cfg: ModelConfig,
  *,
  f_global: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """This micro-batch's share of the MoE aux loss, and its (additive) router metrics.

  Args:
    aux: the model's aux dict; segment_ids: [B, L] (0 = padding) of this micro-batch.
    totals: `batch_totals` of the global batch (n_tok, n_seq); f_global: as in `loss_terms`.

  Returns:
    (aux_loss, metrics): the weighted terms of `moe.aux_losses`, dropped_fraction and
    experts_per_token weighted by this micro-batch's token share, tokens_per_expert counts.
  """
  seg = segment_ids > 0
  tok_share = seg.astype(jnp.float32).sum() / totals["n_tok"]
  seq_share = seg.any(-1).astype(jnp.float32).sum() / totals["n_seq"]
  terms = aux_losses(aux, cfg, fraction=f_global, tok_share=tok_share, seq_share=seq_share)
  metrics = dict(
    terms,
    dropped_fraction=aux["dropped_fraction"] * tok_share,
    experts_per_token=aux["experts_per_token"] * tok_share,
    tokens_per_expert=aux["tokens_per_expert"].astype(jnp.float32),
  )
  return terms["aux_loss"], metrics
