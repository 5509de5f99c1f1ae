"""Tool task: convert units, then compute, through `convert_units` and `calculator`.

"What is 12 ft + 30 in, in m? Round to 2 decimals." -> convert both, add them -> "4.42".

Difficulty (tool calls in the gold chain):
  1: one conversion ("How many m is 12 ft?"; temperatures too);
  2: a conversion, then a product or an equal split (2 calls);
  3: two conversions to a third unit, then their sum (3 calls);
  4: two conversions, then a difference divided by a number (3 calls).
Answer: the number rounded to 2 decimals, trailing zeros dropped ("4.42", "300"); any number
within 0.005 of the exact result scores 1, anything else 0. The verifier looks at the answer
only, so it needs no `ToolEnv`.
"""

from __future__ import annotations

import json
import random

from qwen3_jax.data.tasks.base import (
  Family,
  Task,
  ToolEnv,
  ToolTask,
  assistant,
  final_answer,
  fmt_decimal,
  read_number,
  tool_call,
  tool_message,
)
from qwen3_jax.infer.example_tools import calculate, convert_units

NAME = "unit_tools"
TOOLS = ("convert_units", "calculator")
TOLERANCE = 0.005 + 1e-9
_DIMENSIONS = {
  "length": ("mm", "cm", "m", "km", "in", "ft", "yd", "mi"),
  "mass": ("g", "kg", "lb", "oz", "t"),
  "time": ("s", "min", "h", "day", "week"),
}
_TEMPERATURES = ("C", "F", "K")


def _num(x: float) -> str:
  """A converted value as the tool printed it (JSON), for the calculator expression."""
  return json.dumps(x)


def _plan(rng: random.Random, difficulty: int) -> tuple[str, list[tuple], str]:
  """(prompt, conversions [(value, from, to)], calculator template over x0, x1 or "")."""
  if difficulty == 1:
    units = _TEMPERATURES if rng.random() < 0.2 else _DIMENSIONS[rng.choice(sorted(_DIMENSIONS))]
    u1, u2 = rng.sample(units, 2)
    v = rng.randint(1, 100)
    return f"How many {u2} is {v} {u1}? Round to 2 decimals.", [(v, u1, u2)], ""
  units = _DIMENSIONS[rng.choice(sorted(_DIMENSIONS))]
  if difficulty == 2:
    u1, u2 = rng.sample(units, 2)
    v, k = rng.randint(2, 100), rng.randint(2, 9)
    if rng.random() < 0.5:
      prompt = f"Split {v} {u1} into {k} equal parts. How many {u2} is each? Round to 2 decimals."
      return prompt, [(v, u1, u2)], f"{{x0}} / {k}"
    prompt = f"What is {k} times {v} {u1}, in {u2}? Round to 2 decimals."
    return prompt, [(v, u1, u2)], f"{{x0}} * {k}"
  u1, u2, u3 = rng.sample(units, 3)
  a, b = rng.randint(2, 100), rng.randint(2, 100)
  if difficulty == 3:
    prompt = f"What is {a} {u1} + {b} {u2}, in {u3}? Round to 2 decimals."
    return prompt, [(a, u1, u3), (b, u2, u3)], "{x0} + {x1}"
  k = rng.randint(2, 9)
  prompt = f"What is ({a} {u1} - {b} {u2}) / {k}, in {u3}? Round to 2 decimals."
  return prompt, [(a, u1, u3), (b, u2, u3)], f"({{x0}} - {{x1}}) / {k}"


def sample(rng: random.Random, difficulty: int) -> ToolTask:
  while True:
    prompt, conversions, template = _plan(rng, difficulty)
    xs = [convert_units(v, f, t)["value"] for v, f, t in conversions]
    expression = template.format(**{f"x{i}": _num(x) for i, x in enumerate(xs)})
    value = calculate(expression) if template else xs[0]
    if 0.1 <= value <= 1e6:  # not rounded away to 0, not a wall of digits
      break
  meta = {"conversions": conversions, "template": template, "expression": expression}
  meta["value"] = value
  return ToolTask(NAME, difficulty, prompt, fmt_decimal(value), meta, TOOLS)


def reward(task: Task, completion: str, env: ToolEnv | None = None) -> float:
  """1 when the final content is a number within 0.005 of the exact result, else 0."""
  x = read_number(final_answer(completion))
  return float(x is not None and abs(x - task.meta["value"]) <= TOLERANCE)


def gold(task: Task) -> list[dict]:
  """The gold turns after the user's, with the tool results from actually running the tools."""
  env = task.env()
  conversions, expression = task.meta["conversions"], task.meta["expression"]
  target = conversions[0][2]
  msgs = []
  plan = "convert it" if len(conversions) == 1 else f"convert both to {target}"
  if task.difficulty > 1:
    plan += ", then compute with the calculator"
  calls = [
    tool_call("convert_units", {"value": v, "from_unit": f, "to_unit": t})
    for v, f, t in conversions
  ]
  msgs.append(assistant(f"I need to {plan}.", "", calls))
  results = []
  for call in calls:
    result = env.run(call)
    msgs.append(tool_message(call, result))
    results.append(json.loads(result.content)["value"])
  said = " and ".join(
    f"{v} {f} = {_num(x)} {t}" for (v, f, t), x in zip(conversions, results, strict=True)
  )
  if task.difficulty > 1:
    call = tool_call("calculator", {"expression": expression})
    msgs.append(assistant(f"So {said}. Now the calculator: {expression}.", "", [call]))
    result = env.run(call)
    msgs.append(tool_message(call, result))
    value = float(result.content)
    done = f"The calculator gives {result.content}"
  else:
    value = results[0]
    done = f"So {said}"
  rough = _rough_check(task, results)
  msgs.append(
    assistant(f"{done}, which is {fmt_decimal(value)} to 2 decimals. {rough}", fmt_decimal(value))
  )
  return msgs


def _rough_check(task: Task, xs: list[float]) -> str:
  """Redo the last step by hand with 2-decimal values: the answer must come out close."""
  if task.difficulty == 1:
    (v, f, t), x = task.meta["conversions"][0], xs[0]
    return f"Check: {v} {f} is {fmt_decimal(x)} {t}, matching the tool."
  by_hand = task.meta["template"].format(**{f"x{i}": fmt_decimal(x) for i, x in enumerate(xs)})
  return f"Check: {by_hand} = {fmt_decimal(calculate(by_hand))}, close to the exact result."


FAMILY = Family(NAME, "tool", sample, reward, gold)
