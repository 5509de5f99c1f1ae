"""Running an export (`export.py`) with jax and numpy alone: no model code is imported.

  python -m qwen3_jax.infer.exported DIR --prompt_ids=5,17,42 --max_new_tokens=16
  # prints {"token_ids": [...]} : the greedy continuation

`ExportedModel(directory).greedy(prompt_ids, n)` does what the engine does for a greedy row:
prefill every prompt token but the last (in chunks), then feed the pending token, take the
argmax of the logits (the lowest id among ties), feed it back, until an EOS id (kept in the
output) or n tokens.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np


class ExportedModel:
  """The programs and weights of one export directory, ready to call."""

  def __init__(self, directory: str):
    with open(os.path.join(directory, "meta.json")) as f:
      self.meta = json.load(f)
    self.programs = {}
    for name in ("init", "prefill", "step"):
      with open(os.path.join(directory, f"{name}.stablehlo"), "rb") as f:
        self.programs[name] = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(directory, "weights.npz")) as npz:
      self.weights = [jax.device_put(npz[f"w{i}"]) for i in range(self.meta["num_weights"])]

  def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt (in row 0; other rows idle)."""
    m, (init, prefill, step) = self.meta, (self.programs[k] for k in ("init", "prefill", "step"))
    batch, chunk = m["batch"], m["chunk"]
    if not prompt_ids or len(prompt_ids) + max_new_tokens - 1 > m["max_len"]:
      raise ValueError(
        f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new ones does not fit "
        f"max_len={m['max_len']} (or the prompt is empty)"
      )
    cache = init.call()
    head = list(prompt_ids[:-1])
    for at in range(0, len(head), chunk):
      piece = head[at : at + chunk]
      tokens = np.zeros((batch, chunk), np.int32)
      num = np.zeros((batch,), np.int32)
      tokens[0, : len(piece)], num[0] = piece, len(piece)
      cache = prefill.call(self.weights, cache, tokens, num)
    token, out = prompt_ids[-1], []
    for _ in range(max_new_tokens):
      feed = np.zeros((batch,), np.int32)
      feed[0] = token
      logits, cache = step.call(self.weights, cache, feed)
      token = int(np.argmax(np.asarray(logits[0])))  # first index of the max
      out.append(token)
      if token in m["eos_ids"]:
        break
    return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("directory")
  parser.add_argument("--prompt_ids", required=True, help="comma-separated token ids")
  parser.add_argument("--max_new_tokens", type=int, default=16)
  args = parser.parse_args()
  prompt = [int(t) for t in args.prompt_ids.split(",")]
  ids = ExportedModel(args.directory).greedy(prompt, args.max_new_tokens)
  print(json.dumps({"token_ids": ids}))


if __name__ == "__main__":
  main()
