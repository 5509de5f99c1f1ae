r"""Stage 1, long-CoT cold start: SFT on verified gold chain-of-thought transcripts.

  python scripts/build_sft_data.py --out=runs/stage1_data.jsonl \
      --tokenizer=runs/pt/tokenizer.json --max_tokens=513
  python scripts/train.py \
    --config=configs/stage1_cold_start.py:model=tiny,init_from=runs/pt,data=runs/stage1_data.jsonl \
      --workdir=runs/stage1 --num_cpu_devices=8 --config.mesh.data=2 --config.mesh.expert=4

Args: as configs/sft.py (model, init_from = the pretrained workdir, data, steps, seq_len,
lr, batch). Few steps on purpose (the Qwen3 report's cold start is small). seq_len 512: with
the `tiny` pretraining's 512-token BPE (`make run`'s corpus) all 1000 default transcripts
(reasoning and format families, 200 each) fit, the longest 501 tokens. The tool families'
transcripts are 1.3k-2.7k tokens there (the tools block alone ~1.1k): add them with
seq_len=4096.
"""

from configs.sft import sft_config

BUILD = (
  "python scripts/build_sft_data.py --out=DATA.jsonl --tokenizer=INIT_FROM/tokenizer.json "
  "--max_tokens=513"
)


def get_config(arg=None):
  return sft_config(arg, steps=200, lr=1e-3, build_hint=BUILD)
