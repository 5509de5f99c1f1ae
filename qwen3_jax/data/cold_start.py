"""Stage-1 (long-CoT cold start) SFT data: verified gold transcripts of train-split tasks.

`build_cold_start` draws tasks from the train split (`tasks.make_split`), writes each task's
gold conversation (`tasks.messages`: the user prompt, then the worked, self-checked assistant
turns; for tool families also the tool-call turns and the tool responses) and keeps it only
when `verify_gold` accepts it:
  * reasoning and format families: the gold reply, rendered as a thinking-mode completion
    (`<think>\\n{reasoning}\\n</think>\\n\\n{content}`), scores reward 1 under the family's own
    verifier;
  * tool families: every gold tool call is run again in a fresh `ToolEnv`, its result must equal
    the tool response written in the transcript, and the final reply must score 1 with that
    env (the verifier of `flight_tools` reads the outbox the replayed calls filled).
Transcripts longer than `max_tokens` (when a tokenizer is given) are left out and counted
too: an SFT row with `loss_on="assistant"` that does not fit `seq_len + 1` would be dropped by
the packer anyway, so the builder says so up front.

Rows are `{"messages": [...], "tools": [...] (tool families only), "family", "difficulty"}`,
what `DataConfig(sources=(path,), loss_on="assistant")` reads: the loss then covers the
assistant's own tokens only (reasoning, answer, tool calls), never the prompt, the tools block
or a tool response. User turns carry no `/think` flag: thinking is the default mode.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Sequence

from tokenizers import Tokenizer

from qwen3_jax.data import chat, tasks
from qwen3_jax.data.tokenizer import END_THINK, THINK


@dataclasses.dataclass
class BuildStats:
  """Per-family counts of a build: drawn, written and rejected (by reason)."""

  drawn: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  written: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  rejected: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
  max_tokens: int = 0  # longest written transcript, in tokens (0 without a tokenizer)

  def to_dict(self) -> dict:
    return {
      "drawn": dict(self.drawn),
      "written": dict(self.written),
      "rejected": {f: len(r) for f, r in self.rejected.items()},
      "rejections": {f: r[:5] for f, r in self.rejected.items()},
      "max_tokens": self.max_tokens,
    }


def thinking_completion(message: dict) -> str:
  """An assistant message as the text a thinking-mode reply would be (what verifiers read)."""
  reasoning = (message.get("reasoning_content") or "").strip("\n")
  return f"{THINK}\n{reasoning}\n{END_THINK}\n\n{message.get('content') or ''}"


def verify_gold(task: tasks.Task, turns: Sequence[dict]) -> str | None:
  """None when the gold turns check out (see the module docstring), else why not."""
  final = turns[-1]
  if final.get("role") != "assistant" or final.get("tool_calls"):
    return "the transcript does not end with an assistant answer"
  if not isinstance(task, tasks.ToolTask):
    score = tasks.reward(task, thinking_completion(final))
    return None if score == 1.0 else f"gold reply scores {score}"
  env = task.env()
  pending = []
  for m in turns[:-1]:
    if m["role"] == "assistant":
      pending += m.get("tool_calls") or []
    elif m["role"] == "tool":
      if not pending:
        return "a tool response answers no call"
      fn = pending.pop(0)["function"]
      result = env.execute(fn["name"], fn["arguments"])
      if not result.ok or result.content != m["content"]:
        return (
          f"replayed {fn['name']} gives {result.content!r:.80}, transcript {m['content']!r:.80}"
        )
  if pending:
    return f"{len(pending)} tool call(s) without a response"
  score = tasks.reward(task, thinking_completion(final), env)
  return None if score == 1.0 else f"gold reply scores {score} after replaying its calls"


def build_cold_start(
  families: Sequence[str],
  per_family: int,
  difficulty: tasks.registry.Difficulty = tasks.LEVELS,
  seed: int = 1,
  tokenizer: Tokenizer | None = None,
  max_tokens: int = 0,
) -> tuple[list[dict], BuildStats]:
  """Verified gold SFT rows from the train split.

  Args:
    families: task families (keys of `tasks.FAMILIES`).
    per_family: tasks drawn per family (levels taken in turn, see `tasks.make_split`).
    difficulty: levels, as `make_split` takes them.
    seed: the train list to draw (stage 2 should draw with another seed).
    tokenizer: with `max_tokens` > 0, transcripts of more tokens (`<|endoftext|>` included)
      are rejected.
    max_tokens: the longest transcript kept (0 = no limit).

  Returns:
    (rows, stats); rows in family order, then task order.
  """
  if per_family < 1:
    raise ValueError(f"per_family must be >= 1, got {per_family}")
  if max_tokens and tokenizer is None:
    raise ValueError("max_tokens needs a tokenizer to count tokens with")
  rows, stats = [], BuildStats()
  for family in families:
    for task in tasks.make_split(family, "train", per_family, difficulty, seed):
      stats.drawn[family] += 1
      turns = tasks.gold(task)
      why = verify_gold(task, turns)
      row = {"messages": [{"role": "user", "content": task.prompt}, *turns]}
      if specs := tasks.tools(task):
        row["tools"] = specs
      if why is None and tokenizer is not None:
        n = len(tokenizer.encode(chat.render(row["messages"], row.get("tools"))).ids) + 1
        if max_tokens and n > max_tokens:
          why = f"{n} tokens > max_tokens={max_tokens}"
        else:
          stats.max_tokens = max(stats.max_tokens, n)
      if why is not None:
        stats.rejected[family].append(f"{task.prompt[:60]!r}: {why}")
        continue
      stats.written[family] += 1
      rows.append({**row, "family": family, "difficulty": task.difficulty})
  return rows, stats


def write_jsonl(rows: Sequence[dict], path: str) -> None:
  """One JSON object per line (UTF-8, non-ASCII kept)."""
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
