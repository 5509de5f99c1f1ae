"""Held-out evaluation of a chat model on the task families: what `scripts/evaluate.py` runs.

`evaluate(engine, cfg)` draws `per_family` held-out tasks per family (`tasks.make_split(...,
"heldout", ...)`, difficulty levels in turn) and samples `n` replies per prompt. Modes, each
ONE batched engine call over every non-tool prompt:
  * think: the user turn `{prompt} /think`, Qwen3's thinking preset (T 0.6, top-p 0.95,
    top-k 20), no thinking budget;
  * no_think: `{prompt} /no_think` (the rendered prompt then ends with the empty think block,
    see `chat.render`), the non-thinking preset (T 0.7, top-p 0.8, top-k 20);
  * budget_B for B in `budgets` (None = unlimited is the think run): the think prompt with a
    thinking budget of B tokens, after which the engine forces Qwen3's early-stop text.
Tool families run through the tool loop (`run_tool_loops`, thinking mode, up to
`tool_max_steps` replies): every conversation gets its own `ToolEnv` (tools + outbox), and the
family's verifier scores the final reply with it.

Per reply (see `score_reply`): `correct` (verifier reward == 1), `reward`, `format` (the turn
ended with `<|im_end|>`, a non-empty answer without tool calls, and exactly one think block
opened and closed by the reply in think mode, none in no_think mode, where the prompt holds
the empty one), `flag` (flag following: a non-empty closed think block under /think, no
think tags under /no_think), `tokens` (generated, `<|im_end|>` included) and `thinking_tokens`
(up to and including `</think>`; all generated tokens when the block never closed).

Scores per prompt are the mean over its n samples (pass@1 for `correct`); intervals are
bootstrapped over prompts (`bootstrap.py`). The result, a JSON-ready dict:
  {"meta": settings, "summary": {mode: {...}}, "prompts": [{"id", "family", "difficulty",
   "prompt", mode: {metric: [per-sample values]}}]}
Prompt ids are `family/difficulty/<hash of the prompt>`: two models evaluated with the same
settings have the same ids, which `compare` pairs.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from qwen3_jax.data import chat, tasks
from qwen3_jax.data.fusion import flagged
from qwen3_jax.data.tokenizer import END_THINK, THINK
from qwen3_jax.eval.bootstrap import bootstrap_ci, paired_bootstrap
from qwen3_jax.eval.sampler import EngineSampler
from qwen3_jax.infer.engine import EARLY_STOP, Completion
from qwen3_jax.infer.tool_loop import EnginePolicy, run_tool_loops

BUDGETS = (0, 32, 64, 128, 256, None)  # None = unlimited (the think run)
MODES = ("think", "no_think")
TOOL = "tool"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate and how (defaults: every family, 16 prompts each, 4 samples)."""

  families: tuple[str, ...] = tuple(tasks.FAMILIES)
  per_family: int = 16  # held-out prompts per family (levels in turn)
  difficulty: tuple[int, ...] = tasks.LEVELS
  n: int = 4  # samples per prompt
  seed: int = 0  # sampling and bootstrap seed
  task_seed: int = 0  # which held-out list
  max_new_tokens: int = 512  # per reply (per tool-loop step)
  budgets: tuple[int | None, ...] = BUDGETS
  tool_max_steps: int = 4
  batch_size: int = 64  # engine rows
  reps: int = 2000  # bootstrap resamples

  def __post_init__(self):
    unknown = [f for f in self.families if f not in tasks.FAMILIES]
    if unknown:
      raise ValueError(f"unknown families {unknown}; families: {list(tasks.FAMILIES)}")
    if self.per_family < 1 or self.n < 1:
      raise ValueError(f"per_family and n must be >= 1, got {self.per_family}, {self.n}")
    if any(b is not None and b < 0 for b in self.budgets):
      raise ValueError(f"budgets must be >= 0 or None, got {self.budgets}")


def prompt_id(task: tasks.Task) -> str:
  return f"{task.family}/{task.difficulty}/{tasks.split_hash(task.prompt):016x}"


def budget_key(budget: int | None) -> str:
  return "think" if budget is None else f"budget_{budget}"


def score_reply(task, completion: Completion, mode: str, think_ids: tuple[int, int]) -> dict:
  """One reply's numbers (module docstring); `mode` is "think" or "no_think"."""
  text = completion.text
  if any(completion.forced):
    # The forced early-stop text ends "</think>.\n\n": its "." is the engine's, not the
    # answer's (the verifiers read the content after `</think>` verbatim).
    text = text.replace(EARLY_STOP, EARLY_STOP.replace(f"{END_THINK}.", END_THINK), 1)
  parsed = chat.parse(text)
  closed = completion.finish_reason == "stop"
  answer = bool(parsed.content.strip()) and not parsed.tool_calls
  opens, closes = text.count(THINK), text.count(END_THINK)
  if mode == "think":
    tags_ok = opens == 1 and closes == 1 and text.lstrip().startswith(THINK)
    flag = closes >= 1 and bool(parsed.reasoning.strip())
  else:
    tags_ok = flag = opens == 0 and closes == 0
  ids = completion.token_ids
  end = ids.index(think_ids[1]) + 1 if think_ids[1] in ids else 0
  thinking = end if end else (len(ids) if think_ids[0] in ids else 0)
  reward = tasks.reward(task, text)
  return {
    "correct": float(reward == 1.0),
    "reward": reward,
    "format": float(closed and answer and tags_ok),
    "flag": float(flag),
    "tokens": len(ids),
    "thinking_tokens": thinking,
  }


class _EnvRouter:
  """A registry stand-in for `run_tool_loops`: each conversation's calls go to its own
  `ToolEnv` (so each attempt has its own outbox), recorded in that env's `calls`."""

  def __init__(self, envs: dict[str, tasks.ToolEnv]):
    self.envs = envs
    self.first = next(iter(envs.values()))

  def __contains__(self, name) -> bool:
    return name in self.first.registry

  def specs(self) -> list[dict]:
    return self.first.registry.specs()

  def execute(self, name, arguments, *, conversation_id="", parse_error=None, context=None):
    env = self.envs[conversation_id]
    result = env.registry.execute(
      name, arguments, conversation_id=conversation_id, parse_error=parse_error, context=context
    )
    env.calls.append((name, arguments, result))
    return result


def _tool_runs(policy, cfg: EvalConfig, family_tasks: list, records: dict) -> None:
  """Runs one tool family's tasks (n conversations each) through the tool loop."""
  envs, convs, owners = {}, [], []
  for task in family_tasks:
    for j in range(cfg.n):
      cid = f"{prompt_id(task)}#{j}"
      envs[cid] = task.env()
      convs.append([{"role": "user", "content": task.prompt}])
      owners.append((task, cid))
  router = _EnvRouter(envs)
  transcripts = run_tool_loops(
    policy,
    convs,
    router,
    tools=family_tasks[0].tool_specs(),
    max_steps=cfg.tool_max_steps,
    conversation_ids=[cid for _, cid in owners],
    sampling={"seed": cfg.seed},
    max_new_tokens=cfg.max_new_tokens,
  )
  for (task, cid), tr in zip(owners, transcripts, strict=True):
    reward = tasks.reward(task, tr.steps[-1].text, envs[cid])
    calls = sum(len(s.results) for s in tr.steps)
    rec = records[prompt_id(task)].setdefault(TOOL, collections.defaultdict(list))
    rec["correct"].append(float(reward == 1.0))
    rec["reward"].append(reward)
    rec["tool_calls"].append(calls)
    rec["tool_errors"].append(sum(not r.ok for s in tr.steps for r in s.results))
    rec["tokens"].append(sum(s.end - s.prompt_len for s in tr.steps))


def evaluate(engine, cfg: EvalConfig, printer=print, tool_policy=None) -> dict:
  """Samples and scores every held-out prompt (module docstring); returns the eval dict.

  `tool_policy` (a tool-loop `ModelPolicy`) answers the tool families instead of the engine
  (None: `EnginePolicy(engine)`); `engine` may be None when only tool families are asked.
  """
  drawn = {
    f: tasks.make_split(f, "heldout", cfg.per_family, cfg.difficulty, cfg.task_seed)
    for f in cfg.families
  }
  plain = [t for f in cfg.families if f not in tasks.tool_families for t in drawn[f]]
  records = {prompt_id(t): {} for ts in drawn.values() for t in ts}
  sampler = EngineSampler(
    engine, n=cfg.n, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=cfg.batch_size
  )
  runs = [("think", True, None), ("no_think", False, None)]
  runs += [(budget_key(b), True, b) for b in cfg.budgets if b is not None]
  for key, thinking, budget in runs:
    if not plain:
      break
    printer(f"eval: {key}: {len(plain)} prompts x {cfg.n} samples")
    prompts = [
      chat.render([flagged(t.prompt, thinking)], add_generation_prompt=True) for t in plain
    ]
    outs = sampler.completions(prompts, thinking=thinking, thinking_budget=budget)
    mode = "think" if thinking else "no_think"
    for task, comps in zip(plain, outs, strict=True):
      rec = records[prompt_id(task)].setdefault(key, collections.defaultdict(list))
      for c in comps:
        for k, v in score_reply(task, c, mode, engine.think_ids or (-1, -1)).items():
          rec[k].append(v)
  for f in cfg.families:
    if f in tasks.tool_families:
      printer(f"eval: tool loop: {f}: {len(drawn[f])} prompts x {cfg.n} conversations")
      rows = min(len(drawn[f]) * cfg.n, cfg.batch_size)
      _tool_runs(tool_policy or EnginePolicy(engine, batch_size=rows), cfg, drawn[f], records)
  prompts = [
    {
      "id": prompt_id(t),
      "family": t.family,
      "difficulty": t.difficulty,
      "prompt": t.prompt,
      **{k: dict(v) for k, v in records[prompt_id(t)].items()},
    }
    for ts in drawn.values()
    for t in ts
  ]
  meta = dataclasses.asdict(cfg)
  return {"meta": meta, "summary": summarize(prompts, cfg), "prompts": prompts}


def per_prompt(prompts: Sequence[dict], key: str, metric: str = "correct", **where) -> dict:
  """{prompt id: mean of `metric` over its samples in run `key`} for the prompts that have the
  run and match `where` (e.g. family="parity", difficulty=3)."""
  return {
    p["id"]: float(np.mean(p[key][metric]))
    for p in prompts
    if key in p and all(p[k] == v for k, v in where.items())
  }


def summarize(prompts: Sequence[dict], cfg: EvalConfig) -> dict:
  """Per run: accuracy with its interval (overall, per family, per family x difficulty), and
  the other metrics' means; `budget`: accuracy per budget (None = unlimited)."""
  ci = dict(reps=cfg.reps, seed=cfg.seed)
  out = {}
  keys = [k for k in ("think", "no_think", TOOL) if any(k in p for p in prompts)]
  for key in keys:
    acc = per_prompt(prompts, key)
    s = {"accuracy": bootstrap_ci(list(acc.values()), **ci).to_dict(), "families": {}}
    fams = sorted({p["family"] for p in prompts if key in p}, key=list(tasks.FAMILIES).index)
    for fam in fams:
      levels = sorted({p["difficulty"] for p in prompts if key in p and p["family"] == fam})
      s["families"][fam] = {
        "accuracy": bootstrap_ci(
          list(per_prompt(prompts, key, family=fam).values()), **ci
        ).to_dict(),
        "difficulty": {
          str(d): bootstrap_ci(
            list(per_prompt(prompts, key, family=fam, difficulty=d).values()), **ci
          ).to_dict()
          for d in levels
        },
      }
    metrics = ("format", "flag", "tokens", "thinking_tokens", "reward", "tool_calls", "tool_errors")
    for m in metrics:
      vals = [v for p in prompts if key in p for v in p[key].get(m, [])]
      if vals:
        s[m] = float(np.mean(vals))
    out[key] = s
  budgets = {}
  for b in cfg.budgets:
    acc = per_prompt(prompts, budget_key(b))
    if acc:
      budgets["unlimited" if b is None else str(b)] = bootstrap_ci(
        list(acc.values()), **ci
      ).to_dict()
  out["budget"] = budgets
  return out


def compare(a: dict, b: dict, key: str = "think", metric: str = "correct", **where) -> dict:
  """Paired bootstrap of model A minus model B on the prompts both eval dicts scored in run
  `key` (e.g. "think", "no_think", "tool", "budget_64") and that match `where`.

  Returns {"a", "b": each model's mean on the shared prompts, "difference": Interval dict,
  "prompts": how many were paired}. Raises ValueError when no prompt is shared.
  """
  pa, pb = (
    per_prompt(a["prompts"], key, metric, **where),
    per_prompt(b["prompts"], key, metric, **where),
  )
  shared = [i for i in pa if i in pb]
  if not shared:
    raise ValueError(f"the two evaluations share no prompt with run {key!r} and {where}")
  xa, xb = [pa[i] for i in shared], [pb[i] for i in shared]
  seed = a["meta"].get("seed", 0)
  diff = paired_bootstrap(xa, xb, reps=a["meta"].get("reps", 2000), seed=seed)
  return {
    "a": float(np.mean(xa)),
    "b": float(np.mean(xb)),
    "difference": diff.to_dict(),
    "prompts": len(shared),
  }
