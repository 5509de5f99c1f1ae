"""Shared config pieces and THE function that turns a ConfigDict into library dataclasses.

Config files (`configs/*.py`) return an `ml_collections.ConfigDict` from `get_config(arg)`;
`to_train_config(cd)` (and `to_rl_config(cd)` for configs with an `rl` section) are the only
places that read one, so the library stays typed.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from qwen3_jax import config as C
from qwen3_jax.data.pipeline import DataConfig
from qwen3_jax.rl.config import RLConfig
from qwen3_jax.rl.run_config import RewardWeights, RLRunConfig, RolloutConfig
from qwen3_jax.train.config import OptimConfig, TrainConfig

# Flat fields every training config must set (see TrainConfig for their meaning).
REQUIRED = ("num_steps", "batch_size", "seq_len", "eval_every", "checkpoint_every", "seed")
NESTED = ("model", "optim", "data", "mesh")
# DataConfig tuple fields, held in a ConfigDict as comma-separated strings (flag-friendly).
TUPLE_DATA_FIELDS = ("sources", "task_families")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'model=tiny,steps=200' -> ConfigDict; values take the type of their default."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config arg {item!r} is not key=value")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes")
    elif default is not None:
      value = type(default)(value)
    out[key] = value
  return ml_collections.ConfigDict(out)


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """A model preset from qwen3_jax.config (tiny, small, qwen3_30b_a3b, ...) as a ConfigDict."""
  return ml_collections.ConfigDict(C.to_dict(C.preset(name, **overrides)))


def optim_config(**overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**dataclasses.asdict(OptimConfig()), **overrides})


def data_config(**overrides) -> ml_collections.ConfigDict:
  d = {**dataclasses.asdict(DataConfig()), **overrides}
  for k in TUPLE_DATA_FIELDS:
    d[k] = d[k] if isinstance(d[k], str) else ",".join(d[k])
  return ml_collections.ConfigDict(d)


def mesh_config(**sizes) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**dataclasses.asdict(C.MeshConfig(data=-1)), **sizes})


# LoRA target letters -> the projections they adapt (regex alternatives over parameter paths).
LORA_LETTERS = {
  "q": r"self_attn/q_proj",
  "k": r"self_attn/k_proj",
  "v": r"self_attn/v_proj",
  "o": r"self_attn/o_proj",
  "m": r"mlp/(gate_proj|up_proj|down_proj)",  # the dense MLP (MoE experts are refused)
}


def lora_config(rank: int, targets: str = "qv", alpha: float = 0.0):
  """`model.lora` for a config: None when rank == 0, else LoRA of `rank` on the projections
  named by the letters of `targets` (q, k, v, o, m = dense MLP); alpha 0 = 2 * rank."""
  if rank == 0:
    return None
  bad = sorted(set(targets) - set(LORA_LETTERS))
  if bad or not targets:
    raise ValueError(f"lora targets {targets!r}: letters must be from {sorted(LORA_LETTERS)}")
  regex = ".*(" + "|".join(LORA_LETTERS[t] for t in sorted(set(targets))) + ")"
  lcfg = C.LoraConfig(rank=rank, alpha=alpha or 2.0 * rank, targets=regex)
  return ml_collections.ConfigDict(dataclasses.asdict(lcfg))


def _build(cls, d: dict, where: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"unknown {where} fields {unknown}; known: {sorted(known)}")
  try:
    return cls(**d)
  except TypeError as e:
    raise ValueError(f"invalid {where} config: {e}") from None


def to_train_config(cd: ml_collections.ConfigDict) -> TrainConfig:
  """ConfigDict -> TrainConfig, failing with a message that names any missing/invalid field."""
  d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
  missing = [k for k in REQUIRED + NESTED if k not in d]
  if missing:
    raise ValueError(f"config is missing required fields {missing}")
  for k in REQUIRED:
    if not isinstance(d[k], int) or isinstance(d[k], bool):
      raise ValueError(f"config field {k} must be an int, got {d[k]!r}")
  model = C.from_dict(d.pop("model"))
  optim = _build(OptimConfig, d.pop("optim"), "optim")
  data = dict(d.pop("data"))
  for k in TUPLE_DATA_FIELDS:
    v = data.get(k, ())
    data[k] = tuple(s for s in v.split(",") if s) if isinstance(v, str) else tuple(v)
  data = _build(DataConfig, data, "data")
  mesh = _build(C.MeshConfig, d.pop("mesh"), "mesh")
  return _build(
    TrainConfig, {**d, "model": model, "optim": optim, "data": data, "mesh": mesh}, "top-level"
  )


# RL stages: the `rl` section's keys and where they go (the rest is a training config).
RL_TOP = ("ppo_epochs", "ref_from", "recompute_old_logp", "rewards")


def _seq(value, cast) -> tuple:
  """'a,b' or a sequence -> tuple of cast(item)."""
  items = value.split(",") if isinstance(value, str) else value
  return tuple(cast(x) for x in items if str(x).strip())


def to_rl_config(cd: ml_collections.ConfigDict) -> RLRunConfig:
  """ConfigDict with an `rl` section -> `RLRunConfig` (see configs/stage2_reasoning_rl.py).

  The `rl` section is flat: `RLConfig` fields (the objective), `RolloutConfig` fields,
  `ppo_epochs`, `ref_from`, `recompute_old_logp`, and a nested `rewards` (`RewardWeights`).
  `batch_size` is prompts_per_step * group_size.
  """
  d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
  if "rl" not in d:
    raise ValueError("an RL config needs an `rl` section")
  rl = dict(d.pop("rl"))
  objective_fields = {f.name for f in dataclasses.fields(RLConfig)}
  rollout_fields = {f.name for f in dataclasses.fields(RolloutConfig)}
  unknown = sorted(set(rl) - objective_fields - rollout_fields - set(RL_TOP))
  if unknown:
    raise ValueError(
      f"unknown rl fields {unknown}; known: {sorted(objective_fields | rollout_fields)} "
      f"and {list(RL_TOP)}"
    )
  objective = _build(RLConfig, {k: rl[k] for k in objective_fields & set(rl)}, "rl (objective)")
  ro = {k: rl[k] for k in rollout_fields & set(rl)}
  if "families" in ro:
    ro["families"] = _seq(ro["families"], str)
  if "difficulties" in ro:
    ro["difficulties"] = _seq(ro["difficulties"], int)
  rollout = _build(RolloutConfig, ro, "rl (rollout)")
  rewards = _build(RewardWeights, dict(rl.pop("rewards", {})), "rl.rewards")
  d["batch_size"] = rollout.prompts_per_step * rollout.group_size
  train = to_train_config(ml_collections.ConfigDict(d))
  top = {k: rl[k] for k in ("ppo_epochs", "ref_from", "recompute_old_logp") if k in rl}
  return _build(
    RLRunConfig,
    {"train": train, "objective": objective, "rollout": rollout, "rewards": rewards, **top},
    "rl",
  )
