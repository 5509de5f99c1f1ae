"""The GRPO objective and its variants (DAPO, Dr. GRPO): pure functions of per-token arrays.

Notation: a rollout batch holds B sequences of T tokens; mask m[b, t] = 1 on the tokens the
policy generated and is trained on (not prompt, padding, tool output or forced text). logp,
old_logp, ref_logp [B, T] are log pi(token | prefix) under the policy being trained, the policy
that sampled the rollouts, and the reference policy; A [B] the sequence's advantage.

Advantages (`group_advantages`), per group of G samples of one prompt with rewards R:
  GRPO      A_i = (R_i - mean R) / (std R + eps)        (std over the group, ddof 0)
  Dr. GRPO  A_i = R_i - mean R
Per-token loss (`policy_loss`), with r = exp(logp - old_logp) and clip-higher bounds:
  l[b, t] = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * k3
  k3      = exp(ref_logp - logp) - (ref_logp - logp) - 1   (>= 0, = 0 iff logp == ref_logp)
so with A > 0 a token whose ratio is above 1 + eps_high, and with A < 0 one below 1 - eps_low,
gets no gradient. Aggregation (`aggregate`) over the batch:
  token     sum_bt m l / sum_bt m                            (DAPO: every token weighs the same)
  sequence  mean over sequences with m > 0 of sum_t m l / sum_t m   (GRPO: 1/G sum_i 1/|o_i|)
  constant  sum_bt m l / (B * norm_len)                      (Dr. GRPO: no length bias)
Rollout-side helpers: `zero_variance_groups` (DAPO dynamic sampling drops groups whose
rewards are all equal: their advantages are 0) and `overlong_penalty` (DAPO's soft penalty).

The normalisers (`loss_totals`) may come from a larger batch than the arrays passed: with
gradient accumulation each micro-batch's loss and metrics are its share of the batch's, and
they sum to the batch values (but `ratio_max`, a maximum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3_jax.rl.config import AGGREGATIONS


def group_advantages(
  rewards: jax.Array, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-4
) -> jax.Array:
  """Group-relative advantages.

  Args:
    rewards: [N] float, N = num_groups * G; group j is rows j * G .. j * G + G - 1 (the
      engine's order: a request's `n` samples are consecutive).
    group_size: G.
    scale_by_std: GRPO's (R - mean) / (std + eps) if True, Dr. GRPO's R - mean if False.
    eps: added to the std (a group with equal rewards gets A = 0, also with eps 0).

  Returns:
    [N] float32 advantages.
  """
  g = _groups(rewards, group_size)  # [N / G, G]
  adv = g - g.mean(-1, keepdims=True)
  if scale_by_std:
    std = g.std(-1, keepdims=True)
    adv = jnp.where(std > 0, adv / (std + eps), 0.0)  # 0, not 0 / 0, for equal rewards
  return adv.reshape(-1)


def zero_variance_groups(rewards: jax.Array, group_size: int) -> jax.Array:
  """[N / G] bool: True where every reward of the group is the same (zero advantage, no
  learning signal; DAPO's dynamic sampling drops and resamples them). Its mean is the
  `frac_reward_zero_std` metric."""
  g = _groups(rewards, group_size)
  return g.max(-1) == g.min(-1)


def overlong_penalty(
  lengths: jax.Array, *, max_len: int, cache: int, factor: float = 1.0
) -> jax.Array:
  """DAPO's soft overlong punishment, a reward term per sequence.

  R(L) = 0 for L <= max_len - cache, (max_len - cache - L) / cache in the last `cache`
  tokens (falling linearly to -1 at max_len), -1 beyond max_len; times `factor`.

  Args:
    lengths: [N] ints, generated tokens per sequence.
    max_len: L_max, the generation limit; cache: L_cache >= 0 (0: -1 only beyond max_len).

  Returns:
    [N] float32 penalties in [-factor, 0].
  """
  if not 0 <= cache <= max_len:
    raise ValueError(f"overlong_penalty: need 0 <= cache <= max_len, got {cache}, {max_len}")
  n = jnp.asarray(lengths, jnp.float32)
  over = n - (max_len - cache)  # tokens into the penalty zone
  ramp = -over / max(cache, 1)
  pen = jnp.where(over <= 0, 0.0, jnp.where(n > max_len, -1.0, jnp.maximum(ramp, -1.0)))
  return factor * pen


def loss_totals(mask: jax.Array) -> dict[str, jax.Array]:
  """Normalisers of a batch's loss mask [B, T]: loss tokens, sequences with at least one
  loss token, rows (each at least 1, so an empty batch gives a zero loss, not NaN)."""
  m = mask.astype(jnp.float32)
  return {
    "tokens": jnp.maximum(m.sum(), 1.0),
    "sequences": jnp.maximum((m.sum(-1) > 0).astype(jnp.float32).sum(), 1.0),
    "rows": jnp.asarray(max(mask.shape[0], 1), jnp.float32),
  }


def aggregate(
  per_token: jax.Array,
  mask: jax.Array,
  aggregation: str,
  *,
  totals: dict | None = None,
  norm_len: int | None = None,
) -> jax.Array:
  """The batch loss from per-token losses [B, T] (see the module docstring).

  Args:
    per_token: [B, T] float; mask: [B, T] (0/1).
    aggregation: "token" | "sequence" | "constant".
    totals: `loss_totals` of the whole batch (gradient accumulation); None = of `mask`.
    norm_len: the constant's per-sequence length; None or 0 = T.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}")
  m = mask.astype(jnp.float32)
  totals = loss_totals(mask) if totals is None else totals
  x = jnp.where(m > 0, per_token, 0.0) * m
  if aggregation == "token":
    return x.sum() / totals["tokens"]
  if aggregation == "sequence":
    per_seq = x.sum(-1) / jnp.maximum(m.sum(-1), 1.0)  # [B], 0 for a row without loss tokens
    return per_seq.sum() / totals["sequences"]
  return x.sum() / (totals["rows"] * float(norm_len or mask.shape[1]))


def policy_loss(
  logp: jax.Array,
  old_logp: jax.Array,
  advantages: jax.Array,
  mask: jax.Array,
  *,
  eps_low: float = 0.2,
  eps_high: float = 0.28,
  aggregation: str = "token",
  ref_logp: jax.Array | None = None,
  beta: float = 0.0,
  entropy: jax.Array | None = None,
  norm_len: int | None = None,
  totals: dict | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The clipped policy-gradient loss (+ beta * k3 KL), aggregated (module docstring).

  Args:
    logp: [B, T] log-probs of the tokens under the policy being trained (differentiable).
    old_logp: [B, T] under the rollout policy (constants).
    advantages: [B] per sequence.
    mask: [B, T] 1 on the tokens trained on; elsewhere every input may hold anything finite.
    eps_low, eps_high: the ratio is clipped to [1 - eps_low, 1 + eps_high].
    aggregation, norm_len, totals: as in `aggregate`.
    ref_logp: [B, T] under the reference policy: the KL is computed (metric `kl`) and, with
      beta > 0, added to the loss. None: no KL (beta must then be 0).
    beta: weight of the k3 KL.
    entropy: [B, T] per-token entropies of the policy, only for the `entropy` metric.

  Returns:
    (loss [], metrics): loss and pg_loss (aggregated as the loss), and token means over the
    mask (as shares of `totals["tokens"]`): clip_frac_low (r < 1 - eps_low with A < 0: the
    clip binds), clip_frac_high (r > 1 + eps_high with A > 0), ratio_mean, kl and entropy
    when given; ratio_max over the mask. The metrics carry no gradient.
  """
  if beta and ref_logp is None:
    raise ValueError("policy_loss: beta > 0 needs ref_logp")
  m = mask.astype(jnp.float32)
  on = m > 0
  totals = loss_totals(mask) if totals is None else totals
  a = advantages.astype(jnp.float32)[:, None]  # [B, 1]
  ratio = jnp.exp(jnp.where(on, logp - old_logp, 0.0))  # [B, T]; 1 off the mask
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = -jnp.minimum(ratio * a, clipped * a)  # [B, T]
  agg = lambda x: aggregate(x, mask, aggregation, totals=totals, norm_len=norm_len)  # noqa: E731
  mean = lambda x: jax.lax.stop_gradient((x * m).sum() / totals["tokens"])  # noqa: E731
  pg_loss = agg(pg)
  loss = pg_loss
  metrics = {
    "pg_loss": pg_loss,
    "clip_frac_low": mean(((ratio < 1.0 - eps_low) & (a < 0)).astype(jnp.float32)),
    "clip_frac_high": mean(((ratio > 1.0 + eps_high) & (a > 0)).astype(jnp.float32)),
    "ratio_mean": mean(ratio),
    "ratio_max": jax.lax.stop_gradient(jnp.where(on, ratio, 0.0).max()),
  }
  if ref_logp is not None:
    d = jnp.where(on, ref_logp - logp, 0.0)
    k3 = jnp.exp(d) - d - 1.0  # [B, T]
    metrics["kl"] = mean(k3)
    if beta:
      loss = loss + beta * agg(k3)
  if entropy is not None:
    metrics["entropy"] = mean(entropy)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  metrics["pg_loss"] = jax.lax.stop_gradient(pg_loss)
  return loss, metrics


def _groups(rewards, group_size: int) -> jax.Array:
  """[N] -> [N / G, G] float32."""
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
    raise ValueError(
      f"rewards must be [N] with N a multiple of group_size={group_size}, got {r.shape}"
    )
  return r.reshape(-1, group_size)
