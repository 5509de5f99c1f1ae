r"""Stage 3, thinking-mode fusion: SFT from stage 2 on rejection-sampled thinking answers,
non-thinking answers (empty think block) and flag-switching conversations.

  python scripts/build_fusion_data.py --workdir=runs/stage2 --out=runs/stage3_data.jsonl
  python scripts/train.py \
    --config=configs/stage3_fusion.py:model=tiny,init_from=runs/stage2,data=runs/stage3_data.jsonl \
      --workdir=runs/stage3 --num_cpu_devices=8 --config.mesh.data=2 --config.mesh.expert=4

Args: as configs/sft.py (init_from = stage 2's workdir). Multi-turn rows train on their last
assistant turn only (their "loss_on": "last"; see scripts/build_fusion_data.py).
"""

from configs.sft import sft_config

BUILD = "python scripts/build_fusion_data.py --workdir=STAGE2_WORKDIR --out=DATA.jsonl"


def get_config(arg=None):
  return sft_config(arg, steps=150, lr=5e-4, build_hint=BUILD)
