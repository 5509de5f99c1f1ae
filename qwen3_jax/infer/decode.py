"""The engine's device programs: admit rows, prefill them in chunks, decode many steps per call.

All per-row state lives in `Rows`, a pytree with a leading batch axis on every leaf (the KV
cache included), so one compiled program serves every mix of requests in a (batch, max_len)
bucket. Rows are independent (`kv_cache.py`: per-row lengths), which is what lets the host
admit a new request into a free row while the others keep decoding.

One row's life: `admit` resets its cache and loads its settings; `prefill` feeds its prompt
except the last token, `chunk` tokens per call (other rows carry 0 tokens); `decode` then runs
up to `steps` decode steps in one `lax.while_loop`: feed each active row's pending token (the
prompt's last, then each sampled one), sample the next from the logits, record it, stop the
row on an EOS id or after `max_new` tokens (finish reason `length`; the host caps `max_new` so
that a row stops before its cache would overflow). The host reads the recorded tokens once per
call.

Thinking budget (Qwen3): `think` tracks each row's `<think>` block (0 not opened, 1 open,
2 closed); once an open block holds `budget` tokens, the next tokens are forced to
`Program.forced` (the early-stop text, which closes the block) instead of sampled, and the row
goes on with its answer. Forced tokens are flagged in the output (not policy samples).

Layout for speed (XLA:CPU): a model whose layers run unrolled is given to the programs with
its layer groups unstacked (`stack.unstack_groups`), and the rows keep a per-layer KV cache
(`init_cache(per_layer=True)`). In the stacked form every decode step would copy each layer's
weights and cache out of the stacked arrays (a slice is a copy, and `while` keeps slices of
its invariants in the body) and stack the cache again. The unstacked weights are a copy (one
more copy of the layer weights in memory), made once per version of the weights (`Unstacked`:
kept while the arrays it was made from live).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.infer.sampling import RowParams, add_counts, sample
from qwen3_jax.model import kv_cache
from qwen3_jax.model.kv_cache import KVCache
from qwen3_jax.model.stack import unstack_groups
from qwen3_jax.sharding import constrain

RUNNING, STOPPED, LENGTH = 0, 1, 2  # Rows.finish: still going, hit an EOS id, hit a limit.
NOT_OPENED, THINKING, THOUGHT = 0, 1, 2  # Rows.think


@dataclasses.dataclass
class Rows:
  """Per-row decoding state; every leaf has a leading [B] axis (the cache's after [R]).

  Attributes:
    cache: the model's KV cache (per-row lengths).
    next_token: [B] the token each row feeds next (its prompt's last, then its last sample).
    active: [B] bool, the row is generating.
    finish: [B] RUNNING / STOPPED / LENGTH.
    generated: [B] tokens the row has produced (the token index of its next sample).
    max_new: [B] most tokens the row may produce (at most max_len - prompt + 1: every token
      but the last is fed back).
    params: per-row sampling settings (`sampling.RowParams`).
    counts: [B, V] how often the row produced each token (presence/frequency penalties).
    think: [B] NOT_OPENED / THINKING / THOUGHT; think_len: [B] tokens inside the open block.
    budget: [B] thinking budget (-1 = none); force: [B] position in `Program.forced` the row
      is emitting (-1 = not forcing).
  """

  cache: KVCache
  next_token: jax.Array
  active: jax.Array
  finish: jax.Array
  generated: jax.Array
  max_new: jax.Array
  params: RowParams
  counts: jax.Array
  think: jax.Array
  think_len: jax.Array
  budget: jax.Array
  force: jax.Array


jax.tree_util.register_dataclass(
  Rows, data_fields=[f.name for f in dataclasses.fields(Rows)], meta_fields=[]
)

# Fields `admit` sets from the host for newly admitted rows.
ADMIT_FIELDS = ("next_token", "max_new", "think", "think_len", "budget", "force")


@dataclasses.dataclass(frozen=True)
class Output:
  """What one `decode` call produced: row r's tokens of the call are tokens[r, :n_r] with
  n_r = rows.generated[r] after - before (rows run in lockstep from the call's first step).

  tokens, logprobs, forced: [B, steps]; top_tokens, top_logprobs: [B, steps, top_n];
  steps_run: [] how many steps ran (the loop ends early once no row is active)."""

  tokens: jax.Array
  logprobs: jax.Array
  forced: jax.Array
  top_tokens: jax.Array
  top_logprobs: jax.Array
  steps_run: jax.Array


jax.tree_util.register_dataclass(
  Output, data_fields=[f.name for f in dataclasses.fields(Output)], meta_fields=[]
)


def _batch_axes(x):
  return ("batch",) + (None,) * (x.ndim - 1)


def constrain_rows(rows: Rows) -> Rows:
  """Every per-row leaf split over the data axes (the cache is constrained by the model)."""
  cache = rows.cache
  rest = dataclasses.replace(rows, cache=None)
  rest = jax.tree.map(lambda x: constrain(x, _batch_axes(x)), rest)
  return dataclasses.replace(rest, cache=cache)


@dataclasses.dataclass(frozen=True)
class Program:
  """The static part of the engine's programs (hashable: a jit static argument).

  eos_ids: ids that end a row (`<|im_end|>`, `<|endoftext|>`); think_ids: (`<think>`,
  `</think>`) ids or None; forced: the early-stop token ids (thinking budget); top_n:
  alternatives returned per token; steps: decode steps per call; vocab: V of the logits.
  """

  eos_ids: tuple[int, ...]
  think_ids: tuple[int, int] | None
  forced: tuple[int, ...]
  top_n: int
  steps: int
  vocab: int


def init_rows(cfg, prog: Program, batch: int, max_len: int, params: RowParams) -> Rows:
  """Empty rows (none active) for a (batch, max_len) bucket; call under the decoding mesh."""
  full = lambda v: jnp.full((batch,), v, jnp.int32)  # noqa: E731  (distinct buffers: donated)
  return constrain_rows(
    Rows(
      cache=kv_cache.init_cache(cfg, batch, max_len, per_layer=not cfg.scanned),
      next_token=full(0),
      active=jnp.zeros((batch,), bool),
      finish=full(RUNNING),
      generated=full(0),
      max_new=full(0),
      params=jax.tree.map(jnp.array, params),
      counts=jnp.zeros((batch, prog.vocab), jnp.int32),
      think=full(NOT_OPENED),
      think_len=full(0),
      budget=full(-1),
      force=full(-1),
    )
  )


def admit(rows: Rows, take, release, start, new: dict, params: RowParams) -> Rows:
  """Rows where `take` [B] is true start a new request (cache emptied, counters zeroed, the
  `ADMIT_FIELDS` and sampling settings from `new` / `params`); rows where `start` is true begin
  decoding (taken now or earlier, their prompt prefilled by the end of the host's step); rows
  where `release` is true stop (the host saw a stop string). Other rows are untouched."""
  pick = lambda n, o: jnp.where(take.reshape((-1,) + (1,) * (o.ndim - 1)), n, o)  # noqa: E731
  out = dataclasses.replace(
    rows,
    cache=kv_cache.reset(rows.cache, take),
    active=(rows.active & ~release) | start,
    finish=jnp.where(take, RUNNING, jnp.where(release & rows.active, STOPPED, rows.finish)),
    generated=jnp.where(take, 0, rows.generated),
    counts=pick(0, rows.counts),
    params=jax.tree.map(pick, params, rows.params),
    **{k: pick(new[k], getattr(rows, k)) for k in ADMIT_FIELDS},
  )
  return constrain_rows(out)


def prefill(graphdef, state, rows: Rows, tokens, num) -> Rows:
  """Feeds tokens [B, C] into the rows' caches, num [B] of each row (0 = sits it out)."""
  model = nnx.merge(graphdef, state)
  out = model(tokens, cache=rows.cache, num_tokens=num, return_hidden=True)
  return dataclasses.replace(rows, cache=out.cache)


def _logprob_at(logits, temperature, token):
  """log softmax(logits / T)[token] per row, T = 1 for greedy rows (as `sampling.sample`)."""
  t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
  lp = jax.nn.log_softmax(logits / t, axis=-1)
  return jnp.take_along_axis(lp, token[:, None], axis=1)[:, 0]


def _think_update(rows: Rows, prog: Program, tok, forcing, active):
  """The rows' thinking state after emitting `tok`, and whether each starts forcing next."""
  think, think_len, force = rows.think, rows.think_len, rows.force
  if prog.think_ids is not None:
    open_id, close_id = prog.think_ids
    opened = active & (think == NOT_OPENED) & (tok == open_id)
    closed = active & (think == THINKING) & (tok == close_id)
    grew = active & (think == THINKING) & ~closed
    think = jnp.where(opened, THINKING, jnp.where(closed, THOUGHT, think))
    think_len = think_len + grew
  n_forced = len(prog.forced)
  force = jnp.where(active & forcing, force + 1, force)
  force = jnp.where(force >= n_forced, -1, force)
  start = (
    active
    & (think == THINKING)
    & (rows.budget >= 0)
    & (think_len >= rows.budget)
    & (force < 0)
    & (n_forced > 0)
  )
  force = jnp.where(start, 0, force)
  return think, think_len, force


def decode(graphdef, state, rows: Rows, prog: Program) -> tuple[Rows, Output]:
  """Up to `prog.steps` decode steps for every active row, in one `lax.while_loop`."""
  b = rows.next_token.shape[0]
  n, steps = prog.top_n, prog.steps
  forced_ids = jnp.asarray(prog.forced or (0,), jnp.int32)
  eos = jnp.asarray(prog.eos_ids or (-1,), jnp.int32)
  empty = Output(
    tokens=jnp.zeros((b, steps), jnp.int32),
    logprobs=jnp.zeros((b, steps), jnp.float32),
    forced=jnp.zeros((b, steps), bool),
    top_tokens=jnp.zeros((b, steps, n), jnp.int32),
    top_logprobs=jnp.zeros((b, steps, n), jnp.float32),
    steps_run=jnp.zeros((), jnp.int32),
  )

  model = nnx.merge(graphdef, state)

  def body(carry):
    rows, out = carry
    i = out.steps_run
    active = rows.active
    res = model(rows.next_token[:, None], cache=rows.cache, num_tokens=active.astype(jnp.int32))
    logits = res.logits[:, 0]  # [B, V] float32
    s = sample(logits, rows.params, rows.generated, rows.counts, n)
    forcing = rows.force >= 0
    tok = jnp.where(forcing, forced_ids[jnp.maximum(rows.force, 0)], s.token)
    lp = jax.lax.cond(  # forced tokens are rare: skip the [B, V] log-softmax without them
      jnp.any(forcing),
      lambda: jnp.where(forcing, _logprob_at(logits, rows.params.temperature, tok), s.logprob),
      lambda: s.logprob,
    )
    think, think_len, force = _think_update(rows, prog, tok, forcing, active)
    generated = rows.generated + active
    counts = add_counts(rows.counts, tok, active)
    is_eos = jnp.any(tok[:, None] == eos[None, :], axis=1) & ~forcing
    done = active & (is_eos | (generated >= rows.max_new))
    finish = jnp.where(done, jnp.where(is_eos, STOPPED, LENGTH), rows.finish)
    rows = dataclasses.replace(
      rows,
      cache=res.cache,
      next_token=jnp.where(active, tok, rows.next_token),
      active=active & ~done,
      finish=finish,
      generated=generated,
      counts=counts,
      think=think,
      think_len=think_len,
      force=force,
    )
    out = Output(
      tokens=out.tokens.at[:, i].set(tok),
      logprobs=out.logprobs.at[:, i].set(lp),
      forced=out.forced.at[:, i].set(forcing),
      top_tokens=out.top_tokens.at[:, i].set(s.top_tokens),
      top_logprobs=out.top_logprobs.at[:, i].set(s.top_logprobs),
      steps_run=i + 1,
    )
    return constrain_rows(rows), out

  def cond(carry):
    rows, out = carry
    return (out.steps_run < steps) & jnp.any(rows.active)

  return jax.lax.while_loop(cond, body, (rows, empty))


class Unstacked:
  """state -> (graphdef, state) of the model in the programs' layout (module docstring).

  The unstacked copy is remembered for the arrays it was made from: while the same (live,
  not deleted) arrays come back, it is reused; a new version of the weights (a train step
  makes new arrays) replaces it. Models whose layers run as a scan are passed through.
  """

  def __init__(self, graphdef):
    self.graphdef = graphdef
    self.sources: tuple = ()  # weak references to the leaves the copy was made from
    self.value = None

  def __call__(self, state):
    leaves = jax.tree.leaves(state)
    if self.value is not None and len(leaves) == len(self.sources):
      if all(r() is x and not _deleted(x) for r, x in zip(self.sources, leaves, strict=True)):
        return self.value
    self.value, self.sources = None, ()
    model = nnx.merge(self.graphdef, state)
    if model.cfg.scanned:
      return self.graphdef, state
    model.layers = unstack_groups(model.layers, model.cfg)
    value = nnx.split(model)
    try:
      self.sources = tuple(weakref.ref(x, self._forget) for x in leaves)
    except TypeError:  # a leaf that takes no weak reference: no reuse
      return value
    self.value = value
    return value

  def _forget(self, _):
    self.value, self.sources = None, ()


def _deleted(x) -> bool:
  return isinstance(x, jax.Array) and x.is_deleted()


class _WithModel:
  """fn(state, *args) = program(*unstacked(state), *args); `_cache_size` is the program's."""

  def __init__(self, unstacked: Unstacked, program):
    self.unstacked, self.program = unstacked, program

  def __call__(self, state, *args):
    graphdef, state = self.unstacked(state)
    return self.program(graphdef, state, *args)

  def _cache_size(self) -> int:
    return self.program._cache_size()


@functools.cache
def compiled(graphdef):
  """The three programs for one model structure: admit(rows, ...), prefill(state, rows, ...),
  decode(state, rows, prog) (jit caches one executable per bucket shape; rows are donated, so
  a step updates the cache in place)."""
  unstacked = Unstacked(graphdef)
  return (
    jax.jit(admit, donate_argnums=(0,)),
    _WithModel(unstacked, jax.jit(prefill, static_argnums=(0,), donate_argnums=(2,))),
    _WithModel(unstacked, jax.jit(decode, static_argnums=(0, 3), donate_argnums=(2,))),
  )
