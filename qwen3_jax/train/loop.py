"""The training loop shared by pretraining and SFT: steps, logged metrics, periodic eval and
checkpoints, preemption.

`train(cfg, workdir)` builds the inputs (`inputs.build_data`), resumes from the newest
readable checkpoint in `workdir` or starts from `cfg.init_from` (params only) or from scratch
(`resume.start`), then steps to `cfg.num_steps`, evaluating (`evaluate.evaluate`) and saving
(`resume.save`) on their schedules. Every process of a multi-process run calls it; each feeds
its own slice of every global batch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from qwen3_jax import sharding as shd
from qwen3_jax.train import resume
from qwen3_jax.train.config import TrainConfig
from qwen3_jax.train.evaluate import evaluate
from qwen3_jax.train.inputs import build_data, to_global
from qwen3_jax.train.metrics import MetricsWriter
from qwen3_jax.train.step import make_program


def train(
  cfg: TrainConfig,
  workdir: str,
  *,
  printer: Callable[[str], None] = print,
  on_step: Callable[[int, dict], None] | None = None,
) -> dict:
  """Trains to `cfg.num_steps` (resuming if `workdir` has checkpoints); returns a summary.

  `on_step(step, ctx)` (tests, tools) runs after every step with ctx = {"state", "checkpointer"}.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  printer = printer if jax.process_index() == 0 else (lambda *_: None)
  mesh = shd.make_mesh(cfg.mesh)
  printer(f"workdir {workdir}; mesh {dict(mesh.shape)}; {jax.process_count()} process(es)")
  tok, data, evals, data_stats = build_data(cfg, workdir, printer)
  prog = make_program(cfg, mesh)
  ck, state, start = resume.start(cfg, prog, workdir, data, printer)
  writer = MetricsWriter(workdir, cfg.num_steps, printer)
  writer.write(start, data_stats.metrics(), prefix="data")
  tokens_seen, t_log, steps_since = 0.0, time.time(), 0
  first_loss = last = None
  window = []  # metrics of the steps since the last log line
  step = start
  with resume.catch_sigterm() as preempted:
    try:
      while step < cfg.num_steps:
        batch = to_global(data[step], prog)
        data.step = step + 1
        state, m = prog.train_step(state, batch)
        step += 1
        steps_since += 1
        if window:  # the previous step's streak: reading this step's would block on it
          resume.check_bad_streak(
            int(window[-1]["bad_streak"]), cfg.max_bad_steps, step - 1, ck.root
          )
        window.append(m)
        if step % cfg.log_every == 0 or step == cfg.num_steps or step == start + 1:
          resume.check_bad_streak(int(m["bad_streak"]), cfg.max_bad_steps, step, ck.root)
          m = window_mean(jax.device_get(window))
          window = []
          now = time.time()
          tokens_seen += float(m["tokens"]) * steps_since
          tps = float(m["tokens"]) * steps_since / max(now - t_log, 1e-9)
          t_log, steps_since = now, 0
          scalars = {k: v for k, v in m.items() if np.ndim(v) == 0}
          scalars["tokens_per_s"] = tps
          arrays = {"expert_load": m["expert_load"]} if "expert_load" in m else None
          writer.write(step, scalars, arrays)
          last = float(m["loss"])
          first_loss = last if first_loss is None else first_loss
          extra = f"  skipped {int(m['skipped'])}" if int(m["skipped"]) else ""
          writer.progress(step, last, tps, extra)
        if evals is not None and cfg.eval_every and step % cfg.eval_every == 0:
          ev = evaluate(prog, state.params, evals, cfg.eval_batches)
          writer.write(step, {"ce": ev}, prefix="eval")
          printer(f"step {step:>6}  eval ce {ev:.4f}")
        resume.save(ck, state, step, data, cfg)
        if on_step is not None:
          on_step(step, {"state": state, "checkpointer": ck})
        if resume.any_process(bool(preempted)):
          printer(f"SIGTERM: saving step {step} and stopping")
          break
      resume.save(ck, state, step, data, cfg, force=True)
      ck.wait()
    finally:
      writer.close()
      ck.close()
  summary = {
    "workdir": workdir,
    "steps": step,
    "preempted": bool(preempted),
    "first_logged_loss": first_loss,
    "final_loss": last,
    "skipped_steps": int(state.skipped),
    "wall_s": round(time.time() - writer.t_start, 1),
    "tokens": tokens_seen,
    "data": data_stats.metrics(),
  }
  if evals is not None:
    summary["final_eval_ce"] = evaluate(prog, state.params, evals, cfg.eval_batches)
  printer("summary: " + json.dumps(summary))
  summary["state"] = state
  summary["tokenizer"] = tok
  return summary


# Logged as the value at the logged step; every other metric is averaged over the window.
_LAST = ("lr", "skipped", "bad_streak")


def window_mean(window: list[dict]) -> dict:
  """Host-side mean of per-step metrics over the steps since the last log line."""
  return {
    k: window[-1][k] if k in _LAST else np.mean([np.asarray(m[k]) for m in window], axis=0)
    for k in window[-1]
  }
