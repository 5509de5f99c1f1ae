"""What every training loop (pretraining / SFT, RL) does around its steps: start or resume,
save, stop on non-finite steps, stop on preemption.

- `start` opens the run's checkpointer and settles the start state: the newest readable
  checkpoint in `WORKDIR/checkpoints` (`initial_state`), else a fresh init with the
  parameters of `init_from` (params only) when given. A checkpoint whose state no longer fits
  the config (e.g. `optim.clip_norm` turned off changes the optimizer state) raises
  `checkpoint.CheckpointMismatchError` naming the changed fields; nothing in the workdir is
  moved, and `WORKDIR/config.json` is rewritten only once the start state is settled.
- `save` writes params, optimizer state, the data pipeline's position and the configs, when
  the checkpoint schedule says so (or forced, at the end or on SIGTERM).
- `check_bad_streak` stops a run after too many non-finite (skipped) steps in a row.
- `catch_sigterm` / `any_process`: a SIGTERM on any process stops every process at the same
  step, after a save.

Every process of a multi-process run calls all of these (saves and restores are collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax import checkpoint as ckpt
from qwen3_jax.config import to_dict
from qwen3_jax.data import pipeline
from qwen3_jax.model import lora
from qwen3_jax.train.config import TrainConfig
from qwen3_jax.train.step import Program, TrainState


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


def start(
  cfg: TrainConfig, prog: Program, workdir: str, data: pipeline.Batches, printer
) -> tuple[ckpt.Checkpointer, TrainState, int]:
  """(checkpointer, start state, start step) of a run of `cfg` in `workdir`.

  `cfg` is the run's whole config (`prog.cfg` keeps only what the compiled functions need:
  its checkpoint schedule and `init_from` are blanked). Resumes `data` too when a checkpoint
  is restored. The checkpointer is closed again when no start state can be settled;
  otherwise the caller closes it.
  """
  ck = ckpt.Checkpointer(
    workdir,
    save_every=cfg.checkpoint_every,
    keep=cfg.keep_checkpoints,
    async_save=cfg.async_checkpoint,
  )
  try:
    state, step = initial_state(prog, ck, data, printer, cfg.init_from)
  except BaseException:
    ck.close()
    raise
  # Only now: a resume that fails (e.g. CheckpointMismatchError) leaves config.json as it was.
  ckpt.write_json(os.path.join(workdir, "config.json"), dataclasses.asdict(cfg))
  return ck, state, step


def initial_state(
  prog: Program, ck: ckpt.Checkpointer, data: pipeline.Batches, printer, init_from: str = ""
) -> tuple[TrainState, int]:
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
    # A LoRA run starts from a base model (no adapters) and keeps its fresh adapters.
    base, adapters = lora.split_params(state.params)
    shapes = jax.tree.map(lambda a: a.shape, params)
    want = jax.tree.map(lambda a: a.shape, base)
    if shapes != want:
      raise ValueError(f"init_from={init_from}: parameter shapes differ from the model")
    state = dataclasses.replace(state, params=lora.join_params(params, adapters))
    printer(f"initialised parameters from {init_from}")
  return state, 0


def save(ck, state: TrainState, step: int, data, cfg: TrainConfig, force=False) -> bool:
  """Saves `state` at `step` when the checkpoint schedule (or `force`) says so; True if saved.

  The meta item holds the model config, the whole training config (a resume diffs it against
  the config of the day), the step and the count of skipped steps.
  """
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


def check_bad_streak(bad_streak: int, max_bad_steps: int, step: int, ckpt_root: str) -> None:
  """Stops the run after `max_bad_steps` non-finite steps in a row (each one was skipped)."""
  if bad_streak >= max_bad_steps:
    raise NonFiniteError(
      f"{bad_streak} non-finite steps in a row at step {step} (loss or gradients are NaN/inf); "
      f"they were skipped, so parameters are those of the last finite step, and the last good "
      f"checkpoint in {ckpt_root} is intact. Lower optim.lr or check the data."
    )


@contextlib.contextmanager
def catch_sigterm():
  """Within the block SIGTERM does not kill the process: the yielded list gets an entry and
  the loop is expected to save and stop (see `any_process`). The old handler comes back after.
  """
  caught: list[bool] = []
  old_handler = signal.signal(signal.SIGTERM, lambda *_: caught.append(True))
  try:
    yield caught
  finally:
    signal.signal(signal.SIGTERM, old_handler)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (collective: every process calls it)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
