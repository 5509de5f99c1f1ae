"""Weighted rewards of a rollout (stage 2: correctness and overlong shaping; stage 4: all).

Terms (`score`), each computed on every rollout and weighted by `RewardWeights`:
  correctness  the task family's verifier on the final reply, in [0, 1] (tool tasks: task
               success, judged with the conversation's own `ToolEnv`, e.g. its outbox);
  format       1 when every reply is well formed: closed with `<|im_end|>`; in thinking mode
               exactly one `<think>...</think>` block opening the reply, in non-thinking mode
               no think tags (the empty block is the prompt's); every tool call readable; and
               the final reply has a non-empty answer (content). Else 0;
  flag         1 when every reply follows the user's flag: non-empty reasoning under `/think`
               (or no flag), none under `/no_think`. Else 0;
  tool_valid   tool tasks: the share of tool calls that ran without error (0 when the reply
               made none); 0 for other tasks;
  length       -(generated tokens / max_new_tokens), summed over replies, at most 1 in size;
  overlong     DAPO's soft overlong penalty of the longest reply (`grpo.overlong_penalty`).
The reward is sum_k weight_k * term_k. `passed` (the batch pass rate) is correctness == 1.
"""

from __future__ import annotations

import numpy as np

from qwen3_jax.data import chat
from qwen3_jax.data.tasks import ToolTask, final_answer, reward
from qwen3_jax.data.tokenizer import END_THINK, THINK
from qwen3_jax.rl import grpo
from qwen3_jax.rl.rollout import Rollout
from qwen3_jax.rl.run_config import RewardWeights

TERMS = ("correctness", "format", "flag", "tool_valid", "length", "overlong")


def well_formed(text: str, closed: bool, thinking: bool) -> bool:
  """One reply's format (module docstring), without the answer check."""
  if not closed:
    return False
  if thinking:
    body = text.lstrip()
    if not body.startswith(THINK) or text.count(THINK) != 1 or text.count(END_THINK) != 1:
      return False
  elif THINK in text or END_THINK in text:
    return False
  return all(c.error is None for c in chat.parse(text).tool_calls)


def follows_flag(text: str, thinking: bool) -> bool:
  """Reasoning present under /think, absent under /no_think."""
  has_reasoning = bool(chat.parse(text).reasoning.strip())
  return has_reasoning if thinking else not has_reasoning and THINK not in text


def score(r: Rollout, weights: RewardWeights, max_new_tokens: int) -> dict[str, float]:
  """Every term of `r`'s reward, `reward` (the weighted sum) and `passed` (module docstring)."""
  steps = r.transcript.steps
  thinking = r.prompt.thinking
  final = steps[-1].text if steps else ""
  closed = [s.finish_reason == "stop" for s in steps]
  terms = {"correctness": float(reward(r.prompt.task, final, r.env))}
  fmt = all(well_formed(s.text, c, thinking) for s, c in zip(steps, closed, strict=True))
  terms["format"] = float(bool(steps) and fmt and bool(final_answer(final)))
  terms["flag"] = float(bool(steps) and all(follows_flag(s.text, thinking) for s in steps))
  results = r.results
  valid = np.mean([res.ok for res in results]) if results else 0.0
  terms["tool_valid"] = float(valid) if isinstance(r.prompt.task, ToolTask) else 0.0
  generated = r.generated
  terms["length"] = -min(sum(generated) / max_new_tokens, 1.0)
  longest = max(generated, default=0)
  terms["overlong"] = float(
    grpo.overlong_penalty(
      np.asarray([longest]),
      max_len=max_new_tokens,
      cache=min(weights.overlong_cache, max_new_tokens),
    )[0]
  )
  total = sum(getattr(weights, k) * terms[k] for k in TERMS)
  return {**terms, "reward": float(total), "passed": float(terms["correctness"] >= 1.0)}
