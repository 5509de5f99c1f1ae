"""The real train step and decode step, lowered from abstract shapes only.

`lower_train` lowers `train.step.make_program(cfg, mesh).train_step` (the function every
training run calls: forward, backward, AdamW update, sharded state donated); `lower_decode`
lowers the engine's `infer.decode.decode` (one device call of the generation engine) with a
(batch, max_len) bucket of rows. Arguments are `jax.ShapeDtypeStruct`s carrying the shardings
the real programs use, so no parameter is ever materialised and the mesh's devices may be a
TPU topology that this host does not have.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from qwen3_jax import sharding as shd
from qwen3_jax.config import ModelConfig
from qwen3_jax.infer import decode
from qwen3_jax.infer.sampling import row_params
from qwen3_jax.model import Qwen3
from qwen3_jax.model.stack import unstack_groups
from qwen3_jax.train.config import TrainConfig
from qwen3_jax.train.losses import BATCH_KEYS
from qwen3_jax.train.step import make_program


@dataclasses.dataclass
class Lowered:
  """A lowered step and its abstract arguments (ShapeDtypeStructs with shardings)."""

  lowered: Any  # jax.stages.Lowered
  args: Any  # pytree of the abstract arguments (arrays only)


def _with_shardings(shapes, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
  )


def lower_train(cfg: TrainConfig, mesh: Mesh) -> Lowered:
  """The train step of `cfg` on `mesh`, lowered for the state and a [B, L] int32 batch."""
  prog = make_program(cfg, mesh)
  state = prog.abstract_state()
  rows = jax.ShapeDtypeStruct(
    (cfg.batch_size, cfg.seq_len), jnp.int32, sharding=prog.batch_sharding
  )
  batch = {k: rows for k in BATCH_KEYS}
  with shd.use_mesh(mesh):
    lowered = prog.train_step.fn.lower(state, batch)
  return Lowered(lowered, (state, batch))


def decode_program(cfg: ModelConfig, steps: int) -> decode.Program:
  """A decode Program for AOT: stop / think / forced token ids are placeholders (they are
  constants of the program and do not change its shapes)."""
  return decode.Program(
    eos_ids=(0, 1), think_ids=(2, 3), forced=(4, 5, 6), top_n=0, steps=steps, vocab=cfg.vocab_size
  )


def abstract_model(cfg: ModelConfig, mesh: Mesh):
  """(graphdef, abstract state with shardings) of the model as the engine's programs take it:
  layers unstacked when they run unrolled (`decode.Unstacked`)."""

  def make():
    model = Qwen3(cfg, rngs=nnx.Rngs(0))
    if not cfg.scanned:
      model.layers = unstack_groups(model.layers, cfg)
    return model

  graphdef, state = nnx.split(nnx.eval_shape(make))
  shardings = shd.state_shardings(state, mesh)
  return graphdef, _with_shardings(state, shardings)


def lower_decode(cfg: ModelConfig, mesh: Mesh, batch: int, max_len: int, steps: int = 1) -> Lowered:
  """The engine's decode call (`steps` decode steps) for `batch` rows of `max_len` tokens."""
  shd.validate(cfg, mesh, batch)
  graphdef, state = abstract_model(cfg, mesh)
  prog = decode_program(cfg, steps)
  params = row_params([], [], batch)

  def init():
    return decode.init_rows(cfg, prog, batch, max_len, params)

  with shd.use_mesh(mesh):
    init_j = jax.jit(init)
    shapes = jax.eval_shape(init_j)
    # The rows' shardings are whatever the engine's `init_rows` gives them (its constraints);
    # compiling the initialiser (zeros only) reads them back.
    rows = _with_shardings(shapes, init_j.lower().compile().output_shardings)
    program = decode.compiled(nnx.graphdef(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))))
    step = program[2].program
    # The engine feeds each call the rows the previous call returned: in that steady state
    # the cache is sharded as the model's writes constrain it (`kv_cache.KV_AXES`), not as
    # `init_rows` left it. A first compile reads those output shardings.
    steady = step.lower(graphdef, state, rows, prog).compile().output_shardings[0]
    rows = _with_shardings(shapes, steady)
    lowered = step.lower(graphdef, state, rows, prog)
  return Lowered(lowered, (state, rows))


def per_chip_buffers(args, top: int | None = None) -> list[dict]:
  """Per-chip bytes of every abstract argument, largest first: path, shape, spec, bytes."""
  rows = []
  for path, a in jax.tree_util.tree_flatten_with_path(args)[0]:
    sharding = a.sharding
    local = sharding.shard_shape(a.shape)
    rows.append(
      dict(
        path=jax.tree_util.keystr(path),
        shape=list(a.shape),
        spec=str(getattr(sharding, "spec", "")),
        bytes=math.prod(local) * jnp.dtype(a.dtype).itemsize,
      )
    )
  rows.sort(key=lambda r: -r["bytes"])
  return rows if top is None else rows[:top]
