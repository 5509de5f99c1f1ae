"""Reverse a list of words: "Reverse the order of the words: cat sun red" -> "red sun cat".

Difficulty (number of words, all different, drawn from 64 short common words):
  1: 3;  2: 4-5;  3: 6-7;  4: 8-10.
Answer: the words in reverse order separated by single spaces (compared word by word, so the
spacing is free; case and punctuation are not).
"""

from __future__ import annotations

import random

from qwen3_jax.data.tasks.base import Family, Task, assistant, final_answer

NAME = "reverse_words"
WORDS = (
  "cat dog sun red sky sea map cup box key pen hat car bus egg ice tea ink oak owl fox "
  "bee ant cow pig hen elk yak jam pie bun nut fig cod eel ram "
  "blue gold pink gray green black white lamp rock leaf tree bird fish moon star rain snow "
  "wind fire milk salt rice corn door"
).split()
_LEVELS = {1: (3, 3), 2: (4, 5), 3: (6, 7), 4: (8, 10)}


def sample(rng: random.Random, difficulty: int) -> Task:
  words = rng.sample(WORDS, rng.randint(*_LEVELS[difficulty]))
  prompt = "Reverse the order of the words: " + " ".join(words)
  return Task(NAME, difficulty, prompt, " ".join(reversed(words)), {"words": words})


def reward(task: Task, completion: str) -> float:
  """1 when the content's words are the reversed list, else 0."""
  return float(final_answer(completion).split() == task.answer.split())


def gold(task: Task) -> dict:
  words = task.meta["words"]
  n = len(words)
  lines = [f"There are {n} words: " + ", ".join(f"{i} {w}" for i, w in enumerate(words, 1)) + "."]
  lines.append(
    f"Reading them from number {n} down to 1: "
    + ", ".join(f"{i} {words[i - 1]}" for i in range(n, 0, -1))
    + "."
  )
  out = task.answer.split()
  lines.append(
    f"Check: {len(out)} words out, as many as in; the first word, {words[0]}, is now last, "
    f"and the last, {words[-1]}, is now first."
  )
  return assistant("\n".join(lines), task.answer)


FAMILY = Family(NAME, "reasoning", sample, reward, gold)
