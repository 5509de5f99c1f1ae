"""Multi-step integer arithmetic with operator precedence: "What is 3 + 4 * (5 - 2)?" -> "15".

Difficulty (operations, operand range, largest |value| of any step, parentheses):
  1: 2 ops, 1-9, 100, none, no negative step values;  2: 3 ops, 1-20, 500, none;
  3: 3 ops, 1-30, 2000, at least one pair;            4: 4-5 ops, 1-60, 10000, at least one pair.
Answer: the integer, e.g. "15" or "-13".
"""

from __future__ import annotations

import random

from qwen3_jax.data.tasks import expr
from qwen3_jax.data.tasks.base import Family, Task, assistant, final_answer, read_int

NAME = "arithmetic"
# level -> (ops (fewest, most), largest operand, largest |step value|, parentheses)
_LEVELS = {1: ((2, 2), 9, 100, False), 2: ((3, 3), 20, 500, False)}
_LEVELS |= {3: ((3, 3), 30, 2000, True), 4: ((4, 5), 60, 10_000, True)}


def sample(rng: random.Random, difficulty: int) -> Task:
  (lo, hi), top, bound, parens = _LEVELS[difficulty]
  while True:
    n_ops = rng.randint(lo, hi)
    leaves = [rng.randint(1, top) for _ in range(n_ops + 1)]
    if parens:
      text = expr.render(expr.random_tree(rng, leaves))
      if "(" not in text:
        continue
    else:
      ops = [rng.choice("+-*") for _ in range(n_ops)]
      text = (
        " ".join(f"{a} {op}" for a, op in zip(leaves[:-1], ops, strict=True)) + f" {leaves[-1]}"
      )
    tree = expr.parse(text)
    steps = expr.values(tree)
    if max(abs(v) for v in steps) > bound or (difficulty == 1 and min(steps) < 0):
      continue
    value = expr.evaluate(tree)
    return Task(NAME, difficulty, f"What is {text}?", str(value), {"expression": text})


def reward(task: Task, completion: str) -> float:
  """1 when the reply's content is exactly the right integer, else 0."""
  return float(read_int(final_answer(completion)) == int(task.answer))


def gold(task: Task) -> dict:
  text = task.meta["expression"]
  lines = [f"Compute {text}: parentheses first, then *, then + and - from left to right."]
  steps = expr.reduce_steps(expr.parse(text))
  for step in steps:
    tail = f", leaving {step.rest}." if step.rest != expr.render(step.value) else "."
    lines.append(f"{step.kind.capitalize()}: {step.text()}{tail}")
  lines.append(_check(steps[-1]))
  lines.append(f"So the answer is {task.answer}.")
  return assistant("\n".join(lines), task.answer)


def _check(step: expr.Step) -> str:
  """A second way to the last step's result, e.g. "Check: 15 - 12 = 3, which is 3 again."."""
  r = expr.render
  a, b, v = step.a, step.b, step.value
  if step.op == "+":
    return f"Check: {r(v)} - {r(b)} = {v - b}, which is {a} again."
  if step.op == "-":
    return f"Check: {r(v)} + {r(b)} = {v + b}, which is {a} again."
  return f"Check: {r(a)} * {r(b - 1)} + {r(a)} = {r(a * (b - 1))} + {r(a)} = {v}, the same."


FAMILY = Family(NAME, "reasoning", sample, reward, gold)
