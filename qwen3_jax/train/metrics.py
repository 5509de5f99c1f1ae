"""Metrics: WORKDIR/metrics.jsonl (one JSON object per logged step), TensorBoard events,
and a one-line console progress report. Only process 0 writes."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsWriter:
  """Appends scalars to metrics.jsonl and TensorBoard; histograms (expert load) to TensorBoard."""

  def __init__(self, workdir: str, num_steps: int, printer=print):
    self.active = jax.process_index() == 0
    self.num_steps = num_steps
    self.print = printer
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if self.active:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    self.t_start = time.time()
    self._mark = (None, None)

  def write(self, step: int, scalars: dict, arrays: dict | None = None, prefix: str = "train"):
    """Logs `scalars` (float-able) and `arrays` (e.g. expert_load [n_moe, E]) at `step`."""
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    rec = {"step": step, **{f"{prefix}/{k}": v for k, v in scalars.items()}}
    for k, v in (arrays or {}).items():
      rec[f"{prefix}/{k}"] = np.round(np.asarray(v, np.float64), 5).tolist()
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    for k, v in scalars.items():
      if math.isfinite(v):
        self.tb.add_scalar(f"{prefix}/{k}", v, step)
    for k, v in (arrays or {}).items():
      v = np.asarray(v)
      for layer, row in enumerate(v.reshape(-1, v.shape[-1])):
        # Expert load as a histogram: bucket i holds expert i's share of the routed slots.
        edges = np.arange(len(row) + 1, dtype=np.float64)
        self.tb.add_histogram_raw(
          f"{prefix}/{k}/layer{layer}",
          min=0.0,
          max=float(len(row)),
          num=float(row.sum()),
          sum=float((np.arange(len(row)) * row).sum()),
          sum_squares=float((np.arange(len(row)) ** 2 * row).sum()),
          bucket_limits=edges[1:].tolist(),
          bucket_counts=row.tolist(),
          global_step=step,
        )

  def progress(self, step: int, loss: float, tokens_per_s: float, extra: str = "") -> None:
    """One line: step, loss, tokens/s, elapsed, ETA."""
    if not self.active:
      return
    mark_step, mark_t = self._mark
    now = time.time()
    eta = ""
    if mark_step is not None and step > mark_step:
      eta = f"  eta {_fmt_time((now - mark_t) / (step - mark_step) * (self.num_steps - step))}"
    self._mark = (step, now) if mark_step is None else self._mark
    self.print(
      f"step {step:>6}/{self.num_steps}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s"
      f"  elapsed {_fmt_time(now - self.t_start)}{eta}{extra}"
    )

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
