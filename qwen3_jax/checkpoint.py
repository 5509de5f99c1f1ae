"""Checkpoints: an orbax `CheckpointManager` for training runs, and a params-only format.

Training checkpoints live in `WORKDIR/checkpoints/<step>/` with four items:
  params     the model parameters (a nested dict of arrays, as `nnx.State.to_pure_dict()`)
  opt_state  {"opt": optax state, "step": int32, "skipped": int32} (the rest of TrainState)
  data       JSON: the data pipeline's state (enough to continue exactly where it stopped)
  meta       JSON: {"model": ModelConfig as a dict, "train": the whole training config as a
             dict (when the loop gives it), "step": int, ...}

A params-only checkpoint (`save_params` / `load_params`, used by HF conversion and by
`init_from`) is a directory with `params/` (same format) and `config.json` (the ModelConfig).
`load_params` also accepts a training workdir or one of its step directories, so a later
stage can start from any earlier run.

Restores take abstract targets whose shardings come from the *current* mesh, so a checkpoint
written on one mesh restores onto any other (orbax reshards on read). Saves are asynchronous
and collective (every process calls them). On resume a checkpoint whose stored tree (array
paths and shapes, read from its metadata) differs from the current target is NOT touched:
`CheckpointMismatchError` names the differing arrays and the training-config fields that
differ (e.g. `optim.clip_norm` changes the optimizer state). Only a checkpoint that cannot be
read (corrupt or half-written data, unreadable metadata) is moved aside to
`checkpoints_corrupt/` (never deleted) with a warning, and the previous one is used.
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
from etils import epath
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from qwen3_jax import sharding as shd
from qwen3_jax.config import ModelConfig, from_dict, to_dict
from qwen3_jax.model import Qwen3

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
PARAMS, OPT, DATA, META = "params", "opt_state", "data", "meta"


class CheckpointMismatchError(ValueError):
  """A readable checkpoint that does not fit the current training state (config changed)."""


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


def write_json(path: str, obj: dict) -> None:
  """Process 0 writes `obj` to `path` atomically (a temporary file, then a rename)."""
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def sync_processes(name: str) -> None:
  """Waits until every process has reached the barrier `name` (a no-op with one process); used
  around files that process 0 writes and the others then read."""
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
  sync_processes(f"quarantine_{step}")


def _path_str(path) -> str:
  keys = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
  return "/".join(str(k) for k in keys)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """{"opt/1/0/mu/embed": shape} of every array leaf; works on orbax's metadata trees (where
  tuples are lists and named tuples dicts) and on targets alike."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): tuple(leaf.shape) for p, leaf in leaves}


def _stored_shapes(item_dir: str) -> dict[str, tuple[int, ...]]:
  """`_shapes` of a saved pytree item, from its metadata only (no array data is read)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return _shapes(handler.metadata(epath.Path(item_dir)))
  finally:
    handler.close()


def tree_diff(stored: dict, wanted: dict, limit: int = 6) -> list[str]:
  """Arrays missing, extra, or of another shape in `stored` vs `wanted` (path -> shape)."""
  out = [f"{k}: only in the checkpoint" for k in sorted(set(stored) - set(wanted))]
  out += [f"{k}: not in the checkpoint" for k in sorted(set(wanted) - set(stored))]
  out += [
    f"{k}: shape {stored[k]} in the checkpoint, {wanted[k]} now"
    for k in sorted(set(stored) & set(wanted))
    if stored[k] != wanted[k]
  ]
  return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def _flatten_config(d: Any, prefix: str = "") -> dict[str, Any]:
  """{"optim.clip_norm": 1.0, ...} of a nested JSON-like dict."""
  if not isinstance(d, dict):
    return {prefix[:-1]: d}
  out = {}
  for k, v in d.items():
    out.update(_flatten_config(v, f"{prefix}{k}."))
  return out


def config_diff(stored: dict, now: dict) -> list[str]:
  """`field: stored -> now` for every (dotted) config field that differs."""
  a, b = (_flatten_config(json.loads(json.dumps(d))) for d in (stored, now))  # tuples -> lists
  show = lambda d, k: repr(d[k]) if k in d else "(absent)"  # noqa: E731
  return [
    f"{k}: {show(a, k)} in the checkpoint -> {show(b, k)} now"
    for k in sorted(set(a) | set(b))
    if k not in a or k not in b or a[k] != b[k]
  ]


def _read_meta(step_dir: str) -> dict:
  meta_dir = os.path.join(step_dir, META)
  files = (
    [f for f in os.listdir(meta_dir) if not f.startswith("_")] if os.path.isdir(meta_dir) else []
  )
  if not files:
    raise FileNotFoundError(f"{meta_dir} has no metadata file")
  with open(os.path.join(meta_dir, files[0])) as f:
    return json.load(f)


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
  write_json(os.path.join(directory, "config.json"), to_dict(config))
  sync_processes("save_params")


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
  return from_dict(_read_meta(step_dir)["model"])


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
    self,
    params_target,
    opt_target,
    on_skip: Callable[[int, str], None] | None = None,
    config: dict | None = None,
  ) -> tuple[int, Any, Any, dict, dict] | None:
    """Restores the newest checkpoint that reads back, or returns None when there is none.

    Targets are pytrees of `jax.ShapeDtypeStruct` with the shardings wanted now (any mesh).
    Unreadable steps are moved to `checkpoints_corrupt/` with a warning (`on_skip(step, why)`).
    A readable step whose arrays (paths, shapes) differ from the targets raises
    `CheckpointMismatchError` and nothing is moved: the configuration changed, not the data.

    Args:
      config: the current training config as a dict (`dataclasses.asdict`); the error lists
        the fields where it differs from the one stored in the checkpoint's meta.

    Returns:
      (step, params, opt_state, data_state, meta) or None.
    """
    self.mngr.wait_until_finished()
    for step in step_dirs(self.root):
      step_dir = os.path.join(self.root, str(step))
      try:
        meta = _read_meta(step_dir)
        stored = {name: _stored_shapes(os.path.join(step_dir, name)) for name in (PARAMS, OPT)}
      except Exception as e:  # noqa: BLE001 - unreadable metadata: a corrupt checkpoint
        self._skip(step, e, on_skip)
        continue
      diff = [
        f"{name}/{d}"
        for name, target in ((PARAMS, params_target), (OPT, opt_target))
        for d in tree_diff(stored[name], _shapes(target))
      ]
      if diff:
        raise CheckpointMismatchError(_mismatch_message(step_dir, diff, meta, config))
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
      except Exception as e:  # noqa: BLE001 - the tree fits but the data does not read back
        self._skip(step, e, on_skip)
    return None

  def _skip(self, step: int, e: Exception, on_skip) -> None:
    reason = f"{type(e).__name__}: {str(e)[:300]}"
    if on_skip is not None:
      on_skip(step, reason)
    self.mngr.close()
    quarantine(self.root, step, reason)
    self._open()

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


def _mismatch_message(step_dir: str, diff: list[str], meta: dict, config: dict | None) -> str:
  if config is None:
    fields = []
  elif "train" in meta:
    fields = config_diff(meta["train"], config)
  else:  # written before checkpoints stored the training config: compare the model only
    fields = config_diff({"model": meta.get("model", {})}, {"model": config.get("model", {})})
  why = (
    "the training config differs from the one that wrote it in:\n  " + "\n  ".join(fields)
    if fields
    else "the stored config does not explain it"
  )
  return (
    f"checkpoint {step_dir} does not fit the current training state; its arrays differ:\n  "
    + "\n  ".join(diff)
    + f"\n{why}\nNothing was moved or changed. Resume with the checkpoint's config, or start "
    "a new workdir (init_from= that workdir takes only its parameters)."
  )
