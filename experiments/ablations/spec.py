"""What an ablation is: arms (thin config variants of configs/pretrain.py), the claims checked
with `experiments.verdict`, and how long a full and a `--quick` run train.

Every arm starts from `configs/pretrain.py:model=tiny` with the ablation's `base` overrides,
then its own; overrides are dotted ConfigDict paths (`"model.num_experts": 0`), exactly what
`scripts/train.py --config.model.num_experts=0` would set. Under one seed every arm reads the
same tokenizer, data order and optimizer settings; only the overridden fields differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from configs import common, pretrain
from qwen3_jax.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  note: str  # what this arm is, in words (table column)
  overrides: dict  # dotted config path -> value, on top of the ablation's base


# arm -> metric -> per-seed values (seed order), what the comparisons read.
ArmMetrics = dict[str, dict[str, list[float]]]


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A claim as `high - low + margin > 0`, per seed (`verdict.paired_verdict`).

  high, low: per-seed values (seed order); margin: tolerance of a near-equality claim (0 for
  "beats"); what: how high and low were read (table column)."""

  claim: str
  what: str
  high: list[float]
  low: list[float]
  margin: float = 0.0


def compare(
  m: ArmMetrics, claim: str, high: tuple[str, str], low: tuple[str, str], margin: float = 0.0
) -> list[Comparison]:
  """[Comparison] of metric high[1] of arm high[0] against low's, or [] when an arm did not
  run (a `--quick` run trains two arms)."""
  if high[0] not in m or low[0] not in m:
    return []
  what = f"{high[0]}.{high[1]} - {low[0]}.{low[1]}" + (f" + {margin}" if margin else "")
  return [Comparison(claim, what, m[high[0]][high[1]], m[low[0]][low[1]], margin)]


# The comparisons of an ablation, from the metrics of the arms that ran.
Comparisons = Callable[[ArmMetrics], list[Comparison]]


@dataclasses.dataclass(frozen=True)
class Ablation:
  name: str
  claim: str  # the claim under test, as stated in issue 15
  matched: str  # what the arms are matched on (stated on the results page)
  arms: tuple[Arm, ...]
  quick_arms: tuple[str, str]  # the two arms `--quick` trains
  comparisons: Comparisons
  steps: int  # optimizer steps of a full run
  quick_steps: int = 4
  quick_overrides: dict = dataclasses.field(default_factory=dict)  # --quick only: smaller shapes
  base: dict = dataclasses.field(default_factory=dict)  # overrides shared by every arm
  probes: bool = True  # per-token-type routing probes after training (MoE arms)
  kv_recall: bool = False  # also train + evaluate the synthetic key-value recall task
  columns: tuple[str, ...] = ("eval_ce",)  # metrics tabulated per arm
  notes: str = ""  # what our scale allows to conclude, scaled settings

  def arm(self, name: str) -> Arm:
    for a in self.arms:
      if a.name == name:
        return a
    raise ValueError(f"ablation {self.name} has no arm {name!r}; arms: {self.arm_names}")

  @property
  def arm_names(self) -> list[str]:
    return [a.name for a in self.arms]


def set_dotted(cd: ml_collections.ConfigDict, path: str, value) -> None:
  """cd["a.b.c"] = value for an existing field (a typo raises, naming the path)."""
  *parents, leaf = path.split(".")
  node = cd
  for p in parents:
    if p not in node:
      raise ValueError(f"config override {path!r}: no field {p!r}")
    node = node[p]
  if leaf not in node:
    raise ValueError(f"config override {path!r}: no field {leaf!r}; known: {sorted(node)}")
  node[leaf] = tuple(value) if isinstance(value, list) else value


def arm_config(ablation: Ablation, arm: Arm, *, seed: int, steps: int, extra: dict) -> TrainConfig:
  """The TrainConfig of one arm and seed: pretrain.py, then base, arm and `extra` overrides."""
  cd = pretrain.get_config(f"model=tiny,steps={steps}")
  cd.optim.warmup_steps = max(steps // 20, 1)
  for overrides in (ablation.base, arm.overrides, extra, {"seed": seed}):
    for path, value in overrides.items():
      set_dotted(cd, path, value)
  return common.to_train_config(cd)
