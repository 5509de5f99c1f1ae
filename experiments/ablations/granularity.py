"""Fine-grained experts (E64 k8 F16) against coarse ones (E16 k2 F64): equal active and total."""

from experiments.ablations.spec import Ablation, Arm, compare


def comparisons(m):
  return compare(
    m,
    "fine-grained experts (E64 k8) beat coarse ones (E16 k2) at equal active and total params",
    high=("coarse_e16_k2", "eval_ce"),
    low=("fine_e64_k8", "eval_ce"),
  )


ABLATION = Ablation(
  name="granularity",
  claim="Fine-grained experts (many small experts, more active) beat few large ones at equal "
  "active and total parameters.",
  matched="k*F = 128 active and E*F = 1,024 total expert hidden units per layer in both arms "
  "(the issue's E16 k2 F512 vs E64 k8 F128 scaled by 1/8 with the model: hidden 64); the "
  "router differs (D*E: 1,024 vs 4,096 per layer).",
  arms=(
    Arm(
      "coarse_e16_k2",
      "E16 k2 F64",
      {"model.num_experts": 16, "model.num_experts_per_tok": 2, "model.moe_intermediate_size": 64},
    ),
    Arm(
      "fine_e64_k8",
      "E64 k8 F16",
      {"model.num_experts": 64, "model.num_experts_per_tok": 8, "model.moe_intermediate_size": 16},
    ),
  ),
  quick_arms=("coarse_e16_k2", "fine_e64_k8"),
  comparisons=comparisons,
  steps=400,
  columns=("eval_ce", "us_per_token", "load_cv", "mi_type_expert"),
  notes="Expert sizes scaled down 8x with the model; the step time is CPU time with the "
  "dropless block dispatch, where many small experts cost more per FLOP.",
)
