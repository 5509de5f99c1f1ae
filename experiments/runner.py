"""Runs one ablation: every arm under every seed through the training system, then probes.

Each run is `qwen3_jax.train.loop.train` (what `scripts/train.py` runs) on the arm's
TrainConfig (`spec.arm_config`) in its own workdir. The first run trains the tokenizer; every
later run of the ablation loads it (`data.tokenizer`), so all arms see the same token ids, and
under seed s the same data order (the pipeline shuffles with the config's seed). A run's
record holds its held-out CE, the eval curve against tokens and FLOPs, step time, parameter
counts, the routing probes (MoE arms) and the key-value recall accuracy (attention).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from experiments import flops, kv_recall, probes
from experiments.ablations.spec import Ablation, arm_config
from qwen3_jax import config as C
from qwen3_jax.train.loop import train

# --quick: a slice of the embedded corpus (fast to read and tokenize; a smoke test only).
QUICK_DATA = {"data.max_corpus_bytes": 200_000, "data.num_tasks": 400}


def loop_settings(ab: Ablation, steps: int, quick: bool) -> dict:
  """Overrides for evaluation, logging, checkpoints and (quick) data and shapes, equal for
  every arm of `ab`."""
  return {
    **(QUICK_DATA if quick else {}),
    **(ab.quick_overrides if quick else {}),
    "eval_every": steps if quick else max(steps // 8, 1),
    "eval_batches": 1 if quick else 8,
    "log_every": max(steps // 20, 1),
    "checkpoint_every": 0,  # only the final state (the probes read it from memory)
    "keep_checkpoints": 1,
    "async_checkpoint": False,
    "sample_tokens": 0,
  }


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_one(
  ab: Ablation,
  arm_name: str,
  seed: int,
  *,
  steps: int,
  quick: bool,
  workdir: str,
  extra: dict,
  printer,
) -> tuple[dict, list[dict]]:
  """Trains one arm under one seed in `workdir` (emptied first); returns (its record, the
  rows of its metrics.jsonl)."""
  arm = ab.arm(arm_name)
  cfg = arm_config(
    ab, arm, seed=seed, steps=steps, extra={**loop_settings(ab, steps, quick), **extra}
  )
  shutil.rmtree(workdir, ignore_errors=True)
  summary = train(cfg, workdir, printer=lambda *_: None)
  logged = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train_rows = [r for r in logged if "train/loss" in r]
  tps = [r["train/tokens_per_s"] for r in train_rows[1:]] or [train_rows[-1]["train/tokens_per_s"]]
  mcfg = cfg.model
  experts = (
    float(np.mean([r["train/experts_per_token"] for r in train_rows])) if mcfg.is_moe else 0.0
  )
  fpt = flops.train_flops_per_token(
    mcfg, cfg.seq_len, experts if mcfg.moe.routing == "topp" else None
  )
  tokens_per_step = summary["tokens"] / max(summary["steps"], 1)
  total, active = C.param_count(mcfg)
  rec = {
    "ablation": ab.name,
    "arm": arm_name,
    "seed": seed,
    "steps": summary["steps"],
    "eval_ce": summary["final_eval_ce"],
    "train_loss": summary["final_loss"],
    "tokens": summary["tokens"],
    "wall_s": summary["wall_s"],
    "us_per_token": 1e6 / float(np.median(tps)),
    "total_params": total,
    "active_params": active,
    "experts_per_token": experts,
    "mflops_per_token": fpt / 1e6,
    "total_tflops": fpt * summary["tokens"] / 1e12,
    "curve": [
      {
        "step": r["step"],
        "tokens": r["step"] * tokens_per_step,
        "tflops": r["step"] * tokens_per_step * fpt / 1e12,
        "eval_ce": r["eval/ce"],
      }
      for r in logged
      if "eval/ce" in r
    ],
  }
  if ab.probes and mcfg.is_moe:
    sets = probes.probe_sets(cfg, summary["tokenizer"], rows=cfg.batch_size * (1 if quick else 2))
    rec.update(probes.probe(mcfg, summary["state"].params, sets, cfg.batch_size))
  if ab.kv_recall:
    w = mcfg.attention.window
    acc = kv_recall.train_and_eval(
      cfg,
      seq_len=8 * w + 64,
      distances=(w // 2, w, 2 * w, 4 * w, 8 * w),
      steps=steps,
      eval_rows=8 if quick else 64,
    )
    rec["recall_by_distance"] = {str(d): a for d, a in acc.items()}
    rec["recall_near"] = acc[w // 2]
    rec["recall_far"] = acc[8 * w]
  printer(
    f"{ab.name} {arm_name} seed {seed}: eval ce {rec['eval_ce']:.4f}, {rec['wall_s']:.0f}s train"
  )
  return rec, logged


def run_ablation(
  ab: Ablation,
  *,
  seeds: int,
  quick: bool,
  outdir: str,
  workroot: str,
  steps: int | None = None,
  printer=print,
) -> list[dict]:
  """Runs every (seed, arm) of `ab` (the two quick arms with `quick`), appending each record to
  `outdir/runs.jsonl` and each run's logged metrics to `outdir/metrics.jsonl` as it finishes.

  steps: optimizer steps per run (None = `ab.quick_steps` or `ab.steps`).

  Returns the records, seed-major (seed 0's arms first)."""
  arms = list(ab.quick_arms) if quick else ab.arm_names
  steps = steps or (ab.quick_steps if quick else ab.steps)
  os.makedirs(outdir, exist_ok=True)
  runs_path, metrics_path = (
    os.path.join(outdir, "runs.jsonl"),
    os.path.join(outdir, "metrics.jsonl"),
  )
  for p in (runs_path, metrics_path):
    open(p, "w").close()
  records, extra = [], {}
  t0 = time.time()
  for seed in range(seeds):
    for arm in arms:
      workdir = os.path.join(workroot, ab.name, arm, f"seed{seed}")
      rec, logged = run_one(
        ab, arm, seed, steps=steps, quick=quick, workdir=workdir, extra=extra, printer=printer
      )
      if not extra:  # every later run loads the tokenizer the first one trained
        extra = {"data.tokenizer": os.path.join(workdir, "tokenizer.json")}
      records.append(rec)
      with open(runs_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
      with open(metrics_path, "a") as f:
        for r in logged:
          f.write(json.dumps({"arm": arm, "seed": seed, **r}) + "\n")
  printer(f"{ab.name}: {len(records)} runs in {time.time() - t0:.0f}s")
  return records
