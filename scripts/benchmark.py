r"""Benchmarks: prints a table and one JSON line per row.

python scripts/benchmark.py --suite=SUITE (moe | train | attention | breakdown | layers | sampling |
  decode | rl | serve | all)
"""

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen3_jax.runtime import malloc_tuned, reexec_with_tuned_malloc  # noqa: E402

if __name__ == "__main__":
  # Before JAX starts. One device: tuned unless QWEN3_JAX_MALLOC=default.
  reexec_with_tuned_malloc(by_default=True)

from absl import app, flags  # noqa: E402

SUITES = ("moe", "train", "attention", "breakdown", "layers", "sampling", "decode", "rl", "serve")
FLAGS = flags.DEFINE_string("suite", "all", f"One of {SUITES} or 'all'.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions per case (median is reported).")
flags.DEFINE_bool("quick", False, "Small shapes, for a smoke run.")


def main(argv):
  del argv
  suite = flags.FLAGS.suite
  names = SUITES if suite == "all" else (suite,)
  state = "tuned" if malloc_tuned() else "glibc defaults"
  print(f"malloc: {state} (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r})")
  for name in names:
    if name not in SUITES:
      raise app.UsageError(f"--suite={name!r} is not one of {SUITES} or 'all'")
    importlib.import_module(f"experiments.benchmarks.{name}").run(flags.FLAGS)


if __name__ == "__main__":
  app.run(main)
