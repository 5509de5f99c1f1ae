r"""Run an ablation of issue 15 and write its results page.

  python experiments/run.py --ablation=moe_vs_dense [--seeds=3] [--steps=N] [--quick] \
      [--outdir=experiments/results/moe_vs_dense] [--workroot=/tmp/ablations]

Ablations: moe_vs_dense, routing, load_balance, granularity, attention (experiments/ablations/).
Writes OUTDIR/results.md, PNG plots, runs.jsonl and metrics.jsonl. --quick trains the two quick
arms for a few steps with one seed (what `make test` runs).
"""

import os
import shlex
import sys
import tempfile
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("ablation", None, "Which ablation (experiments/ablations/).")
flags.DEFINE_integer("seeds", 3, "Seeds per arm (0, 1, ...); arms are paired by seed.")
flags.DEFINE_integer("steps", 0, "Optimizer steps per run; 0 = the ablation's full-run default.")
flags.DEFINE_bool("quick", False, "Two arms, one seed, a few steps (a smoke test).")
flags.DEFINE_string("outdir", "", "Results directory; default experiments/results/ABLATION.")
flags.DEFINE_string("workroot", "", "Run workdirs (checkpoints, logs); default a temp dir.")
flags.mark_flag_as_required("ablation")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  from experiments.ablations import ABLATIONS
  from experiments.report import write_results
  from experiments.runner import run_ablation

  if f.ablation not in ABLATIONS:
    raise app.UsageError(f"--ablation={f.ablation!r} is not one of {sorted(ABLATIONS)}")
  ab = ABLATIONS[f.ablation]
  seeds = 1 if f.quick else f.seeds
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  outdir = f.outdir or os.path.join(root, "experiments", "results", ab.name)
  workroot = f.workroot or tempfile.mkdtemp(prefix="ablations_")
  t0 = time.time()
  records = run_ablation(
    ab, seeds=seeds, quick=f.quick, outdir=outdir, workroot=workroot, steps=f.steps or None
  )
  command = "python " + shlex.join(["experiments/run.py", *sys.argv[1:]])
  write_results(
    ab, records, outdir=outdir, command=command, seeds=seeds, quick=f.quick, wall_s=time.time() - t0
  )
  print(f"results: {os.path.join(outdir, 'results.md')}")


if __name__ == "__main__":
  app.run(main)
