"""LoRA adapters as files of their own, and LoRA models folded back into plain ones.

- `save_adapters(directory, model)` writes only the adapters (orbax, a few percent of the
  model or less) and `adapter_config.json` (the `LoraConfig` and the base model's config).
- `load_adapters(directory, base)` puts them onto a base model (a `Qwen3` without adapters,
  e.g. from `checkpoint.load_params` or `hf.from_pretrained`) and returns the LoRA model.
- `merged(model)` folds W + (alpha / r) A B into each base weight: a plain model with the
  same function, which `checkpoint.save_params` and `hf.save_pretrained` write as usual.
"""

from __future__ import annotations

import dataclasses
import json
import os

import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from qwen3_jax import checkpoint as ckpt
from qwen3_jax.config import LoraConfig, ModelConfig, from_dict, to_dict
from qwen3_jax.model import lora

ADAPTERS, CONFIG = "adapters", "adapter_config.json"


def _params(model: nnx.Module) -> dict:
  return nnx.state(model, nnx.Param).to_pure_dict()


def save_adapters(directory: str, model: nnx.Module) -> None:
  """Writes `directory/adapters` (orbax: the LoRA params only) and `adapter_config.json`."""
  cfg: ModelConfig = model.cfg
  if cfg.lora is None:
    raise ValueError("save_adapters: the model has no LoRA adapters (its cfg.lora is None)")
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, ADAPTERS)):
    raise FileExistsError(f"{directory}/{ADAPTERS} exists; refusing to overwrite adapters")
  os.makedirs(directory, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, ADAPTERS), lora.split_params(_params(model))[1])
  ckptr.wait_until_finished()
  meta = {"lora": dataclasses.asdict(cfg.lora), "base": to_dict(cfg.replace(lora=None))}
  ckpt.write_json(os.path.join(directory, CONFIG), meta)
  ckpt.sync_processes("save_adapters")


def load_adapters(directory: str, base: nnx.Module, mesh: Mesh | None = None) -> nnx.Module:
  """The LoRA model: `base`'s params plus the adapters saved in `directory`, placed with the
  sharding rules on `mesh` (None: one device). The base must have the architecture the
  adapters were trained on (checked: every field of its config but dtype choices)."""
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, CONFIG)) as f:
    meta = json.load(f)
  saved = from_dict(meta["base"])
  cfg: ModelConfig = base.cfg
  if cfg.lora is not None or cfg.quant is not None:
    raise ValueError(f"load_adapters: the base must be a plain float model, got {cfg}")
  keep = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, moe=cfg.moe, remat=cfg.remat)
  if saved.replace(**keep) != cfg:
    raise ValueError(f"load_adapters: adapters in {directory} were trained on {saved}, not {cfg}")
  cfg = cfg.replace(lora=LoraConfig(**meta["lora"]))
  graphdef, abs_state, target = ckpt.abstract_model(cfg, mesh)
  adapters = ocp.StandardCheckpointer().restore(
    os.path.join(directory, ADAPTERS), lora.split_params(target)[1]
  )
  return ckpt.merge_params(graphdef, abs_state, lora.join_params(_params(base), adapters))


def merged(model: nnx.Module, mesh: Mesh | None = None) -> nnx.Module:
  """The plain model (cfg.lora = None) whose weights are W + (alpha / r) A B."""
  cfg: ModelConfig = model.cfg
  if cfg.lora is None:
    raise ValueError("merged: the model has no LoRA adapters (its cfg.lora is None)")
  params = lora.merge_params(_params(model), cfg.lora.scale)
  graphdef, abs_state, _ = ckpt.abstract_model(cfg.replace(lora=None), mesh)
  return ckpt.merge_params(graphdef, abs_state, params)
