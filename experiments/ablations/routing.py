"""Fixed top-k (1, 2, 4, 8) against dynamic top-p routing (p = 0.3, 0.5, 0.7; 1 to 8 experts)."""

import numpy as np

from experiments.ablations.spec import Ablation, Arm, Comparison, compare

FIXED = (1, 2, 4, 8)
TOP_P = (0.3, 0.5, 0.7)
ENTROPY_COEF = 0.01  # the dynamic (router entropy) loss of the top-p arms


def at_equal_compute(m, arm: str) -> list[Comparison]:
  """Top-p arm vs fixed top-k at its measured mean experts per token m_bar: per seed, the
  fixed arms' CE interpolated linearly in k between the two fixed k around m_bar (or the
  nearest fixed k outside [1, 8])."""
  ran = [k for k in FIXED if f"top{k}" in m]
  if arm not in m or not ran:
    return []
  m_bar = float(np.mean(m[arm]["experts_per_token"]))
  lo = max([k for k in ran if k <= m_bar], default=min(ran))
  hi = min([k for k in ran if k >= m_bar], default=max(ran))
  ce_lo, ce_hi = (np.asarray(m[f"top{k}"]["eval_ce"]) for k in (lo, hi))
  w = 0.0 if hi == lo else (m_bar - lo) / (hi - lo)
  fixed = list((1 - w) * ce_lo + w * ce_hi)
  what = f"CE of fixed k interpolated at k={m_bar:.2f} (top{lo}, top{hi}) - {arm}.eval_ce"
  claim = f"{arm} beats fixed top-k at equal mean experts per token"
  return [Comparison(claim, what, fixed, m[arm]["eval_ce"])]


def comparisons(m):
  out = []
  for p in TOP_P:
    arm = f"topp{p}"
    out += at_equal_compute(m, arm)
    out += compare(
      m,
      f"{arm}: hard arithmetic prompts (level 4) use more experts than easy ones (level 1)",
      high=(arm, "experts_arith_hard"),
      low=(arm, "experts_arith_easy"),
    )
  return out


def _topp(p):
  return {
    "model.moe.routing": "topp",
    "model.moe.top_p": p,
    "model.moe.dynamic_loss_coef": ENTROPY_COEF,
  }


ABLATION = Ablation(
  name="routing",
  claim="Dynamic routing (1 to 8 experts per token) adapts compute to difficulty: harder tokens "
  "and tasks use more experts; it beats fixed top-k at equal average compute.",
  matched="All arms: E16 F32, same parameters; compute differs by the experts per token, so "
  "top-p is compared with the fixed-k CE interpolated at its measured mean experts per token "
  f"(FLOPs column). Top-p arms add the router-entropy loss (coefficient {ENTROPY_COEF}), cap 8.",
  arms=tuple(Arm(f"top{k}", f"fixed top-{k}", {"model.num_experts_per_tok": k}) for k in FIXED)
  + tuple(Arm(f"topp{p}", f"top-p {p}, 1-8 experts", _topp(p)) for p in TOP_P),
  quick_arms=("top2", "topp0.5"),
  comparisons=comparisons,
  steps=300,
  base={"model.num_experts": 16, "model.moe.max_experts": 8},
  columns=(
    "eval_ce",
    "experts_per_token",
    "mflops_per_token",
    "experts_code",
    "experts_chat",
    "experts_arith_easy",
    "experts_arith_hard",
  ),
  notes="Experts per token by token type are measured on held-out documents of one type each "
  "(code = unseen stdlib files, chat = reasoning-task transcripts, arithmetic at level 1 and "
  "4): the type of a token is the type of its document.",
)
