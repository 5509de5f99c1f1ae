"""The post-training recipe's report: one row per stage, each stage's target tested against
the stage before it on the same held-out prompts (`scripts/recipe.py` writes it).

Targets (the paired 95% bootstrap interval of the difference, over prompts both models
answered, must exclude zero; `heldout.compare`'s pairing):
  stage1: thinking-mode accuracy on the reasoning families over the pretrained model;
  stage2: thinking-mode accuracy on the reasoning families over stage 1 (RL must help the
          answers, not only the format);
  stage3: flag following >= 95% in both modes, and its thinking accuracy inside stage 2's
          95% interval (fusion must not cost reasoning);
  stage4: tool-task success and format rate over stage 3.
Plus the saturation check: stage-1 accuracy on the hardest difficulty below 60%.

Inputs: WORKDIR/STAGE/eval.json (scripts/evaluate.py) and WORKDIR/STAGE/metrics.jsonl.
"""

from __future__ import annotations

import json
import os

import numpy as np

from qwen3_jax.data import tasks
from qwen3_jax.eval.bootstrap import bootstrap_ci, paired_bootstrap
from qwen3_jax.eval.heldout import per_prompt

STAGES = ("pretrain", "stage1", "stage2", "stage3", "stage4")
FLAG_TARGET = 0.95
SATURATED = 0.60


def _scores(result: dict, key: str, metric: str, families) -> dict[str, float]:
  out = {}
  for fam in families:
    out.update(per_prompt(result["prompts"], key, metric, family=fam))
  return out


def paired(a: dict, b: dict, key: str, metric: str, families) -> dict | None:
  """Paired bootstrap of A minus B over the prompts of `families` both scored in run `key`;
  None when they share none (e.g. the run was not evaluated)."""
  sa, sb = _scores(a, key, metric, families), _scores(b, key, metric, families)
  shared = [i for i in sa if i in sb]
  if not shared:
    return None
  xa, xb = [sa[i] for i in shared], [sb[i] for i in shared]
  diff = paired_bootstrap(xa, xb, seed=a["meta"].get("seed", 0))
  return {"a": float(np.mean(xa)), "b": float(np.mean(xb)), "difference": diff.to_dict()}


def _mean_ci(result: dict, key: str, metric: str, families) -> dict | None:
  s = list(_scores(result, key, metric, families).values())
  return bootstrap_ci(s, seed=result["meta"].get("seed", 0)).to_dict() if s else None


def row(result: dict) -> dict:
  """The columns of one stage's row (None where the run was not evaluated)."""
  reasoning, fmt = tasks.reasoning_families, tasks.format_families
  plain = reasoning + fmt
  summary = result["summary"]
  return {
    "think_accuracy": _mean_ci(result, "think", "correct", reasoning),
    "no_think_accuracy": _mean_ci(result, "no_think", "correct", reasoning),
    "format_family_accuracy": _mean_ci(result, "think", "correct", fmt),
    "format_rate": _mean_ci(result, "think", "format", plain),
    "flag_think": _mean_ci(result, "think", "flag", plain),
    "flag_no_think": _mean_ci(result, "no_think", "flag", plain),
    "tool_success": _mean_ci(result, "tool", "correct", tasks.tool_families),
    "response_tokens": summary.get("think", {}).get("tokens"),
    "thinking_tokens": summary.get("think", {}).get("thinking_tokens"),
    "hardest_think_accuracy": _mean_ci_level(result, max(result["meta"]["difficulty"])),
    "budget": {k: v["mean"] for k, v in summary.get("budget", {}).items()},
  }


def _mean_ci_level(result: dict, level: int) -> dict | None:
  s = []
  for fam in tasks.reasoning_families:
    s += per_prompt(result["prompts"], "think", "correct", family=fam, difficulty=level).values()
  return bootstrap_ci(s, seed=result["meta"].get("seed", 0)).to_dict() if s else None


def _excl(d: dict | None) -> bool | None:
  if d is None:
    return None
  return d["difference"]["lo"] > 0


def targets(evals: dict[str, dict]) -> dict[str, dict]:
  """Each stage's target: the comparison(s) and whether it was met (None = not measurable)."""
  r, tools = tasks.reasoning_families, tasks.tool_families
  plain = tasks.reasoning_families + tasks.format_families
  out = {}
  if "stage1" in evals and "pretrain" in evals:
    c = paired(evals["stage1"], evals["pretrain"], "think", "correct", r)
    out["stage1"] = {"think_accuracy_vs_pretrain": c, "met": _excl(c)}
  if "stage2" in evals and "stage1" in evals:
    c = paired(evals["stage2"], evals["stage1"], "think", "correct", r)
    out["stage2"] = {"think_accuracy_vs_stage1": c, "met": _excl(c)}
  if "stage3" in evals and "stage2" in evals:
    s3, s2 = row(evals["stage3"]), row(evals["stage2"])
    flags_ok = all(
      s3[k] is not None and s3[k]["mean"] >= FLAG_TARGET for k in ("flag_think", "flag_no_think")
    )
    acc3, ci2 = s3["think_accuracy"], s2["think_accuracy"]
    within = acc3 is not None and ci2 is not None and ci2["lo"] <= acc3["mean"] <= ci2["hi"]
    c = paired(evals["stage3"], evals["stage2"], "think", "correct", r)
    out["stage3"] = {
      "flag_think": s3["flag_think"],
      "flag_no_think": s3["flag_no_think"],
      "think_accuracy_within_stage2_interval": within,
      "think_accuracy_vs_stage2": c,
      "met": flags_ok and within,
    }
  if "stage4" in evals and "stage3" in evals:
    t = paired(evals["stage4"], evals["stage3"], "tool", "correct", tools)
    f = paired(evals["stage4"], evals["stage3"], "think", "format", plain)
    met = None if t is None or f is None else bool(_excl(t) and _excl(f))
    out["stage4"] = {"tool_success_vs_stage3": t, "format_rate_vs_stage3": f, "met": met}
  if "stage1" in evals:
    hard = row(evals["stage1"])["hardest_think_accuracy"]
    met = None if hard is None else hard["mean"] < SATURATED
    out["not_saturated"] = {"stage1_hardest": hard, "met": met}
  return out


def curves(workdir: str) -> list[dict]:
  """Training curves of every stage on one axis: [{stage, x, loss or reward}] from each
  stage's metrics.jsonl (x = step + the steps of the stages before it)."""
  points, offset = [], 0
  for stage in STAGES:
    path = os.path.join(workdir, stage, "metrics.jsonl")
    if not os.path.exists(path):
      continue
    last = 0
    with open(path) as f:
      for line in f:
        m = json.loads(line)
        step = m.get("step", 0)
        last = max(last, step)
        loss, reward = m.get("train/loss"), m.get("rl/reward_mean")
        if loss is not None or reward is not None:
          points.append({"stage": stage, "x": offset + step, "loss": loss, "reward": reward})
    offset += last
  return points


def build(workdir: str, times: dict[str, float], cpu: dict[str, float] | None = None) -> dict:
  """Reads every stage's eval.json; returns {"rows", "targets", "times", "cpu", "markdown"}
  (times: wall seconds per stage; cpu: CPU seconds, user + system, of its processes)."""
  cpu = cpu or {}
  evals = {}
  for stage in STAGES:
    path = os.path.join(workdir, stage, "eval.json")
    if os.path.exists(path):
      with open(path) as f:
        evals[stage] = json.load(f)
  rows = {stage: row(e) for stage, e in evals.items()}
  tg = targets(evals)
  return {
    "rows": rows,
    "targets": tg,
    "times": times,
    "cpu": cpu,
    "markdown": markdown(rows, tg, times, cpu),
  }


def _fmt(d) -> str:
  if d is None:
    return "-"
  if isinstance(d, dict):
    return f"{d['mean']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"
  return f"{d:.0f}" if abs(d) >= 10 else f"{d:.2f}"


COLUMNS = (
  ("think_accuracy", "think acc (reasoning)"),
  ("no_think_accuracy", "no-think acc"),
  ("format_family_accuracy", "format-task acc"),
  ("format_rate", "format rate"),
  ("flag_think", "flag /think"),
  ("flag_no_think", "flag /no_think"),
  ("tool_success", "tool success"),
  ("response_tokens", "reply tokens"),
  ("thinking_tokens", "thinking tokens"),
)


def markdown(rows: dict, tg: dict, times: dict, cpu: dict | None = None) -> str:
  cpu = cpu or {}
  head = "| stage | " + " | ".join(name for _, name in COLUMNS) + " | minutes | CPU min |"
  lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
  for stage, r in rows.items():
    cells = [_fmt(r[k]) for k, _ in COLUMNS]
    minutes = f"{times[stage] / 60:.1f}" if stage in times else "-"
    cpu_min = f"{cpu[stage] / 60:.1f}" if stage in cpu else "-"
    lines.append(f"| {stage} | " + " | ".join(cells) + f" | {minutes} | {cpu_min} |")
  lines.append("")
  budgets = sorted({b for r in rows.values() for b in r["budget"]}, key=_budget_order)
  if budgets:
    lines.append("| stage | " + " | ".join(f"budget {b}" for b in budgets) + " |")
    lines.append("|" + "---|" * (len(budgets) + 1))
    for stage, r in rows.items():
      lines.append(f"| {stage} | " + " | ".join(_fmt(r["budget"].get(b)) for b in budgets) + " |")
    lines.append("")
  lines.append("Targets (paired 95% bootstrap interval of the difference over shared prompts):")
  for stage, t in tg.items():
    verdict = {True: "met", False: "missed", None: "not measured"}[t["met"]]
    parts = []
    for k, v in t.items():
      if k == "met":
        continue
      if isinstance(v, dict) and "difference" in v:
        d = v["difference"]
        parts.append(f"{k}: {v['a']:.3f} vs {v['b']:.3f}, diff {_fmt(d)}")
      elif isinstance(v, dict):
        parts.append(f"{k}: {_fmt(v)}")
      else:
        parts.append(f"{k}: {v}")
    lines.append(f"- {stage}: **{verdict}** ({'; '.join(parts)})")
  total = sum(times.values())
  lines.append(
    f"\nTotal time: {total / 60:.1f} min",
  )
  if cpu:
    lines[-1] += f" ({sum(cpu.values()) / 60:.1f} CPU min)"
  lines[-1] += "."
  return "\n".join(lines)


def _budget_order(b: str) -> float:
  return float("inf") if b == "unlimited" else float(b)


def save(workdir: str, report: dict) -> str:
  """report.md, report.json and curves.png (loss and reward over the whole run) in workdir."""
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(report["markdown"] + "\n")
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump({k: v for k, v in report.items() if k != "markdown"}, f, indent=1)
  points = curves(workdir)
  if points:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ax2 = ax.twinx()
    for stage in STAGES:
      pts = [p for p in points if p["stage"] == stage]
      loss = [(p["x"], p["loss"]) for p in pts if p["loss"] is not None]
      reward = [(p["x"], p["reward"]) for p in pts if p["reward"] is not None]
      if loss:
        ax.plot(*zip(*loss, strict=True), label=f"{stage} loss")
      if reward:
        ax2.plot(*zip(*reward, strict=True), "--", label=f"{stage} reward")
    ax.set_xlabel("step (stages one after another)")
    ax.set_ylabel("training loss")
    ax2.set_ylabel("mean reward")
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "curves.png"), dpi=100)
    plt.close(fig)
  return os.path.join(workdir, "report.md")
