"""Batched sampling of rendered chat prompts through the generation engine.

`EngineSampler` turns P prompt texts into P x n `Completion`s with ONE `Engine.generate` call
(the engine's continuous batching keeps `batch_size` rows busy), with Qwen3's sampling preset
for the mode (`SamplingParams.qwen3`) unless temperature / top-p / top-k are given. Request i
samples with seed `seed + i` and sample indices 0..n-1 (the engine's randomness depends on
those and the token index only), so the same prompts give the same texts in any batch.
It is also a `fusion.Sampler` (`sampler(prompts) -> texts`), for rejection sampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from qwen3_jax.infer.engine import Completion, Engine, Request
from qwen3_jax.infer.sampling import SamplingParams, fold_seed


@dataclasses.dataclass
class EngineSampler:
  """Samples `n` replies per prompt from `engine`.

  Attributes:
    engine: the generation engine (model + tokenizer).
    n: samples per prompt.
    max_new_tokens: most tokens per reply.
    seed: base seed (request i uses seed + i).
    temperature, top_p, top_k: override Qwen3's preset for the mode when not None.
    batch_size: engine rows (None = all rows at once).
  """

  engine: Engine
  n: int = 4
  max_new_tokens: int = 512
  seed: int = 0
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  batch_size: int | None = 64

  def params(self, thinking: bool, i: int) -> SamplingParams:
    """Request i's sampling settings in the given mode."""
    given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
    overrides = {k: v for k, v in given.items() if v is not None}
    return SamplingParams.qwen3(thinking, seed=fold_seed(self.seed + i), **overrides)

  def completions(
    self, prompts: Sequence[str], *, thinking: bool = True, thinking_budget: int | None = None
  ) -> list[list[Completion]]:
    """n completions per prompt (one engine call). `thinking` picks the sampling preset;
    the prompt text itself decides whether the reply opens a think block."""
    if not prompts:
      return []
    reqs = [
      Request(
        p,
        sampling=self.params(thinking and thinking_budget != 0, i),
        max_new_tokens=self.max_new_tokens,
        n=self.n,
        thinking_budget=thinking_budget,
      )
      for i, p in enumerate(prompts)
    ]
    rows = len(reqs) * self.n
    return self.engine.generate(reqs, batch_size=min(rows, self.batch_size or rows))

  def __call__(self, prompts: list[str]) -> list[list[str]]:
    """Thinking-mode reply texts, n per prompt (the `fusion.Sampler` protocol)."""
    return [[c.text for c in cs] for cs in self.completions(prompts, thinking=True)]
