r"""Decode suite: generation tokens/s of the `small` preset, the Engine against HF `generate()`.

python scripts/benchmark.py --suite=decode [--quick] [--repeats=3]

`small` (vocab 8192, hidden 512, 4 layers, 8 q / 4 kv heads, head_dim 64, E16 k2 F512),
float32, one CPU device, greedy, prompts of 128 random ids, 128 new tokens per row (EOS
ignored), batch 1, 8 and 32 (`--quick`: batch 1 and 8, prompt 32, 32 new tokens, at most 2
rounds, no `ours_loop` and no logits comparison; well under a minute). `ours` is
`Engine.generate` (prefill chunk 128, 16 decode steps per device call, KV cache of 256 slots);
`hf_torch` is transformers' `Qwen3MoeForCausalLM.generate()` (its KV cache, default attention)
with the very same weights: our randomly initialised model written by `hf.save_pretrained`
and read back by transformers. Every case is timed interleaved (one call of each per round,
compiled and warmed up first) and the fastest round counts: the machine is shared.

Per implementation and batch B, two calls are timed: N new tokens (`total_s`) and 1 new token
(`ttft_s`: submit to the first token of fresh requests, i.e. prefill + one decode step).
  tokens_per_s          decode: B * (N - 1) / (total_s - ttft_s), generated tokens / decode time
  e2e_tokens_per_s      B * N / total_s (what the README's HF numbers count)
  step_ms               (total_s - ttft_s) / (N - 1): one decode step of the whole batch
  prefill_tokens_per_s  B * prompt / (ttft_s - step), the prompt tokens / prefill time
`ours_loop` times the device program alone (`decode.decode`, N - 1 steps in one call from a
prefilled state, no host work): its `step_ms` minus ours' is the host's share.

Bound: `weight_read_ms` = the bytes of the weights one decode step must read (all but the
input embedding; of the experts, the expected number hit by B tokens with uniform routing,
E (1 - (1 - k/E)^B) per layer) at the read bandwidth measured in the same run (`sum_gb_s`:
the best sum of a 256 MiB float32 array; `copy_gb_s`: a copy of it, read + write bytes, for
reference). `kv_read_ms`: the cache keys and values attention reads per step at the mean
length, at that bandwidth. A step cannot be faster than about weight_read_ms + kv_read_ms.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train.py; must precede torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.benchmarks.common import print_load, report, time_interleaved  # noqa: E402
from qwen3_jax import config as C  # noqa: E402
from qwen3_jax import hf  # noqa: E402
from qwen3_jax.data.tokenizer import train_tokenizer  # noqa: E402
from qwen3_jax.infer.engine import Engine, Request  # noqa: E402
from qwen3_jax.infer.sampling import SamplingParams  # noqa: E402
from qwen3_jax.model import Qwen3  # noqa: E402

HF_RECORDED = {1: 98, 8: 223, 32: 526}  # HF generate() tokens/s measured here (REFERENCES.md)
TARGET = {1: 1.5, 8: 3.0, 32: 3.0}  # ours / HF decode tokens/s
STEPS_PER_CALL = 16
BANDWIDTH_BYTES = 256 << 20
GREEDY = SamplingParams.greedy()


def bandwidth(repeats: int = 10) -> tuple[float, float]:
  """(copy, sum) bytes/s of a BANDWIDTH_BYTES float32 array on the default device (best run);
  a copy moves 2x the bytes (read + write), a sum reads them once."""
  x = jnp.arange(BANDWIDTH_BYTES // 4, dtype=jnp.float32)
  copy = jax.jit(lambda x: x * 1.0 + 0.0)  # not elided: one read, one write
  total = jax.jit(jnp.sum)
  out = []
  for fn, moved in ((copy, 2 * BANDWIDTH_BYTES), (total, BANDWIDTH_BYTES)):
    jax.block_until_ready(fn(x))
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(x))
      best = min(best, time.perf_counter() - t0)
    out.append(moved / best)
  return out[0], out[1]


def step_bytes(cfg: C.ModelConfig, model: Qwen3, batch: int) -> int:
  """Weight bytes one decode step of `batch` tokens reads (see the module docstring)."""
  e, k = cfg.num_experts, cfg.num_experts_per_tok
  hit = e * (1 - (1 - k / e) ** batch)
  total = 0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = "/".join(map(str, path))
    nbytes = var.get_value().nbytes
    if name.startswith("embed_tokens") and not cfg.tie_word_embeddings:
      continue  # a lookup of B rows
    if name.endswith(("gate_proj", "up_proj", "down_proj")) and "mlp" in name and e:
      nbytes = nbytes * hit / e
    total += nbytes
  return int(total)


def kv_bytes(cfg: C.ModelConfig, batch: int, mean_len: float) -> int:
  """Cached keys and values the layers' attention reads per step, at `mean_len` tokens."""
  per_tok = 2 * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  return int(cfg.num_hidden_layers * batch * mean_len * per_tok)


def hf_model(model: Qwen3, cfg: C.ModelConfig):
  """transformers' Qwen3MoeForCausalLM with our weights (via `hf.save_pretrained`), or None."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(model, cfg, d)
    theirs = transformers.Qwen3MoeForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
  return theirs


def check_same_weights(model: Qwen3, theirs, tokens: np.ndarray) -> float:
  """Largest |ours - HF| logit difference on `tokens` [B, L] (same weights: ~1e-5)."""
  import torch

  ours = np.asarray(nnx.jit(lambda m, t: m(t).logits)(model, jnp.asarray(tokens)))
  with torch.no_grad():
    ref = theirs(torch.from_numpy(tokens).long()).logits.numpy()
  return float(np.abs(ours - ref[..., : ours.shape[-1]]).max())


def ours_calls(eng: Engine, prompts: list[list[int]], new: int, max_len: int):
  """(N new tokens, 1 new token) zero-argument calls of `Engine.generate`; each returns the
  [B, n] generated ids."""

  def run(n):
    reqs = [Request(p, sampling=GREEDY, max_new_tokens=n) for p in prompts]
    out = eng.generate(reqs, max_len=max_len)
    return np.asarray([c[0].token_ids for c in out])

  return functools.partial(run, new), functools.partial(run, 1)


def ours_loop(eng: Engine, prompts: list[list[int]], new: int, max_len: int):
  """A zero-argument call of the decode program alone: `new - 1` steps in one device call
  from a copy of a prefilled state (the first token already sampled)."""
  b = len(prompts)
  sess = eng.session(batch_size=b, max_len=max_len)
  for i, p in enumerate(prompts):
    sess.submit(Request(p, sampling=GREEDY, max_new_tokens=new, id=i))
  sess.prog = dataclasses.replace(sess.prog, steps=1)
  sess.step()  # admit, prefill, the first token
  state = nnx.state(eng.model)
  prog = dataclasses.replace(sess.prog, steps=new - 1)
  rows0 = sess.rows
  fn = eng.programs[2]

  def call():
    rows = jax.tree.map(jnp.copy, rows0)
    rows, out = fn(state, rows, prog)
    return np.asarray(out.tokens)

  return call


def hf_calls(theirs, prompts: list[list[int]], new: int):
  """(N new tokens, 1 new token) zero-argument calls of HF generate(); [B, n] ids."""
  import torch

  ids = torch.tensor(prompts, dtype=torch.long)
  mask = torch.ones_like(ids)

  def run(n):
    with torch.no_grad():
      out = theirs.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        eos_token_id=None,
        pad_token_id=0,
      )
    return out[:, ids.shape[1] :].numpy()

  return functools.partial(run, new), functools.partial(run, 1)


def run(flags) -> list[dict]:
  batches, prompt_len, new = ((1, 8), 32, 32) if flags.quick else ((1, 8, 32), 128, 128)
  max_len = 1 << (prompt_len + new - 1 - 1).bit_length()
  print_load("at start")
  cfg = C.small()
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  tok = train_tokenizer(["The quick brown fox jumps over the lazy dog."], 300)
  eng = Engine(model, tok, prefill_chunk=128, steps_per_call=STEPS_PER_CALL)
  eng.eos_ids = ()  # always N new tokens, as HF with eos_token_id=None
  theirs = hf_model(model, cfg)
  rng = np.random.default_rng(0)
  if theirs is not None and not flags.quick:  # (--quick: the greedy tokens are compared)
    diff = check_same_weights(model, theirs, rng.integers(10, cfg.vocab_size, (2, 16)))
    print(f"same weights: max |logits ours - HF| = {diff:.2e}")
  copy_bw, sum_bw = bandwidth(3 if flags.quick else 10)
  print(f"memory bandwidth: copy {copy_bw / 1e9:.1f} GB/s, sum {sum_bw / 1e9:.1f} GB/s")
  rows = []
  for b in batches:
    prompts = rng.integers(10, cfg.vocab_size, (b, prompt_len)).tolist()
    fns = {}
    fns["ours/total"], fns["ours/ttft"] = ours_calls(eng, prompts, new, max_len)
    if not flags.quick:  # two more compilations of the decode loop
      fns["ours_loop/loop"] = ours_loop(eng, prompts, new, max_len)
    if theirs is not None:
      fns["hf_torch/total"], fns["hf_torch/ttft"] = hf_calls(theirs, prompts, new)
    results = {name: fn() for name, fn in fns.items()}  # compile, and the tokens to compare
    if theirs is not None:
      same = float(np.mean(results["ours/total"] == results["hf_torch/total"]))
      print(f"batch {b}: greedy tokens equal to HF's: {same:.3f}")
    repeats = min(flags.repeats, 2) if flags.quick else flags.repeats
    times = time_interleaved(fns, repeats=repeats, slow_s=300.0)
    best = {name: float(np.min(t)) for name, t in times.items()}
    w_ms = step_bytes(cfg, model, b) / sum_bw * 1e3
    kv_ms = kv_bytes(cfg, b, prompt_len + new / 2) / sum_bw * 1e3
    for impl in ("ours", "hf_torch", "ours_loop"):
      if impl == "ours_loop" and "ours_loop/loop" in best:
        decode_s, ttft = best["ours_loop/loop"], None
      elif f"{impl}/total" in best:
        ttft = best[f"{impl}/ttft"]
        decode_s = best[f"{impl}/total"] - ttft
      else:
        continue
      step = decode_s / (new - 1)
      row = dict(
        suite="decode",
        case=f"small_E16k2_b{b}",
        impl=impl,
        batch=b,
        prompt=prompt_len,
        new_tokens=new,
        tokens_per_s=b * (new - 1) / decode_s,
        step_ms=step * 1e3,
        weight_read_ms=w_ms,
        kv_read_ms=kv_ms,
        copy_gb_s=copy_bw / 1e9,
        sum_gb_s=sum_bw / 1e9,
        samples=len(times[f"{impl}/{'loop' if ttft is None else 'total'}"]),
      )
      if ttft is not None:
        row.update(
          ttft_s=ttft,
          total_s=best[f"{impl}/total"],
          e2e_tokens_per_s=b * new / best[f"{impl}/total"],
          prefill_tokens_per_s=b * prompt_len / max(ttft - step, 1e-9),
        )
      rows.append(row)
  by = {(r["batch"], r["impl"]): r for r in rows}
  for r in rows:
    other = by.get((r["batch"], "hf_torch"))
    if r["impl"] != "hf_torch" and other is not None:
      r["vs_hf"] = r["tokens_per_s"] / other["tokens_per_s"]
    if r["batch"] in HF_RECORDED:
      r["vs_hf_recorded"] = r["tokens_per_s"] / HF_RECORDED[r["batch"]]
  print_load("at end")
  report(
    rows,
    [
      "case",
      "impl",
      "tokens_per_s",
      "e2e_tokens_per_s",
      "prefill_tokens_per_s",
      "ttft_s",
      "step_ms",
      "weight_read_ms",
      "kv_read_ms",
      "vs_hf",
      "vs_hf_recorded",
    ],
  )
  for r in rows:
    if r["impl"] == "ours" and "vs_hf" in r:
      need = TARGET[r["batch"]]
      ok = r["vs_hf"] >= need
      print(f"target batch {r['batch']}: ours/HF decode >= {need}: {'PASS' if ok else 'FAIL'}")
  return rows
