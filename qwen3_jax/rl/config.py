"""Typed configuration of the policy-gradient objective (GRPO and its variants).

Presets: `RLConfig.grpo()` (DeepSeekMath), `RLConfig.dapo()`, `RLConfig.dr_grpo()`; formulas
in `qwen3_jax/rl/grpo.py`.
"""

from __future__ import annotations

import dataclasses

AGGREGATIONS = ("token", "sequence", "constant")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The objective of one RL stage (the optimizer, model and batch shape are `TrainConfig`'s)."""

  temperature: float = 1.0  # Rollout sampling temperature: log-probs of softmax(logits / T).
  eps_low: float = 0.2  # Ratio clipped below at 1 - eps_low.
  eps_high: float = 0.28  # Ratio clipped above at 1 + eps_high (clip-higher; GRPO: = eps_low).
  aggregation: str = "token"  # token (DAPO) | sequence (GRPO) | constant (Dr. GRPO).
  norm_len: int = 0  # constant: per-sequence normaliser (e.g. max new tokens); 0 = batch L.
  beta: float = 0.0  # Weight of the k3 KL to the reference policy (> 0 needs ref_logp).
  # Advantages (for `grpo.group_advantages` on the rollout side; the step takes them as given):
  scale_by_std: bool = True  # (R - mean) / (std + adv_eps); False: R - mean (Dr. GRPO).
  adv_eps: float = 1e-4  # Added to the group's reward std.
  moe_aux: bool = True  # Add the MoE aux losses (load balance, router z) to the RL loss.

  def __post_init__(self):
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"aggregation={self.aggregation!r} is not one of {AGGREGATIONS}")
    if not self.temperature > 0:
      raise ValueError(
        f"temperature must be > 0 (log-probs of a greedy row use 1), got {self.temperature}"
      )
    if not 0 <= self.eps_low < 1:
      raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}")
    for name in ("eps_high", "beta", "adv_eps", "norm_len"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

  @classmethod
  def grpo(cls, **overrides) -> RLConfig:
    """DeepSeekMath GRPO: symmetric clip 0.2, per-sequence mean, std-scaled advantages, KL."""
    base = dict(eps_low=0.2, eps_high=0.2, aggregation="sequence", beta=0.04)
    return cls(**{**base, **overrides})

  @classmethod
  def dapo(cls, **overrides) -> RLConfig:
    """DAPO: clip-higher (0.2, 0.28), token-level mean, no KL (dynamic sampling and the
    overlong penalty act on the rollouts: `grpo.zero_variance_groups`, `overlong_penalty`)."""
    base = dict(eps_low=0.2, eps_high=0.28, aggregation="token", beta=0.0)
    return cls(**{**base, **overrides})

  @classmethod
  def dr_grpo(cls, norm_len: int = 0, **overrides) -> RLConfig:
    """Dr. GRPO: advantages R - mean (no std), constant normaliser B * norm_len, no KL."""
    base = dict(
      eps_low=0.2,
      eps_high=0.2,
      aggregation="constant",
      norm_len=norm_len,
      beta=0.0,
      scale_by_std=False,
    )
    return cls(**{**base, **overrides})
