"""Typed configuration of an RL run (stages 2 and 4): what `configs/stage*_rl.py` turn into.

`RLRunConfig` = the training run (`TrainConfig`: model, optimizer, mesh, seed, checkpoints,
`init_from`; its `num_steps` counts RL iterations, each one rollout batch and `ppo_epochs`
optimizer steps), the objective (`RLConfig`), the rollouts (`RolloutConfig`) and the reward
weights (`RewardWeights`). The loop is `qwen3_jax/rl/loop.py`.
"""

from __future__ import annotations

import dataclasses

from qwen3_jax.data.tasks import FAMILIES, LEVELS
from qwen3_jax.rl.config import RLConfig
from qwen3_jax.train.config import TrainConfig

RECOMPUTE = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """What is sampled each iteration and how."""

  group_size: int = 8  # G: samples per prompt (one GRPO group).
  prompts_per_step: int = 8  # Prompts (groups) per rollout batch.
  max_new_tokens: int = 128  # Most generated tokens per reply (the max response length).
  top_k: int = 0  # Rollout sampling filters (0 / 1.0 = off: log-probs then equal the
  top_p: float = 1.0  # sampling distribution); the temperature is RLConfig's.
  families: tuple[str, ...] = ("arithmetic", "countdown")  # Task families drawn uniformly.
  difficulties: tuple[int, ...] = (1, 2)  # Levels drawn uniformly per prompt.
  think_flags: bool = False  # Append "/think" or "/no_think" to every user turn.
  no_think_frac: float = 0.5  # With think_flags: share of prompts that get "/no_think".
  max_tool_steps: int = 4  # Tool tasks: most replies per conversation (`run_tool_loops`).
  dynamic_sampling: bool = True  # Replace zero-reward-variance groups by fresh prompts.
  max_resample_tries: int = 2  # Extra rollout rounds per iteration for dynamic sampling.

  def __post_init__(self):
    for name in ("group_size", "prompts_per_step", "max_new_tokens", "max_tool_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
    if self.max_resample_tries < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(
        f"rollout: need max_resample_tries >= 0, top_k >= 0, 0 < top_p <= 1; got "
        f"{self.max_resample_tries}, {self.top_k}, {self.top_p}"
      )
    unknown = [f for f in self.families if f not in FAMILIES]
    if not self.families or unknown:
      raise ValueError(f"rollout.families {list(self.families)}: unknown {unknown} or empty")
    if not self.difficulties or any(d not in LEVELS for d in self.difficulties):
      raise ValueError(f"rollout.difficulties must be levels in {LEVELS}, got {self.difficulties}")
    if not 0 <= self.no_think_frac <= 1:
      raise ValueError(f"rollout.no_think_frac must be in [0, 1], got {self.no_think_frac}")


@dataclasses.dataclass(frozen=True)
class RewardWeights:
  """reward = sum of weight * term (`rewards.score` defines each term)."""

  correctness: float = 1.0  # The task's verifier, in [0, 1] (tool tasks: task success).
  format: float = 0.0  # 1 for one think block (none under /no_think) and a non-empty answer.
  flag: float = 0.0  # 1 when the reply follows /think (reasoning) or /no_think (none).
  tool_valid: float = 0.0  # Tool tasks: share of tool calls that ran without error.
  length: float = 0.0  # -(generated tokens / max_new_tokens): a linear length penalty.
  overlong: float = 0.0  # DAPO's soft overlong penalty (0 .. -1 in the last overlong_cache).
  overlong_cache: int = 32  # L_cache of the overlong penalty (tokens before max_new_tokens).

  def __post_init__(self):
    if self.overlong_cache < 0:
      raise ValueError(f"rewards.overlong_cache must be >= 0, got {self.overlong_cache}")


@dataclasses.dataclass(frozen=True)
class RLRunConfig:
  """One RL stage (module docstring)."""

  train: TrainConfig  # batch_size = prompts_per_step * group_size (padded to the mesh).
  objective: RLConfig = RLConfig.dapo()
  rollout: RolloutConfig = RolloutConfig()
  rewards: RewardWeights = RewardWeights()
  ppo_epochs: int = 1  # Optimizer steps per rollout batch (the later ones off policy).
  ref_from: str = ""  # Frozen reference for the k3 KL (beta > 0); "" = train.init_from.
  # Old log-probs: "auto" recomputes them with the training step's forward when the model is
  # not float32 (a bf16 engine rounds its logits); "always" / "never" force it.
  recompute_old_logp: str = "auto"

  def __post_init__(self):
    if self.ppo_epochs < 1:
      raise ValueError(f"ppo_epochs must be >= 1, got {self.ppo_epochs}")
    if self.recompute_old_logp not in RECOMPUTE:
      raise ValueError(f"recompute_old_logp={self.recompute_old_logp!r} not in {RECOMPUTE}")
    if self.objective.beta > 0 and not (self.ref_from or self.train.init_from):
      raise ValueError("objective.beta > 0 needs a reference: set ref_from or train.init_from")
    rows = self.rollout.prompts_per_step * self.rollout.group_size
    if self.train.batch_size != rows:
      raise ValueError(
        f"train.batch_size={self.train.batch_size} != prompts_per_step * group_size = {rows}"
      )

  @property
  def reference(self) -> str:
    return self.ref_from or self.train.init_from
