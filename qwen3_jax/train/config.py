"""Typed training configuration (what `configs/*.py` ConfigDicts are turned into)."""

from __future__ import annotations

import dataclasses

from qwen3_jax.config import MeshConfig, ModelConfig
from qwen3_jax.data.pipeline import DataConfig

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with warmup + decay, global-norm clipping and a weight-decay mask."""

  lr: float = 3e-4  # Peak learning rate.
  warmup_steps: int = 100  # Linear warmup from 0 to `lr`.
  schedule: str = "cosine"  # cosine | linear | constant decay after warmup.
  min_lr_ratio: float = 0.1  # Final lr = min_lr_ratio * lr (cosine / linear).
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_norms: bool = False  # Apply weight decay to RMSNorm weights too.
  decay_embeddings: bool = False  # Apply weight decay to the token embedding too.
  clip_norm: float = 1.0  # Global-norm gradient clipping; 0 = off.

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optim.schedule={self.schedule!r} is not one of {SCHEDULES}")
    if self.lr <= 0:
      raise ValueError(f"optim.lr must be > 0, got {self.lr}")
    if self.warmup_steps < 0:
      raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run: pretraining or SFT (the loss mask comes from the data)."""

  num_steps: int  # Optimizer steps in total (a resumed run continues up to this).
  batch_size: int  # Global batch, in sequences, summed over all processes and micro-batches.
  seq_len: int  # Tokens per sequence fed to the model.
  model: ModelConfig
  optim: OptimConfig = OptimConfig()
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig(data=-1)
  eval_every: int = 100  # Evaluate on held-out rows every this many steps (0 = never).
  eval_batches: int = 4  # Batches per evaluation.
  checkpoint_every: int = 100  # Save every this many steps (0 = only at the end / SIGTERM).
  keep_checkpoints: int = 3  # Keep the newest K checkpoints (0 = all).
  seed: int = 0  # Parameter init and data order.
  init_from: str = ""  # Params-only start: a save_params dir, step dir or workdir ("" = none).
  micro_batches: int = 1  # Gradient accumulation: batch_size is split into this many.
  z_loss: float = 0.0  # Weight of the output z-loss mean(logsumexp(logits)^2).
  log_every: int = 10  # Metrics to metrics.jsonl / TensorBoard / console every N steps.
  max_bad_steps: int = 5  # Stop after this many consecutive non-finite steps.
  async_checkpoint: bool = True  # Write checkpoints in the background.
  sample_tokens: int = 0  # At the end, greedily continue a prompt by this many tokens.

  def __post_init__(self):
    for name in ("num_steps", "batch_size", "seq_len", "micro_batches", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.batch_size % self.micro_batches:
      raise ValueError(
        f"batch_size={self.batch_size} is not divisible by micro_batches={self.micro_batches}"
      )
    if self.max_bad_steps < 1:
      raise ValueError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
