"""The five ablations of issue 15, by name (`experiments/run.py --ablation=NAME`)."""

from experiments.ablations import attention, granularity, load_balance, moe_vs_dense, routing

ABLATIONS = {
  m.ABLATION.name: m.ABLATION for m in (moe_vs_dense, granularity, routing, load_balance, attention)
}
