"""Verifiable task families for post-training and evaluation.

Families (`FAMILIES`; module docstrings define each difficulty level, 1 easiest to 4):
  reasoning (`reasoning_families`): `arithmetic` (multi-step integer arithmetic with
    precedence; parentheses at 3-4), `countdown` (reach a target with + - *, each number at
    most once), `reverse_words` (reverse a word list), `parity` (even or odd count of 1s);
  format (`format_families`): `format` (JSON with a given key, exactly N words, all
    lowercase, a given first word; stacked by level);
  tool (`tool_families`): `unit_tools` (convert units, then compute: 1-3 calls to
    `convert_units` / `calculator`), `flight_tools` (search flights, email the cheapest:
    1-3 calls to `search_flights` / `send_email`, judged by the outbox).

Answer convention, the same for every family: the answer is the reply's *content*, i.e. the
text after `</think>` as `chat.parse` reads it (tool calls removed), stripped of surrounding
whitespace, and nothing else: "15", "(3 + 5) * 2", "red sun cat", "odd",
`{"note": "deep blue sea."}`, "4.42", "DL456". In a non-thinking reply (empty think block) it
is the whole reply. A reply cut off inside `<think>` has no content and scores 0. A tool task's
answer is the content of the final reply, after the last tool response.

Each family has `sample(rng, difficulty) -> Task`, `reward(task, completion) -> float in
[0, 1]` (tool families: `reward(task, completion, env)`, `env` the `ToolEnv` whose tools the
reply's calls ran through), and `gold(task)`: a worked, self-checked assistant message
(`reasoning_content` + `content`), or for tool tasks the gold turns with tool calls and the
results of running them. The registry dispatches: `reward`, `gold`, `messages`, `tools`,
`render_gold`.

Splits: `make_split(family, "train" | "heldout", n, difficulty, seed)` is deterministic. The
two splits draw from differently seeded generators, and a task is kept only when
`split_of(prompt)` (SHA-256 of the normalised prompt; one prompt in 8 is held out) names the
split, so no held-out prompt is ever in a train list, whichever generator drew it. The
pretraining corpus (`data/corpus.py`) draws from the train split only.
"""

from qwen3_jax.data.tasks.base import (
  HELDOUT_BUCKETS,
  LEVELS,
  SPLITS,
  Family,
  Task,
  ToolEnv,
  ToolTask,
  final_answer,
  normalise_prompt,
  split_hash,
  split_of,
)
from qwen3_jax.data.tasks.registry import (
  FAMILIES,
  format_families,
  gold,
  make_split,
  messages,
  reasoning_families,
  render_gold,
  reward,
  tool_families,
  tools,
)

__all__ = [
  "FAMILIES",
  "HELDOUT_BUCKETS",
  "LEVELS",
  "SPLITS",
  "Family",
  "Task",
  "ToolEnv",
  "ToolTask",
  "final_answer",
  "format_families",
  "gold",
  "make_split",
  "messages",
  "normalise_prompt",
  "reasoning_families",
  "render_gold",
  "reward",
  "split_hash",
  "split_of",
  "tool_families",
  "tools",
]
