"""The RL loop (qwen3_jax/rl/loop.py) end to end on a tiny MoE: a one-token bandit learns its
rewarded tokens through the real loop (engine rollouts, dynamic sampling, GRPO steps); the
step's recomputed log-probs equal the engine's rollout log-probs; a killed run resumes
exactly; the stage-2 and stage-4 configs run from a checkpoint on a 2 data x 2 expert mesh;
multi-turn tool rollouts keep tool responses out of the loss; the reward terms by hand."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common, stage2_reasoning_rl, stage4_general_rl
from qwen3_jax import checkpoint as ckpt
from qwen3_jax import config as C
from qwen3_jax import sharding as shd
from qwen3_jax.data import chat, tasks
from qwen3_jax.data.tokenizer import load_tokenizer as load_tok
from qwen3_jax.data.tokenizer import train_tokenizer
from qwen3_jax.infer.engine import Engine
from qwen3_jax.infer.tool_loop import EnginePolicy, ScriptedPolicy
from qwen3_jax.model.transformer import Qwen3
from qwen3_jax.rl import rewards
from qwen3_jax.rl.batch import sequence_batch
from qwen3_jax.rl.loop import train_rl
from qwen3_jax.rl.rollout import Prompt, draw_tasks, roll_out
from qwen3_jax.rl.run_config import RewardWeights, RLRunConfig, RolloutConfig
from qwen3_jax.rl.step import make_rl_program
from qwen3_jax.train.config import OptimConfig, TrainConfig

VOCAB = 512  # configs/pretrain.py's tiny vocabulary, which the stage configs use
TIMING = ("time_generate_s", "time_train_s", "generate_share", "gen_tokens_per_s")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  """A BPE trained on gold task conversations (short prompts), saved as tokenizer.json."""
  texts = [
    tasks.render_gold(t)
    for fam in ("arithmetic", "parity", "format", "unit_tools", "flight_tools")
    for t in tasks.make_split(fam, "train", 6, (1, 2), seed=9)
  ]
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  train_tokenizer(texts, VOCAB).save(path)
  return path


def _one_layer():
  return C.tiny(vocab_size=VOCAB, num_hidden_layers=1)


def _run_cfg(tok_path, steps, *, init_from="", **kw) -> RLRunConfig:
  """Parity prompts (short), G = 8, 4 prompts, one generated token, 1 device."""
  optim = OptimConfig(lr=kw.pop("lr", 1e-2), warmup_steps=0, schedule="constant", weight_decay=0)
  rollout = RolloutConfig(
    group_size=8, prompts_per_step=4, max_new_tokens=1, families=("parity",), difficulties=(1,)
  )
  train = TrainConfig(
    num_steps=steps,
    batch_size=32,
    seq_len=96,
    model=_one_layer(),
    optim=optim,
    mesh=C.MeshConfig(data=1),
    checkpoint_every=0,
    init_from=init_from,
    data=dataclasses.replace(TrainConfig.__dataclass_fields__["data"].default, tokenizer=tok_path),
  )
  return RLRunConfig(train=train, rollout=rollout, **kw)


def _mesh1():
  return shd.make_mesh(C.MeshConfig(data=1), jax.devices()[:1])


def _first_token(r) -> int:
  return r.transcript.token_ids[r.transcript.steps[0].prompt_len]


REWARDED = set(range(9, VOCAB, 16))  # 32 ordinary token ids: ~1/16 of the mass at init


def _bandit_reward(r) -> dict:
  return {"reward": float(_first_token(r) in REWARDED)}


class Kill(Exception):
  """Stands for the process dying right after an iteration (and its checkpoint)."""


def _params(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


@pytest.fixture(scope="module")
def bandit(tok_path, tmp_path_factory):
  """16 iterations of the bandit (module docstring of the test below), the parameters after
  iteration 4 kept for the resume test."""
  cfg = _run_cfg(tok_path, 16, ppo_epochs=2)
  kept = {}

  def keep(it, ctx):
    if it == 4:
      kept["params"] = _params(ctx["state"])

  workdir = str(tmp_path_factory.mktemp("bandit"))
  out = train_rl(cfg, workdir, reward_fn=_bandit_reward, mesh=_mesh1(), on_step=keep)
  return cfg, out, kept["params"]


def _p_rewarded(cfg, params, tok) -> float:
  prompt = draw_tasks(cfg.rollout, 0, 0)[0]
  ids = jnp.asarray([tok.encode(chat.render(prompt.messages, add_generation_prompt=True)).ids])
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen3(cfg.train.model, rngs=nnx.Rngs(0))))
  logits = jax.jit(lambda p: nnx.merge(graphdef, p)(ids).logits)(params)
  probs = jax.nn.softmax(logits[0, -1, :VOCAB])
  return float(probs[np.asarray(sorted(REWARDED))].sum())


def test_one_token_bandit_learns_the_rewarded_tokens(bandit):
  """Reward 1 when the one generated token is in a fixed set of 32 ids (of 512), else 0:
  through the real loop (engine rollouts at T = 1 from the learner's params in place,
  dynamic sampling, DAPO, 2 optimizer steps per batch), the set's probability under the
  model (an independent plain forward of the final params) rises from ~1/16 to > 0.9 within
  16 iterations; the logged reward follows."""
  cfg, out, _ = bandit
  recs = out["records"]
  assert len(recs) == 16 and recs[0]["reward_mean"] < 0.3
  assert recs[0]["rollout_rounds"] > 1  # round 0 had flat groups: more prompts were drawn
  assert _p_rewarded(cfg, out["state"].params, out["tokenizer"]) > 0.9
  assert np.mean([r["reward_mean"] for r in recs[-3:]]) > 0.8
  for key in ("pg_loss", "entropy", "clip_frac", "response_len_max", "gen_tokens_per_s"):
    assert all(np.isfinite(r[key]) for r in recs), key
  assert all(r["response_len_max"] == 1 for r in recs)


def test_killed_run_resumes_exactly(bandit, tok_path, tmp_path):
  """The bandit killed after iteration 2 (checkpoint every 2) and restarted: iterations 3-4
  give the same parameters (bit for bit) and the same metrics (timings aside) as the
  uninterrupted run; prompts and sampling seeds derive from the saved iteration."""
  cfg, straight, params4 = bandit
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=2))

  def kill_at(n):
    def on_step(it, ctx):
      if it == n:
        raise Kill(_params(ctx["state"]))

    return on_step

  kw = dict(reward_fn=_bandit_reward, mesh=_mesh1(), printer=lambda *_: None)
  with pytest.raises(Kill):
    train_rl(cfg, str(tmp_path), on_step=kill_at(2), **kw)
  with pytest.raises(Kill) as resumed:
    train_rl(cfg, str(tmp_path), on_step=kill_at(4), **kw)
  for a, b in zip(jax.tree.leaves(resumed.value.args[0]), jax.tree.leaves(params4), strict=True):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert [r["step"] for r in logged] == [1, 2, 3, 4]
  for got, want in zip(logged, straight["records"][:4], strict=True):
    for k, v in want.items():
      if k not in TIMING and not k.endswith("tokens_per_s"):
        assert got[k if k == "step" else f"rl/{k}"] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_recomputed_logprobs_equal_the_engine_rollouts(bandit):
  """Rollouts of 8 tokens (T = 1, float32) from the engine with the run's final params;
  the RL step's `logprobs` on the built batch equal the engine's log-probs on every sampled
  token within 2e-5 (what makes the importance ratio start at 1)."""
  cfg, out, _ = bandit
  rc = dataclasses.replace(cfg.rollout, max_new_tokens=8)
  prog = make_rl_program(_step_cfg(cfg), _mesh1(), cfg.objective)
  params = out["state"].params
  engine = Engine(nnx.merge(prog.graphdef, params), out["tokenizer"], mesh=_mesh1())
  policy = EnginePolicy(engine, state=params, batch_size=32)
  rs = roll_out(policy, draw_tasks(rc, 0, 99), rc, temperature=1.0, seed=5)
  seqs = [(r.transcript.token_ids, r.transcript.loss_mask, r.transcript.logprobs) for r in rs]
  batch = sequence_batch(seqs, np.zeros(32), cfg.train.seq_len)
  logp, _ = prog.logprobs(params, batch["tokens"], batch["segment_ids"])
  on = batch["loss_mask"] > 0
  assert on.sum() == sum(sum(r.generated) for r in rs) > 32
  np.testing.assert_allclose(np.asarray(logp)[on], batch["old_logp"][on], atol=2e-5)


def _step_cfg(cfg):
  return dataclasses.replace(cfg.train, num_steps=cfg.train.num_steps * cfg.ppo_epochs)


@pytest.fixture(scope="module")
def init_dir(tok_path, tmp_path_factory):
  """A previous stage's checkpoint: `save_params` of a random tiny model (the stage configs'
  `model=tiny`, one layer) with its tokenizer.json."""
  path = str(tmp_path_factory.mktemp("stage_prev"))
  model_cfg = _one_layer()
  ckpt.save_params(path, Qwen3(model_cfg, rngs=nnx.Rngs(1)), model_cfg)
  with open(tok_path) as src, open(os.path.join(path, "tokenizer.json"), "w") as dst:
    dst.write(src.read())
  return path


@pytest.mark.parametrize("module", [stage2_reasoning_rl, stage4_general_rl])
def test_stage_config_runs_two_iterations_from_a_checkpoint(module, init_dir, tmp_path):
  """The stage config, shrunk (one layer, 2 prompts x 2 samples, 8 new tokens), runs 2
  iterations from the previous stage's checkpoint on a 2 data x 2 expert mesh; its workdir
  then holds what a later stage's `init_from` reads (params + tokenizer). Stage 4: a k3 KL
  to the checkpoint, /think and /no_think prompts, a tool task among the prompts."""
  cd = module.get_config(f"model=tiny,init_from={init_dir},steps=2")
  cd.mesh.data, cd.mesh.expert = 2, 2
  cd.model.num_hidden_layers = 1
  cd.rl.group_size, cd.rl.prompts_per_step, cd.rl.max_new_tokens = 2, 2, 8
  cfg = common.to_rl_config(cd)
  mesh = shd.make_mesh(cfg.train.mesh, jax.devices()[:4])
  lines = []
  out = train_rl(cfg, str(tmp_path), mesh=mesh, printer=lines.append)
  assert out["iterations"] == 2 and any("initialised parameters from" in x for x in lines)
  recs = out["records"]
  for r in recs:
    assert np.isfinite(r["loss"]) and 0 <= r["pass_rate"] <= 1 and r["response_len_max"] <= 8
  model, _ = ckpt.load_params(str(tmp_path))
  assert model.cfg == cfg.train.model
  assert os.path.exists(os.path.join(tmp_path, "tokenizer.json"))
  if module is stage4_general_rl:
    assert all(0 <= r["kl"] < 1e-2 for r in recs)  # near the reference it starts from
    drawn = [draw_tasks(cfg.rollout, cfg.train.seed, i, a) for i in range(2) for a in range(3)]
    kinds = {(isinstance(p.task, tasks.ToolTask), p.thinking) for ps in drawn for p in ps}
    assert {k for k, _ in kinds} == {True, False} and {t for _, t in kinds} == {True, False}


def _reply_text(m: dict) -> str:
  """A gold assistant message as the model would write it (think block, content, calls)."""
  calls = "".join(
    "\n<tool_call>\n"
    + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
    + "\n</tool_call>"
    for c in m.get("tool_calls", [])
  )
  return f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}{calls}".replace(
    "\n\n\n", "\n\n"
  )


def test_multi_turn_tool_rollouts_mask_tool_responses_out_of_the_loss(tok_path):
  """A scripted policy writes a tool task's gold replies (level 2: two calls, two tool
  turns): in the built batch the loss mask is on exactly the replies' tokens (each with its
  <|im_end|>), the tool responses and headers are off, old_logp is 0 off the mask; the
  weighted reward sees a correct, well-formed, flag-following, valid-tool rollout."""
  tok = load_tok(tok_path)
  [task] = tasks.make_split("unit_tools", "train", 1, 2, seed=3)
  gold = [m for m in tasks.gold(task) if m["role"] == "assistant"]
  replies = [_reply_text(m) for m in gold]
  policy = ScriptedPolicy(tok, lambda turn: replies[turn.step])
  rc = RolloutConfig(group_size=2, prompts_per_step=1, max_new_tokens=64, max_tool_steps=4)
  rs = roll_out(policy, [Prompt(task, True, " /think")], rc, temperature=1.0, seed=0)
  assert len(rs) == 2 and all(len(r.transcript.steps) == len(gold) == 3 for r in rs)
  seqs = [(r.transcript.token_ids, r.transcript.loss_mask, r.transcript.logprobs) for r in rs]
  batch = sequence_batch(seqs, np.asarray([0.5, -0.5]), 2048, rows=4)
  row, on = batch["tokens"][0], batch["loss_mask"][0] > 0
  n = len(rs[0].transcript.token_ids)
  runs, start = [], 0
  for i in range(1, n + 1):  # maximal runs of equal mask
    if i == n or on[i] != on[start]:
      runs.append((bool(on[start]), tok.decode(row[start:i].tolist(), skip_special_tokens=False)))
      start = i
  trained = [text for m, text in runs if m]
  assert trained == [r + "<|im_end|>" for r in replies]
  untrained = "".join(text for m, text in runs if not m)
  assert untrained.count("<tool_response>") == 2 and task.prompt in untrained
  for result in rs[0].results:
    assert result.ok and result.content in untrained
  assert not on[n:].any() and not batch["loss_mask"][2:].any()
  assert np.all(batch["old_logp"][~(batch["loss_mask"] > 0)] == 0)
  weights = RewardWeights(correctness=1, format=0.5, flag=0.25, tool_valid=0.125, length=0.0)
  s = rewards.score(rs[0], weights, max_new_tokens=64)
  assert s["correctness"] == s["format"] == s["flag"] == s["tool_valid"] == s["passed"] == 1.0
  assert s["reward"] == pytest.approx(1.875) and -1 <= s["length"] < 0


def test_reward_terms_by_hand():
  """Format: one think block opening the reply (none under /no_think), closed, readable
  calls; flag: reasoning under /think, none under /no_think."""
  ok = "<think>\nadd them\n</think>\n\n15"
  assert rewards.well_formed(ok, True, thinking=True)
  assert not rewards.well_formed(ok, False, thinking=True)  # cut by max_new_tokens
  assert not rewards.well_formed("15", True, thinking=True)  # no think block
  assert not rewards.well_formed(ok + "<think>\n", True, thinking=True)  # two openings
  assert rewards.well_formed("15", True, thinking=False)
  assert not rewards.well_formed(ok, True, thinking=False)  # reasoning under /no_think
  assert not rewards.well_formed("15\n<tool_call>\n{oops}\n</tool_call>", True, thinking=False)
  assert rewards.follows_flag(ok, True) and not rewards.follows_flag(ok, False)
  assert rewards.follows_flag("15", False) and not rewards.follows_flag("15", True)
  assert not rewards.follows_flag("<think>\n\n</think>\n\n15", True)  # empty reasoning


def test_rl_config_conversion_and_errors():
  """The stage configs convert (batch = prompts x G, families / levels from comma strings);
  an unknown rl field, a bad family or a KL without reference fail naming the input."""
  cfg = common.to_rl_config(stage4_general_rl.get_config("init_from=/prev"))
  assert cfg.train.batch_size == cfg.rollout.prompts_per_step * cfg.rollout.group_size
  assert cfg.rollout.families[-1] == "flight_tools" and cfg.rollout.difficulties == (1, 2)
  assert cfg.objective.beta > 0 and cfg.reference == "/prev" and cfg.rollout.think_flags
  cd = stage2_reasoning_rl.get_config()
  cd.rl.unlock()
  cd.rl.group_sizes = 4
  with pytest.raises(ValueError, match="unknown rl fields \\['group_sizes'\\]"):
    common.to_rl_config(cd)
  cd = stage2_reasoning_rl.get_config()
  cd.rl.families = "arithmetic,algebra"
  with pytest.raises(ValueError, match="algebra"):
    common.to_rl_config(cd)
  with pytest.raises(ValueError, match="needs a reference"):
    common.to_rl_config(stage4_general_rl.get_config())
