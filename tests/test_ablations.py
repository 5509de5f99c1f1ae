"""Ablations (experiments/): the verdict rule, FLOPs, probe statistics and the key-value recall
task against hand computations, and every ablation's `--quick` run end to end."""

import json
import math
import os

import numpy as np
import pytest

from experiments import flops, kv_recall, probes
from experiments.ablations import ABLATIONS
from experiments.report import write_results
from experiments.runner import run_ablation
from experiments.verdict import paired_verdict
from qwen3_jax import config as C

T_975_2 = 4.302652729911275  # Student's t, 0.975 quantile, 2 degrees of freedom


def test_paired_verdict_hand_example():
  # d = [0.1, 0.2, 0.3]: mean 0.2, std 0.1, half-width 4.3027 * 0.1 / sqrt(3) = 0.24841.
  v = paired_verdict([1.1, 1.2, 1.3], [1.0, 1.0, 1.0])
  half = T_975_2 * 0.1 / math.sqrt(3)
  np.testing.assert_allclose([v.mean, v.lo, v.hi], [0.2, 0.2 - half, 0.2 + half], rtol=1e-9)
  assert v.verdict == "inconclusive" and v.n == 3
  assert paired_verdict([1.5, 1.6, 1.7], [1.0, 1.0, 1.0]).verdict == "held"  # [0.35, 0.85]
  assert paired_verdict([1.0, 1.0, 1.0], [1.5, 1.6, 1.7]).verdict == "did not hold"
  # Near-equality with a margin of 0.05: d = 0.05 - [0.01, 0.02, 0.03] -> [0.0052, 0.0548].
  v = paired_verdict([1.0, 1.0, 1.0], [1.01, 1.02, 1.03], margin=0.05)
  np.testing.assert_allclose(
    [v.lo, v.hi], [0.03 - 0.01 * T_975_2 / math.sqrt(3), 0.03 + 0.01 * T_975_2 / math.sqrt(3)]
  )
  assert v.verdict == "held"
  # ... and a gap larger than the margin: d = 0.05 - [0.2, 0.3, 0.25] < 0.
  assert paired_verdict([1.0] * 3, [1.2, 1.3, 1.25], margin=0.05).verdict == "did not hold"
  one = paired_verdict([2.0], [1.0])
  assert one.verdict == "inconclusive" and math.isnan(one.lo)
  with pytest.raises(ValueError, match="equal 1-D shapes"):
    paired_verdict([1.0, 2.0], [1.0])


def test_flops_hand_computed():
  cfg = C.tiny(
    num_hidden_layers=1,
    vocab_size=10,
    hidden_size=4,
    head_dim=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=3,
  )
  # Full causal, L=4: mean keys (1+2+3+4)/4 = 2.5.
  assert flops.mean_context(cfg, 0, 4) == 2.5
  # MACs: head 4*10 + projections 4*2*(4+2) + scores 2*2*2*2.5 + router 4*4 + experts
  # 2*3*4*3 = 40 + 48 + 20 + 16 + 72 = 196.
  assert flops.train_flops_per_token(cfg, 4) == 6 * 196
  assert flops.train_flops_per_token(cfg, 4, experts_per_token=1.0) == 6 * (196 - 36)
  # Sparse, window 2, a global every 2, cap 1: window keys 1,2,2,2 + globals 1,1,1,1 -> 2.75.
  att = C.AttentionConfig(kind="sparse", window=2, global_every=2, max_globals=1)
  assert flops.mean_context(cfg.replace(attention=att), 0, 4) == 2.75


def test_probe_statistics_hand_computed():
  # Two types, one layer, two experts: type 0 always expert 0, type 1 always expert 1, equal
  # counts -> I = log 2; the same distribution for both types -> I = 0.
  np.testing.assert_allclose(probes.mutual_information([[[5, 0]], [[0, 5]]]), math.log(2))
  np.testing.assert_allclose(probes.mutual_information([[[3, 1]], [[6, 2]]]), 0.0, atol=1e-12)
  # Loads [1, 3]: std 1, mean 2 -> 0.5; [2, 2] -> 0; averaged over the two layers -> 0.25.
  np.testing.assert_allclose(probes.load_cv([[1, 3], [2, 2]]), 0.25)


def test_kv_recall_rows_plant_pairs_at_their_distance():
  dists = (4, 16, 40)
  rows, dist = kv_recall.make_rows(np.random.default_rng(0), 3, 48, dists, per_distance=2)
  for r in range(3):
    qs = np.flatnonzero(dist[r])
    assert sorted(dist[r][qs].tolist()) == sorted(list(dists) * 2)
    keys = rows["inputs"][r][qs]
    assert len(set(keys.tolist())) == 6 and all(
      kv_recall.KEYS[0] <= k < kv_recall.KEYS[1] for k in keys
    )
    for q in qs:
      d = dist[r][q]
      assert rows["inputs"][r][q - d] == rows["inputs"][r][q]  # the key's first occurrence
      assert rows["targets"][r][q] == rows["inputs"][r][q - d + 1]  # the value after it
      assert kv_recall.VALUES[0] <= rows["targets"][r][q] < kv_recall.VALUES[1]
  np.testing.assert_array_equal(rows["loss_mask"], dist > 0)
  # Accuracy by distance: logits that predict the target everywhere except one distance-4 query.
  logits = np.eye(512)[rows["targets"]]
  q = np.argwhere(dist == 4)[0]
  logits[q[0], q[1]] = np.eye(512)[0]
  acc = kv_recall.recall_accuracy(logits, rows, dist)
  assert acc == {4: 5 / 6, 16: 1.0, 40: 1.0}
  with pytest.raises(ValueError, match="does not fit"):
    kv_recall.make_rows(np.random.default_rng(0), 1, 40, (40,), 1)


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_quick_ablation(name, tmp_path):
  """`experiments/run.py --ablation=NAME --quick`: two arms, one seed, a few steps."""
  ab = ABLATIONS[name]
  out = str(tmp_path / "out")
  records = run_ablation(
    ab, seeds=1, quick=True, outdir=out, workroot=str(tmp_path / "runs"), printer=lambda *_: None
  )
  assert [r["arm"] for r in records] == list(ab.quick_arms)
  assert all(np.isfinite(r["eval_ce"]) and 4.0 < r["eval_ce"] < 7.0 for r in records)
  with open(os.path.join(out, "runs.jsonl")) as f:
    assert [json.loads(line)["arm"] for line in f] == list(ab.quick_arms)
  text = write_results(ab, records, outdir=out, command="test", seeds=1, quick=True, wall_s=1.0)
  assert "**inconclusive**" in text  # one seed never gives a verdict
  assert os.path.getsize(os.path.join(out, "eval_ce_vs_tokens.png")) > 1000
  if ab.kv_recall:
    assert all(0.0 <= r["recall_far"] <= 1.0 for r in records)
  if ab.probes:
    assert all(r["mi_type_expert"] >= 0 and r["experts_code"] >= 1 for r in records)
