"""Bootstrap intervals over prompts: one model's accuracy, and the paired difference of two.

Evaluation scores every prompt by the mean of its n samples (pass@1 estimated per prompt);
prompts are the unit of resampling. `bootstrap_ci(x)` resamples the P per-prompt scores with
replacement `reps` times and returns the observed mean with the (1 - level) / 2 and
1 - (1 - level) / 2 quantiles of the resampled means. Quantiles are the inverted empirical
CDF (the smallest resampled mean whose share of resamples at or below it reaches q), so an
interval's ends are means a resample can actually have. `paired_bootstrap(a, b)` is the same on
the per-prompt differences a_i - b_i: both models answered the same prompts, and resampling
the prompts together removes the prompts' own spread of difficulty from the interval.

Deterministic: the resampling draws from `numpy.random.default_rng(seed)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

REPS = 2000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
  """An observed mean and its bootstrap interval [lo, hi] over `n` prompts."""

  mean: float
  lo: float
  hi: float
  n: int

  def excludes_zero(self) -> bool:
    return self.lo > 0 or self.hi < 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def __str__(self) -> str:
    return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def bootstrap_ci(
  per_prompt: Sequence[float], *, reps: int = REPS, level: float = LEVEL, seed: int = 0
) -> Interval:
  """Mean of the per-prompt scores and its percentile bootstrap interval (module docstring).

  Raises ValueError on an empty input or a level outside (0, 1).
  """
  x = np.asarray(per_prompt, np.float64).reshape(-1)
  if x.size == 0:
    raise ValueError("bootstrap_ci needs at least one per-prompt score")
  if not 0 < level < 1 or reps < 1:
    raise ValueError(f"need 0 < level < 1 and reps >= 1, got level={level}, reps={reps}")
  idx = np.random.default_rng(seed).integers(0, x.size, size=(reps, x.size))  # [R, P]
  means = x[idx].mean(axis=1)  # [R]
  alpha = (1 - level) / 2
  lo, hi = np.quantile(means, [alpha, 1 - alpha], method="inverted_cdf")
  return Interval(float(x.mean()), float(lo), float(hi), int(x.size))


def paired_bootstrap(
  a: Sequence[float], b: Sequence[float], *, reps: int = REPS, level: float = LEVEL, seed: int = 0
) -> Interval:
  """Interval of mean(a - b), a and b the two models' scores on the same prompts, in order."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired scores need the same prompts: {a.shape} vs {b.shape}")
  return bootstrap_ci(a - b, reps=reps, level=level, seed=seed)
