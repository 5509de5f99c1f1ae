"""MoE (E16 k2) against dense models of equal active and of equal total parameters."""

from experiments.ablations.spec import Ablation, Arm, compare

F = 32  # expert hidden size (the tiny preset's); k * F and E * F size the dense arms


def comparisons(m):
  return compare(
    m,
    "MoE beats dense at equal active parameters (~equal FLOPs per token)",
    high=("dense_active", "eval_ce"),
    low=("moe_e16_k2", "eval_ce"),
  ) + compare(
    m,
    "MoE reaches the quality of dense at equal total parameters (within 0.02 nats), at a "
    "fraction of its compute",
    high=("dense_total", "eval_ce"),
    low=("moe_e16_k2", "eval_ce"),
    margin=0.02,
  )


ABLATION = Ablation(
  name="moe_vs_dense",
  claim='MoE reaches dense quality at 30-50% of dense compute; "16 experts with top-2 routing '
  'is 40% more compute-efficient".',
  matched="dense_active: MLP hidden k*F = 64 (the active expert parameters of MoE); "
  "dense_total: MLP hidden E*F = 512 (all expert parameters). The MoE arm also has the router "
  "(D*E = 1,024 per layer). Same tokens per step, steps, optimizer and data order.",
  arms=(
    Arm("moe_e16_k2", "MoE, 16 experts top-2, F=32", {}),
    Arm(
      "dense_active",
      "dense, MLP 64 (= k F)",
      {"model.num_experts": 0, "model.intermediate_size": 2 * F},
    ),
    Arm(
      "dense_total",
      "dense, MLP 512 (= E F)",
      {"model.num_experts": 0, "model.intermediate_size": 16 * F},
    ),
  ),
  quick_arms=("moe_e16_k2", "dense_active"),
  comparisons=comparisons,
  steps=400,
  base={"model.num_experts": 16, "model.num_experts_per_tok": 2, "model.moe_intermediate_size": F},
  probes=False,
  columns=(
    "eval_ce",
    "total_params",
    "active_params",
    "mflops_per_token",
    "us_per_token",
    "total_tflops",
  ),
  notes="Tiny models (hidden 64, 2 layers) for minutes of CPU: at this scale the comparison "
  "says little about billion-parameter models; the CE-vs-FLOPs plot shows the compute axis.",
)
