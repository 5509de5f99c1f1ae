"""The recipe report's stage targets on hand-made evaluations whose verdicts are known: a stage
that answers every prompt its predecessor missed meets its target, an identical one misses it,
and the saturation / flag / interval checks read the right runs and families."""

import json
import os

import pytest

from qwen3_jax.data import tasks
from qwen3_jax.eval import recipe_report as rr

N = 24  # prompts per family: enough for a 95% interval to exclude 0 at a +0.5 difference


def evaluation(think, no_think=0.0, fmt=1.0, flag=1.0, tool=0.0, hardest=None):
  """An eval dict in scripts/evaluate.py's layout: per family N prompts at levels 1 and 4;
  `think` etc. are the fraction of prompts answered correctly (all samples alike)."""
  prompts = []
  for fam in tasks.FAMILIES:
    for i in range(N):
      level = 4 if i % 2 else 1
      p = {"id": f"{fam}/{level}/{i}", "family": fam, "difficulty": level, "prompt": f"p{i}"}
      if fam in tasks.tool_families:
        p["tool"] = {"correct": [float(i < tool * N)] * 2}
      else:
        acc = hardest if (hardest is not None and level == 4) else think
        p["think"] = {
          "correct": [float(i < acc * N)] * 2,
          "format": [float(i < fmt * N)] * 2,
          "flag": [float(i < flag * N)] * 2,
          "tokens": [100.0] * 2,
        }
        p["no_think"] = {"correct": [float(i < no_think * N)] * 2, "flag": [1.0, 1.0]}
      prompts.append(p)
  summary = {"think": {"tokens": 100.0, "thinking_tokens": 60.0}, "budget": {"0": {"mean": 0.1}}}
  return {"meta": {"seed": 0, "difficulty": [1, 4]}, "summary": summary, "prompts": prompts}


@pytest.fixture(scope="module")
def evals():
  return {
    "pretrain": evaluation(think=0.0, fmt=0.5, flag=0.5),
    "stage1": evaluation(think=0.5, fmt=0.5, flag=0.5, hardest=0.5),
    "stage2": evaluation(think=0.5, fmt=0.5, flag=0.5),  # no better than stage 1
    "stage3": evaluation(think=0.5, fmt=0.5, flag=1.0),
    "stage4": evaluation(think=0.5, fmt=0.5, flag=1.0, tool=0.75),  # tools up, format not
  }


def test_targets_verdicts(evals):
  tg = rr.targets(evals)
  assert tg["stage1"]["met"] is True
  d = tg["stage1"]["think_accuracy_vs_pretrain"]
  assert d["a"] == pytest.approx(0.5) and d["b"] == 0.0 and d["difference"]["lo"] > 0
  assert tg["stage2"]["met"] is False  # identical answers: the interval is [0, 0]
  assert tg["stage3"]["met"] is True and tg["stage3"]["think_accuracy_within_stage2_interval"]
  assert tg["stage4"]["tool_success_vs_stage3"]["difference"]["lo"] > 0
  assert tg["stage4"]["met"] is False  # the format rate did not improve
  assert tg["not_saturated"]["met"] is True  # 0.5 on level 4 < 0.6


def test_flags_below_target_and_saturation_fail():
  tg = rr.targets(
    {
      "stage1": evaluation(think=0.7, hardest=0.7),
      "stage2": evaluation(think=0.7),
      "stage3": evaluation(think=0.7, flag=0.9),
    }
  )
  assert tg["stage3"]["met"] is False and tg["stage3"]["flag_think"]["mean"] == pytest.approx(
    22 / 24
  )
  assert tg["not_saturated"]["met"] is False
  assert "stage4" not in tg and "stage1" not in tg  # no pretrain evaluation to compare with


def test_rows_average_the_right_families(evals):
  row = rr.row(evals["stage4"])
  assert row["think_accuracy"]["mean"] == pytest.approx(0.5)
  assert row["tool_success"]["mean"] == pytest.approx(0.75)
  assert row["think_accuracy"]["n"] == N * len(tasks.reasoning_families)
  assert row["format_family_accuracy"]["n"] == N * len(tasks.format_families)
  assert row["budget"] == {"0": 0.1}


def test_build_and_save_write_report_and_curves(evals, tmp_path):
  w = str(tmp_path)
  for stage, e in evals.items():
    os.makedirs(os.path.join(w, stage))
    with open(os.path.join(w, stage, "eval.json"), "w") as f:
      json.dump(e, f)
    with open(os.path.join(w, stage, "metrics.jsonl"), "w") as f:
      for step in (1, 2, 3):
        key = "rl/reward_mean" if stage in ("stage2", "stage4") else "train/loss"
        f.write(json.dumps({"step": step, key: 1.0 / step}) + "\n")
  report = rr.build(w, {"pretrain": 60.0, "stage1": 120.0})
  md = report["markdown"]
  assert md.count("| stage |") == 2 and "| stage1 | 0.50 [" in md
  assert "- stage1: **met**" in md and "- stage2: **missed**" in md
  assert "Total time: 3.0 min" in md
  xs = [p["x"] for p in rr.curves(w)]
  assert xs == list(range(1, 16))  # the stages one after another
  rr.save(w, report)
  for name in ("report.md", "report.json", "curves.png"):
    assert os.path.getsize(os.path.join(w, name)) > 0
