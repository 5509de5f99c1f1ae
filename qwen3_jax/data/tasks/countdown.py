"""Countdown: reach a target from given numbers with + - * and parentheses, each number used at
most once. "Reach 16 with 3, 5, 2 ..." -> "(3 + 5) * 2".

Difficulty (numbers given, their range, largest target):
  1: 2 numbers, 1-20, 200;  2: 3 numbers, 1-12, 200;  3: 4 numbers, 1-15, 500;
  4: 5 numbers, 1-20, 1000. The target is positive, not one of the numbers, and reachable
  (the gold expression uses every number once).
Answer: the expression, e.g. "(3 + 5) * 2"; a trailing "= 16" is allowed and ignored.
Reward: 1 when it evaluates to the target and uses each given number at most once; 0.1 when it
is well-formed (integers, + - *, parentheses) but wrong; 0 otherwise. The expression is read by
`expr.parse`, never `eval`.
"""

from __future__ import annotations

import collections
import random

from qwen3_jax.data.tasks import expr
from qwen3_jax.data.tasks.base import Family, Task, assistant, final_answer, read_int

NAME = "countdown"
WELL_FORMED = 0.1
# level -> (how many numbers, largest number, largest target)
_LEVELS = {1: (2, 20, 200), 2: (3, 12, 200), 3: (4, 15, 500), 4: (5, 20, 1000)}


def sample(rng: random.Random, difficulty: int) -> Task:
  count, top, max_target = _LEVELS[difficulty]
  while True:
    nums = [rng.randint(1, top) for _ in range(count)]
    tree = expr.random_tree(rng, nums)
    target = expr.evaluate(tree)
    if 1 <= target <= max_target and target not in nums:
      break
  shown = sorted(nums, key=lambda _: rng.random())  # the prompt's order is not the solution's
  listed = ", ".join(map(str, shown))
  prompt = f"Reach {target} with {listed} using + - * and parentheses, each number at most once."
  meta = {"numbers": shown, "target": target}
  return Task(NAME, difficulty, prompt, expr.render(tree), meta)


def check(task: Task, answer: str) -> float:
  """The reward of an answer text (the reply's content)."""
  lhs, eq, rhs = answer.partition("=")
  if eq and read_int(rhs) is None:
    return 0.0
  try:
    tree = expr.parse(lhs)
  except expr.ExprError:
    return 0.0
  used = collections.Counter(expr.literals(tree))
  fits = used <= collections.Counter(task.meta["numbers"])
  return 1.0 if fits and expr.evaluate(tree) == task.meta["target"] else WELL_FORMED


def reward(task: Task, completion: str) -> float:
  """1 for a correct expression, 0.1 for a well-formed wrong one, 0 otherwise (see above)."""
  return check(task, final_answer(completion))


def gold(task: Task) -> dict:
  target, nums = task.meta["target"], task.meta["numbers"]
  listed = ", ".join(map(str, nums))
  lines = [f"Target {target} from {listed}, each at most once, with + - *."]
  rng = random.Random(task.prompt)  # the same failed tries every time
  tries = 1 if task.difficulty <= 2 else 2
  for _ in range(50):
    if tries == 0:
      break
    pick = rng.sample(nums, rng.randint(min(2, len(nums)), len(nums)))
    attempt = expr.random_tree(rng, pick)
    v = expr.evaluate(attempt)
    if v != target:
      side = "high" if v > target else "low"
      lines.append(f"Try {_walk(attempt)}: {v} is {abs(v - target)} too {side}.")
      tries -= 1
  lines.append(f"Try {_walk(expr.parse(task.answer))}: that is the target.")
  lines.append(
    f"Check: {task.answer} = {target}, and it uses "
    + ", ".join(map(str, expr.literals(expr.parse(task.answer))))
    + ", each given and used once."
  )
  return assistant("\n".join(lines), task.answer)


def _walk(tree: expr.Node) -> str:
  return ", then ".join(s.text() for s in expr.reduce_steps(tree))


FAMILY = Family(NAME, "reasoning", sample, reward, gold)
