"""Parity of a bit string: "Is the number of 1s in 10110 even or odd?" -> "odd".

Difficulty (length of the bit string): 1: 5-9;  2: 10-13;  3: 14-17;  4: 18-24.
Answer: "even" or "odd" (lowercase, nothing else).
"""

from __future__ import annotations

import random

from qwen3_jax.data.tasks.base import Family, Task, assistant, final_answer

NAME = "parity"
_LEVELS = {1: (5, 9), 2: (10, 13), 3: (14, 17), 4: (18, 24)}


def _word(k: int) -> str:
  return "even" if k % 2 == 0 else "odd"


def sample(rng: random.Random, difficulty: int) -> Task:
  bits = "".join(rng.choice("01") for _ in range(rng.randint(*_LEVELS[difficulty])))
  prompt = f"Is the number of 1s in {bits} even or odd?"
  return Task(NAME, difficulty, prompt, _word(bits.count("1")), {"bits": bits})


def reward(task: Task, completion: str) -> float:
  """1 when the content is exactly the right word, else 0."""
  return float(final_answer(completion) == task.answer)


def gold(task: Task) -> dict:
  bits = task.meta["bits"]
  count, running = 0, []
  for b in bits:
    count += b == "1"
    running.append(f"{b}:{count}")
  ones, zeros = bits.count("1"), bits.count("0")
  lines = [
    f"Count the 1s bit by bit (bit:count so far): {' '.join(running)}.",
    f"That is {ones} ones, and {ones} is {_word(ones)}.",
    f"Check: {ones} ones + {zeros} zeros = {ones + zeros} bits, the length of {bits}.",
  ]
  return assistant("\n".join(lines), task.answer)


FAMILY = Family(NAME, "reasoning", sample, reward, gold)
