"""The embedded default corpus: needs no download, the same on every machine with Python.

Two parts, interleaved deterministically:
  * real text: the Python standard library's own source files (code, comments, docstrings);
  * generated reasoning tasks (arithmetic, countdown, string reversal, parity) written as Qwen3
    chat transcripts (`chat.render`) with a `<think>` block, so a pretrained model has seen the
    chat format it will be fine-tuned and prompted in.
"""

from __future__ import annotations

import itertools
import os
import random
import sysconfig

from qwen3_jax.data import chat


def stdlib_documents(max_bytes: int) -> list[str]:
  """Python stdlib source files in sorted path order, up to `max_bytes` in total."""
  root = sysconfig.get_paths()["stdlib"]
  skip = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "turtledemo"}
  docs, total = [], 0
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip)
    for name in sorted(filenames):
      if not name.endswith(".py"):
        continue
      try:
        with open(os.path.join(dirpath, name), encoding="utf-8") as f:
          text = f.read()
      except (OSError, UnicodeDecodeError):
        continue
      if len(text) < 200:
        continue
      docs.append(text)
      total += len(text)
      if total >= max_bytes:
        return docs
  if not docs:
    raise FileNotFoundError(f"No Python standard library sources found under {root}")
  return docs


# ----------------------------------------------------------------------------- tasks


def _arithmetic(rng: random.Random):
  a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
  q = f"What is {a} + {b} * {c}?"
  think = f"Multiplication first: {b} * {c} = {b * c}. Then {a} + {b * c} = {a + b * c}."
  return q, think, str(a + b * c)


def _countdown(rng: random.Random):
  while True:
    nums = [rng.randint(1, 12) for _ in range(3)]
    ops = [("+", lambda x, y: x + y), ("-", lambda x, y: x - y), ("*", lambda x, y: x * y)]
    (o1, f1), (o2, f2) = rng.choice(ops), rng.choice(ops)
    a, b, c = nums
    target = f2(f1(a, b), c)
    if 1 <= target <= 200:
      break
  q = f"Using the numbers {nums} once each with + - *, reach {target}."
  think = f"Try ({a} {o1} {b}) = {f1(a, b)}; then {f1(a, b)} {o2} {c} = {target}. That works."
  return q, think, f"({a} {o1} {b}) {o2} {c} = {target}"


def _reverse(rng: random.Random):
  word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
  q = f"Reverse the string '{word}'."
  think = "Read it from the last letter to the first: " + " ".join(reversed(word)) + "."
  return q, think, word[::-1]


def _parity(rng: random.Random):
  bits = "".join(rng.choice("01") for _ in range(rng.randint(4, 12)))
  ones = bits.count("1")
  q = f"Is the number of 1s in {bits} even or odd?"
  think = f"Counting the 1s gives {ones}, which is {'even' if ones % 2 == 0 else 'odd'}."
  return q, think, "even" if ones % 2 == 0 else "odd"


TASKS = {"arithmetic": _arithmetic, "countdown": _countdown, "reverse": _reverse, "parity": _parity}


def reasoning_transcripts(n: int, seed: int) -> list[str]:
  """`n` chat transcripts of generated tasks, with the reasoning in a <think> block."""
  rng = random.Random(seed)
  names = sorted(TASKS)
  out = []
  for i in range(n):
    q, think, answer = TASKS[names[i % len(names)]](rng)
    msgs = [
      {"role": "user", "content": q},
      {"role": "assistant", "reasoning_content": think, "content": answer},
    ]
    out.append(chat.render(msgs))
  return out


def embedded_corpus(max_bytes: int, num_tasks: int, seed: int = 0) -> list[str]:
  """Stdlib sources with a batch of task transcripts after each file (deterministic)."""
  code = stdlib_documents(max_bytes)
  tasks = reasoning_transcripts(num_tasks, seed)
  per = max(1, -(-len(tasks) // max(len(code), 1)))
  chunks = [tasks[i : i + per] for i in range(0, len(tasks), per)]
  docs = []
  for c, t in itertools.zip_longest(code, chunks):
    if c is not None:
      docs.append(c)
    docs.extend(t or [])
  return docs
