"""Scanned vs unrolled layers: the `small` train step both ways, timed interleaved.

python scripts/benchmark.py --suite=layers

The train suite's step (batch 8 x 512 tokens, float32, AdamW, 1 device) for both variants
(E16 k2 F512, E64 k8 F128), built once with the layers unrolled (`scan_layers=False`, what
`scan_layers=None` picks for `small`'s 4 layers) and once scanned (`scan_layers=True`), one
call of each per round. Reports the fastest and median round and the compile time of each
(forward and train step together); `vs_scan` = scanned seconds / these seconds.
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import train as train_suite
from experiments.benchmarks.common import print_load, report, time_interleaved

LAYOUTS = {"unrolled": False, "scan": True}  # name: scan_layers


def run(flags) -> list[dict]:
  batch, seq_len = (2, 128) if flags.quick else (8, 512)
  print_load("at start")
  rows = []
  for name, (e, k, f) in train_suite.VARIANTS.items():
    base = train_suite.variant_config(e, k, f)
    seq = np.random.default_rng(0).integers(0, base.vocab_size, (batch, seq_len + 1), np.int32)
    tokens, labels = jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:])
    steps, compile_s = {}, {}
    for layout, scan in LAYOUTS.items():
      cfg = dataclasses.replace(base, scan_layers=scan)
      t0 = time.perf_counter()
      _, steps[layout], _, _ = train_suite.ours(cfg, tokens, labels)
      compile_s[layout] = time.perf_counter() - t0
    times = time_interleaved(steps, repeats=flags.repeats)
    best = {layout: float(np.min(t)) for layout, t in times.items()}
    for layout, samples in times.items():
      rows.append(
        dict(
          suite="layers",
          case=f"small_{name}",
          layout=layout,
          strategy="auto",
          seconds=best[layout],
          seconds_median=float(np.median(samples)),
          compile_s=compile_s[layout],
          vs_scan=best["scan"] / best[layout],
          tokens_per_s=batch * seq_len / best[layout],
          num_experts=e,
          top_k=k,
          tokens=batch * seq_len,
        )
      )
  print_load("at end")
  report(rows, ["case", "layout", "seconds", "seconds_median", "compile_s", "vs_scan"])
  return rows
