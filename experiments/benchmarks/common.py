"""Timing, XLA cost analysis and reporting shared by the benchmark suites."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np


def compiled_cost(fn: Callable, *args) -> tuple[Callable, float, int]:
  """Compiles `jax.jit(fn)` for args. Returns (compiled, XLA-counted FLOPs, peak bytes)."""
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get("flops", float("nan")))
  peak = -1
  try:
    mem = compiled.memory_analysis()
    peak = int(
      mem.temp_size_in_bytes
      + mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
    )
  except Exception:  # Not every backend reports memory.
    pass
  return compiled, flops, peak


def time_fn(fn: Callable, *args, warmup: int = 1, repeats: int = 5) -> float:
  """Median wall-clock seconds of fn(*args), blocking on the result."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def report(rows: Sequence[dict], columns: Sequence[str]) -> None:
  """Prints a readable table, then one JSON line per row."""
  if not rows:
    return
  width = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
  print("  ".join(c.rjust(width[c]) for c in columns))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).rjust(width[c]) for c in columns))
  for r in rows:
    print(json.dumps(r, sort_keys=True))


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)
