"""What qwix sees in our layers: which projections its LoRA and weight-only PTQ providers find
in one `Attention` module, one dense `MLP` and the whole tiny `Qwen3`, and the time of the
`linear` seam (the weight contracted as stored) against a 2-D reshape of the weight.

  PYTHONPATH=. python -m experiments.lora_int8.qwix_spike

Prints one line per (module, provider): the LoRA / quantised parameter names it created, or
the error it raised. Run it on commit 13b3855 (before the seam) to see the "before" column of
the README's table.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from qwen3_jax import config as C
from qwen3_jax.model import Qwen3
from qwen3_jax.model.attention import Attention
from qwen3_jax.model.layers import MLP, linear


def found(model, provider, *inputs, **kw) -> str:
  try:
    out = qwix.quantize_model(model, provider, *inputs, **kw)
  except Exception as e:  # noqa: BLE001 - the error is the finding
    return f"error {type(e).__name__}: {str(e)[:80]}"
  lora = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(out, nnx.LoRAParam))]
  q = [".".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(out)) if v.dtype == jnp.int8]
  return f"lora {sorted(lora)}" if lora else f"int8 {sorted(q)}"


def reshaped_linear(x, w, n_in=1):
  """The previous `linear`: both operands flattened to 2-D."""
  lead, ins = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
  k = math.prod(ins)
  return (x.reshape(-1, k) @ w.reshape(k, -1)).reshape(*lead, *w.shape[n_in:])


def seam_timing(rounds: int = 10) -> dict:
  """min ms of fwd+bwd of the `small` preset's q and o projections, the two forms interleaved."""
  x = jax.random.normal(jax.random.key(0), (16, 256, 512))
  wq = jax.random.normal(jax.random.key(1), (512, 8, 64))
  wo = jax.random.normal(jax.random.key(2), (8, 64, 512))
  fns = {}
  for name, f in (("reshaped", reshaped_linear), ("as_stored", linear)):
    loss = lambda x, wq, wo, f=f: jnp.sum(f(f(x, wq), wo, 2) ** 2)  # noqa: E731
    fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(fns[name](x, wq, wo))
  best = {k: float("inf") for k in fns}
  for _ in range(rounds):
    for k, g in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(g(x, wq, wo))
      best[k] = min(best[k], (time.perf_counter() - t) * 1e3)
  return best


def main():
  cfg = C.tiny()
  x = jax.random.normal(jax.random.key(0), (2, 8, cfg.hidden_size))
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  tok = jnp.ones((1, 8), jnp.int32)
  lora = qwix.LoraProvider(module_path=".*", rank=4, alpha=8.0)
  ptq = qwix.PtqProvider([qwix.QtRule(module_path=".*", weight_qtype="int8")])
  cases = {
    "Attention": (lambda: Attention(cfg, rngs=nnx.Rngs(0)), (x, pos)),
    "MLP": (lambda: MLP(cfg, cfg.intermediate_size, rngs=nnx.Rngs(0)), (x,)),
    "Qwen3": (lambda: Qwen3(cfg, rngs=nnx.Rngs(0)), (tok,)),
  }
  for name, (make, inputs) in cases.items():
    print(f"{name} LoRA: {found(make(), lora, *inputs, rngs=nnx.Rngs(1))}")
    print(f"{name} PTQ:  {found(make(), ptq, *inputs)}")
  print("linear fwd+bwd min ms (small q/o projections):", seam_timing())


if __name__ == "__main__":
  main()
