r"""Pretraining on the embedded corpus (stdlib source + generated reasoning chats) or your files.

  python scripts/train.py --config=configs/pretrain.py:model=tiny --workdir=/tmp/pt \
      --num_cpu_devices=8 --config.optim.lr=3e-3 --config.num_steps=300

Args (after the colon, comma-separated): model = a preset of qwen3_jax.config
(tiny | small | qwen3_30b_a3b | ...); steps = num_steps; lora = LoRA rank (0 = full
training), lora_targets = letters of the adapted projections (q, k, v, o, m = dense MLP).
"""

from configs import common
from qwen3_jax.data.tasks import FAMILIES

# Per-preset sizes that make a sensible CPU run: vocab of the tokenizer trained here,
# sequence length, global batch, peak learning rate.
SIZES = {
  "tiny": dict(vocab=512, seq_len=128, batch=16, lr=3e-3),
  "small": dict(vocab=8192, seq_len=256, batch=16, lr=1e-3),
  # The post-training recipe (scripts/recipe.py): mostly task transcripts of every family
  # (the tools block of the tool families' system turns is learnt by the tokenizer too).
  "mini": dict(
    vocab=1024,
    seq_len=512,
    batch=16,
    lr=3e-3,
    data=dict(max_corpus_bytes=300_000, num_tasks=20_000, task_families=",".join(FAMILIES)),
  ),
}
LARGE = dict(vocab=151936, seq_len=4096, batch=512, lr=3e-4)


def get_config(arg=None):
  arg = common.parse_arg(arg, model="tiny", steps=300, lora=0, lora_targets="qv")
  size = SIZES.get(arg.model, LARGE)
  c = common.ml_collections.ConfigDict()
  c.num_steps = arg.steps  # Optimizer steps.
  c.batch_size = size["batch"]  # Global batch in sequences (all processes, all micro-batches).
  c.seq_len = size["seq_len"]  # Tokens per sequence.
  c.eval_every = 100  # Held-out cross-entropy every N steps (0 = never).
  c.eval_batches = 4  # Batches per evaluation.
  c.checkpoint_every = 100  # Checkpoint every N steps (plus at the end and on SIGTERM).
  c.keep_checkpoints = 3  # Newest checkpoints kept.
  c.seed = 0  # Init and data order.
  c.init_from = ""  # Params-only start: save_params dir, step dir or workdir.
  c.micro_batches = 1  # Gradient accumulation steps per optimizer step.
  c.z_loss = 0.0  # Output z-loss weight.
  c.log_every = 10  # Log every N steps.
  c.max_bad_steps = 5  # Non-finite steps in a row before stopping.
  c.async_checkpoint = True  # Background checkpoint writes.
  c.sample_tokens = 32  # Greedy tokens sampled from the final model (0 = none).
  c.model = common.model_config(arg.model, vocab_size=size["vocab"])
  c.model.lora = common.lora_config(arg.lora, arg.lora_targets)  # None: train every weight
  c.optim = common.optim_config(lr=size["lr"], warmup_steps=max(arg.steps // 20, 1))
  c.data = common.data_config(vocab_size=size["vocab"], **size.get("data", {}))
  c.mesh = common.mesh_config(data=-1)  # All devices data-parallel; e.g. expert=4 for EP.
  return c
