r"""Stage-3 SFT data: rejection sampling from the stage-2 model plus non-thinking answers and
flag-switching conversations (qwen3_jax/data/fusion.py has the semantics).

  python scripts/build_fusion_data.py --workdir=runs/stage2 --out=runs/stage3_data.jsonl \
      [--checkpoint=DIR] [--families=arithmetic,...] [--per_family=64] [--n=4] \
      [--temperature=0.6 --top_p=0.95 --top_k=20] [--max_new_tokens=512] [--multi_turn=64]

The stage-2 model answers train-split prompts (drawn with --seed, by default not stage 1's)
in thinking mode, n samples each, in one batched engine call; only verified answers (reward 1)
are kept. Kept / total samples per family are printed and written to OUT.stats.json.
"""

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen3_jax.data import tasks  # noqa: E402
from qwen3_jax.data.cold_start import write_jsonl  # noqa: E402
from qwen3_jax.data.fusion import build_fusion  # noqa: E402

flags.DEFINE_string("workdir", None, "The stage-2 workdir (newest checkpoint).")
flags.DEFINE_string("checkpoint", None, "A params or step checkpoint instead.")
flags.DEFINE_string("out", None, "Output JSONL path.")
flags.DEFINE_list("families", list(tasks.reasoning_families + tasks.format_families), "Families.")
flags.DEFINE_integer("per_family", 64, "Train prompts per family (levels in turn).")
flags.DEFINE_list("difficulty", ["1", "2", "3", "4"], "Difficulty levels.")
flags.DEFINE_integer("seed", 3, "Which train list to draw, and the sampling seed.")
flags.DEFINE_integer("n", 4, "Samples per prompt.")
flags.DEFINE_float("temperature", None, "Sampling temperature (default: Qwen3's thinking 0.6).")
flags.DEFINE_float("top_p", None, "Nucleus mass (default 0.95).")
flags.DEFINE_integer("top_k", None, "Top-k (default 20).")
flags.DEFINE_integer("max_new_tokens", 512, "Most tokens per sample.")
flags.DEFINE_integer("keep_per_prompt", 1, "Most verified samples kept per prompt.")
flags.DEFINE_integer("multi_turn", 64, "Flag-switching two-turn conversations.")
flags.DEFINE_integer("batch_size", 64, "Engine rows.")
flags.mark_flags_as_required(["out"])


def main(argv):
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  if not (f.workdir or f.checkpoint):
    raise app.UsageError("give --workdir or --checkpoint (the stage-2 model)")
  from qwen3_jax.eval.sampler import EngineSampler
  from qwen3_jax.infer.engine import Engine
  from qwen3_jax.infer.load import load_model

  model, tok = load_model(checkpoint=f.checkpoint) if f.checkpoint else load_model(f.workdir)
  sampler = EngineSampler(
    Engine(model, tok),
    n=f.n,
    max_new_tokens=f.max_new_tokens,
    seed=f.seed,
    temperature=f.temperature,
    top_p=f.top_p,
    top_k=f.top_k,
    batch_size=f.batch_size,
  )
  levels = [int(d) for d in f.difficulty]
  task_list = [
    t for fam in f.families for t in tasks.make_split(fam, "train", f.per_family, levels, f.seed)
  ]
  rows, report = build_fusion(
    task_list, sampler, multi_turn=f.multi_turn, keep_per_prompt=f.keep_per_prompt, seed=f.seed
  )
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  write_jsonl(rows, f.out)
  with open(f.out + ".stats.json", "w") as fh:
    json.dump(report, fh, indent=1)
  for fam, c in report["rejection"].items():
    kept, prompts = f"{c['kept']}/{c['samples']}", f"{c['prompts_kept']}/{c['prompts']}"
    print(f"{fam:>14}: kept {kept} samples; {prompts} prompts with a verified answer")
  print(f"rows per mode: {report['rows']}; no_think answers from {report['no_think_answers']}")
  print(f"wrote {len(rows)} rows to {f.out}")


if __name__ == "__main__":
  app.run(main)
