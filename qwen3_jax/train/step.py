"""TrainState and the pure, jitted `train_step(state, batch) -> (state, metrics)`.

The whole state (params and optimizer state) is a plain pytree; the model is rebuilt inside the
step with `nnx.merge(graphdef, params)`. `jax.jit` gets explicit in/out shardings for the state
(from the sharding rules) and the batch, and donates the old state, so the step compiles once
and its outputs land exactly where its inputs were.

The pieces any objective needs are shared with the RL step (`qwen3_jax/rl/step.py`):
`setup_state` (model graph, optimizer, state shardings, init), `accumulate_grads` (gradient
accumulation over micro-batches, with the MoE global-balance pre-pass) and `apply_gradients`
(the optimizer update that skips non-finite steps).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen3_jax import sharding as shd
from qwen3_jax.config import ModelConfig
from qwen3_jax.data.pipeline import DataConfig
from qwen3_jax.model import Qwen3, lora
from qwen3_jax.train.config import TrainConfig
from qwen3_jax.train.fused_ce import fused_cross_entropy
from qwen3_jax.train.losses import BATCH_KEYS, batch_totals, fraction_from_counts, loss_terms
from qwen3_jax.train.optimizer import make_optimizer, schedule


@dataclasses.dataclass
class TrainState:
  """step: batches consumed; skipped: non-finite steps in total; bad_streak: in a row."""

  step: jax.Array  # int32 []
  params: Any  # nested dict of arrays (nnx.State.to_pure_dict() layout)
  opt_state: Any
  skipped: jax.Array  # int32 []
  bad_streak: jax.Array  # int32 []


jax.tree_util.register_dataclass(
  TrainState,
  data_fields=["step", "params", "opt_state", "skipped", "bad_streak"],
  meta_fields=[],
)


@dataclasses.dataclass
class StateSetup:
  """The model graph, optimizer and sharded train state of one (TrainConfig, mesh): what every
  compiled step (pretraining / SFT, RL) is built on. `init` here is the plain function."""

  cfg: TrainConfig
  mesh: Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  state_shardings: TrainState
  param_shardings: Any  # params-shaped tree of NamedShardings
  replicated: NamedSharding
  init: Any  # () -> TrainState (not jitted)
  lr: Any  # step -> learning rate


def setup_state(cfg: TrainConfig, mesh: Mesh) -> StateSetup:
  """Model graph, optimizer (`cfg.optim` over `cfg.num_steps`) and TrainState shardings."""
  mcfg: ModelConfig = cfg.model
  shd.validate(mcfg, mesh, cfg.batch_size // cfg.micro_batches)
  tx = make_optimizer(cfg.optim, cfg.num_steps)

  def make_params():
    return nnx.state(Qwen3(mcfg, rngs=nnx.Rngs(cfg.seed)), nnx.Param).to_pure_dict()

  abstract = nnx.eval_shape(lambda: Qwen3(mcfg, rngs=nnx.Rngs(cfg.seed)))
  graphdef, abs_state = nnx.split(abstract)
  param_sh = shd.state_shardings(abs_state, mesh).to_pure_dict()
  replicated = NamedSharding(mesh, PartitionSpec())
  abs_params = jax.eval_shape(make_params)
  # The optimizer holds state for the trainable params only (the adapters of a LoRA model).
  abs_opt = jax.eval_shape(tx.init, lora.trainable(abs_params)[1])
  opt_sh = optax.tree_map_params(
    tx,
    lambda _, s: s,
    abs_opt,
    lora.trainable(param_sh)[1],
    transform_non_params=lambda _: replicated,
  )

  def init():
    params = make_params()
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, tx.init(lora.trainable(params)[1]), zero, zero)

  return StateSetup(
    cfg=cfg,
    mesh=mesh,
    graphdef=graphdef,
    tx=tx,
    state_shardings=TrainState(replicated, param_sh, opt_sh, replicated, replicated),
    param_shardings=param_sh,
    replicated=replicated,
    init=init,
    lr=schedule(cfg.optim, cfg.num_steps),
  )


def accumulate_grads(loss_fn, params, batch: dict, n: int, counts_fn=None):
  """(grads, metrics) of `loss_fn` over the batch in n micro-batches, summed.

  Args:
    loss_fn: (params, micro_batch, f_global) -> (loss, metrics); each micro-batch's loss is
      its share of the batch loss (normalised by global-batch totals), so the sum is exact.
    batch: arrays with a leading batch dim B (divisible by n).
    n: micro-batches; 1 = one value_and_grad over the whole batch (f_global None).
    counts_fn: (params, micro_batch) -> tokens_per_expert [n_moe, E], forward only: with
      n > 1 a pre-pass sums it over the batch and passes the global expert fractions as
      f_global (MoE global balance); None = f_global stays None.

  Returns:
    grads (summed) of the trainable params (`lora.trainable`: the adapters of a LoRA model,
    whose base params get no gradient; all params otherwise) and metrics: summed over
    micro-batches, except keys ending in `_max` (maxima).
  """
  frozen, params = lora.trainable(params)
  if frozen:
    base = jax.lax.stop_gradient(frozen)
    full_loss, full_counts = loss_fn, counts_fn
    loss_fn = lambda t, mb, f: full_loss(lora.join_params(base, t), mb, f)  # noqa: E731
    if full_counts is not None:
      counts_fn = lambda t, mb: full_counts(lora.join_params(base, t), mb)  # noqa: E731
  if n == 1:
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
    return grads, metrics
  mbs = _split_micro(batch, n)
  first = jax.tree.map(lambda x: x[0], mbs)
  f_global = None
  if counts_fn is not None:
    # Forward-only pre-pass: expert counts of the whole global batch.
    def count(c, mb):
      return c + counts_fn(params, mb), None

    zeros = jnp.zeros(jax.eval_shape(lambda: counts_fn(params, first)).shape, jnp.float32)
    counts, _ = jax.lax.scan(count, zeros, mbs)
    f_global = fraction_from_counts(counts)

  def combine(a: dict, b: dict) -> dict:
    return {k: (jnp.maximum if k.endswith("_max") else jnp.add)(a[k], b[k]) for k in a}

  def body(carry, mb):
    (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, f_global)
    return (jax.tree.map(jnp.add, carry[0], g), combine(carry[1], m)), None

  abs_m = jax.eval_shape(lambda: loss_fn(params, first, f_global)[1])
  carry0 = (
    jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(lambda: params)),
    {
      k: jnp.full(a.shape, -jnp.inf if k.endswith("_max") else 0, a.dtype) for k, a in abs_m.items()
    },
  )
  (grads, metrics), _ = jax.lax.scan(body, carry0, mbs)
  return grads, metrics


def apply_gradients(setup: StateSetup, state: TrainState, grads, metrics: dict):
  """One optimizer step, skipped (params and optimizer state kept, `skipped` counted) when
  metrics["loss"] or the gradient norm is not finite. Returns (new state, metrics + grad_norm,
  lr, finite, skipped, bad_streak)."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  frozen, params = lora.trainable(state.params)  # grads are those of `params`
  updates, new_opt = setup.tx.update(grads, state.opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
  bad = (~finite).astype(jnp.int32)
  new_state = TrainState(
    step=state.step + 1,
    params=lora.join_params(frozen, keep(new_params, params)),
    opt_state=keep(new_opt, state.opt_state),
    skipped=state.skipped + bad,
    bad_streak=jnp.where(finite, 0, state.bad_streak + 1),
  )
  metrics = dict(metrics)
  metrics.update(
    grad_norm=grad_norm,
    lr=setup.lr(state.step - state.skipped),
    finite=finite,
    skipped=new_state.skipped,
    bad_streak=new_state.bad_streak,
  )
  if "tokens_per_expert" in metrics:
    metrics["expert_load"] = fraction_from_counts(metrics.pop("tokens_per_expert"))
  return new_state, metrics


@dataclasses.dataclass
class Compiled:
  """What every compiled program has: the config it was built for, its mesh, model graph,
  optimizer, state shardings, jitted `init` and the lr schedule (what resume needs)."""

  cfg: TrainConfig
  mesh: Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  state_shardings: TrainState
  init: Any  # () -> TrainState (jitted, sharded)
  lr: Any  # step -> learning rate

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with this mesh's shardings: the restore target."""
    with shd.use_mesh(self.mesh):
      shapes = jax.eval_shape(self.init.fn)
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      shapes,
      self.state_shardings,
    )


@dataclasses.dataclass
class Program(Compiled):
  """Everything compiled for one pretraining / SFT run: shardings, init, train and eval steps."""

  batch_sharding: NamedSharding
  train_step: Any  # (TrainState, batch) -> (TrainState, metrics) (jitted, donating)
  eval_step: Any  # (params, batch) -> {"ce_sum", "n"} (jitted)
  grads: Any  # (params, batch) -> (grads, metrics), summed over micro-batches (jitted)


def moe_counts_fn(graphdef, mcfg: ModelConfig):
  """(params, micro_batch) -> tokens_per_expert, forward only, for `accumulate_grads`'s
  global-balance pre-pass; None when the model has no MoE layer or balances per sequence or
  per micro-batch (each micro-batch's loss then takes its own f).
  The micro-batch holds `inputs` and `segment_ids` (`forward`)."""
  if not (mcfg.is_moe and mcfg.moe.balance == "global"):
    return None
  return lambda p, mb: forward(graphdef, p, mb)[0].aux["tokens_per_expert"]


def forward(graphdef, params, mb: dict):
  """(ModelOutput with final hidden states instead of logits, head weight [D, V]) for a batch
  dict (inputs, segment_ids): the losses apply the head themselves (`fused_ce`)."""
  model = nnx.merge(graphdef, params)
  out = model(mb["inputs"], segment_ids=mb["segment_ids"], return_hidden=True)
  return out, model.head_weight()


def _split_micro(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B/n, ...]; micro-batch j takes rows j, j+n, ... so each stays spread over
  every data-parallel device."""

  def one(x):
    b = x.shape[0]
    x = x.reshape((b // n, n) + x.shape[1:]).swapaxes(0, 1)
    return shd.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

  return jax.tree.map(one, batch)


# TrainConfig fields that do not change any compiled function (left out of the cache key).
LOOP_ONLY = dict(
  data=DataConfig(),
  eval_every=0,
  eval_batches=0,
  checkpoint_every=0,
  keep_checkpoints=0,
  init_from="",
  log_every=1,
  max_bad_steps=1,
  async_checkpoint=True,
  sample_tokens=0,
)


def make_program(cfg: TrainConfig, mesh: Mesh) -> Program:
  """Builds the sharded init / train / eval functions of `cfg` on `mesh`.

  Cached: a second run in the same process with the same model / optimizer / batch shape /
  mesh (e.g. a resume, or an experiment sweep over data) reuses the compiled functions.
  `Program.cfg` keeps only the fields that matter to them.
  """
  return _make_program(dataclasses.replace(cfg, **LOOP_ONLY), mesh)


@functools.lru_cache(maxsize=4)
def _make_program(cfg: TrainConfig, mesh: Mesh) -> Program:
  mcfg: ModelConfig = cfg.model
  setup = setup_state(cfg, mesh)
  graphdef, param_sh, replicated = setup.graphdef, setup.param_shardings, setup.replicated
  state_sh = setup.state_shardings
  batch_sh = NamedSharding(mesh, shd.logical_to_spec(("batch", None)))

  def grads_and_metrics(params, batch):
    totals = batch_totals(batch)

    def mb_loss(p, mb, f_global):
      out, head = forward(graphdef, p, mb)
      return loss_terms(
        out.hidden, head, out.aux, mb, totals, mcfg, z_loss=cfg.z_loss, f_global=f_global
      )

    return accumulate_grads(
      mb_loss, params, batch, cfg.micro_batches, moe_counts_fn(graphdef, mcfg)
    )

  def train_step(state: TrainState, batch: dict):
    grads, metrics = grads_and_metrics(state.params, batch)
    new_state, metrics = apply_gradients(setup, state, grads, metrics)
    metrics["tokens"] = batch_totals(batch)["n_tok"]
    return new_state, metrics

  def eval_step(params, batch):
    out, head = forward(graphdef, params, batch)
    w = batch["loss_mask"].astype(jnp.float32)
    _, m = fused_cross_entropy(  # forward only: chunked
      out.hidden, head, batch["targets"], w, vocab_size=mcfg.vocab_size
    )
    return {"ce_sum": m["ce"], "n": w.sum()}

  batch_tree = {k: batch_sh for k in BATCH_KEYS}
  with shd.use_mesh(mesh):
    init_j = jax.jit(setup.init, out_shardings=state_sh)
    step_j = jax.jit(
      train_step,
      in_shardings=(state_sh, batch_tree),
      out_shardings=(state_sh, replicated),
      donate_argnums=(0,),
    )
    eval_j = jax.jit(eval_step, in_shardings=(param_sh, batch_tree), out_shardings=replicated)
    grads_j = jax.jit(grads_and_metrics, in_shardings=(param_sh, batch_tree))
  return Program(
    cfg=cfg,
    mesh=mesh,
    graphdef=graphdef,
    tx=setup.tx,
    state_shardings=state_sh,
    batch_sharding=batch_sh,
    init=under_mesh(init_j, mesh),
    train_step=under_mesh(step_j, mesh),
    eval_step=under_mesh(eval_j, mesh),
    lr=setup.lr,
    grads=under_mesh(grads_j, mesh),
  )


class under_mesh:
  """Calls a jitted function with `jax.set_mesh(mesh)` active (the model reads the mesh)."""

  def __init__(self, fn, mesh):
    self.fn, self.mesh = fn, mesh

  def __call__(self, *args):
    with shd.use_mesh(self.mesh):
      return self.fn(*args)

  def cache_size(self) -> int:
    return self.fn._cache_size()
