"""Integer expressions over + - * and parentheses: a safe parser (no `eval`), evaluation,
rendering with the fewest parentheses, and a step-by-step reduction for worked solutions.

A tree is an `int` (a literal) or a tuple `(op, left, right)` with `op` in "+-*".
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple

Node = int | tuple  # int, or (op, left, right)

MAX_CHARS = 200  # longer text is refused before parsing
MAX_DEPTH = 32
_TOKEN_RE = re.compile(r"\s*([0-9]+|[-+*()])")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


class ExprError(ValueError):
  """The text is not an expression of non-negative integers, + - * and parentheses."""


def parse(text: str) -> Node:
  """Parses `text` (e.g. "(3 + 5) * 2") into a tree; raises `ExprError` otherwise.

  Grammar: expr := term (("+" | "-") term)*; term := atom ("*" atom)*;
  atom := digits | "(" expr ")". No unary signs, no other operators; whitespace is free.
  """
  if len(text) > MAX_CHARS:
    raise ExprError(f"longer than {MAX_CHARS} characters")
  tokens, pos = [], 0
  text = text.rstrip()
  while pos < len(text):
    m = _TOKEN_RE.match(text, pos)
    if m is None:
      raise ExprError(f"unexpected character {text[pos:].lstrip()[:1]!r}")
    tokens.append(m.group(1))
    pos = m.end()
  if not tokens:
    raise ExprError("empty expression")
  node, i = _expr(tokens, 0, 0)
  if i != len(tokens):
    raise ExprError(f"unexpected {tokens[i]!r}")
  return node


def _expr(tokens: list[str], i: int, depth: int) -> tuple[Node, int]:
  node, i = _term(tokens, i, depth)
  while i < len(tokens) and tokens[i] in "+-":
    op = tokens[i]
    right, i = _term(tokens, i + 1, depth)
    node = (op, node, right)
  return node, i


def _term(tokens: list[str], i: int, depth: int) -> tuple[Node, int]:
  node, i = _atom(tokens, i, depth)
  while i < len(tokens) and tokens[i] == "*":
    right, i = _atom(tokens, i + 1, depth)
    node = ("*", node, right)
  return node, i


def _atom(tokens: list[str], i: int, depth: int) -> tuple[Node, int]:
  if depth > MAX_DEPTH:
    raise ExprError("too deeply nested")
  if i >= len(tokens):
    raise ExprError("expression ends too early")
  tok = tokens[i]
  if tok[0] in "0123456789":
    return int(tok), i + 1
  if tok == "(":
    node, i = _expr(tokens, i + 1, depth + 1)
    if i >= len(tokens) or tokens[i] != ")":
      raise ExprError("unclosed parenthesis")
    return node, i + 1
  raise ExprError(f"unexpected {tok!r}")


def evaluate(node: Node) -> int:
  if isinstance(node, int):
    return node
  op, a, b = node
  a, b = evaluate(a), evaluate(b)
  return a + b if op == "+" else a - b if op == "-" else a * b


def literals(node: Node) -> list[int]:
  """The numbers written in the expression, left to right."""
  return [node] if isinstance(node, int) else literals(node[1]) + literals(node[2])


def values(node: Node) -> list[int]:
  """The value of every operation in the tree (post-order)."""
  if isinstance(node, int):
    return []
  return values(node[1]) + values(node[2]) + [evaluate(node)]


def render(node: Node) -> str:
  """The expression with only the parentheses the standard precedence needs (negative
  literals, which only reductions produce, are parenthesised)."""
  if isinstance(node, int):
    return str(node) if node >= 0 else f"({node})"
  op, a, b = node
  left, right = render(a), render(b)
  if _needs_parens(a, op, is_right=False):
    left = f"({left})"
  if _needs_parens(b, op, is_right=True):
    right = f"({right})"
  return f"{left} {op} {right}"


def _needs_parens(child: Node, op: str, is_right: bool) -> bool:
  if isinstance(child, int):
    return False
  inner, outer = _PRECEDENCE[child[0]], _PRECEDENCE[op]
  # a - (b + c) and a - (b - c) keep theirs; a + (b - c) reads the same without.
  return inner < outer or (is_right and inner == outer and op == "-")


def random_tree(rng: random.Random, leaves: list[int], ops: str = "+-*") -> Node:
  """A random binary tree over `leaves` in the given order, each inner node an op from `ops`."""
  if len(leaves) == 1:
    return leaves[0]
  cut = rng.randint(1, len(leaves) - 1)
  return (rng.choice(ops), random_tree(rng, leaves[:cut], ops), random_tree(rng, leaves[cut:], ops))


class Step(NamedTuple):
  """One operation of a reduction: `a op b = value`, and the whole expression after it."""

  kind: str  # "parentheses" (the operation sat inside parentheses), "multiply", "add", "subtract"
  op: str
  a: int
  b: int
  value: int
  rest: str

  def text(self) -> str:
    return f"{render(self.a)} {self.op} {render(self.b)} = {self.value}"


def reduce_steps(node: Node) -> list[Step]:
  """Evaluation one operation at a time: the leftmost operation whose operands are both numbers
  goes first (so parentheses and products before the sums around them, as by hand)."""
  steps = []
  while not isinstance(node, int):
    path = _leftmost_reducible(node)
    sub = _at(node, path)
    op, a, b = sub
    v = evaluate(sub)
    kind = {"*": "multiply", "+": "add", "-": "subtract"}[op]
    if path and _needs_parens(sub, _at(node, path[:-1])[0], is_right=path[-1] == 2):
      kind = "parentheses"
    node = _replace(node, path, v)
    steps.append(Step(kind, op, a, b, v, render(node)))
  return steps


def _leftmost_reducible(node: Node, path: tuple = ()) -> tuple:
  _, a, b = node
  if isinstance(a, int) and isinstance(b, int):
    return path
  if not isinstance(a, int):
    return _leftmost_reducible(a, path + (1,))
  return _leftmost_reducible(b, path + (2,))


def _at(node: Node, path: tuple) -> Node:
  for i in path:
    node = node[i]
  return node


def _replace(node: Node, path: tuple, value: int) -> Node:
  if not path:
    return value
  parts = list(node)
  parts[path[0]] = _replace(node[path[0]], path[1:], value)
  return tuple(parts)
