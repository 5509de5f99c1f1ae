r"""Attention suite: one attention layer's forward+backward, full vs. local window vs. sparse.

python scripts/benchmark.py --suite=attention [--quick] [--repeats=5]

Per sequence length n (1k..32k; batch 1, 8 heads, 8 kv heads, head_dim 64, float32):
  full              our causal attention (explicit [n, n] logits, as every XLA path)
  jax_local_window  jax.nn.dot_product_attention(is_causal, local_window_size=(w-1, 0), 'xla')
  sparse            ours: window w=512, a global token every 64 positions (n/64 more
                    queries/keys), max_globals=64, block 128
Each row: XLA-counted FLOPs and compiled peak bytes (compile only), then the median
forward+backward time unless a guard says the case cannot run here: compiled peak above
MEM_GUARD_BYTES, or estimated time (FLOPs / EST_FLOPS_PER_S) above TIME_GUARD_S; such rows
say why in `status` and have seconds = null. Then the full small-preset model (remat=full)
forward+backward at 32k tokens is compiled with all-full and all-sparse attention to compare
peak memory against MODEL_BUDGET_BYTES, and the targets are printed as PASS/FAIL.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks.common import compiled_cost, report, time_fn
from qwen3_jax import config as C
from qwen3_jax.model.attention import full_attention
from qwen3_jax.model.global_tokens import make_layout
from qwen3_jax.model.sparse_attention import sparse_attention
from qwen3_jax.model.transformer import Qwen3

HEADS, HEAD_DIM = 8, 64
WINDOW, EVERY, MAX_GLOBALS, BLOCK = 512, 64, 64, 128
MEM_GUARD_BYTES = 8 << 30  # this machine: 24 GiB shared by several jobs
TIME_GUARD_S = 60.0  # per timed call
EST_FLOPS_PER_S = 2e10  # ~what 2 CPU cores sustain on these einsums
MODEL_BUDGET_BYTES = 16 << 30  # a 16 GiB accelerator
GIB = float(1 << 30)


def _layer_fn(strategy: str, n: int):
  """(loss(*args), args): sum(attention(q, k, v) * cotangent) for one layer."""
  rng = np.random.default_rng(0)
  shape = (1, n, HEADS, HEAD_DIM)

  def arr(s):
    return jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32)

  q, k, v, ct = arr(shape), arr(shape), arr(shape), arr(shape)
  if strategy == "full":
    return lambda q, k, v: jnp.sum(full_attention(q, k, v) * ct), (q, k, v)
  if strategy == "jax_local_window":

    def loss(q, k, v):
      out = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(WINDOW - 1, 0), implementation="xla"
      )
      return jnp.sum(out * ct)

    return loss, (q, k, v)
  seg = jnp.ones((1, n), jnp.int32)
  layout = make_layout(seg, EVERY, 1)  # one document: ceil(n / EVERY) global slots
  gshape = (1, layout.num_globals, HEADS, HEAD_DIM)
  gseg = jnp.ones((1, layout.num_globals), jnp.int32)
  gct = arr(gshape)

  def sparse_loss(q, k, v, qg, kg, vg):
    (out, _), (gout, _) = sparse_attention(
      q, k, v, seg, qg, kg, vg, gseg, layout, WINDOW, MAX_GLOBALS, BLOCK
    )
    return jnp.sum(out * ct) + jnp.sum(gout * gct)

  return sparse_loss, (q, k, v, arr(gshape), arr(gshape), arr(gshape))


def _row(strategy: str, n: int, repeats: int) -> dict:
  loss, args = _layer_fn(strategy, n)
  fn = jax.value_and_grad(loss, argnums=tuple(range(len(args))))
  compiled, flops, peak = compiled_cost(fn, *args)
  row = {"suite": "attention", "strategy": strategy, "seq_len": n, "flops": flops}
  row.update({"peak_bytes": peak, "seconds": None, "status": "ok"})
  if peak > MEM_GUARD_BYTES:
    row["status"] = f"does not fit: peak {peak / GIB:.1f} GiB > guard {MEM_GUARD_BYTES / GIB:g}"
  elif flops / EST_FLOPS_PER_S > TIME_GUARD_S:
    row["status"] = f"too slow here: ~{flops / EST_FLOPS_PER_S:.0f} s > guard {TIME_GUARD_S:g}"
  else:
    row["seconds"] = time_fn(compiled, *args, repeats=repeats)
  return row


def model_memory(kind: str, n: int) -> dict:
  """Compiled peak bytes of the small preset's forward+backward on one [1, n] sequence."""
  att = C.AttentionConfig(
    kind=kind, window=WINDOW, global_every=EVERY, max_globals=MAX_GLOBALS, block_size=BLOCK
  )
  # Scanned + remat: one layer's activations live at a time (the memory this suite reports).
  cfg = C.small(attention=att, remat="full", scan_layers=True, moe=C.MoEConfig(strategy="capacity"))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((1, n), jnp.int32)

  def loss(state, tokens):
    logits = nnx.merge(graphdef, state)(tokens).logits
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

  _, flops, peak = compiled_cost(jax.value_and_grad(loss), state, tokens)
  fits = 0 <= peak <= MODEL_BUDGET_BYTES
  return {
    "suite": "attention",
    "strategy": f"model_small_{kind}",
    "seq_len": n,
    "flops": flops,
    "peak_bytes": peak,
    "seconds": None,
    "status": f"{'fits' if fits else 'does not fit'} in {MODEL_BUDGET_BYTES / GIB:g} GiB",
  }


def run(flags) -> None:
  quick = flags.quick
  lengths = [1024, 2048] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
  rows = []
  for n in lengths:  # strategies interleaved per length: ratios see the same machine load
    for strategy in ("full", "jax_local_window", "sparse"):
      rows.append(_row(strategy, n, flags.repeats))
      print(json.dumps(rows[-1]), flush=True)
  n_model = 4096 if quick else 32768
  rows += [model_memory("full", n_model), model_memory("sparse", n_model)]
  cols = ("strategy", "seq_len", "seconds", "flops", "peak_bytes", "status")
  report(rows, cols)
  _targets(rows, lengths, n_model)


def _targets(rows, lengths, n_model) -> None:
  get = {(r["strategy"], r["seq_len"]): r for r in rows}
  top, half = lengths[-1], lengths[-2]
  sp, full = get[("sparse", top)], get[("full", top)]
  checks = [
    (
      f"sparse FLOPs({top})/FLOPs({half}) <= 2.1",
      sp["flops"] / get[("sparse", half)]["flops"],
      lambda x: x <= 2.1,
    ),
    (f"full/sparse FLOPs at {top} >= 8", full["flops"] / sp["flops"], lambda x: x >= 8),
  ]
  timed = [n for n in lengths if get[("full", n)]["seconds"] is not None]
  at_least_4 = lambda x: x >= 4  # noqa: E731
  if full["seconds"] is not None:
    checks.append((f"full/sparse time at {top} >= 4", full["seconds"] / sp["seconds"], at_least_4))
  elif timed:  # full cannot run at `top` here: extrapolate its time quadratically (its FLOPs do).
    m = timed[-1]
    est = get[("full", m)]["seconds"] * (top / m) ** 2
    checks.append((f"full/sparse time at {top} >= 4 (full extrapolated from n={m} as n^2)",
                   est / sp["seconds"], at_least_4))  # fmt: skip
    checks.append((f"full/sparse time at {m} (measured, for reference)",
                   get[("full", m)]["seconds"] / get[("sparse", m)]["seconds"], None))  # fmt: skip
  mf, ms = get[("model_small_full", n_model)], get[("model_small_sparse", n_model)]
  for name, value, ok in checks:
    verdict = "" if ok is None else (" -> PASS" if ok(value) else " -> FAIL")
    print(f"{'target' if ok else 'info'} {name}: {value:.2f}{verdict}")
  fits = ms["peak_bytes"] <= MODEL_BUDGET_BYTES < mf["peak_bytes"]
  print(
    f"target small model fwd+bwd at {n_model} tokens fits {MODEL_BUDGET_BYTES / GIB:g} GiB "
    f"with sparse ({ms['peak_bytes'] / GIB:.2f} GiB) but not with full "
    f"({mf['peak_bytes'] / GIB:.2f} GiB) -> {'PASS' if fits else 'FAIL'}"
  )
