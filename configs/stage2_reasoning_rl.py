r"""Stage 2, reasoning RL: GRPO (DAPO by default) on the reasoning task families, rollouts from
the current policy through the generation engine, from the stage-1 checkpoint.

  python scripts/train.py --config=configs/stage2_reasoning_rl.py:model=tiny,init_from=RUNS/stage1 \
      --workdir=RUNS/stage2 --num_cpu_devices=8 --config.mesh.expert=4 [--config.rl.group_size=4]

Args (after the colon, comma-separated): model = the preset of the previous stages (its
vocabulary as in configs/pretrain.py); init_from = the stage-1 workdir (or any checkpoint,
params-only start; its tokenizer.json is copied here); steps = RL iterations.
The `rl` section (fields of qwen3_jax/rl/config.py and run_config.py, commented below) is
what makes scripts/train.py run the RL loop (qwen3_jax/rl/loop.py) instead of SFT.
"""

from configs import common
from configs.pretrain import LARGE, SIZES

# Per-preset RL sizes: tokens per reply and rows (prompt + reply) of the policy step.
RL_SIZES = {
  "tiny": dict(max_new_tokens=192, seq_len=320),
  "small": dict(max_new_tokens=256, seq_len=448),
  "mini": dict(max_new_tokens=320, seq_len=384),
}


ARGS = dict(model="tiny", init_from="", steps=40)


def get_config(arg=None):
  arg = common.parse_arg(arg, **ARGS)
  size = SIZES.get(arg.model, LARGE)
  rl_size = RL_SIZES.get(arg.model, dict(max_new_tokens=1024, seq_len=1536))
  c = common.ml_collections.ConfigDict()
  c.num_steps = arg.steps  # RL iterations (each: one rollout batch, rl.ppo_epochs steps).
  c.seq_len = rl_size["seq_len"]  # Row length of the policy step (longer rows are cut).
  c.eval_every = 0  # Unused by RL (held-out evaluation is scripts/evaluate.py's).
  c.eval_batches = 0
  c.checkpoint_every = 10  # Checkpoint every N iterations (plus at the end and on SIGTERM).
  c.keep_checkpoints = 2  # Newest checkpoints kept.
  c.seed = 0  # Prompt draws and sampling seeds (with the iteration number).
  c.init_from = arg.init_from  # The previous stage (params only).
  c.micro_batches = 1  # Gradient accumulation steps per optimizer step.
  c.z_loss = 0.0  # Unused by the RL objective.
  c.log_every = 1  # Progress line every N iterations (metrics.jsonl gets every one).
  c.max_bad_steps = 5  # Non-finite optimizer steps in a row before stopping.
  c.async_checkpoint = True  # Background checkpoint writes.
  c.sample_tokens = 0  # Unused by RL.
  c.model = common.model_config(arg.model, vocab_size=size["vocab"])
  # RL moves a trained policy: a small constant lr, no weight decay pulling it elsewhere.
  c.optim = common.optim_config(
    lr=size["lr"] / 10, warmup_steps=0, schedule="constant", weight_decay=0.0
  )
  c.data = common.data_config(vocab_size=size["vocab"])  # only data.tokenizer is read
  c.mesh = common.mesh_config(data=-1)  # All devices data-parallel; e.g. expert=4 for EP.

  rl = common.ml_collections.ConfigDict()
  # The objective: DAPO's (RLConfig.dapo); GRPO = eps_high 0.2, aggregation sequence, beta
  # 0.04; Dr. GRPO = eps_high 0.2, aggregation constant, scale_by_std False.
  rl.temperature = 1.0  # Rollout sampling temperature (log-probs of softmax(logits / T)).
  rl.eps_low = 0.2  # Ratio clipped below at 1 - eps_low.
  rl.eps_high = 0.28  # Ratio clipped above at 1 + eps_high (clip-higher).
  rl.aggregation = "token"  # token (DAPO) | sequence (GRPO) | constant (Dr. GRPO).
  rl.norm_len = 0  # constant aggregation: per-sequence normaliser (0 = seq_len).
  rl.scale_by_std = True  # Advantages (R - mean) / std; False: R - mean (Dr. GRPO).
  rl.beta = 0.0  # Weight of the k3 KL to the reference (ref_from); 0 = no reference.
  rl.ref_from = ""  # The frozen reference's checkpoint; "" = init_from.
  rl.ppo_epochs = 2  # Optimizer steps per rollout batch (stored old log-probs).
  rl.recompute_old_logp = "auto"  # auto (when not float32) | always | never.
  rl.group_size = 8  # G samples per prompt.
  rl.prompts_per_step = 8  # Prompts per rollout batch (batch = prompts x G rows).
  rl.max_new_tokens = rl_size["max_new_tokens"]  # Max response length per reply.
  rl.top_k = 0  # Rollout sampling filters (off: the ratio's old policy is the sampler).
  rl.top_p = 1.0
  rl.families = "arithmetic,countdown,reverse_words,parity"  # Reasoning families drawn.
  rl.difficulties = "1,2,3"  # Levels drawn uniformly.
  rl.think_flags = False  # Stage 2 is thinking mode only (no /think, /no_think flags).
  rl.no_think_frac = 0.0  # Share of /no_think prompts when think_flags.
  rl.max_tool_steps = 1  # Replies per conversation (tool tasks only).
  rl.dynamic_sampling = True  # Refill groups whose rewards have zero variance...
  rl.max_resample_tries = 2  # ... with at most this many extra rollout rounds.
  rl.rewards = common.ml_collections.ConfigDict(
    dict(
      correctness=1.0,  # The task's verifier.
      format=0.0,  # One think block + a non-empty answer.
      flag=0.0,  # Follows /think or /no_think.
      tool_valid=0.0,  # Share of tool calls that ran.
      length=0.0,  # -(tokens / max_new_tokens).
      overlong=1.0,  # DAPO's soft overlong penalty ...
      overlong_cache=rl_size["max_new_tokens"] // 4,  # ... over the last this many tokens.
    )
  )
  c.rl = rl
  return c
