"""The RL loop (stages 2 and 4): rollouts from the current policy, rewards, GRPO steps.

`train_rl(cfg, workdir)` runs `cfg.train.num_steps` iterations. Each iteration:
  1. draws `prompts_per_step` training prompts, a pure function of (seed, iteration, attempt)
     (`rollout.draw_tasks`);
  2. samples `group_size` conversations of each through the generation engine with the
     learner's parameters read in place (the engine is handed `state.params` at every call: no
     copy of the weights is made for sampling), tool tasks through the tool loop
     (`rollout.roll_out`);
  3. scores them (`rewards.score`, weights from the config; or the caller's `reward_fn`);
  4. dynamic sampling (`rollout.dynamic_sampling`): groups whose rewards are all equal carry
     no signal, so up to `max_resample_tries` more rounds of fresh prompts are drawn and their
     groups with spread take those places (a group still flat after that stays, at A = 0);
  5. group advantages (`grpo.group_advantages`), the batch (`batch.sequence_batch`: one row
     per conversation, padded with empty rows to a multiple of the mesh's data axes x
     micro-batches; rows longer than seq_len are cut), the rollout log-probs as old_logp
     (recomputed by the step's forward when the model is not float32, `recompute_old_logp`)
     and, with beta > 0, the frozen reference's log-probs;
  6. `ppo_epochs` optimizer steps (`rl/step.py`) on that batch.
The checkpoint (the project's `Checkpointer`, every `checkpoint_every` iterations, at the
end, on SIGTERM) holds params, optimizer state and the iteration, which is all the rollout
state there is (prompts and sampling seeds derive from it), so a killed run resumes exactly;
its step directories are what a later stage's `init_from` reads. One record per iteration
goes to metrics.jsonl and TensorBoard (prefix `rl/`): reward mean / std and each term, pass
rate, zero-std group shares, KL (beta > 0), entropy, response lengths, clip fractions, the
step's losses and norms, generation and training tokens/s and the generate / train time split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax import checkpoint as ckpt
from qwen3_jax import sharding as shd
from qwen3_jax.data.tokenizer import load_tokenizer
from qwen3_jax.infer.engine import Engine
from qwen3_jax.infer.load import load_tokenizer_for
from qwen3_jax.infer.tool_loop import EnginePolicy
from qwen3_jax.rl import grpo, rewards
from qwen3_jax.rl.batch import sequence_batch
from qwen3_jax.rl.rollout import Rollout, draw_tasks, mix_seed, roll_out
from qwen3_jax.rl.run_config import RLRunConfig
from qwen3_jax.rl.step import make_rl_program
from qwen3_jax.train import resume
from qwen3_jax.train.loop import window_mean
from qwen3_jax.train.metrics import MetricsWriter

RewardFn = Callable[[Rollout], dict]  # -> at least {"reward": float}; other floats are logged


class Iteration:
  """The rollout state a checkpoint keeps (its `data` item): the iteration number."""

  def __init__(self):
    self.value = 0

  def get_state(self) -> dict:
    return {"iteration": self.value}

  def set_state(self, state: dict) -> None:
    self.value = int(state["iteration"])


def train_rl(
  cfg: RLRunConfig,
  workdir: str,
  *,
  printer: Callable[[str], None] = print,
  reward_fn: RewardFn | None = None,
  policy=None,
  mesh=None,
  on_step: Callable[[int, dict], None] | None = None,
) -> dict:
  """Runs (or resumes) the RL stage to `cfg.train.num_steps` iterations; returns a summary.

  Args:
    cfg: the run's config.
    workdir: checkpoints, metrics.jsonl, tb/, config.json, rl_config.json, tokenizer.json.
    reward_fn: replaces `rewards.score` (tests: a custom bandit reward).
    policy: a `ModelPolicy` to sample from instead of the engine (tests: scripted replies).
    mesh: the mesh to run on; None = `cfg.train.mesh` over every device.
    on_step: `(iteration, {"state", "record"})` after every iteration's save.

  Returns:
    {"workdir", "iterations", "records" (this call's metric records), "state", "tokenizer",
    "wall_s", "preempted"}.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  printer = printer if jax.process_index() == 0 else (lambda *_: None)
  tcfg, rc = cfg.train, cfg.rollout
  mesh = shd.make_mesh(tcfg.mesh) if mesh is None else mesh
  dp = math.prod(mesh.shape[a] for a in shd.BATCH_AXES)
  unit = dp * tcfg.micro_batches
  rows = -(-tcfg.batch_size // unit) * unit  # padded with empty rows
  step_cfg = dataclasses.replace(
    tcfg, batch_size=rows, num_steps=tcfg.num_steps * cfg.ppo_epochs
  )  # the optimizer's schedule counts optimizer steps
  prog = make_rl_program(step_cfg, mesh, cfg.objective)
  tok = _tokenizer(cfg, workdir)
  it_state = Iteration()
  ck, state, start = resume.start(step_cfg, prog, workdir, it_state, printer)
  ckpt.write_json(os.path.join(workdir, "rl_config.json"), dataclasses.asdict(cfg))
  printer(
    f"RL: mesh {dict(mesh.shape)}; {rc.prompts_per_step} prompts x {rc.group_size} samples "
    f"-> {rows} rows of {tcfg.seq_len}; {cfg.ppo_epochs} optimizer step(s) per batch"
  )
  if policy is None:
    engine = Engine(nnx.merge(prog.graphdef, state.params), tok, mesh=mesh)
    policy = EnginePolicy(engine, batch_size=-(-tcfg.batch_size // dp) * dp)
  ref_params = None
  if cfg.objective.beta > 0:
    ref_model, _ = ckpt.load_params(cfg.reference, mesh)
    ref_params = nnx.state(ref_model, nnx.Param).to_pure_dict()
  recompute = cfg.recompute_old_logp == "always" or (
    cfg.recompute_old_logp == "auto" and tcfg.model.dtype != "float32"
  )
  score = reward_fn or (lambda r: rewards.score(r, cfg.rewards, rc.max_new_tokens))
  writer = MetricsWriter(workdir, tcfg.num_steps, printer)
  records = []
  it = start
  with resume.catch_sigterm() as preempted:
    try:
      while it < tcfg.num_steps:
        t0 = time.time()
        if hasattr(policy, "state"):
          policy.state = state.params  # sample from the learner's current weights, in place
        chosen, scores, info = collect(policy, cfg, score, it)
        t_gen = time.time() - t0
        host, seqs = _host_batch(cfg, chosen, scores, rows)
        batch = {k: jax.device_put(v, prog.batch_shardings[k]) for k, v in host.items()}
        if recompute:  # the step's own forward: an exact ratio of 1 on policy
          logp, _ = prog.logprobs(state.params, batch["tokens"], batch["segment_ids"])
          batch["old_logp"] = jnp.where(batch["loss_mask"] > 0, logp, 0.0)
        if ref_params is not None:
          batch["ref_logp"] = prog.logprobs(ref_params, batch["tokens"], batch["segment_ids"])[0]
        ms = []
        for _ in range(cfg.ppo_epochs):
          state, m = prog.rl_step(state, batch)
          ms.append(m)
        m = window_mean(jax.device_get(ms))
        t_train = time.time() - t0 - t_gen
        it += 1
        it_state.value = it
        resume.check_bad_streak(int(m["bad_streak"]), tcfg.max_bad_steps, it, ck.root)
        rec = _record(m, scores, info, host, seqs, rc.group_size, cfg.ppo_epochs, t_gen, t_train)
        writer.write(it, rec, prefix="rl")
        records.append({"step": it, **rec})
        writer.progress(
          it,
          rec["loss"],
          rec["train_tokens_per_s"],
          f"  reward {rec['reward_mean']:.3f}  pass {rec.get('pass_rate', float('nan')):.2f}"
          f"  gen {rec['gen_tokens_per_s']:,.0f} tok/s ({rec['generate_share']:.0%} of the step)",
        )
        resume.save(ck, state, it, it_state, step_cfg)
        if on_step is not None:
          on_step(it, {"state": state, "record": rec})
        if resume.any_process(bool(preempted)):
          printer(f"SIGTERM: saving iteration {it} and stopping")
          break
      resume.save(ck, state, it, it_state, step_cfg, force=True)
      ck.wait()
    finally:
      writer.close()
      ck.close()
  summary = {
    "workdir": workdir,
    "iterations": it,
    "preempted": bool(preempted),
    "wall_s": round(time.time() - writer.t_start, 1),
  }
  printer("summary: " + json.dumps(summary))
  return {**summary, "records": records, "state": state, "tokenizer": tok}


def collect(policy, cfg: RLRunConfig, score: RewardFn, iteration: int):
  """The iteration's rollouts and their scores, after dynamic sampling.

  Round 0 draws `prompts_per_step` prompts; with `dynamic_sampling`, each further round (at
  most `max_resample_tries`) draws as many fresh ones (the same batch shape, so no new
  compile) and their groups with reward spread replace, in order, the groups without.

  Returns:
    (rollouts [P * G], scores [P * G], info): info counts the rounds run, the zero-std groups
    of round 0 and of the final batch, and every token generated (discarded groups too).
  """
  rc, seed = cfg.rollout, cfg.train.seed
  g = rc.group_size

  def round_(attempt):
    prompts = draw_tasks(rc, seed, iteration, attempt)
    rs = roll_out(
      policy,
      prompts,
      rc,
      temperature=cfg.objective.temperature,
      seed=mix_seed("rollout", seed, iteration, attempt),
    )
    sc = [score(r) for r in rs]
    groups = [(rs[k * g : (k + 1) * g], sc[k * g : (k + 1) * g]) for k in range(len(prompts))]
    return groups, sum(sum(r.generated) for r in rs)

  def flat(group) -> bool:
    rewards_g = [s["reward"] for s in group[1]]
    return max(rewards_g) == min(rewards_g)

  groups, generated = round_(0)
  zero_first = sum(map(flat, groups))
  rounds = 1
  while rc.dynamic_sampling and rounds <= rc.max_resample_tries and any(map(flat, groups)):
    fresh, n = round_(rounds)
    generated += n
    rounds += 1
    spare = [grp for grp in fresh if not flat(grp)]
    for k, grp in enumerate(groups):
      if flat(grp) and spare:
        groups[k] = spare.pop(0)
  info = {
    "rounds": rounds,
    "frac_zero_std_first": zero_first / len(groups),
    "frac_zero_std": sum(map(flat, groups)) / len(groups),
    "generated_tokens": generated,
  }
  return [r for grp in groups for r in grp[0]], [s for grp in groups for s in grp[1]], info


def _host_batch(cfg: RLRunConfig, chosen, scores, rows: int):
  """(numpy batch, per-row (ids, mask, logprobs)): group advantages of the rewards, one row
  per conversation, padded to `rows`, cut at seq_len."""
  rewards_n = np.asarray([s["reward"] for s in scores], np.float32)
  obj = cfg.objective
  adv = grpo.group_advantages(
    rewards_n, cfg.rollout.group_size, scale_by_std=obj.scale_by_std, eps=obj.adv_eps
  )
  seqs = [(r.transcript.token_ids, r.transcript.loss_mask, r.transcript.logprobs) for r in chosen]
  host = sequence_batch(seqs, np.asarray(adv), cfg.train.seq_len, rows=rows, truncate=True)
  return host, seqs


def _record(m, scores, info, host, seqs, g, epochs, t_gen, t_train) -> dict:
  """The iteration's metrics (module docstring)."""
  reward = np.asarray([s["reward"] for s in scores], np.float64)
  lens = np.asarray([int(np.sum(mask)) for _, mask, _ in seqs])  # sampled tokens per row
  rec = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
  rec["clip_frac"] = rec.get("clip_frac_low", 0.0) + rec.get("clip_frac_high", 0.0)
  terms = sorted({k for s in scores for k in s} - {"reward"})
  for k in terms:
    rec[f"reward_{k}"] = float(np.mean([s.get(k, 0.0) for s in scores]))
  if "reward_passed" in rec:
    rec["pass_rate"] = rec.pop("reward_passed")
  tokens = float(host["segment_ids"].sum())  # non-padding tokens trained on per epoch
  rec.update(
    reward_mean=float(reward.mean()),
    reward_std=float(reward.std()),
    frac_zero_std=info["frac_zero_std"],
    frac_zero_std_first=info["frac_zero_std_first"],
    rollout_rounds=float(info["rounds"]),
    response_len_mean=float(lens.mean()),
    response_len_max=float(lens.max()),
    truncated=float(np.mean([len(ids) > host["tokens"].shape[1] for ids, _, _ in seqs])),
    groups=float(len(scores) // g),
    time_generate_s=t_gen,
    time_train_s=t_train,
    generate_share=t_gen / max(t_gen + t_train, 1e-9),
    gen_tokens_per_s=info["generated_tokens"] / max(t_gen, 1e-9),
    train_tokens_per_s=tokens * epochs / max(t_train, 1e-9),
  )
  return rec


def _tokenizer(cfg: RLRunConfig, workdir: str):
  """WORKDIR/tokenizer.json (a resumed run), else `data.tokenizer`, else the one kept with
  `init_from`; copied into the workdir so later stages and `load_model` find it there."""
  saved = os.path.join(workdir, "tokenizer.json")
  if os.path.exists(saved):
    return load_tokenizer(saved)
  if cfg.train.data.tokenizer:
    tok = load_tokenizer(cfg.train.data.tokenizer)
  elif cfg.train.init_from:
    tok = load_tokenizer_for(checkpoint=cfg.train.init_from)
  else:
    raise ValueError("an RL run needs a tokenizer: set init_from or data.tokenizer")
  if jax.process_index() == 0:
    tok.save(saved + ".tmp")
    os.replace(saved + ".tmp", saved)
  ckpt.sync_processes("rl_tokenizer")
  return tok
