r"""Demo: a small Qwen3-MoE on 8 simulated CPU devices (2 data x 4 expert), a few AdamW steps.

python scripts/demo.py [--steps=5]
"""

import os
import sys
import time

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from qwen3_jax import config as C  # noqa: E402
from qwen3_jax import sharding  # noqa: E402
from qwen3_jax.model import Qwen3  # noqa: E402

flags.DEFINE_integer("steps", 5, "Optimizer steps.")
flags.DEFINE_integer("batch", 8, "Sequences per step.")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")


def main(argv):
  del argv
  f = flags.FLAGS
  cfg = C.tiny(num_hidden_layers=4, hidden_size=128, num_experts=8, moe_intermediate_size=64)
  mesh = sharding.make_mesh(C.MeshConfig(data=2, expert=4))
  sharding.validate(cfg, mesh, f.batch)
  model = sharding.create_sharded(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)), mesh)
  opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
  print(f"mesh {dict(mesh.shape)}; parameters (path, shape, spec, per-device shape):")
  for row in sharding.describe(model):
    print("  {:<44} {:<16} {:<28} {}".format(*row))

  @nnx.jit
  def step(model, opt, tokens):
    def loss_fn(model):
      out = model(tokens[:, :-1])
      ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens[:, 1:]).mean()
      return ce + out.aux["aux_loss"], (ce, out.aux)

    (_, (ce, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return ce, aux

  # A learnable toy stream: each row counts upward from a random start.
  start = jax.random.randint(jax.random.key(0), (f.batch, 1), 0, cfg.vocab_size)
  tokens = (start + jnp.arange(f.seq_len + 1)) % cfg.vocab_size
  with jax.set_mesh(mesh):
    tokens = jax.device_put(tokens, sharding.logical_to_spec(("batch", None)))
    for i in range(f.steps):
      t0 = time.perf_counter()
      ce, aux = jax.block_until_ready(step(model, opt, tokens))
      dt = time.perf_counter() - t0
      print(
        f"step {i}: loss {float(ce):.4f}  load_balance {float(aux['load_balance_loss']):.4f}"
        f"  z {float(aux['router_z_loss']):.3f}  dropped {float(aux['dropped_fraction']):.3f}"
        f"  {f.batch * f.seq_len / dt:,.0f} tokens/s" + ("  (compile)" if i == 0 else "")
      )


if __name__ == "__main__":
  app.run(main)
