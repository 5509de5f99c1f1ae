r"""Stage-1 style SFT (chat JSONL, loss on the assistant turns) as LoRA on a base model: only
the adapters train (q and v at rank 8 by default); the base comes from `init_from`.

  python scripts/train.py --config=configs/lora_sft.py:model=tiny,rank=8,targets=qv \
      --workdir=/tmp/lora_sft --config.init_from=runs/pt \
      --config.data.sources=train.jsonl --config.data.tokenizer=runs/pt/tokenizer.json

Args (after the colon): model (preset), steps, rank (0 = full fine-tuning, the comparison
arm), targets (letters: q, k, v, o, m = dense MLP), lr (0 = 5e-3 with LoRA, 1e-3 without).
The adapters are saved with the training checkpoints; `qwen3_jax.adapters` writes them
alone, loads them onto a base and merges them.
"""

from configs import common, pretrain


def get_config(arg=None):
  arg = common.parse_arg(arg, model="tiny", steps=200, rank=8, targets="qv", lr=0.0)
  c = pretrain.get_config(f"model={arg.model},steps={arg.steps}")
  c.model.lora = common.lora_config(arg.rank, arg.targets)
  c.optim.lr = arg.lr or (5e-3 if arg.rank else 1e-3)  # adapters start at B = 0: a larger lr
  c.optim.weight_decay = 0.0  # no pull towards zero on the adapters (or the full weights)
  c.data.loss_on = "assistant"  # SFT: the loss on the assistant turns only
  c.eval_every = 50
  c.checkpoint_every = 0  # the end (and SIGTERM) only
  c.sample_tokens = 0
  return c
