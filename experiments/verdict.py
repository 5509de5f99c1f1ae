"""The verdict rule of every ablation, paired by seed.

A claim says that `high` exceeds `low` (e.g. the dense arm's held-out CE exceeds the MoE arm's,
i.e. MoE is better), optionally "by more than -margin" for claims of near-equality ("window +
globals is near-lossless": CE(sparse) - CE(full) < margin). Each seed s gives one paired
difference d_s = high_s - low_s + margin (both arms saw the same data order, tokens and
optimizer under seed s); the claim predicts d > 0.

With n >= 2 seeds the 95% interval of the mean difference is mean(d) +- t(0.975, n-1) *
std(d, ddof=1) / sqrt(n) (Student's t). The verdict:
  held          the interval lies above zero (claimed direction, zero excluded);
  did not hold  the interval lies below zero (it excludes the claimed effect: the opposite
                holds, or for a near-equality claim the gap is larger than the margin);
  inconclusive  otherwise, and always with a single seed (no interval).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

RULE = (
  "Per seed s, d_s = high_s - low_s + margin (paired: both arms saw the same data order, "
  "tokens and optimizer under seed s); the claim predicts d > 0. 95% interval: mean(d) +- "
  "t(0.975, n-1) * std(d) / sqrt(n). **held** when the interval lies above 0, **did not hold** "
  "when it lies below 0 (it excludes the claimed effect), **inconclusive** otherwise (always "
  "with one seed)."
)


@dataclasses.dataclass(frozen=True)
class Verdict:
  """Mean paired difference, its 95% interval (nan with one seed) and the verdict word."""

  mean: float
  lo: float
  hi: float
  n: int
  verdict: str


def paired_verdict(high, low, margin: float = 0.0) -> Verdict:
  """The verdict for paired per-seed values `high[s]`, `low[s]` (same seed order).

  Args:
    high, low: sequences of equal length n >= 1; the claim is high - low + margin > 0.
    margin: tolerance of a near-equality claim (0 for "beats" claims).
  """
  high, low = np.asarray(high, np.float64), np.asarray(low, np.float64)
  if high.shape != low.shape or high.ndim != 1 or high.size == 0:
    raise ValueError(f"paired values need equal 1-D shapes, got {high.shape} and {low.shape}")
  if not (np.all(np.isfinite(high)) and np.all(np.isfinite(low))):
    raise ValueError(f"paired values must be finite, got high={high}, low={low}")
  d = high - low + margin
  n = d.size
  mean = float(d.mean())
  if n < 2:
    return Verdict(mean, math.nan, math.nan, n, "inconclusive")
  half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
  lo, hi = mean - half, mean + half
  word = "held" if lo > 0 else "did not hold" if hi < 0 else "inconclusive"
  return Verdict(mean, lo, hi, n, word)
