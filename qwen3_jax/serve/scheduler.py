"""The engine thread: continuous batching of HTTP requests over one engine `Session`.

One thread owns the devices. It loops: take what the HTTP side handed over (new requests,
cancellations), then run one `Session.step`, which admits queued rows into free engine rows,
runs at most `prefill_calls` prefill chunks (a long prompt goes in over several steps,
interleaved with decoding) and one decode call of `steps_per_call` steps for every row whose
prompt is in;
each row's events go straight to its request's sink. So a request waits for a free row, never
for another request to finish, and a new request starts within one decode call of a row
freeing (finished rows are retired in the step that finishes them).

The waiting line is bounded: `submit` raises `QueueFull` when the rows waiting for a free
engine row (plus the new request's `n`) would exceed `max_queue`. `cancel` (a client that went
away) frees the request's rows at the next step.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from qwen3_jax.infer.engine import Engine, Request
from qwen3_jax.serve.metrics import Metrics


class QueueFull(Exception):
  """The waiting line is full (HTTP 429)."""


@dataclasses.dataclass
class _Job:
  request: Request
  sink: Callable[[tuple], None]
  arrived: float
  left: int  # choices not finished yet
  last: dict = dataclasses.field(default_factory=dict)  # choice -> time of its last event


class Scheduler:
  """Feeds one engine session from any thread (see the module docstring).

  Args:
    engine: the engine; its `steps_per_call` bounds how long an admission waits.
    batch_size: engine rows decoding together.
    max_len: KV length of every row (prompt + reply).
    max_queue: most rows waiting for a free engine row.
    top_logprobs: the session computes the top alternatives of every token.
    prefill_calls: most prefill chunks per step (`Session`): a long prompt is prefilled over
      several steps, between the running rows' decode calls (None: all at once).
    metrics: updated after every step.

  A sink gets, on the engine thread, `("event", choice, Event, Completion | None)` per event
  (the `Completion` with the choice's last event) or `("error", message)` if the engine failed
  (every running request gets it; the session is then rebuilt).
  """

  def __init__(
    self,
    engine: Engine,
    *,
    batch_size: int,
    max_len: int,
    max_queue: int,
    top_logprobs: bool = True,
    prefill_calls: int | None = 4,
    metrics: Metrics | None = None,
  ):
    if max_queue < 1:
      raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    self.engine, self.max_queue = engine, max_queue
    self.new_session = lambda: engine.session(batch_size, max_len, top_logprobs, prefill_calls)
    self.session = self.new_session()
    self.metrics = metrics or Metrics()
    self.cond = threading.Condition()
    self.inbox: list[tuple] = []
    self.waiting = 0  # rows in the inbox or the session's queue
    self.jobs: dict[object, _Job] = {}
    self.closed = False
    self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)

  def start(self) -> Scheduler:
    self.thread.start()
    return self

  def close(self) -> None:
    with self.cond:
      self.closed = True
      self.cond.notify()
    self.thread.join()

  def submit(self, job_id, request: Request, sink: Callable[[tuple], None]) -> None:
    """Queues `request` (its prompt as token ids) under `job_id`; raises `QueueFull`."""
    with self.cond:
      if self.waiting + request.n > self.max_queue:
        raise QueueFull(
          f"the server's queue is full ({self.waiting} rows waiting, limit {self.max_queue})"
        )
      self.waiting += request.n
      self.inbox.append(("submit", job_id, request, sink, time.monotonic()))
      self.cond.notify()

  def cancel(self, job_id) -> None:
    """Drops the job's rows (a no-op once it finished)."""
    with self.cond:
      self.inbox.append(("cancel", job_id))
      self.cond.notify()

  # ------------------------------------------------------------------ engine thread

  def _loop(self) -> None:
    while True:
      with self.cond:
        while not self.inbox and self.session.idle and not self.closed:
          self.cond.wait()
        if self.closed:
          return
        items, self.inbox = self.inbox, []
      for item in items:
        if item[0] == "submit":
          _, job_id, request, sink, arrived = item
          try:
            self.session.submit(request, list(request.prompt), key=job_id)
          except ValueError as e:  # the HTTP side checks lengths first; never kill the thread
            sink(("error", str(e)))
            continue
          self.jobs[job_id] = _Job(request, sink, arrived, request.n)
        elif self.jobs.pop(item[1], None) is not None:
          self.session.cancel(item[1])
      if not self.session.idle:
        self._step()
      with self.cond:
        queued = len(self.session.queue)
        self.waiting = queued + sum(it[2].n for it in self.inbox if it[0] == "submit")
      running = sum(s is not None for s in self.session.slots)
      self.metrics.rows(self.waiting, running)

  def _step(self) -> None:
    try:
      events = self.session.step()
    except Exception as e:  # noqa: BLE001  (a failed step must not kill the server)
      for job in self.jobs.values():
        job.sink(("error", f"the engine failed: {type(e).__name__}: {e}"))
      self.jobs.clear()
      self.session = self.new_session()
      return
    now = time.monotonic()
    for key, ev in events:
      job_id, choice = key
      job = self.jobs.get(job_id)
      done = self.session.results.pop(key, None) if ev.finish_reason else None
      if job is None:
        continue
      if ev.token_ids:
        self.metrics.tokens(len(ev.token_ids), now)
        if choice in job.last:
          self.metrics.gap(now - job.last[choice], len(ev.token_ids))
        else:
          self.metrics.first_token(now - job.arrived)
        job.last[choice] = now
      job.sink(("event", choice, ev, done))
      if done is not None:
        job.left -= 1
        if not job.left:
          del self.jobs[job_id]
