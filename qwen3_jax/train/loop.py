"""The training loop shared by pretraining and SFT: data, init / resume, steps, eval,
checkpoints, metrics, preemption, and a greedy sample at the end.

`train(cfg, workdir)` resumes from the newest readable checkpoint in `workdir`, else starts
from `cfg.init_from` (params only) or from scratch. A checkpoint whose state no longer fits the
config (e.g. `optim.clip_norm` turned off changes the optimizer state) stops the run with an
error naming the changed fields; nothing in `workdir` is moved, and `WORKDIR/config.json` is
rewritten only once the start state is settled. Every process of a multi-process run calls
it; each feeds its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax import checkpoint as ckpt
from qwen3_jax import sharding as shd
from qwen3_jax.config import to_dict
from qwen3_jax.data import pipeline
from qwen3_jax.data.tokenizer import load_tokenizer, train_tokenizer
from qwen3_jax.model import global_tokens
from qwen3_jax.train.config import TrainConfig
from qwen3_jax.train.metrics import MetricsWriter
from qwen3_jax.train.step import Program, TrainState, make_program

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


# ----------------------------------------------------------------------------- data


def build_data(cfg: TrainConfig, workdir: str, printer=print):
  """(tokenizer, train Batches, eval Batches or None, PackStats).

  A tokenizer trained here is saved in workdir. Documents are packed whole (`pipeline.pack`);
  how many were dropped or split and the packing efficiency are printed here and written to
  the metrics by `train`.
  """
  dcfg = cfg.data
  docs = pipeline.read_documents(dcfg, cfg.seed)
  saved = os.path.join(workdir, "tokenizer.json")
  exists = os.path.exists(saved)
  ckpt._sync("tokenizer_check")  # every process looked before process 0 may write it
  if dcfg.tokenizer:
    tok = load_tokenizer(dcfg.tokenizer)
  elif exists:
    tok = load_tokenizer(saved)
  else:
    if jax.process_index() == 0:
      t0 = time.time()
      tok = train_tokenizer((t for d in docs for t, _ in d), dcfg.vocab_size)
      tok.save(saved + ".tmp")
      os.replace(saved + ".tmp", saved)
      printer(f"trained a {tok.get_vocab_size()}-token BPE in {time.time() - t0:.1f}s -> {saved}")
    ckpt._sync("tokenizer")
    tok = load_tokenizer(saved)
  if tok.get_vocab_size() > cfg.model.vocab_size:
    raise ValueError(
      f"tokenizer has {tok.get_vocab_size()} tokens but model.vocab_size={cfg.model.vocab_size}"
    )
  ids, loss, doc = pipeline.tokenize(docs, tok)
  max_docs = dcfg.max_docs_per_row
  model_cap = cfg.model.attention.max_docs_per_row if global_tokens.global_every(cfg.model) else 0
  if model_cap and not 0 < max_docs <= model_cap:
    max_docs = model_cap  # the model's global-token slots per row bound its documents per row
  rows, stats = pipeline.pack(
    ids,
    loss,
    doc,
    cfg.seq_len,
    split_long=dcfg.loss_on == "all",
    max_docs_per_row=max_docs,
  )
  train_rows, eval_rows = pipeline.split_rows(rows, dcfg.eval_fraction)
  kw = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train = pipeline.Batches(train_rows, cfg.batch_size, seed=cfg.seed, **kw)
  evals = None
  if cfg.eval_every and len(eval_rows["inputs"]) >= cfg.batch_size:
    evals = pipeline.Batches(eval_rows, cfg.batch_size, seed=0, shuffle=False, **kw)
  printer(
    f"data: {len(ids):,} tokens in {stats.documents:,} documents -> {train.num_rows:,} train "
    f"rows, {len(eval_rows['inputs'])} eval rows of {cfg.seq_len} tokens; packing efficiency "
    f"{stats.efficiency:.1%}"
  )
  if stats.dropped:
    printer(
      f"WARNING: dropped {stats.dropped:,} of {stats.documents:,} documents longer than a row "
      f"(seq_len + 1 = {cfg.seq_len + 1} tokens): loss_on=assistant never splits a conversation"
    )
  if stats.split:
    printer(f"data: split {stats.split:,} documents longer than a row across rows")
  return tok, train, evals, stats


def to_global(local: dict, prog: Program) -> dict:
  """Process-local numpy rows -> global jax arrays sharded over the batch axes."""
  b = prog.cfg.batch_size
  return {
    k: jax.make_array_from_process_local_data(prog.batch_sharding, v, (b,) + v.shape[1:])
    for k, v in local.items()
  }


# ----------------------------------------------------------------------------- state


def initial_state(
  prog: Program, ck: ckpt.Checkpointer, data: pipeline.Batches, printer, init_from: str = ""
):
  """Newest readable checkpoint, else init (+ params from `init_from`). Returns (state, step)."""
  target = prog.abstract_state()
  opt_target = {"opt": target.opt_state, "step": target.step, "skipped": target.skipped}
  config = dataclasses.asdict(prog.cfg)
  restored = ck.restore_latest(
    target.params,
    opt_target,
    on_skip=lambda s, why: printer(f"WARNING: checkpoint {s} unreadable, skipped ({why})"),
    config=config,
  )  # a checkpoint that does not fit this config raises ckpt.CheckpointMismatchError
  if restored is not None:
    step, params, opt, data_state, meta = restored
    data.set_state(data_state)
    state = TrainState(opt["step"], params, opt["opt"], opt["skipped"], jnp.zeros((), jnp.int32))
    state = jax.device_put(state, prog.state_shardings)
    printer(f"resumed from {ck.root}/{step}")
    changed = ckpt.config_diff(meta["train"], config) if "train" in meta else []
    if changed:
      printer("config changed since the checkpoint:\n  " + "\n  ".join(changed))
    return state, step
  state = prog.init()
  if init_from:
    model, _ = ckpt.load_params(init_from, prog.mesh)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    shapes = jax.tree.map(lambda a: a.shape, params)
    want = jax.tree.map(lambda a: a.shape, state.params)
    if shapes != want:
      raise ValueError(f"init_from={init_from}: parameter shapes differ from the model")
    state = dataclasses.replace(state, params=params)
    printer(f"initialised parameters from {init_from}")
  return state, 0


def save(ck, state: TrainState, step: int, data, cfg: TrainConfig, force=False) -> bool:
  if not (force or ck.should_save(step)):
    return False  # decided before `int(state.skipped)`, which would wait for the device
  opt = {"opt": state.opt_state, "step": state.step, "skipped": state.skipped}
  meta = {
    "model": to_dict(cfg.model),
    "train": dataclasses.asdict(cfg),  # resume diffs it against the config of the day
    "step": step,
    "skipped": int(state.skipped),
  }
  return ck.save(step, state.params, opt, data.get_state(), meta, force=force)


# ----------------------------------------------------------------------------- loop


def check_bad_streak(bad_streak: int, max_bad_steps: int, step: int, ckpt_root: str) -> None:
  """Stops the run after `max_bad_steps` non-finite steps in a row (each one was skipped)."""
  if bad_streak >= max_bad_steps:
    raise NonFiniteError(
      f"{bad_streak} non-finite steps in a row at step {step} (loss or gradients are NaN/inf); "
      f"they were skipped, so parameters are those of the last finite step, and the last good "
      f"checkpoint in {ckpt_root} is intact. Lower optim.lr or check the data."
    )


def evaluate(prog: Program, params, evals: pipeline.Batches, num_batches: int) -> float:
  """Mean cross-entropy over the first `num_batches` held-out batches (same every time)."""
  tot = n = 0.0
  for i in range(min(num_batches, evals.num_rows // prog.cfg.batch_size)):
    out = jax.device_get(prog.eval_step(params, to_global(evals[i], prog)))
    tot, n = tot + float(out["ce_sum"]), n + float(out["n"])
  return tot / max(n, 1.0)


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
  ck = ckpt.Checkpointer(
    workdir,
    save_every=cfg.checkpoint_every,
    keep=cfg.keep_checkpoints,
    async_save=cfg.async_checkpoint,
  )
  try:
    state, start = initial_state(prog, ck, data, printer, cfg.init_from)
  except BaseException:
    ck.close()
    raise
  # Only now: a resume that fails (e.g. CheckpointMismatchError) leaves config.json as it was.
  ckpt._write_json(os.path.join(workdir, "config.json"), dataclasses.asdict(cfg))
  writer = MetricsWriter(workdir, cfg.num_steps, printer)
  writer.write(start, data_stats.metrics(), prefix="data")
  preempted = []
  old_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
  tokens_seen, t_log, steps_since = 0.0, time.time(), 0
  first_loss = last = None
  window = []  # metrics of the steps since the last log line
  step = start
  try:
    while step < cfg.num_steps:
      batch = to_global(data[step], prog)
      data.step = step + 1
      state, m = prog.train_step(state, batch)
      step += 1
      steps_since += 1
      if window:  # the previous step's streak: reading this step's would block on it
        check_bad_streak(int(window[-1]["bad_streak"]), cfg.max_bad_steps, step - 1, ck.root)
      window.append(m)
      if step % cfg.log_every == 0 or step == cfg.num_steps or step == start + 1:
        check_bad_streak(int(m["bad_streak"]), cfg.max_bad_steps, step, ck.root)
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
      save(ck, state, step, data, cfg)
      if on_step is not None:
        on_step(step, {"state": state, "checkpointer": ck})
      if _any_process(bool(preempted)):
        printer(f"SIGTERM: saving step {step} and stopping")
        break
    save(ck, state, step, data, cfg, force=True)
    ck.wait()
  finally:
    signal.signal(signal.SIGTERM, old_handler)
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


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


# ----------------------------------------------------------------------------- sampling


def greedy_generate(
  model: nnx.Module, prompts: list[list[int]], num_tokens: int
) -> list[list[int]]:
  """Greedy continuations of several prompts without a KV cache: one compiled call per token.

  Rows live in a fixed [R, max_prompt + n] buffer; row r's next token is read at its own
  position t_r - 1, and slots from t_r on are padding (segment 0), which causal attention
  never lets earlier tokens see.
  """
  lens = np.asarray([len(p) for p in prompts], np.int32)
  if lens.min() < 1:
    raise ValueError("every prompt needs at least one token")
  total = int(lens.max()) + num_tokens
  buf = np.zeros((len(prompts), total), np.int32)
  for r, p in enumerate(prompts):
    buf[r, : len(p)] = p
  graphdef, params = nnx.split(model)

  @jax.jit
  def step(params, buf, t):  # buf [R, T], t [R]: tokens already in each row
    seg = (jnp.arange(total)[None, :] < t[:, None]).astype(jnp.int32)
    # [R, T, V]: the model slices off the vocab padding, so argmax never picks a padded id.
    logits = nnx.merge(graphdef, params)(buf, segment_ids=seg).logits
    nxt = jnp.argmax(jnp.take_along_axis(logits, (t - 1)[:, None, None], axis=1)[:, 0], -1)
    return buf.at[jnp.arange(buf.shape[0]), t].set(nxt.astype(jnp.int32)), t + 1

  buf, t = jnp.asarray(buf), jnp.asarray(lens)
  for _ in range(num_tokens):
    buf, t = step(params, buf, t)
  buf = np.asarray(buf)
  return [buf[r, n : n + num_tokens].tolist() for r, n in enumerate(lens)]
