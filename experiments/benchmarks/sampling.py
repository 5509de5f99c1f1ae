r"""Sampling suite: one `sample` call (one decode step) for B = 32 rows of Qwen3's vocabulary.

python scripts/benchmark.py --suite=sampling [--quick] [--repeats=5]

B = 32, V = 151936, float32, one CPU device; every row of a case has the same settings.
Logits are either `peaked` (Zipf-like, p ~ rank^-1.5, the top 256 tokens hold ~95% of the
mass, as at most LM positions) or `flat` (standard normal: a top-p 0.9 nucleus of tens of
thousands of tokens, which makes top-p take the bisection path). `seconds` is the fastest of
`--repeats` interleaved calls (the machine is shared). `sort_ref` times a bare jnp.sort of the
logits, the cost a sort-based top-p would add.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.common import print_load, report, time_interleaved
from qwen3_jax.infer.sampling import SamplingParams, row_params, sample

CASES = {  # name: (settings of every row, logits, penalties, top_n)
  "greedy": (SamplingParams.greedy(), "peaked", False, 0),
  "temperature_1": (SamplingParams(), "peaked", False, 0),
  "top_p_0.9": (SamplingParams(top_p=0.9), "peaked", False, 0),
  "top_p_0.9_flat": (SamplingParams(top_p=0.9), "flat", False, 0),
  "qwen3_thinking": (SamplingParams.qwen3(thinking=True), "peaked", False, 0),
  "qwen3_penalties_top5": (
    SamplingParams.qwen3(thinking=False, presence_penalty=0.5, frequency_penalty=0.2),
    "peaked",
    True,
    5,
  ),  # fmt: skip
}


def _logits(kind: str, b: int, v: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  if kind == "flat":
    return rng.standard_normal((b, v)).astype(np.float32)
  ranks = np.stack([rng.permutation(v) for _ in range(b)]) + 1
  return (-1.5 * np.log(ranks) + 0.1 * rng.standard_normal((b, v))).astype(np.float32)


def run(flags) -> list[dict]:
  b, v = (8, 16384) if flags.quick else (32, 151936)
  print_load("at start")
  fn = jax.jit(sample, static_argnames=("top_n",))
  calls = {}
  index = jnp.zeros((b,), jnp.int32)
  counts = jnp.asarray(np.random.default_rng(1).integers(0, 2, (b, v)), jnp.int32)
  for name, (params, kind, penalties, top_n) in CASES.items():
    args = (jnp.asarray(_logits(kind, b, v)), row_params([params] * b, [0] * b, b), index)
    args += (counts if penalties else None,)
    call = functools.partial(fn, *args, top_n=top_n)
    jax.block_until_ready(call())  # compile
    calls[name] = lambda call=call: jax.block_until_ready(call())
  sort = jax.jit(lambda x: jnp.sort(x, -1))
  flat = jnp.asarray(_logits("flat", b, v))
  calls["sort_ref"] = lambda: jax.block_until_ready(sort(flat))
  times = time_interleaved(calls, repeats=flags.repeats)
  rows = [
    dict(suite="sampling", case=name, batch=b, vocab=v, seconds=float(np.min(t)))
    for name, t in times.items()
  ]
  report(rows, ["case", "batch", "vocab", "seconds"])
  print_load("at end")
  return rows
