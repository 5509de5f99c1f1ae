"""Full attention against sliding window only and window + global tokens (capped, uncapped)."""

from experiments.ablations.spec import Ablation, Arm, compare

SEQ_LEN = 512
WINDOW = 64  # 512 scaled down 8x with the context (4096 -> 512)
EVERY = 8  # 64 scaled down 8x: window / spacing = 8, as in the claim
CAP = 16  # capped arm: the 16 most recent globals (128 tokens back)


def _sparse(every, cap):
  return {
    "model.attention.kind": "sparse",
    "model.attention.global_every": every,
    "model.attention.max_globals": cap,
  }


def comparisons(m):
  out = []
  for arm in ("window_global_capped", "window_global_uncapped", "window_only"):
    out += compare(
      m,
      f"{arm} is near-lossless against full attention (CE within 0.02 nats)",
      high=("full", "eval_ce"),
      low=(arm, "eval_ce"),
      margin=0.02,
    )
    out += compare(
      m,
      f"{arm} keeps long-range recall (accuracy at 8x the window within 0.05 of full)",
      high=(arm, "recall_far"),
      low=("full", "recall_far"),
      margin=0.05,
    )
  return out


ABLATION = Ablation(
  name="attention",
  claim="Sliding window 512 + a global token every 64 is near-lossless against full attention "
  "and sub-quadratic.",
  matched=f"Same model (the tiny MoE) and parameters; context {SEQ_LEN}, window {WINDOW}, a "
  f"global token every {EVERY} (the claim's 512 / 64 scaled down 8x with the context, ratio "
  f"kept); capped = the {CAP} most recent globals, uncapped = all. Globals add one learnable "
  "embedding (the global token) to the sparse arms.",
  arms=(
    Arm("full", "full causal", {"model.attention.kind": "full"}),
    Arm("window_only", f"window {WINDOW}, no globals", _sparse(0, 0)),
    Arm(
      "window_global_capped",
      f"window {WINDOW} + global every {EVERY}, cap {CAP}",
      _sparse(EVERY, CAP),
    ),
    Arm(
      "window_global_uncapped", f"window {WINDOW} + global every {EVERY}, no cap", _sparse(EVERY, 0)
    ),
  ),
  quick_arms=("full", "window_global_capped"),
  comparisons=comparisons,
  steps=300,
  base={
    "seq_len": SEQ_LEN,
    "batch_size": 8,
    "model.attention.window": WINDOW,
    "model.attention.block_size": WINDOW,
  },
  quick_overrides={"seq_len": 128, "model.attention.window": 16, "model.attention.block_size": 16},
  probes=False,
  kv_recall=True,
  columns=("eval_ce", "us_per_token", "recall_near", "recall_far"),
  notes="Step time and peak memory against sequence length (1k-32k tokens, one layer and the "
  "small model) come from the attention benchmark: `python scripts/benchmark.py "
  "--suite=attention` (docs/attention_kernel.md); here the step time is at 512 tokens, where the "
  "window saves little.",
)
