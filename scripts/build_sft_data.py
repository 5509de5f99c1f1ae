r"""Stage-1 SFT data: verified gold long-CoT transcripts of train-split tasks, as chat JSONL.

  python scripts/build_sft_data.py --out=runs/stage1_data.jsonl \
      [--families=arithmetic,countdown,reverse_words,parity,format] [--per_family=200] \
      [--difficulty=1,2,3,4] [--seed=1] [--tokenizer=runs/pt/tokenizer.json --max_tokens=513]

Every gold transcript is checked by its family's verifier before it is written (tool
transcripts: their calls are replayed); rejections are counted and printed per family, and
the counts go to OUT.stats.json. With a tokenizer, transcripts longer than --max_tokens
(seq_len + 1 of the SFT run) are rejected too. Train on it with configs/stage1_cold_start.py.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen3_jax.data import tasks  # noqa: E402
from qwen3_jax.data.cold_start import build_cold_start, write_jsonl  # noqa: E402
from qwen3_jax.data.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_FAMILIES = tasks.reasoning_families + tasks.format_families

flags.DEFINE_string("out", None, "Output JSONL path.")
flags.DEFINE_list("families", list(DEFAULT_FAMILIES), "Task families (tool families too).")
flags.DEFINE_integer("per_family", 200, "Tasks drawn per family (difficulty levels in turn).")
flags.DEFINE_list("difficulty", ["1", "2", "3", "4"], "Difficulty levels.")
flags.DEFINE_integer("seed", 1, "Which train list to draw (stage 2 draws with another).")
flags.DEFINE_string("tokenizer", "", "tokenizer.json to measure transcripts with.")
flags.DEFINE_integer("max_tokens", 0, "Reject transcripts longer than this (needs --tokenizer).")
flags.mark_flags_as_required(["out"])


def main(argv):
  del argv
  f = flags.FLAGS
  tok = load_tokenizer(f.tokenizer) if f.tokenizer else None
  levels = [int(d) for d in f.difficulty]
  rows, stats = build_cold_start(f.families, f.per_family, levels, f.seed, tok, f.max_tokens)
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  write_jsonl(rows, f.out)
  report = stats.to_dict()
  with open(f.out + ".stats.json", "w") as fh:
    json.dump(report, fh, indent=1)
  for fam in f.families:
    print(
      f"{fam:>14}: {report['written'].get(fam, 0):>5} written, "
      f"{report['rejected'].get(fam, 0):>4} rejected of {report['drawn'].get(fam, 0)}"
    )
  longest = f"; longest {stats.max_tokens} tokens" if tok else ""
  print(f"wrote {len(rows)} rows to {f.out}{longest}")


if __name__ == "__main__":
  app.run(main)
