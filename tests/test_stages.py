"""The SFT stage configs run from a previous checkpoint; held-out evaluation and its bootstrap."""

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx

from configs import stage1_cold_start, stage3_fusion
from configs.common import to_train_config
from qwen3_jax import checkpoint as ckpt
from qwen3_jax import config as C
from qwen3_jax.data import chat, cold_start, fusion, tasks
from qwen3_jax.data.tokenizer import IM_END, train_tokenizer
from qwen3_jax.eval import bootstrap, heldout, report
from qwen3_jax.infer.engine import EARLY_STOP, Completion, Engine
from qwen3_jax.infer.load import load_model
from qwen3_jax.infer.tool_loop import ScriptedPolicy
from qwen3_jax.model import Qwen3
from qwen3_jax.train.loop import train

STEPS = 2


def _run_stage(module, init_from, data, workdir, tokenizer):
  """What `scripts/train.py --config=configs/<stage>.py:...` runs, minus the flag parsing
  (all 8 simulated devices data-parallel)."""
  c = module.get_config(
    f"model=tiny,init_from={init_from},data={data},steps={STEPS},seq_len=256,batch=8"
  )
  c.async_checkpoint, c.sample_tokens, c.eval_every = False, 0, 0
  cfg = to_train_config(c)
  assert cfg.init_from == init_from and cfg.data.loss_on == "assistant"
  assert cfg.data.tokenizer == tokenizer  # the pretrained tokenizer, found through init_from
  return train(cfg, workdir, printer=lambda *_: None)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  """A tiny params checkpoint (the 'pretrained' model) -> stage 1 -> stage 3, 2 steps each."""
  root = tmp_path_factory.mktemp("stages")
  corpus = [
    tasks.render_gold(t) for f in tasks.FAMILIES for t in tasks.make_split(f, "train", 6, seed=9)
  ]
  tok = train_tokenizer(corpus, 512)
  cfg = C.preset("tiny", vocab_size=512)
  pre = str(root / "pre")
  ckpt.save_params(pre, Qwen3(cfg, rngs=nnx.Rngs(0)), cfg)
  tok_path = os.path.join(pre, "tokenizer.json")
  tok.save(tok_path)

  rows, stats = cold_start.build_cold_start(
    ["parity", "arithmetic"], 8, (1, 2), tokenizer=tok, max_tokens=257
  )
  assert sum(stats.written.values()) == 16
  s1_data = str(root / "s1.jsonl")
  cold_start.write_jsonl(rows, s1_data)
  s1 = _run_stage(stage1_cold_start, pre, s1_data, str(root / "stage1"), tok_path)

  task_list = tasks.make_split("parity", "train", 6, 1, seed=4)
  golds = [cold_start.thinking_completion(tasks.gold(t)[-1]) for t in task_list]
  rows, _ = fusion.build_fusion(task_list, lambda prompts: [[g] for g in golds], multi_turn=4)
  s3_data = str(root / "s3.jsonl")
  cold_start.write_jsonl(rows, s3_data)
  s3 = _run_stage(stage3_fusion, str(root / "stage1"), s3_data, str(root / "stage3"), tok_path)
  return root, s1, s3


def test_stage_configs_train_from_the_previous_checkpoint(stages):
  root, s1, s3 = stages
  for summary in (s1, s3):
    assert summary["steps"] == STEPS and summary["skipped_steps"] == 0
    assert summary["data"]["dropped_documents"] == 0
    assert 0 < summary["final_loss"] < 10
  assert os.path.isdir(root / "stage3" / "checkpoints" / str(STEPS))
  # stage 1 started from the pretrained params, not from a fresh init
  with open(root / "stage1" / "metrics.jsonl") as f:
    assert any('"train/loss"' in line for line in f)
  pre, _ = ckpt.load_params(str(root / "pre"))
  fresh = Qwen3(C.preset("tiny", vocab_size=512), rngs=nnx.Rngs(1))
  s1_model, _ = ckpt.load_params(str(root / "stage1"))

  def gap(a, b):
    return float(
      np.abs(
        np.asarray(a.embed_tokens.embedding[...]) - np.asarray(b.embed_tokens.embedding[...])
      ).max()
    )

  assert gap(s1_model, pre) < gap(s1_model, fresh)


def test_stage_configs_name_the_build_command_without_data():
  for module, script in (
    (stage1_cold_start, "build_sft_data.py"),
    (stage3_fusion, "build_fusion_data.py"),
  ):
    with pytest.raises(ValueError, match=script):
      module.get_config("init_from=/x")
    with pytest.raises(ValueError, match="init_from"):
      module.get_config("data=/x.jsonl")


def test_evaluate_writes_a_well_formed_eval_json(stages):
  root, _, _ = stages
  model, tok = load_model(str(root / "stage3"))
  engine = Engine(model, tok)
  cfg = heldout.EvalConfig(
    families=("parity",), per_family=4, n=2, max_new_tokens=8, budgets=(0, 4, None), batch_size=8,
    reps=200,
  )  # fmt: skip
  result = heldout.evaluate(engine, cfg, printer=lambda *_: None)
  out, png = report.save(result, str(root / "eval.json"))
  assert png and os.path.getsize(png) > 1000
  with open(out) as f:
    ev = json.load(f)
  s = ev["summary"]
  assert set(s) == {"think", "no_think", "budget"}
  assert (
    set(s["budget"]) == {"0", "4", "unlimited"}
    and s["budget"]["unlimited"] == s["think"]["accuracy"]
  )
  assert set(s["think"]["families"]) == {"parity"}
  assert set(s["think"]["families"]["parity"]["difficulty"]) == {"1", "2", "3", "4"}
  for key in ("think", "no_think"):
    for m in ("format", "flag", "tokens", "thinking_tokens"):
      assert m in s[key]
    assert 0 <= s[key]["format"] <= 1 and 0 <= s[key]["flag"] <= 1
  assert len(ev["prompts"]) == 4
  for p in ev["prompts"]:
    runs = (
      ("tool",) if p["family"] == "unit_tools" else ("think", "no_think", "budget_0", "budget_4")
    )
    assert set(runs) <= set(p)
    for r in runs:
      assert len(p[r]["correct"]) == cfg.n
      assert all(t <= cfg.max_new_tokens for t in p[r]["tokens"])
    for r in ("think", "no_think"):
      if r in p:  # the per-prompt mean the summary bootstraps
        acc = np.mean([np.mean(q[r]["correct"]) for q in ev["prompts"] if r in q])
        assert s[r]["accuracy"]["mean"] == pytest.approx(acc)
  for p in ev["prompts"]:  # no think tags under /no_think (flag kept): no thinking tokens
    run = p.get("no_think", {"flag": [], "thinking_tokens": []})
    for flag, n in zip(run["flag"], run["thinking_tokens"], strict=True):
      assert n == 0 or not flag
  # deterministic given the seed: the same settings sample the same replies
  again = heldout.evaluate(
    engine, dataclasses.replace(cfg, budgets=(None,)), printer=lambda *_: None
  )
  first = {p["id"]: p["think"] for p in ev["prompts"] if "think" in p}
  assert {p["id"]: p["think"] for p in again["prompts"]} == first
  assert report.table(ev).count("parity") == 5  # 4 levels + all


def _gold_reply(task, k):
  """The text of the gold conversation's k-th assistant turn, as the model would write it."""
  msgs = tasks.messages(task)
  idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"][k]
  runs = chat.pieces(msgs[: idx + 1], tasks.tools(task))
  return runs[-2][0].removesuffix(IM_END)


def test_tool_tasks_are_scored_through_the_tool_loop_each_with_its_own_env():
  """A scripted policy plays the gold turns (sample 1 ends with a wrong answer): every
  conversation's calls run in its own env, so each flight email lands in its own outbox."""
  cfg = heldout.EvalConfig(
    families=("unit_tools", "flight_tools"), per_family=4, n=2, difficulty=(2, 3)
  )
  by_id = {
    heldout.prompt_id(t): t for f in cfg.families for t in tasks.make_split(f, "heldout", 4, (2, 3))
  }

  def reply(turn):
    pid, j = turn.conversation_id.rsplit("#", 1)
    text = _gold_reply(by_id[pid], turn.step)
    last = turn.step == sum(m["role"] == "assistant" for m in tasks.gold(by_id[pid])) - 1
    return text + " (wrong)" if last and j == "1" else text

  tok = train_tokenizer([tasks.render_gold(t) for t in by_id.values()], 400)
  result = heldout.evaluate(
    None, cfg, printer=lambda *_: None, tool_policy=ScriptedPolicy(tok, reply)
  )
  for p in result["prompts"]:
    assert p["tool"]["correct"] == [1.0, 0.0], p
    assert p["tool"]["tool_errors"] == [0, 0] and p["tool"]["tool_calls"][0] == p["difficulty"]
  s = result["summary"]["tool"]
  assert s["accuracy"]["mean"] == 0.5 and set(s["families"]) == {"unit_tools", "flight_tools"}
  assert set(result["summary"]) == {"tool", "budget"} and result["summary"]["budget"] == {}


def test_score_reply_reads_the_answer_after_a_forced_early_stop():
  task = tasks.Task("parity", 1, "Is the number of 1s in 101 even or odd?", "even", {"bits": "101"})
  text = f"<think>\ncounting{EARLY_STOP}even"
  forced = Completion(
    "x",
    0,
    [1],
    token_ids=[5, 6, 7, 2],
    forced=[False, True, True, False],
    text=text,
    finish_reason="stop",
  )
  assert heldout.score_reply(task, forced, "think", (5, 6))["correct"] == 1.0
  assert tasks.reward(task, text) == 0.0  # the verifier alone reads ".\n\neven"


def test_bootstrap_interval_matches_a_hand_computation():
  # Five prompts scored 1, 1, 1, 1, 0: a resample's mean is k/5 with k ~ Binomial(5, 0.8).
  # P(k <= 1) = 0.0067 < 0.025 <= P(k <= 2) = 0.0579, so the 2.5% quantile is 2/5; the
  # 97.5% quantile is 5/5 (P(k = 5) = 0.328).
  ci = bootstrap.bootstrap_ci([1, 1, 1, 1, 0], reps=20000, seed=3)
  assert (ci.mean, ci.lo, ci.hi, ci.n) == (0.8, 0.4, 1.0, 5)
  assert bootstrap.bootstrap_ci([0.5] * 7).to_dict() == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 7}
  # paired: the same per-prompt differences give the same interval; identical models give 0
  d = bootstrap.paired_bootstrap([1, 1, 1, 1, 0.5], [0, 0, 0, 0, 0.5], reps=20000, seed=3)
  assert (d.mean, d.lo, d.hi) == (0.8, 0.4, 1.0) and d.excludes_zero()
  same = bootstrap.paired_bootstrap([0.25, 1, 0], [0.25, 1, 0])
  assert (same.lo, same.hi) == (0.0, 0.0) and not same.excludes_zero()
  with pytest.raises(ValueError, match="same prompts"):
    bootstrap.paired_bootstrap([1, 0], [1])


def test_compare_pairs_prompts_by_id():
  def ev(scores, order):
    prompts = [
      {"id": f"p{i}", "family": "parity", "difficulty": 1, "think": {"correct": scores[i]}}
      for i in order
    ]
    return {"meta": {"seed": 3, "reps": 20000}, "prompts": prompts}

  a = ev({0: [1, 1], 1: [1, 1], 2: [1, 0], 3: [1, 1], 4: [0, 0], 5: [1, 1]}, [5, 0, 1, 2, 3, 4])
  b = ev({0: [0, 0], 1: [0, 0], 2: [0, 1], 3: [0, 0], 4: [0, 0]}, [4, 3, 2, 1, 0])
  got = heldout.compare(a, b, "think")
  want = bootstrap.paired_bootstrap([1, 1, 0.5, 1, 0], [0, 0, 0.5, 0, 0], reps=20000, seed=3)
  assert got["prompts"] == 5 and got["difference"] == want.to_dict()
  assert (got["a"], got["b"]) == (0.7, 0.1)
  with pytest.raises(ValueError, match="share no prompt"):
    heldout.compare(a, b, "no_think")
