"""The generation engine: requests in, completions (or a stream of text deltas) out.

`Engine(model, tokenizer, mesh=...)` samples from a Qwen3 model through its KV cache with the
device programs of `decode.py`. Requests are split into rows (one per sample, `Request.n`);
a `Session` owns a fixed (batch, max_len) bucket of rows and admits queued rows into free
ones at every step, so a finished row takes the next request while the others keep decoding
(continuous batching; the server keeps one session open). `Engine.generate` / `stream` open a
session sized for their requests and run it to the end.

Semantics:
- Randomness per row comes from (request seed, sample index, token index) only: a request's
  tokens do not depend on its batch slot, on the other rows, or on the mesh.
- Log-probs are under softmax(logits / temperature) of the raw model (no penalties, no
  top-k / top-p / min-p filtering; temperature 1 for greedy rows): what an RL step recomputes.
- A row stops on an EOS id (finish reason `stop`, the EOS token kept in `token_ids` but not in
  the text), on a stop string (`stop`; text and tokens cut after the token that completed it,
  the stop string itself not in the text), or on `max_new_tokens` or a full KV cache (`length`).
- Thinking budget: once a row has produced `thinking_budget` tokens inside `<think>` without
  closing it, Qwen3's early-stop text (`EARLY_STOP`, which closes the block) is appended and the
  row goes on with its answer; those tokens are flagged in `Completion.forced`. Budget 0 on a
  prompt that has not opened a think block renders it as `enable_thinking=False` does (the
  empty think block appended to the prompt), so it gives the very same tokens.
- Sampling defaults (`Request.sampling=None`) are Qwen3's presets for the row's mode: thinking
  unless the prompt already holds a closed think block or the budget is 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax import sharding
from qwen3_jax.data.chat import EMPTY_THINK
from qwen3_jax.data.tokenizer import END_THINK, EOS, IM_END, IM_START, THINK
from qwen3_jax.infer import decode
from qwen3_jax.infer.detokenize import TextStream, TokenBytes
from qwen3_jax.infer.reply_stream import CONTENT, REASONING, ReplySplitter
from qwen3_jax.infer.sampling import SamplingParams, row_params

EARLY_STOP = (
  "Considering the limited time by the user, I have to give the solution based on the thinking "
  "directly now.\n</think>.\n\n"
)
TOP_N = 20  # alternatives computed per token when any request of a session asks for them
MIN_PREFILL = 8  # smallest prefill chunk width (widths: chunk, chunk / 4, ... >= this)


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt to complete.

  Attributes:
    prompt: text (tokenized as is: special tokens such as `<|im_start|>` are recognised) or
      token ids.
    sampling: `SamplingParams`; None = Qwen3's preset for the row's thinking mode.
    max_new_tokens: most tokens to generate per sample.
    stop: stop strings (not included in the text).
    n: samples of this prompt (rows with sample index 0..n-1: a GRPO group).
    thinking_budget: tokens allowed inside `<think>` (None = unlimited).
    id: any label; defaults to the request's position in the call.
  """

  prompt: str | Sequence[int]
  sampling: SamplingParams | None = None
  max_new_tokens: int = 256
  stop: tuple[str, ...] = ()
  n: int = 1
  thinking_budget: int | None = None
  id: object = None

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"Request.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.n < 1:
      raise ValueError(f"Request.n must be >= 1, got {self.n}")
    if self.thinking_budget is not None and self.thinking_budget < 0:
      raise ValueError(f"Request.thinking_budget must be >= 0 or None, got {self.thinking_budget}")
    if isinstance(self.stop, str):
      object.__setattr__(self, "stop", (self.stop,))


@dataclasses.dataclass
class Completion:
  """One sample of a request. `token_ids`, `logprobs`, `forced` (and `top_logprobs`: per token
  a list of (id, logprob), when asked for) cover the generated tokens only."""

  request_id: object
  index: int
  prompt_ids: list[int]
  token_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  forced: list[bool] = dataclasses.field(default_factory=list)
  top_logprobs: list[list[tuple[int, float]]] | None = None
  text: str = ""
  finish_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Event:
  """A stream item: what one row produced since its last event. The deltas of a row
  concatenate to its `Completion`; `finish_reason` is set on its last event. `reasoning`,
  `content` and `tool_calls` split `text` by the chat format (`reply_stream.ReplySplitter`:
  their concatenations agree with `chat.parse` of the whole text)."""

  request_id: object
  index: int
  text: str
  token_ids: list[int]
  logprobs: list[float]
  finish_reason: str | None = None
  reasoning: str = ""
  content: str = ""
  tool_calls: str = ""
  top_logprobs: list[list[tuple[int, float]]] | None = None  # as `Completion.top_logprobs`


@dataclasses.dataclass
class _Row:
  """Host-side state of one occupied row."""

  completion: Completion
  stream: TextStream
  split: ReplySplitter
  prefill: list[int]  # prompt tokens still to feed (all but the last)
  top_n: int = 0  # alternatives asked for per token
  generated: int = 0  # the device's `generated` at the last read
  started: bool = False  # decoding (its prompt is all in the cache by the end of the step)


class Engine:
  """Batched KV-cache generation from a Qwen3 model (see the module docstring).

  Args:
    model: a `Qwen3` nnx module; its parameters are read in place at every call (after a
      training step the next call samples from the new weights), or pass `state=`.
    tokenizer: a `tokenizers.Tokenizer` with Qwen3's special tokens.
    mesh: the mesh the params live on (None: one device); batches are padded with idle rows to
      a multiple of its data axes.
    prefill_chunk: widest prefill call (tokens per row); narrower calls use chunk / 4^i.
    steps_per_call: decode steps per device call (the host streams, admits and stops rows only
      between calls).
  """

  def __init__(self, model, tokenizer, *, mesh=None, prefill_chunk=128, steps_per_call=16):
    if prefill_chunk < 1 or steps_per_call < 1:
      raise ValueError("prefill_chunk and steps_per_call must be >= 1")
    self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
    self.cfg = model.cfg
    self.prefill_chunk, self.steps_per_call = prefill_chunk, steps_per_call
    self.token_bytes = TokenBytes(tokenizer)
    tid = tokenizer.token_to_id
    self.eos_ids = tuple(i for i in (tid(IM_END), tid(EOS)) if i is not None)
    self.im_start = tid(IM_START)
    self.think_ids = (tid(THINK), tid(END_THINK))
    if None in self.think_ids:
      self.think_ids = None
    self.early_stop = tuple(tokenizer.encode(EARLY_STOP).ids)
    self.empty_think = tuple(tokenizer.encode(EMPTY_THINK).ids)
    self.graphdef = nnx.graphdef(model)
    self.programs = decode.compiled(self.graphdef)
    self.data_parallel = (
      1 if mesh is None else math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    )

  # ------------------------------------------------------------------ one-shot calls

  def generate(self, requests, *, batch_size=None, max_len=None, state=None):
    """Completions of every request: a list (per request) of `n` `Completion`s."""
    out = {}
    for ev in self._run(requests, batch_size, max_len, state, out):
      del ev
    return [[out[(i, j)] for j in range(r.n)] for i, r in enumerate(requests)]

  def stream(self, requests, *, batch_size=None, max_len=None, state=None) -> Iterator[Event]:
    """`Event`s as rows produce text (one per row and device call at most)."""
    yield from self._run(requests, batch_size, max_len, state, {})

  def _run(self, requests, batch_size, max_len, state, out):
    requests = [r if isinstance(r, Request) else Request(r) for r in requests]
    prompts = [self.encode_prompt(r) for r in requests]
    rows = sum(r.n for r in requests)
    need = max(len(p) + r.max_new_tokens - 1 for p, r in zip(prompts, requests, strict=True))
    session = self.session(
      batch_size=min(rows, batch_size or rows),
      max_len=max_len or _bucket(need),
      top_logprobs=any(r.sampling and r.sampling.top_logprobs for r in requests),
    )
    for i, (r, p) in enumerate(zip(requests, prompts, strict=True)):
      session.submit(dataclasses.replace(r, id=i if r.id is None else r.id), p, key=i)
    while not session.idle:
      for key, ev in session.step(state):
        if ev.finish_reason is not None:
          out[key] = session.results.pop(key)
        yield ev

  def session(
    self,
    batch_size: int,
    max_len: int,
    top_logprobs: bool = False,
    prefill_calls: int | None = None,
  ) -> Session:
    """A fixed (batch, max_len) bucket of rows for continuous batching (see `Session`)."""
    return Session(self, batch_size, max_len, top_logprobs, prefill_calls)

  # ------------------------------------------------------------------ prompts

  def encode_prompt(self, request: Request) -> list[int]:
    """The request's prompt ids, with the empty think block added for budget 0."""
    if isinstance(request.prompt, str):
      ids = self.tokenizer.encode(request.prompt).ids
    else:
      ids = [int(i) for i in request.prompt]
    if not ids:
      raise ValueError(f"request {request.id!r}: the prompt is empty")
    if max(ids) >= self.cfg.vocab_size or min(ids) < 0:
      raise ValueError(
        f"request {request.id!r}: prompt token ids must be in [0, {self.cfg.vocab_size}), "
        f"got {min(ids)}..{max(ids)}"
      )
    if request.thinking_budget == 0 and self.think_state(ids) == decode.NOT_OPENED:
      ids = ids + list(self.empty_think)
    return ids

  def think_state(self, ids: Sequence[int]) -> int:
    """The think-block state at the end of a prompt (its last turn; the budget counts only
    the tokens the row generates, not those of a block the prompt opened)."""
    if self.think_ids is None:
      return decode.NOT_OPENED
    start = max((i for i, t in enumerate(ids) if t == self.im_start), default=-1) + 1
    state = decode.NOT_OPENED
    for t in ids[start:]:
      if state == decode.NOT_OPENED and t == self.think_ids[0]:
        state = decode.THINKING
      elif state == decode.THINKING and t == self.think_ids[1]:
        state = decode.THOUGHT
    return state


def _bucket(n: int) -> int:
  """max_len bucket: the next power of two (at least 64)."""
  return max(64, 1 << (max(n, 1) - 1).bit_length())


class Session:
  """Rows of one (batch, max_len) bucket; `submit` queues requests, `step` advances all.

  A step admits queued rows into free ones, runs prefill calls (`prefill_chunk` tokens of
  every row still prefilling per call), then one decode call for the rows whose prompt is in
  the cache, and returns [(key, Event)] for the rows that produced something. `results[key]`
  holds the `Completion` of row key = (request key, sample index) once its event says it
  finished.

  `prefill_calls` caps the prefill calls per step (None: as many as the new rows need, so
  they all decode in the step that admits them). With a cap, a long prompt is prefilled over
  several steps, interleaved with the decode calls of the running rows (which then wait at
  most `prefill_calls` chunks per step, not a whole prompt); its row decodes from the step in
  which its last chunk goes in.
  """

  def __init__(
    self,
    engine: Engine,
    batch_size: int,
    max_len: int,
    top_logprobs: bool,
    prefill_calls: int | None = None,
  ):
    if batch_size < 1 or max_len < 2:
      raise ValueError(
        f"session needs batch_size >= 1 and max_len >= 2, got {batch_size}, {max_len}"
      )
    if prefill_calls is not None and prefill_calls < 1:
      raise ValueError(f"prefill_calls must be >= 1 or None, got {prefill_calls}")
    self.prefill_calls = prefill_calls
    dp = engine.data_parallel
    self.engine, self.max_len = engine, max_len
    self.batch = -(-batch_size // dp) * dp  # idle rows pad the batch to the data axes
    self.prog = decode.Program(
      eos_ids=engine.eos_ids,
      think_ids=engine.think_ids,
      forced=engine.early_stop,
      top_n=TOP_N if top_logprobs else 0,
      steps=engine.steps_per_call,
      vocab=engine.cfg.vocab_size,
    )
    self.slots: list[tuple | None] = [None] * self.batch
    self.hosts: dict[tuple, _Row] = {}
    self.queue: deque = deque()
    self.results: dict[tuple, Completion] = {}
    self.release = np.zeros(self.batch, bool)
    with sharding.use_mesh(engine.mesh):
      self.rows = decode.init_rows(
        engine.cfg, self.prog, self.batch, max_len, row_params([], [], self.batch)
      )

  @property
  def idle(self) -> bool:
    return not self.queue and all(s is None for s in self.slots)

  def submit(self, request: Request, prompt: list[int] | None = None, key=None) -> None:
    """Queues the request's `n` rows (keys (key, 0..n-1); key defaults to request.id)."""
    prompt = self.engine.encode_prompt(request) if prompt is None else prompt
    if len(prompt) > self.max_len:
      raise ValueError(
        f"request {request.id!r}: prompt of {len(prompt)} tokens does not fit the session's "
        f"max_len={self.max_len}"
      )
    key = request.id if key is None else key
    for j in range(request.n):
      self.queue.append(((key, j), request, prompt))

  def cancel(self, key) -> int:
    """Drops request `key`'s rows: queued ones leave the queue, running ones stop at the next
    step (their slots take queued rows at once); no event or result is produced for them.
    Returns how many rows were dropped (0 for a key that finished or was never submitted)."""
    before = len(self.queue)
    self.queue = deque(item for item in self.queue if item[0][0] != key)
    dropped = before - len(self.queue)
    for r, row_key in enumerate(self.slots):
      if row_key is not None and row_key[0] == key:
        self.slots[r] = None
        del self.hosts[row_key]
        self.release[r] = True
        dropped += 1
    return dropped

  # ------------------------------------------------------------------ one step

  def step(self, state=None) -> list[tuple[tuple, Event]]:
    eng = self.engine
    state = nnx.state(eng.model) if state is None else state
    admit, prefill, decode_fn = eng.programs
    with sharding.use_mesh(eng.mesh):
      calls = self._admit(admit)
      self._prefill(prefill, state, calls)
      before = {k: h.generated for k, h in self.hosts.items()}
      self.rows, out = decode_fn(state, self.rows, self.prog)
      out, generated, finish = jax.device_get((out, self.rows.generated, self.rows.finish))
    return self._collect(out, generated, finish, before)

  def _admit(self, admit) -> int:
    """Takes queued rows into free slots and starts the rows whose prefill ends this step;
    returns how many prefill calls the step runs."""
    free = [r for r, s in enumerate(self.slots) if s is None]
    take = np.zeros(self.batch, bool)
    new = {k: np.zeros(self.batch, np.int32) for k in decode.ADMIT_FIELDS}
    new["budget"][:], new["force"][:] = -1, -1
    params: list[SamplingParams | None] = [None] * self.batch
    index = [0] * self.batch
    taken = []
    while free and self.queue:
      key, req, prompt = self.queue.popleft()
      r = free.pop(0)
      take[r] = True
      taken.append(r)
      self.slots[r] = key
      state = self.engine.think_state(prompt)
      budget = -1 if req.thinking_budget is None else req.thinking_budget
      params[r] = req.sampling or SamplingParams.qwen3(
        thinking=state != decode.THOUGHT and budget != 0
      )
      index[r] = key[1]
      new["next_token"][r] = prompt[-1]
      new["max_new"][r] = min(req.max_new_tokens, self.max_len - len(prompt) + 1)
      new["think"][r], new["budget"][r] = state, budget
      want_top = bool(params[r].top_logprobs)
      self.hosts[key] = _Row(
        completion=Completion(
          request_id=req.id,
          index=key[1],
          prompt_ids=list(prompt),
          top_logprobs=[] if want_top else None,
        ),
        stream=TextStream(self.engine.token_bytes, stop=req.stop),
        split=ReplySplitter(in_reasoning=state == decode.THINKING),
        prefill=list(prompt[:-1]),
        top_n=params[r].top_logprobs,
      )
    # A call feeds every prefilling row `chunk` tokens (or all it has left, when the longest
    # fits one call), so a row with R tokens left is done after ceil(R / chunk) calls.
    chunk = self.engine.prefill_chunk
    waiting = [h for h in self.hosts.values() if not h.started]
    calls = max((-(-len(h.prefill) // chunk) for h in waiting), default=0)
    calls = calls if self.prefill_calls is None else min(calls, self.prefill_calls)
    start = np.zeros(self.batch, bool)
    for r, key in enumerate(self.slots):
      host = self.hosts.get(key) if key is not None else None
      if host is not None and not host.started and -(-len(host.prefill) // chunk) <= calls:
        start[r] = host.started = True
    if taken or start.any() or self.release.any():
      rp = row_params(params, index, self.batch)
      self.rows = admit(self.rows, take, self.release.copy(), start, new, rp)
      self.release[:] = False
    return calls

  def _prefill(self, prefill, state, calls: int) -> None:
    chunk = self.engine.prefill_chunk
    for _ in range(calls):
      left = {r: self.hosts[k].prefill for r, k in enumerate(self.slots) if k is not None}
      most = max((len(p) for p in left.values()), default=0)
      if not most:
        return
      width = chunk
      while width // 4 >= max(most, MIN_PREFILL):  # the narrowest width that holds it
        width //= 4
      toks = np.zeros((self.batch, width), np.int32)
      num = np.zeros(self.batch, np.int32)
      for r, p in left.items():
        piece = p[:width]
        toks[r, : len(piece)], num[r] = piece, len(piece)
        del p[:width]
      self.rows = prefill(state, self.rows, jnp.asarray(toks), jnp.asarray(num))

  def _collect(self, out, generated, finish, before) -> list[tuple[tuple, Event]]:
    events = []
    for r, key in enumerate(self.slots):
      if key is None:
        continue
      host = self.hosts[key]
      n = int(generated[r]) - before.get(key, 0)
      host.generated = int(generated[r])
      done = finish[r] != decode.RUNNING
      if n == 0 and not done:
        continue
      toks = out.tokens[r, :n].tolist()
      eos_end = finish[r] == decode.STOPPED and n > 0 and toks[-1] in self.engine.eos_ids
      text_toks = toks[:-1] if eos_end else toks
      delta = host.stream.push(text_toks)
      text = delta.text
      reason = None
      if delta.stopped:
        n = delta.consumed
        toks, reason = toks[:n], "stop"
        if not done:
          self.release[r] = True
      elif done:
        text += host.stream.finish()
        reason = "stop" if finish[r] == decode.STOPPED else "length"
      c = host.completion
      c.token_ids += toks
      c.logprobs += out.logprobs[r, :n].tolist()
      c.forced += out.forced[r, :n].tolist()
      top = None
      if c.top_logprobs is not None:
        k = host.top_n
        top = [
          list(
            zip(out.top_tokens[r, i, :k].tolist(), out.top_logprobs[r, i, :k].tolist(), strict=True)
          )
          for i in range(n)
        ]
        c.top_logprobs += top
      c.text += text
      pieces = host.split.push(text) + (host.split.finish() if reason else [])
      parts = {k: "".join(t for kind, t in pieces if kind == k) for k in (REASONING, CONTENT)}
      calls = "".join(t for kind, t in pieces if kind not in (REASONING, CONTENT))
      ev = Event(
        c.request_id,
        c.index,
        text,
        toks,
        out.logprobs[r, :n].tolist(),
        reason,
        reasoning=parts[REASONING],
        content=parts[CONTENT],
        tool_calls=calls,
        top_logprobs=top,
      )
      if reason is not None:
        c.finish_reason = reason
        self.results[key] = c
        self.slots[r] = None
        del self.hosts[key]
      events.append((key, ev))
    return events
