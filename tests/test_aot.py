"""Ahead-of-time compilation (qwen3_jax/aot, scripts/aot.py): a TPU topology through libtpu
when the `tpu` extra is installed, 64 simulated CPU devices through the script, and the
arithmetic (collective bytes, analytic FLOPs, roofline, mesh candidates) against references
written out by hand."""

import json
import os
import subprocess
import sys

import jax
import pytest

from qwen3_jax import config as C
from qwen3_jax import sharding as shd
from qwen3_jax.aot import chips, flops, hlo, report, search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = 4


def adam_state_bytes_by_hand(cfg: C.ModelConfig, mesh: dict) -> int:
  """Per-chip bytes of float32 params + AdamW's two moments, from the rules as written in the
  README (experts over `expert`, embed over `fsdp`, heads / mlp / vocab over `tensor`)."""
  d, h, k, dh, e, f = (
    cfg.hidden_size,
    cfg.num_attention_heads,
    cfg.num_key_value_heads,
    cfg.head_dim,
    cfg.num_experts,
    cfg.moe_intermediate_size,
  )
  fs, ep, tp, vp = mesh["fsdp"], mesh["expert"], mesh["tensor"], cfg.padded_vocab_size
  kv_split = tp if k % tp == 0 else 1
  layer = (
    2 * d * h * dh // (fs * tp)  # q_proj, o_proj
    + 2 * d * k * dh // (fs * kv_split)  # k_proj, v_proj
    + 2 * dh  # q_norm, k_norm
    + 2 * d  # input / post-attention norms
    + d * e // fs  # router gate [D, E]
    + 3 * e * d * f // (ep * fs * tp)  # expert gate / up / down projections
  )
  params = cfg.num_hidden_layers * layer + 2 * vp * d // (fs * tp) + d
  return 3 * params * F32


def test_collectives_from_hlo_text():
  text = "\n".join(
    [
      "  %ag = bf16[8,128]{1,0:T(8,128)} all-gather-start(%x), replica_groups={{0,1,2,3}}",
      "  %ag.d = bf16[8,128]{1,0} all-gather-done(%ag)",
      "  %ar = (f32[4]{0}, f32[12]{0}) all-reduce(%a, %b), replica_groups=[2,2]<=[4]",
      "  %rs = f32[16]{0} reduce-scatter(%y), "
      "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}",
      "  %p = bf16[16,2]{1,0} copy(%z)",  # this chip's slots; the output is worst-case sized
      "  %r = bf16[64,2]{1,0} ragged-all-to-all(%p, %q), replica_groups={{0,1}}",
      "  %fusion = f32[8]{0} fusion(%all-gather), kind=kLoop",
    ]
  )
  c = hlo.collectives(text)
  assert c["all-gather"] == {"count": 1, "bytes": 2048, "wire_bytes": 2048 * 3 / 4}
  assert c["all-reduce"] == {"count": 1, "bytes": 64, "wire_bytes": 2 * 64 / 2}
  assert c["reduce-scatter"] == {"count": 1, "bytes": 64, "wire_bytes": 64 * 3}
  assert c["ragged-all-to-all"] == {"count": 1, "bytes": 64, "wire_bytes": 32}
  assert c["all-to-all"]["count"] == c["collective-permute"]["count"] == 0


def test_per_step_collectives_count_loop_bodies_by_trip_count():
  text = "\n".join(
    [
      "%cond (p: (s32[])) -> pred[] {",
      "  %i = s32[] get-tuple-element(%p), index=0",
      "  %n = s32[] constant(12)",
      "  ROOT %lt = pred[] compare(%i, %n), direction=LT",
      "}",
      "%body (p: (s32[])) -> (s32[]) {",
      "  %ag = f32[256]{0} all-gather(%x), replica_groups={{0,1,2,3}}",
      "}",
      "%fused (a: f32[4]) -> f32[4] {",
      "  %f = f32[4]{0} add(%a, %a)",
      "}",
      "ENTRY %main (a: f32[4]) -> f32[4] {",
      "  %w = (s32[]) while(%t), condition=%cond, body=%body",
      "  %g = f32[64]{0} fusion(%a), kind=kLoop, calls=%fused",
      "  %ar = f32[64]{0} all-reduce(%g), replica_groups={{0,1}}",
      "}",
    ]
  )
  runs, fused = hlo.executions(text)
  assert runs == {"cond": 12, "body": 12, "fused": 1, "main": 1} and fused == {"fused"}
  c = hlo.per_step(text)["collectives"]
  assert c["all-gather"] == {"count": 12, "bytes": 12 * 1024, "wire_bytes": 12 * 1024 * 3 / 4}
  assert c["all-reduce"] == {"count": 1, "bytes": 256, "wire_bytes": 256}


def test_analytic_flops_by_hand():
  cfg = C.tiny(num_experts=0, vocab_size=128)  # dense: every parameter is active
  d, i, hd, h, k, v, n = 64, 96, 16, 4, 2, 128, 2
  per_layer = d * hd * (2 * h + 2 * k) + 2 * hd + 2 * d + 3 * d * i
  matmul = n * per_layer + v * d + d  # LM head + final norm; the input embedding is a lookup
  assert flops.matmul_params(cfg) == matmul
  b, l = 3, 10
  attn = n * 4 * h * hd * (l / 2)
  assert flops.train_flops(cfg, b, l) == pytest.approx(3 * (2 * matmul + attn) * b * l)
  assert flops.decode_flops(cfg, b, 40) == pytest.approx((2 * matmul + n * 4 * h * hd * 40) * b)


def test_roofline_takes_the_slowest_resource():
  chip = chips.CHIPS["v5p"]
  costs = {"flops": 459e12 * 0.5, "bytes": 2765e9 * 0.8, "wire_bytes": 600e9 * 0.1}
  r = report.roofline(costs, model_flops=459e12 * 0.3 * 4, chips=4, chip=chip)
  assert r["bound"] == "hbm" and r["step_s"] == pytest.approx(0.8)
  assert r["mfu"] == pytest.approx(0.3 / 0.8)
  no_hbm = report.roofline({**costs, "bytes": None}, 459e12 * 0.3 * 4, chips=4, chip=chip)
  assert no_hbm["bound"] == "compute" and "hbm_s" not in no_hbm


def test_search_meshes_are_valid_and_ordered():
  cfg = C.qwen3_30b_a3b()
  found = search.meshes(cfg, 64, batch=64)
  assert found and all(
    m.data * m.fsdp * m.expert * m.tensor == 64 and cfg.num_experts % m.expert == 0 for m in found
  )
  assert found[0].expert == 64 and found[0].tensor == 1  # widest expert axis first
  pairs = search.candidates(cfg, 64, batch=64, max_candidates=3)
  assert [r for _, r in pairs] == ["full", "dots", "full"]
  with pytest.raises(ValueError, match="no .* mesh of 64 chips"):
    search.candidates(cfg, 64, batch=1)


def test_topology_needs_libtpu_or_names_the_extra():
  with pytest.raises(ValueError, match="unknown chip 'v9x'"):
    chips.chip_of("v9x:2x2")
  if not chips.libtpu_available():
    with pytest.raises(chips.TopologyUnavailable, match=r"\.\[tpu\]"):
      chips.topology_devices("v5p:2x2x1")


@pytest.mark.skipif(
  not chips.libtpu_available(), reason="libtpu missing: pip install -e '.[tpu]' to run TPU AOT"
)
def test_tpu_topology_train_step_is_dropless_and_sharded():
  devices = chips.topology_devices("v5p:2x2x1")
  assert len(devices) == 4 and devices[0].platform == "tpu"
  mesh_cfg = C.MeshConfig(fsdp=2, expert=2)
  mesh = shd.make_mesh(mesh_cfg, devices)
  cfg = C.tiny(num_hidden_layers=4, scan_layers=True, dtype="bfloat16")
  spec = report.Spec(model=cfg, mesh=mesh_cfg, batch=8, seq_len=64)
  # conftest asks for "highest" (float32) matmul precision; libtpu's grouped-matmul kernel
  # refuses it for bf16 operands ("Mosaic failed to compile TPU kernel: Bad lhs type").
  with jax.default_matmul_precision("default"):
    r = report.analyse(spec, mesh, chips.chip_of("v5p:2x2x1"), probe=False)
  m = r["memory"]
  assert min(m["argument"], m["output"], m["temp"], m["code"]) > 0 and r["fits"]
  assert m["alias"] >= 0.99 * m["argument"]  # the state is donated
  hand = adam_state_bytes_by_hand(cfg, dict(mesh.shape))
  # TPU layouts pad the last two dims to (8, 128) tiles, and tiny's are small (head_dim 16,
  # D 64): the arguments hold the hand count plus padding (3.5x here; exact on CPU below).
  assert hand <= m["argument"] <= 4 * hand
  coll = r["collectives_in_hlo"]
  assert coll["ragged-all-to-all"]["count"] > 0  # the dropless exchange, not capacity buffers
  assert coll["all-gather"]["count"] > 0  # FSDP gathers the weights


def test_cpu_64_devices_through_the_script(tmp_path):
  out = tmp_path / "aot.json"
  cmd = [
    sys.executable, os.path.join(ROOT, "scripts", "aot.py"), "--model=small",
    "--cpu_devices=64", "--mesh=data=2,fsdp=2,expert=16", "--batch=64", "--seq_len=32",
    "--dtype=float32", "--noprobe", f"--out={out}",
  ]  # fmt: skip
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "| train | 2,2,16,1 |" in proc.stdout
  (r,) = json.loads(out.read_text())
  assert r["chips"] == 64 and r["fits"] is None and "roofline" not in r
  cfg = C.small()
  hand = adam_state_bytes_by_hand(cfg, r["mesh"])
  batch = 4 * (64 // 64) * 32 * 4  # 4 int32 [B, L] arrays, one row per chip
  # The rest is the state's int32 scalars (step, skip counters, optimizer counts).
  assert 0 <= r["memory"]["argument"] - hand - batch <= 64
  assert r["memory"]["temp"] > 0 and r["memory"]["alias"] >= hand
  # Largest per chip: the embedding / LM head [Vp, D], split 2 x over fsdp (tensor is 1);
  # an expert weight [4 layers, 16, 512, 512] is split 32 x (16 experts, 2 x embed).
  top = r["largest_arguments"]
  assert top[0]["bytes"] == 8192 * 512 * F32 // 2 and "fsdp" in top[0]["spec"]
  expert = next(b for b in top if "down_proj" in b["path"])
  assert expert["bytes"] == 4 * 16 * 512 * 512 * F32 // 32 and "expert" in expert["spec"]
  assert r["collectives_in_hlo"]["all-gather"]["count"] > 0
