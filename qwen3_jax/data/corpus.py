"""The embedded default corpus: needs no download, the same on every machine with Python.

Two parts, interleaved deterministically:
  * real text: the Python standard library's own source files (code, comments, docstrings);
  * generated reasoning tasks (`qwen3_jax.data.tasks`: arithmetic, countdown, word-list
    reversal, parity), from the train split only, written as Qwen3 chat transcripts
    (`chat.render`) with the gold worked reasoning in a `<think>` block, so a pretrained model
    has seen the chat format it will be fine-tuned and prompted in, and no held-out prompt.
"""

from __future__ import annotations

import itertools
import os
import sysconfig

from qwen3_jax.data import tasks


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


def corpus_tasks(n: int, seed: int, families: tuple[str, ...] = ()) -> list[tasks.Task]:
  """`n` tasks of `families` (default `tasks.reasoning_families`; taken in turn, levels 1-4
  in turn), all from the train split: no held-out prompt ever reaches the corpus."""
  names = tuple(families) or tasks.reasoning_families
  unknown = sorted(set(names) - set(tasks.FAMILIES))
  if unknown:
    raise ValueError(f"unknown task families {unknown}; known: {sorted(tasks.FAMILIES)}")
  per = -(-n // len(names))
  lists = [tasks.make_split(f, "train", per, tasks.LEVELS, seed, unique=False) for f in names]
  return [lists[i % len(names)][i // len(names)] for i in range(n)]


def task_transcripts(n: int, seed: int, families: tuple[str, ...] = ()) -> list[str]:
  """`n` chat transcripts of `corpus_tasks`: the prompt, then the gold reply with its
  worked reasoning in a <think> block."""
  return [tasks.render_gold(t) for t in corpus_tasks(n, seed, families)]


def embedded_corpus(
  max_bytes: int, num_tasks: int, seed: int = 0, families: tuple[str, ...] = ()
) -> list[str]:
  """Stdlib sources with a batch of task transcripts (of `families`, default the reasoning
  ones) after each file (deterministic)."""
  code = stdlib_documents(max_bytes)
  chats = task_transcripts(num_tasks, seed, families)
  per = max(1, -(-len(chats) // max(len(code), 1)))
  chunks = [chats[i : i + per] for i in range(0, len(chats), per)]
  docs = []
  for c, t in itertools.zip_longest(code, chunks):
    if c is not None:
      docs.append(c)
    docs.extend(t or [])
  return docs
