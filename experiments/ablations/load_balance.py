"""Load balancing: none, per sequence, per micro-batch, global batch (two coefficients), each
with and without router z-loss."""

from experiments.ablations.spec import Ablation, Arm, compare

BALANCE = {  # arm stem -> (moe.balance, router_aux_loss_coef)
  "none": ("global", 0.0),
  "sequence": ("sequence", 0.01),
  "micro_batch": ("micro_batch", 0.01),
  "global": ("global", 0.01),
  "global_x10": ("global", 0.1),
}
Z_COEF = 1e-3
MICRO_BATCHES = 4


def _arm(stem, z):
  balance, coef = BALANCE[stem]
  name = stem + ("_z" if z else "")
  over = {"model.moe.balance": balance, "model.router_aux_loss_coef": coef}
  over["model.moe.router_z_loss_coef"] = Z_COEF if z else 0.0
  note = f"balance={balance}, coef {coef}" + (f", z-loss {Z_COEF}" if z else "")
  return Arm(name, note, over)


def comparisons(m):
  out = []
  for other in ("micro_batch", "sequence"):
    out += compare(
      m,
      f"global-batch balancing gives lower CE than {other} balancing",
      high=(other, "eval_ce"),
      low=("global", "eval_ce"),
    )
    out += compare(
      m,
      f"global-batch balancing gives more expert specialisation than {other} balancing",
      high=("global", "mi_type_expert"),
      low=(other, "mi_type_expert"),
    )
  return out


ABLATION = Ablation(
  name="load_balance",
  claim="Global-batch load balancing gives better quality and specialisation than per-sequence "
  "or per-micro-batch balancing (Qiu et al., arXiv 2501.11873, adopted by the Qwen3 report).",
  matched=f"Same model (E16 k2 F32) and batch, {MICRO_BATCHES} micro-batches of gradient "
  "accumulation in every arm (so per-micro-batch statistics differ from global ones); "
  "training is dropless, the capacity strategy (factor 1.25) is applied only in the probe "
  "that measures the dropped fraction.",
  arms=tuple(_arm(stem, z) for z in (False, True) for stem in BALANCE),
  quick_arms=("global", "micro_batch"),
  comparisons=comparisons,
  steps=200,
  base={"model.num_experts": 16, "micro_batches": MICRO_BATCHES},
  # --quick: micro-batches of 8 rows, so that 8 data-parallel (simulated) devices divide them.
  quick_overrides={"micro_batches": 2},
  columns=("eval_ce", "load_cv", "dropped_fraction", "mi_type_expert"),
  notes="Specialisation = mutual information (nats, averaged over MoE layers) between the "
  "document type (code, chat, arithmetic) of a token and the experts it is routed to, on "
  "held-out probe documents. A micro-batch here is 4 sequences of 128 tokens: the "
  "difference between micro-batch and global statistics is larger than at real batch sizes.",
)
