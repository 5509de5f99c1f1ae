"""The jitted policy-gradient step: `rl_step(state, batch) -> (state, metrics)`.

Built on the training step's machinery (`train/step.py`: the same TrainState, optimizer, state
shardings, gradient accumulation, non-finite skipping), so resume and checkpoints are shared
with the SFT loop. The objective is `grpo.policy_loss` of the tokens' log-probs, recomputed
memory-lean from the final hidden states (`fused_ce.token_logprobs`: the LM head chunked over
tokens, no [B, L, V] logits) at the rollout temperature, so that they equal the engine's
rollout log-probs and the importance ratio starts at exactly 1 on policy.

Batch (`RL_BATCH_KEYS`), one sequence (prompt + completion) per row, token-aligned:
  tokens       [B, L] int32  prompt and completion ids (anything in the padding)
  segment_ids  [B, L] int32  1 on the row's tokens, 0 on padding (packed rows: 1, 2, ...)
  loss_mask    [B, L]        1 on the completion tokens trained on (not prompt, padding, tool
                             responses or forced text)
  old_logp     [B, L] f32    log pi_old(tokens[b, t] | tokens[b, <t]) (engine log-probs or
                             `logprobs` on the rollout params); 0 off the mask. The engine's
                             equal these within float32 rounding for a float32 model; a bf16
                             model's engine rounds its logits to bf16 (the step keeps them
                             float32), so recompute with `logprobs` for an exact ratio of 1
  advantages   [B]    f32    per sequence (`grpo.group_advantages`)
  ref_logp     [B, L] f32    only when rl_cfg.beta > 0: the reference policy's log-probs
Several optimizer steps per rollout batch: call `rl_step` again with the same old_logp.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from qwen3_jax import sharding as shd
from qwen3_jax.rl import grpo
from qwen3_jax.rl.config import RLConfig
from qwen3_jax.train.config import TrainConfig
from qwen3_jax.train.fused_ce import token_logprobs
from qwen3_jax.train.losses import batch_totals, moe_terms
from qwen3_jax.train.step import (
  LOOP_ONLY,
  Compiled,
  TrainState,
  accumulate_grads,
  apply_gradients,
  forward,
  moe_counts_fn,
  setup_state,
  under_mesh,
)

RL_BATCH_KEYS = ("tokens", "segment_ids", "loss_mask", "old_logp", "advantages")


def sequence_logprobs(
  graphdef, params, tokens: jax.Array, segment_ids: jax.Array, *, temperature: float, vocab_size
):
  """Per-token log-probs and entropies of each token given the ones before it.

  logp[b, t] = log softmax(logits[b, t - 1] / T)[tokens[b, t]], entropy[b, t] that
  distribution's entropy; both 0 at t = 0 (and meaningless at a packed segment's first token).
  From the final hidden states and the chunked head (`fused_ce.token_logprobs`).

  Args:
    graphdef, params: the model (`nnx.merge(graphdef, params)`).
    tokens, segment_ids: [B, L] int (segment 0 = padding).
    temperature: T > 0 (the rollouts' sampling temperature; 1 for greedy ones).
    vocab_size: the real vocabulary (the head's padding columns are masked).

  Returns:
    (logp [B, L], entropy [B, L], the model's aux dict); logp differentiable w.r.t. params.
  """
  out, head = forward(graphdef, params, {"inputs": tokens, "segment_ids": segment_ids})
  # Position t predicts token t + 1; the last position's target is a dummy (id 0).
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  lp, ent = token_logprobs(
    out.hidden, head, targets, temperature=temperature, vocab_size=vocab_size
  )
  shift = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)  # noqa: E731
  return shift(lp), shift(ent), out.aux


@dataclasses.dataclass
class RLProgram(Compiled):
  """The compiled RL functions of one (TrainConfig, mesh, RLConfig)."""

  rl_cfg: RLConfig
  batch_shardings: dict  # key -> NamedSharding, for every key the batch must hold
  rl_step: Any  # (TrainState, batch) -> (TrainState, metrics) (jitted, donating)
  grads: Any  # (params, batch) -> (grads, metrics), summed over micro-batches (jitted)
  logprobs: Any  # (params, tokens, segment_ids) -> (logp, entropy) [B, L] (jitted)


def make_rl_program(cfg: TrainConfig, mesh: Mesh, rl_cfg: RLConfig) -> RLProgram:
  """Builds the sharded init / rl_step / logprobs functions (cached like `make_program`).

  `cfg` gives the model, optimizer, seed and micro-batches (its z_loss is not used);
  `rl_cfg` the objective. The batch must hold exactly `RL_BATCH_KEYS`, plus `ref_logp` when
  rl_cfg.beta > 0.
  """
  return _make_rl_program(dataclasses.replace(cfg, **LOOP_ONLY), mesh, rl_cfg)


@functools.lru_cache(maxsize=4)
def _make_rl_program(cfg: TrainConfig, mesh: Mesh, rl_cfg: RLConfig) -> RLProgram:
  mcfg = cfg.model
  setup = setup_state(cfg, mesh)
  graphdef, state_sh, replicated = setup.graphdef, setup.state_shardings, setup.replicated
  rows = NamedSharding(mesh, shd.logical_to_spec(("batch", None)))  # [B, L]
  keys = RL_BATCH_KEYS + (("ref_logp",) if rl_cfg.beta > 0 else ())
  batch_sh = {k: rows for k in keys}
  batch_sh["advantages"] = NamedSharding(mesh, shd.logical_to_spec(("batch",)))  # [B]
  logprobs_of = functools.partial(
    sequence_logprobs, graphdef, temperature=rl_cfg.temperature, vocab_size=mcfg.vocab_size
  )
  moe_counts = moe_counts_fn(graphdef, mcfg) if rl_cfg.moe_aux else None

  def grads_and_metrics(params, batch):
    totals = grpo.loss_totals(batch["loss_mask"])  # the policy loss's normalisers
    moe_totals = batch_totals(batch)  # the MoE aux losses' (tokens, sequences)

    def mb_loss(p, mb, f_global):
      logp, ent, aux = logprobs_of(p, mb["tokens"], mb["segment_ids"])
      loss, metrics = grpo.policy_loss(
        logp,
        mb["old_logp"],
        mb["advantages"],
        mb["loss_mask"],
        eps_low=rl_cfg.eps_low,
        eps_high=rl_cfg.eps_high,
        aggregation=rl_cfg.aggregation,
        ref_logp=mb.get("ref_logp"),
        beta=rl_cfg.beta,
        entropy=ent,
        norm_len=rl_cfg.norm_len,
        totals=totals,
      )
      if mcfg.is_moe:
        aux_loss, terms = moe_terms(aux, mb["segment_ids"], moe_totals, mcfg, f_global=f_global)
        metrics.update(terms)
        if rl_cfg.moe_aux:
          loss = loss + aux_loss
        metrics["loss"] = jax.lax.stop_gradient(loss)
      return loss, metrics

    counts = None
    if moe_counts is not None:
      counts = lambda p, mb: moe_counts(p, {"inputs": mb["tokens"], **mb})  # noqa: E731
    return accumulate_grads(mb_loss, params, batch, cfg.micro_batches, counts)

  def rl_step(state: TrainState, batch: dict):
    grads, metrics = grads_and_metrics(state.params, batch)
    new_state, metrics = apply_gradients(setup, state, grads, metrics)
    metrics["tokens"] = grpo.loss_totals(batch["loss_mask"])["tokens"]
    return new_state, metrics

  def logprobs(params, tokens, segment_ids):
    logp, ent, _ = logprobs_of(params, tokens, segment_ids)
    return logp, ent

  with shd.use_mesh(mesh):
    init_j = jax.jit(setup.init, out_shardings=state_sh)
    step_j = jax.jit(
      rl_step,
      in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, replicated),
      donate_argnums=(0,),
    )
    grads_j = jax.jit(grads_and_metrics, in_shardings=(setup.param_shardings, batch_sh))
    logprobs_j = jax.jit(
      logprobs, in_shardings=(setup.param_shardings, rows, rows), out_shardings=(rows, rows)
    )
  check = functools.partial(_check_batch, keys=keys)
  return RLProgram(
    cfg=cfg,
    mesh=mesh,
    graphdef=graphdef,
    tx=setup.tx,
    state_shardings=state_sh,
    init=under_mesh(init_j, mesh),
    lr=setup.lr,
    rl_cfg=rl_cfg,
    batch_shardings=batch_sh,
    rl_step=_Checked(under_mesh(step_j, mesh), check),
    grads=_Checked(under_mesh(grads_j, mesh), check),
    logprobs=under_mesh(logprobs_j, mesh),
  )


def _check_batch(batch: dict, keys: tuple[str, ...]) -> None:
  if set(batch) != set(keys):
    raise ValueError(
      f"RL batch keys {sorted(batch)} != {sorted(keys)} (ref_logp goes with beta > 0 only)"
    )


class _Checked:
  """A jitted (x, batch) function whose batch keys are checked first (a clear error instead
  of a pytree-structure mismatch with the in_shardings)."""

  def __init__(self, fn, check):
    self.fn, self.check = fn, check

  def __call__(self, x, batch):
    self.check(batch)
    return self.fn(x, batch)

  def cache_size(self) -> int:
    return self.fn.cache_size()
