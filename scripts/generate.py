r"""Batched generation from JSONL prompts to JSONL completions.

  python scripts/generate.py --workdir=/tmp/run --input=prompts.jsonl --output=out.jsonl
  python scripts/generate.py --hf_dir=/models/Qwen3-30B-A3B --input=in.jsonl --output=out.jsonl \
    --temperature=0.6 --top_p=0.95 --seed=1 --max_new_tokens=512 --thinking_budget=256

Input rows: `{"prompt": "..."}` (text sent as is) or `{"messages": [...], "tools": [...]}`
(rendered with Qwen3's chat template and the generation prompt; `--enable_thinking`, and the
soft switches /think and /no_think in the messages, pick the mode). Output rows, in input
order: text, reasoning and content (from the chat format), token ids, log-probs, token counts
and the finish reason. Sampling defaults to Qwen3's preset of each row's mode; any sampling
flag given overrides it (--temperature=0: greedy).
"""

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("workdir", None, "Training run directory (its newest checkpoint).")
flags.DEFINE_string("checkpoint", None, "Params checkpoint (save_params / convert_hf.py output).")
flags.DEFINE_string("hf_dir", None, "Hugging Face Qwen3 directory (its tokenizer included).")
flags.DEFINE_string("input", None, "JSONL of {'prompt': ...} or {'messages': [...]} rows.")
flags.DEFINE_string("output", None, "JSONL to write, one row per input row.")
flags.DEFINE_float("temperature", None, "Sampling temperature (0 = greedy; default: preset).")
flags.DEFINE_float("top_p", None, "Nucleus mass (default: preset).")
flags.DEFINE_integer("top_k", None, "Top-k (default: preset).")
flags.DEFINE_float("min_p", None, "Min-p (default: preset).")
flags.DEFINE_integer("seed", 0, "Sampling seed (row i uses seed + i).")
flags.DEFINE_integer("max_new_tokens", 256, "Most new tokens per row.")
flags.DEFINE_integer("thinking_budget", None, "Most tokens inside <think> (default: no limit).")
flags.DEFINE_bool("enable_thinking", True, "Chat rows: hard switch for reasoning.")
flags.DEFINE_integer("batch_size", 8, "Rows decoded together.")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from qwen3_jax.data import chat
  from qwen3_jax.infer.engine import Engine, Request
  from qwen3_jax.infer.load import load_model
  from qwen3_jax.infer.sampling import SamplingParams

  source = dict(workdir=f.workdir, checkpoint=f.checkpoint, hf_dir=f.hf_dir)
  if sum(bool(v) for v in source.values()) != 1:
    raise app.UsageError("give one of --workdir, --checkpoint and --hf_dir")
  with open(f.input) as fh:
    rows = [json.loads(line) for line in fh if line.strip()]
  overrides = {
    k: getattr(f, k)
    for k in ("temperature", "top_p", "top_k", "min_p")
    if getattr(f, k) is not None
  }
  requests = []
  for i, row in enumerate(rows):
    if "messages" in row:
      prompt = chat.render(
        row["messages"], row.get("tools"), True, enable_thinking=f.enable_thinking
      )
      thinking = chat.thinking_mode(row["messages"], f.enable_thinking)
    elif "prompt" in row:
      prompt, thinking = row["prompt"], f.enable_thinking
    else:
      raise app.UsageError(f"{f.input} row {i}: needs 'prompt' or 'messages', got {sorted(row)}")
    mode = thinking and f.thinking_budget != 0
    sampling = SamplingParams.qwen3(thinking=mode, **overrides, seed=f.seed + i)
    requests.append(
      Request(prompt, sampling, f.max_new_tokens, thinking_budget=f.thinking_budget, id=i)
    )
  model, tokenizer = load_model(**source)
  out = Engine(model, tokenizer).generate(requests, batch_size=f.batch_size)
  os.makedirs(os.path.dirname(os.path.abspath(f.output)), exist_ok=True)
  with open(f.output, "w") as fh:
    for [c] in out:
      parsed = chat.parse(c.text)
      fh.write(
        json.dumps(
          {
            "text": c.text,
            "reasoning": parsed.reasoning,
            "content": parsed.content,
            "token_ids": c.token_ids,
            "logprobs": c.logprobs,
            "prompt_tokens": len(c.prompt_ids),
            "completion_tokens": len(c.token_ids),
            "finish_reason": c.finish_reason,
          },
          ensure_ascii=False,
        )
        + "\n"
      )
  print(f"wrote {len(out)} rows to {f.output}")


if __name__ == "__main__":
  app.run(main)
