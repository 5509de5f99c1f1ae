"""Where the `small` train step's time goes: its parts timed alone, forward + backward.

python scripts/benchmark.py --suite=breakdown

Same shapes as the train suite (batch 8 x 512 tokens, hidden 512, float32, 1 device), both
variants (E16 k2 F512, E64 k8 F128). Parts, each jitted alone and timed interleaved with the
others (one call of each per round; `seconds` is the fastest round), with `per_step` = how
many of it one train step runs:
  lm_head_ce   fused LM head + cross entropy (`train/fused_ce.py`), value and grads of h, W;
  attention    one attention layer (q/k/v/o projections, QK-norm, RoPE, causal core);
  moe          one MoE layer with the default dispatch (router, sort, experts, combine);
  experts      the default's blocked expert SwiGLU loop alone, on the T*k routed rows laid out
               as evenly filled blocks (no padding);
  adamw        one optax AdamW update of all parameters (donated, in place);
  train_step   the whole train step of the train suite, for reference.
The parts' `seconds * per_step` add up to about the train step (norms, embedding and the
residual adds are left out). `gflop_per_s` = model FLOPs of the part / seconds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.benchmarks import train as train_suite
from experiments.benchmarks.common import print_load, report, time_interleaved
from qwen3_jax.model import Qwen3, dispatch
from qwen3_jax.model.attention import Attention
from qwen3_jax.model.moe import MoE
from qwen3_jax.train.fused_ce import fused_cross_entropy


def _grad_call(fn, *args):
  """A zero-argument call of jit(grad of sum(fn(*args) * r)) w.r.t. every arg."""
  out = jax.eval_shape(fn, *args)
  r = jax.random.normal(jax.random.key(1), out.shape, out.dtype)
  g = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * r), argnums=tuple(range(len(args)))))
  return lambda: jax.block_until_ready(g(*args))


def _module_call(module, fn, x):
  graphdef, state = nnx.split(module)
  return _grad_call(lambda st, x: fn(nnx.merge(graphdef, st), x), state, x)


def _parts(cfg, batch: int, seq_len: int):
  """({part: zero-argument call}, {part: forward model FLOPs or None}, {part: runs per step})."""
  e, k, f = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
  d, v, t = cfg.hidden_size, cfg.vocab_size, batch * seq_len
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (batch, seq_len, d), jnp.float32)
  head = 0.02 * jax.random.normal(keys[1], (d, v), jnp.float32)
  targets = jax.random.randint(keys[2], (batch, seq_len), 0, v)
  weights = jnp.full((batch, seq_len), 1.0 / t, jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
  b = dispatch.block_size(t * k, e)
  n_blocks = t * k // b  # evenly filled: each expert gets n_blocks / E whole blocks
  rows = jax.random.normal(keys[3], (n_blocks * b, d), jnp.float32)
  block_expert = jnp.arange(n_blocks, dtype=jnp.int32) * e // n_blocks
  moe = MoE(cfg, rngs=nnx.Rngs(0))

  def experts(rows, wg, wu, wd):
    return dispatch.expert_blocks(rows, wg, wu, wd, block_expert, n_blocks, b)

  params = nnx.state(Qwen3(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  tx = optax.adamw(train_suite.LEARNING_RATE, weight_decay=train_suite.WEIGHT_DECAY)
  box = {"params": params, "opt": tx.init(params)}
  grads = jax.tree.map(lambda p: 1e-3 * p, params)

  def update(params, opt, grads):
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  update = jax.jit(update, donate_argnums=(0, 1))

  def run_adamw():
    box["params"], box["opt"] = update(box["params"], box["opt"], grads)
    jax.block_until_ready(box["params"])

  seq = np.random.default_rng(0).integers(0, v, (batch, seq_len + 1), dtype=np.int32)
  _, run_step, _, _ = train_suite.ours(cfg, jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:]))

  def ce(h, w):
    return fused_cross_entropy(h, w, targets, weights)[0]

  calls = {
    "lm_head_ce": _grad_call(ce, x, head),
    "attention": _module_call(Attention(cfg, rngs=nnx.Rngs(0)), lambda m, x: m(x, positions)[0], x),
    "moe": _module_call(moe, lambda m, x: m(x)[0], x),
    "experts": _grad_call(experts, rows, moe.gate_proj[...], moe.up_proj[...], moe.down_proj[...]),
    "adamw": run_adamw,
    "train_step": run_step,
  }
  h, kh, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  attn = 2 * t * d * (2 * h + 2 * kh) * dh + 4 * t * seq_len * h * dh  # projections, full L x L
  flops = {
    "lm_head_ce": 2 * t * d * v,
    "attention": attn,
    "moe": 2 * t * k * 3 * d * f + 2 * t * d * e,
    "experts": 2 * t * k * 3 * d * f,
    "adamw": None,
    "train_step": train_suite.model_flops(cfg, batch, seq_len) / 3,
  }
  n = cfg.num_hidden_layers
  per_step = dict(lm_head_ce=1, attention=n, moe=n, experts=n, adamw=1, train_step=1)
  return calls, flops, per_step


def run(flags) -> list[dict]:
  batch, seq_len = (2, 128) if flags.quick else (8, 512)
  print_load("at start")
  rows = []
  for name, (e, k, f) in train_suite.VARIANTS.items():
    cfg = train_suite.variant_config(e, k, f)
    calls, flops, per_step = _parts(cfg, batch, seq_len)
    times = time_interleaved(calls, repeats=flags.repeats)
    for part, samples in times.items():
      seconds = float(np.min(samples))
      fl = None if flops[part] is None else 3.0 * flops[part]  # forward + backward
      rows.append(
        dict(
          suite="breakdown",
          case=f"small_{name}",
          part=part,
          strategy=cfg.moe.strategy,
          seconds=seconds,
          seconds_median=float(np.median(samples)),
          per_step=per_step[part],
          step_share_s=seconds * per_step[part],
          flops=fl,
          gflop_per_s=None if fl is None else fl / seconds / 1e9,
          num_experts=e,
          top_k=k,
          tokens=batch * seq_len,
        )
      )
  print_load("at end")
  columns = ["case", "part", "seconds", "seconds_median", "per_step", "step_share_s"]
  report(rows, columns + ["gflop_per_s"])
  return rows
