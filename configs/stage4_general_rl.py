r"""Stage 4, general RL: GRPO with weighted rewards (correctness, format, flag following,
tool-call validity and task success, length) on reasoning, format and tool tasks, half of the
prompts in /no_think mode, tool tasks as multi-turn rollouts through the tool loop, from the
stage-3 checkpoint with a k3 KL to it.

  python scripts/train.py --config=configs/stage4_general_rl.py:model=tiny,init_from=RUNS/stage3 \
      --workdir=RUNS/stage4 --num_cpu_devices=8 --config.mesh.expert=4

Args as in configs/stage2_reasoning_rl.py (whose fields this config changes, commented here).
"""

from configs import common, stage2_reasoning_rl

# Rows hold the tools block and up to max_tool_steps replies with the tool turns between.
SEQ_LEN = {"tiny": 1536, "small": 2048, "mini": 1280}
# Gradient accumulation of the policy step: 64 rows of 1280 tokens in one pass need over 20 GB
# on 8 simulated devices (the exact expert exchange sizes its buffers for the worst case).
MICRO_BATCHES = {"mini": 4}


def get_config(arg=None):
  c = stage2_reasoning_rl.get_config(arg)
  model = common.parse_arg(arg, **stage2_reasoning_rl.ARGS).model
  c.seq_len = SEQ_LEN.get(model, 4096)
  c.micro_batches = MICRO_BATCHES.get(model, 1)
  rl = c.rl
  rl.families = "arithmetic,countdown,format,unit_tools,flight_tools"  # All kinds of task.
  rl.difficulties = "1,2"  # Tool chains of 1-2 calls.
  rl.think_flags = True  # Every user turn ends in /think or /no_think ...
  rl.no_think_frac = 0.5  # ... half of them /no_think.
  rl.max_tool_steps = 3  # Replies per tool conversation (calls run between them).
  rl.beta = 0.01  # A light k3 KL to the stage-3 model (ref_from "" = init_from).
  rl.rewards.correctness = 1.0  # Task success (tool tasks: the verifier with the outbox).
  rl.rewards.format = 0.2  # One think block (none under /no_think), a non-empty answer.
  rl.rewards.flag = 0.2  # Reasoning under /think, none under /no_think.
  rl.rewards.tool_valid = 0.2  # Share of tool calls that ran without error.
  rl.rewards.length = 0.05  # Linear length penalty.
  rl.rewards.overlong = 0.0  # (the length penalty replaces the overlong one)
  return c
