r"""Exports a model's prefill and decode-step programs to StableHLO files (`jax.export`).

  python scripts/export.py --workdir=runs/pt --output=/tmp/export --max_len=512
  python -m qwen3_jax.infer.exported /tmp/export --prompt_ids=1,2,3   # no model code needed

The weights go to weights.npz as arguments of the programs (qwen3_jax/infer/export.py); the
tokenizer is copied beside them.
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("workdir", None, "Training run directory (its newest checkpoint).")
flags.DEFINE_string("checkpoint", None, "Params checkpoint (save_params / convert_hf.py output).")
flags.DEFINE_string("hf_dir", None, "Hugging Face Qwen3 directory.")
flags.DEFINE_string("output", None, "Directory to write.")
flags.DEFINE_integer("batch", 1, "Rows per call.")
flags.DEFINE_integer("max_len", 256, "KV length per row (prompt + reply tokens).")
flags.DEFINE_integer("chunk", 64, "Tokens per prefill call.")
flags.mark_flags_as_required(["output"])


def main(argv):
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from qwen3_jax.infer.engine import Engine
  from qwen3_jax.infer.export import export_model
  from qwen3_jax.infer.load import load_model

  source = dict(workdir=f.workdir, checkpoint=f.checkpoint, hf_dir=f.hf_dir)  # exactly one
  model, tokenizer = load_model(**source)
  eos = Engine(model, tokenizer).eos_ids
  meta = export_model(model, f.output, batch=f.batch, max_len=f.max_len, chunk=f.chunk, eos_ids=eos)
  tokenizer.save(os.path.join(f.output, "tokenizer.json"))
  print(f"exported to {f.output}: {meta}")


if __name__ == "__main__":
  app.run(main)
