"""Timing, XLA cost analysis and reporting shared by the benchmark suites."""

from __future__ import annotations

import json
import os
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


def time_interleaved(
  fns: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1, slow_s: float = 20.0
) -> dict[str, list[float]]:
  """Wall-clock seconds of each zero-argument fn, timed round-robin (one call of each per round).

  Interleaving spreads the load of a shared machine evenly over the candidates, so ratios
  between them stay meaningful when absolute times are noisy. A fn whose warm-up call took
  longer than `slow_s` is not repeated: that call is its only sample. Each fn must block until its
  result is ready. Returns {name: [seconds per call]}.
  """
  times: dict[str, list[float]] = {name: [] for name in fns}
  slow = set()
  for name, fn in fns.items():
    for _ in range(warmup):
      t0 = time.perf_counter()
      fn()
      dt = time.perf_counter() - t0
      if dt > slow_s:  # Too slow to repeat: its (already compiled) warm-up call is the sample.
        slow.add(name)
        times[name].append(dt)
        break
  for _ in range(repeats):
    for name, fn in fns.items():
      if name in slow:
        continue
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def matmul_peak(n: int = 2048, repeats: int = 10, dtype=np.float32) -> float:
  """Measured n^3 GEMM throughput of XLA on the default device, in FLOP/s (best run).

  Inputs in `dtype`, products accumulated and returned in float32."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  mm = jax.jit(lambda a, b: jax.numpy.dot(a, b, preferred_element_type=np.float32))
  jax.block_until_ready(mm(a, b))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(mm(a, b))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def print_load(when: str) -> None:
  """Prints the machine's 1/5/15-minute load averages (the machine may be shared)."""
  load = os.getloadavg()
  print(f"load average {when}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
