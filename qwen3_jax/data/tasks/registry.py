"""The task families by name, deterministic train / held-out task lists, and the calls that
dispatch on a task's family (reward, gold reply, the conversation to render)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from qwen3_jax.data import chat
from qwen3_jax.data.tasks import (
  arithmetic,
  countdown,
  flight_tools,
  formats,
  parity,
  reverse_words,
  unit_tools,
)
from qwen3_jax.data.tasks.base import (
  LEVELS,
  SPLITS,
  Family,
  Task,
  ToolEnv,
  ToolTask,
  normalise_prompt,
  split_of,
)

FAMILIES: dict[str, Family] = {
  f.name: f
  for f in (
    arithmetic.FAMILY,
    countdown.FAMILY,
    reverse_words.FAMILY,
    parity.FAMILY,
    formats.FAMILY,
    unit_tools.FAMILY,
    flight_tools.FAMILY,
  )
}
reasoning_families = tuple(n for n, f in FAMILIES.items() if f.kind == "reasoning")
format_families = tuple(n for n, f in FAMILIES.items() if f.kind == "format")
tool_families = tuple(n for n, f in FAMILIES.items() if f.kind == "tool")

Difficulty = int | Sequence[int] | Mapping[int, float]


def _family(name: str) -> Family:
  if name not in FAMILIES:
    raise KeyError(f"unknown task family {name!r}; families: {', '.join(FAMILIES)}")
  return FAMILIES[name]


def make_split(
  family: str,
  split: str,
  n: int,
  difficulty: Difficulty = LEVELS,
  seed: int = 0,
  unique: bool = True,
) -> list[Task]:
  """`n` tasks of one family from one split; the same list for the same arguments, anywhere.

  The generator is seeded with `(family, split, seed, difficulty)`, so the two splits (and
  two difficulty settings) draw different streams; on top of that, a drawn task is kept only
  when `split_of(prompt)` names this split, which makes the splits disjoint by prompt
  whatever the seeds.

  Args:
    family: a key of `FAMILIES`.
    split: "train" or "heldout".
    n: how many tasks.
    difficulty: a level (1-4); a sequence of levels, taken in turn (task i has level
      `difficulty[i % len]`); or a mapping level -> weight, drawn at random.
    seed: picks another list of the same split.
    unique: no two tasks with the same prompt (case and whitespace aside). Raises ValueError
      when the split runs out of distinct prompts at that level.

  Returns:
    The tasks, in order.
  """
  fam = _family(family)
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if isinstance(difficulty, int):
    difficulty = (difficulty,)
  if isinstance(difficulty, Mapping):
    levels, weights = list(difficulty), list(difficulty.values())
  else:
    levels, weights = list(difficulty), None
  if not levels or any(level not in LEVELS for level in levels):
    raise ValueError(f"difficulty levels must be in {LEVELS}, got {levels}")
  # str seeds hash with SHA-512: the same stream everywhere; one per (family, split, levels).
  rng = random.Random(f"{family}|{split}|{seed}|{levels}|{weights}")
  out, seen = [], set()
  budget = 200 * n + 2000
  while len(out) < n:
    budget -= 1
    if budget < 0:
      raise ValueError(
        f"{family} ({split}, difficulty {difficulty}) ran out of distinct prompts after "
        f"{len(out)} of {n}; ask for fewer, mix in other levels, or pass unique=False"
      )
    level = rng.choices(levels, weights)[0] if weights else levels[len(out) % len(levels)]
    task = fam.sample(rng, level)
    if split_of(task.prompt) != split:
      continue
    key = normalise_prompt(task.prompt)
    if unique and key in seen:
      continue
    seen.add(key)
    out.append(task)
  return out


def reward(task: Task, completion: str, env: ToolEnv | None = None) -> float:
  """The family's verifier: a reward in [0, 1] for a generated reply.

  Args:
    task: the task.
    completion: the assistant's reply text (what follows `<|im_start|>assistant\\n`; for tool
      tasks, the final reply, after the last tool response).
    env: for tool tasks, the `ToolEnv` the reply's tool calls ran in (see each tool family
      for when it is required); ignored by the other families.
  """
  fam = _family(task.family)
  return fam.reward(task, completion, env) if fam.kind == "tool" else fam.reward(task, completion)


def gold(task: Task) -> list[dict]:
  """The gold assistant turns after the user's: one message for reasoning and format tasks;
  tool calls, tool results and the final answer for tool tasks (the tools really run)."""
  out = _family(task.family).gold(task)
  return out if isinstance(out, list) else [out]


def messages(task: Task, with_gold: bool = True) -> list[dict]:
  """The conversation: the user's prompt, then (with `with_gold`) the gold turns."""
  user = [{"role": "user", "content": task.prompt}]
  return user + gold(task) if with_gold else user


def tools(task: Task) -> list[dict] | None:
  """The tool specs to render with the task (None for tasks without tools)."""
  return task.tool_specs() if isinstance(task, ToolTask) else None


def render_gold(task: Task) -> str:
  """The whole gold conversation as chat text (Qwen3 template, tools block included)."""
  return chat.render(messages(task), tools=tools(task))
