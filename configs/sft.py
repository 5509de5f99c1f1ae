r"""Supervised fine-tuning on chat JSONL from a previous run's parameters (the SFT stages' base).

  python scripts/train.py --config=configs/sft.py:model=tiny,init_from=runs/pt,data=chats.jsonl \
      --workdir=runs/sft --num_cpu_devices=8 --config.mesh.data=2 --config.mesh.expert=4

Args (after the colon, comma-separated): model = the preset of `init_from` (its vocabulary
size as in configs/pretrain.py); init_from = the previous stage's workdir, step directory or
params checkpoint (required); data = JSONL of {"messages": [...]} rows (required); steps;
seq_len (every transcript must fit seq_len + 1 tokens: loss_on=assistant drops, and counts,
the ones that do not); lr; batch.

The tokenizer is the one `init_from` was trained with (token ids must mean the same thing);
the loss covers assistant tokens only (`data.loss_on=assistant`).
"""

import os

from configs import common, pretrain
from qwen3_jax.infer.load import tokenizer_places


def sft_config(arg, *, steps, lr, seq_len=512, batch=16, build_hint=""):
  """The SFT ConfigDict for `arg`; stage configs call it with their own defaults.

  `build_hint` is the command that builds the default data, named in the error raised when
  `data=` is not given.
  """
  arg = common.parse_arg(
    arg, model="tiny", init_from="", data="", steps=steps, seq_len=seq_len, lr=lr, batch=batch
  )
  if not arg.init_from:
    raise ValueError("SFT needs init_from=<previous stage's workdir or checkpoint>")
  if not arg.data:
    raise ValueError(
      f"SFT needs data=<chat JSONL path>{'; build it with: ' + build_hint if build_hint else ''}"
    )
  vocab = pretrain.SIZES.get(arg.model, pretrain.LARGE)["vocab"]
  c = pretrain.get_config(f"model={arg.model},steps={arg.steps}")
  c.batch_size = arg.batch
  c.seq_len = arg.seq_len
  c.init_from = arg.init_from
  c.eval_every = 50  # Held-out CE on the data's last rows (skipped when fewer than a batch).
  c.eval_batches = 2
  c.checkpoint_every = 50
  c.sample_tokens = 64  # Greedy reply to a chat prompt at the end.
  c.optim = common.optim_config(lr=arg.lr, warmup_steps=max(arg.steps // 20, 1))
  c.data = common.data_config(
    sources=os.path.abspath(arg.data),
    tokenizer=tokenizer_of(arg.init_from),
    vocab_size=vocab,
    loss_on="assistant",
    eval_fraction=0.02,
  )
  return c


def tokenizer_of(init_from: str) -> str:
  """The tokenizer.json `init_from` was trained with: the first that exists of the places
  `infer.load` looks at (the first of them when none exists yet)."""
  places = tokenizer_places(checkpoint=os.path.abspath(init_from))
  return next((p for p in places if os.path.isfile(p)), places[0])


def get_config(arg=None):
  return sft_config(arg, steps=100, lr=1e-3)
