"""AdamW (optax) with warmup + cosine/linear decay, global-norm clipping, weight-decay mask."""

from __future__ import annotations

import jax
import optax

from qwen3_jax.train.config import OptimConfig


def schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine / linear decay to `min_lr_ratio * lr` at num_steps."""
  warm = min(cfg.warmup_steps, num_steps)
  end = cfg.lr * cfg.min_lr_ratio
  decay_steps = max(num_steps - warm, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(cfg.lr)
  if warm == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def decay_mask(params, cfg: OptimConfig):
  """True where weight decay applies: matrices, but not norms / embeddings unless asked."""

  def one(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if any(n.endswith("norm") for n in names):  # input_layernorm, q_norm, norm, ...
      return cfg.decay_norms
    if "embed_tokens" in names:
      return cfg.decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """clip(global norm) -> AdamW(schedule, masked weight decay)."""
  chain = []
  if cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.clip_norm))
  chain.append(
    optax.adamw(
      schedule(cfg, num_steps),
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=lambda p: decay_mask(p, cfg),
    )
  )
  return optax.chain(*chain)
