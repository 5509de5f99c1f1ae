r"""Held-out evaluation of a model on the task families: WORKDIR/eval.json, a table, a plot.

  python scripts/evaluate.py --workdir=runs/stage1 [--checkpoint=DIR] [--n=4] [--per_family=16] \
      [--families=arithmetic,parity,...] [--budgets=0,32,64,128,256,-1] [--out=eval.json]
  python scripts/evaluate.py --compare=runs/stage1/eval.json,runs/pt/eval.json [--run=think]

Accuracy (pass@1 over --n samples, 95% bootstrap interval over prompts) per family and
difficulty in think and no_think modes, format and flag-following rates, tool-task success
through the tool loop, response / thinking lengths, and accuracy against the thinking budget
(-1 = unlimited; plot in eval_budget.png next to the output). Deterministic given --seed.
--compare prints the paired bootstrap interval of A minus B over the prompts both scored.
"""

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen3_jax.data import tasks  # noqa: E402
from qwen3_jax.eval import heldout, report  # noqa: E402

flags.DEFINE_string("workdir", None, "Training workdir (newest checkpoint; eval.json goes here).")
flags.DEFINE_string("checkpoint", None, "A params or step checkpoint instead of the newest.")
flags.DEFINE_string("out", None, "Output JSON (default WORKDIR/eval.json).")
flags.DEFINE_list("families", list(tasks.FAMILIES), "Task families.")
flags.DEFINE_integer("per_family", 16, "Held-out prompts per family (levels in turn).")
flags.DEFINE_list("difficulty", ["1", "2", "3", "4"], "Difficulty levels.")
flags.DEFINE_integer("n", 4, "Samples per prompt.")
flags.DEFINE_integer("seed", 0, "Sampling and bootstrap seed.")
flags.DEFINE_integer("max_new_tokens", 512, "Most tokens per reply.")
flags.DEFINE_list("budgets", ["0", "32", "64", "128", "256", "-1"], "Thinking budgets (-1 = none).")
flags.DEFINE_integer("batch_size", 64, "Engine rows.")
flags.DEFINE_list("compare", None, "Two eval.json files A,B: paired bootstrap of A - B.")
flags.DEFINE_string("run", "think", "--compare: think | no_think | tool | budget_<B>.")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  if f.compare:
    a, b = (json.load(open(p)) for p in f.compare)
    print(json.dumps(heldout.compare(a, b, f.run), indent=1))
    return
  if not (f.workdir or f.checkpoint):
    raise app.UsageError("give --workdir or --checkpoint")
  from qwen3_jax.infer.engine import Engine
  from qwen3_jax.infer.load import load_model

  cfg = heldout.EvalConfig(
    families=tuple(f.families),
    per_family=f.per_family,
    difficulty=tuple(int(d) for d in f.difficulty),
    n=f.n,
    seed=f.seed,
    max_new_tokens=f.max_new_tokens,
    budgets=tuple(None if int(b) < 0 else int(b) for b in f.budgets),
    batch_size=f.batch_size,
  )
  model, tok = load_model(checkpoint=f.checkpoint) if f.checkpoint else load_model(f.workdir)
  result = heldout.evaluate(Engine(model, tok), cfg)
  result["meta"]["source"] = os.path.abspath(f.checkpoint or f.workdir)
  out = f.out or os.path.join(f.workdir or f.checkpoint, "eval.json")
  out, png = report.save(result, out)
  print(report.table(result))
  print(f"wrote {out}" + (f" and {png}" if png else " (no budget plot: matplotlib missing)"))


if __name__ == "__main__":
  app.run(main)
