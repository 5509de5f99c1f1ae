"""Checkpoints: an orbax `CheckpointManager` for training runs, and a params-only format.

Training checkpoints live in `WORKDIR/checkpoints/<step>/` with four items:
  params     the model parameters (a nested dict of arrays, as `nnx.State.to_pure_dict()`)
  opt_state  {"opt": optax state, "step": int32, "skipped": int32} (the rest of TrainState)
  data       JSON: the data pipeline's state (enough to continue exactly where it stopped)
  meta       JSON: {"model": ModelConfig as a dict, "step": int, ...}

A params-only checkpoint (`save_params` / `load_params`, used by HF conversion and by
`init_from`) is a directory with `params/` (same format) and `config.json` (the ModelConfig).
`load_params` also accepts a training workdir or one of its step directories, so a later
stage can start from any earlier run.

Restores take abstract targets whose shardings come from the *current* mesh, so a checkpoint
written on one mesh restores onto any other (orbax reshards on read). Saves are asynchronous
and collective (every process calls them). A checkpoint that fails to restore is moved aside to
`checkpoints_corrupt/` (never deleted) with a warning and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from qwen3_jax import sharding as shd
from qwen3_jax.config import ModelConfig, from_dict, to_dict
from qwen3_jax.model import Qwen3

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
PARAMS, OPT, DATA, META = "params", "opt_state", "data", "meta"


# ----------------------------------------------------------------------------- helpers


def abstract_model(cfg: ModelConfig, mesh: Mesh | None) -> tuple[nnx.GraphDef, nnx.State, Any]:
  """(graphdef, abstract nnx state, params target) of a Qwen3 model placed on `mesh`.

  The target is a pure dict of `jax.ShapeDtypeStruct`s carrying the shardings the rules give
  on `mesh` (one device when mesh is None); orbax restores straight onto those shards.
  """
  graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))
  if mesh is None:
    dev = SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: dev, abs_state.to_pure_dict())
  else:
    shardings = shd.state_shardings(abs_state, mesh).to_pure_dict()
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abs_state.to_pure_dict(),
    shardings,
  )
  return graphdef, abs_state, target


def merge_params(graphdef: nnx.GraphDef, abs_state: nnx.State, params: dict) -> nnx.Module:
  """Builds the module from a graphdef, its abstract state and a pure dict of arrays."""
  nnx.replace_by_pure_dict(abs_state, params)
  return nnx.merge(graphdef, abs_state)


def _write_json(path: str, obj: dict) -> None:
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def step_dirs(ckpt_root: str) -> list[int]:
  """Finished step numbers under a checkpoints directory, newest first (tmp dirs excluded)."""
  if not os.path.isdir(ckpt_root):
    return []
  return sorted((int(n) for n in os.listdir(ckpt_root) if n.isdigit()), reverse=True)


def quarantine(ckpt_root: str, step: int, reason: str) -> None:
  """Moves a bad step directory aside (never deletes it) so training can go on past it."""
  log.warning(
    "Checkpoint step %d in %s cannot be restored (%s); skipping it", step, ckpt_root, reason
  )
  if jax.process_index() == 0:
    dest_root = os.path.join(os.path.dirname(os.path.abspath(ckpt_root)), CORRUPT_DIR)
    os.makedirs(dest_root, exist_ok=True)
    dest = os.path.join(dest_root, f"{step}-{int(time.time())}")
    shutil.move(os.path.join(ckpt_root, str(step)), dest)
    log.warning("Moved the unreadable checkpoint to %s (delete it yourself when done)", dest)
  _sync(f"quarantine_{step}")


# ----------------------------------------------------------------------------- params only


def save_params(directory: str, model: nnx.Module, config: ModelConfig) -> None:
  """Writes `directory/params` (orbax) and `directory/config.json`; collective, blocking."""
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, PARAMS)):
    raise FileExistsError(f"{directory}/{PARAMS} exists; refusing to overwrite a checkpoint")
  os.makedirs(directory, exist_ok=True)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, PARAMS), params)
  ckptr.wait_until_finished()
  _write_json(os.path.join(directory, "config.json"), to_dict(config))
  _sync("save_params")


def _resolve_params_path(path: str) -> tuple[str, ModelConfig, list[str]]:
  """(params dir, config, fallbacks) for a params dir, a step dir, or a training workdir."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No checkpoint at {path}")
  if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
    os.path.join(path, PARAMS)
  ):
    with open(os.path.join(path, "config.json")) as f:
      return os.path.join(path, PARAMS), from_dict(json.load(f)), []
  if os.path.isdir(os.path.join(path, META)) and os.path.isdir(os.path.join(path, PARAMS)):
    return os.path.join(path, PARAMS), _read_meta_config(path), []
  root = os.path.join(path, CKPT_DIR) if os.path.isdir(os.path.join(path, CKPT_DIR)) else path
  steps = step_dirs(root)
  if not steps:
    raise FileNotFoundError(
      f"{path} holds no checkpoint: expected config.json + params/ (save_params), a step "
      f"directory (params/ + meta/), or a workdir with {CKPT_DIR}/<step>/"
    )
  dirs = [os.path.join(root, str(s)) for s in steps]
  return os.path.join(dirs[0], PARAMS), _read_meta_config(dirs[0]), dirs[1:]


def _read_meta_config(step_dir: str) -> ModelConfig:
  meta_dir = os.path.join(step_dir, META)
  files = (
    [f for f in os.listdir(meta_dir) if not f.startswith("_")] if os.path.isdir(meta_dir) else []
  )
  if not files:
    raise FileNotFoundError(f"{meta_dir} has no metadata file")
  with open(os.path.join(meta_dir, files[0])) as f:
    return from_dict(json.load(f)["model"])


def load_params(
  path: str, mesh: Mesh | None = None, **config_overrides
) -> tuple[nnx.Module, ModelConfig]:
  """Restores a model from a params checkpoint, a training step dir, or a training workdir.

  Args:
    path: `save_params` directory, `WORKDIR/checkpoints/<step>`, or `WORKDIR` (newest step;
      an unreadable step falls back to the previous one with a warning).
    mesh: parameters are placed with the sharding rules on this mesh (any shape, not
      necessarily the one that wrote them); None = one device.
    **config_overrides: ModelConfig fields to change that do not change parameter shapes
      (e.g. dtype="bfloat16", moe=MoEConfig(strategy="dense")).

  Returns:
    (model, config).
  """
  params_path, cfg, fallbacks = _resolve_params_path(path)
  if config_overrides:
    cfg = cfg.replace(**config_overrides)
  graphdef, abs_state, target = abstract_model(cfg, mesh)
  candidates = [params_path] + [os.path.join(d, PARAMS) for d in fallbacks]
  for i, p in enumerate(candidates):
    try:
      params = ocp.StandardCheckpointer().restore(p, target)
      break
    except Exception as e:  # noqa: BLE001 - any read failure means: try the previous one
      if i == len(candidates) - 1:
        raise RuntimeError(f"Cannot restore parameters from {p}: {e}") from e
      log.warning("Cannot restore %s (%s); trying the previous checkpoint", p, e)
  return merge_params(graphdef, abs_state, params), cfg


# ----------------------------------------------------------------------------- training


class Checkpointer:
  """Training checkpoints in `workdir/checkpoints`: async, keep-last-K, resumable.

  Args:
    workdir: run directory.
    save_every: save when `step % save_every == 0` (0 = only forced saves).
    keep: keep the newest `keep` checkpoints (older ones are deleted by orbax: that is what
      the user asked for with `keep`); 0 = keep all.
    async_save: write in a background thread while training continues.
  """

  def __init__(self, workdir: str, *, save_every: int, keep: int = 3, async_save: bool = True):
    self.root = os.path.join(os.path.abspath(workdir), CKPT_DIR)
    self.save_every = save_every
    self._options = ocp.CheckpointManagerOptions(
      max_to_keep=keep or None,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=False,  # a half-written save is left for the user to inspect
    )
    self._open()

  def _open(self):
    self.mngr = ocp.CheckpointManager(self.root, options=self._options)

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(
    self, step: int, params, opt_state, data_state: dict, meta: dict, *, force: bool = False
  ) -> bool:
    """Starts an (async) save of the full training state at `step`; collective."""
    if not (force or self.should_save(step)):
      return False
    if step in self.mngr.all_steps():
      return False
    return self.mngr.save(
      step,
      args=ocp.args.Composite(
        **{
          PARAMS: ocp.args.StandardSave(params),
          OPT: ocp.args.StandardSave(opt_state),
          DATA: ocp.args.JsonSave(data_state),
          META: ocp.args.JsonSave(meta),
        }
      ),
      force=True,
    )

  def restore_latest(
    self, params_target, opt_target, on_skip: Callable[[int, str], None] | None = None
  ) -> tuple[int, Any, Any, dict, dict] | None:
    """Restores the newest checkpoint that reads back, or returns None when there is none.

    Targets are pytrees of `jax.ShapeDtypeStruct` with the shardings wanted now (any mesh).
    Unreadable steps are moved to `checkpoints_corrupt/` with a warning.

    Returns:
      (step, params, opt_state, data_state, meta) or None.
    """
    self.mngr.wait_until_finished()
    for step in step_dirs(self.root):
      try:
        r = self.mngr.restore(
          step,
          args=ocp.args.Composite(
            **{
              PARAMS: ocp.args.StandardRestore(params_target),
              OPT: ocp.args.StandardRestore(opt_target),
              DATA: ocp.args.JsonRestore(),
              META: ocp.args.JsonRestore(),
            }
          ),
        )
        return step, r[PARAMS], r[OPT], dict(r[DATA]), dict(r[META])
      except Exception as e:  # noqa: BLE001 - any failure to read means: use the previous one
        reason = f"{type(e).__name__}: {str(e)[:300]}"
        if on_skip is not None:
          on_skip(step, reason)
        self.mngr.close()
        quarantine(self.root, step, reason)
        self._open()
    return None

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
