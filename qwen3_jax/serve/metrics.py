"""Server metrics in the Prometheus text format (no client library needed).

`Metrics` is written by the engine thread and read by `GET /metrics`:
  * `qwen3_queue_rows` (gauge): rows waiting for a free engine row;
  * `qwen3_running_rows` (gauge): engine rows generating;
  * `qwen3_generated_tokens_total` (counter) and `qwen3_generated_tokens_per_second` (gauge,
    over the last `window_s` seconds);
  * `qwen3_time_to_first_token_seconds` (histogram): from a request's arrival to the engine
    event that carries its first token (per choice);
  * `qwen3_inter_token_latency_seconds` (histogram): per token of every event after a row's
    first, the time since the row's previous event divided by the tokens the event carries
    (the engine hands tokens over once per decode call, `steps_per_call` at a time).
"""

from __future__ import annotations

import bisect
import collections
import threading
import time

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
  """Cumulative-bucket histogram (Prometheus semantics: `le` buckets, `_sum`, `_count`)."""

  def __init__(self, buckets=LATENCY_BUCKETS):
    self.buckets = tuple(buckets)
    self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
    self.sum = 0.0

  def observe(self, value: float, times: int = 1) -> None:
    self.counts[bisect.bisect_left(self.buckets, value)] += times
    self.sum += value * times

  def lines(self, name: str) -> list[str]:
    out, total = [f"# TYPE {name} histogram"], 0
    for le, c in zip((*self.buckets, "+Inf"), self.counts, strict=True):
      total += c
      out.append(f'{name}_bucket{{le="{le}"}} {total}')
    return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {total}"]


class Metrics:
  """The server's counters (thread-safe)."""

  def __init__(self, window_s: float = 10.0):
    self.lock = threading.Lock()
    self.window_s = window_s
    self.queue_rows = 0
    self.running_rows = 0
    self.generated = 0
    self.recent: collections.deque = collections.deque()  # (time, tokens) within the window
    self.ttft = Histogram()
    self.itl = Histogram()

  def tokens(self, n: int, now: float | None = None) -> None:
    now = time.monotonic() if now is None else now
    with self.lock:
      self.generated += n
      self.recent.append((now, n))

  def rows(self, queued: int, running: int) -> None:
    with self.lock:
      self.queue_rows, self.running_rows = queued, running

  def first_token(self, seconds: float) -> None:
    with self.lock:
      self.ttft.observe(seconds)

  def gap(self, seconds: float, tokens: int) -> None:
    with self.lock:
      self.itl.observe(seconds / tokens, tokens)

  def render(self) -> str:
    now = time.monotonic()
    with self.lock:
      while self.recent and self.recent[0][0] < now - self.window_s:
        self.recent.popleft()
      rate = sum(n for _, n in self.recent) / self.window_s
      lines = [
        "# TYPE qwen3_queue_rows gauge",
        f"qwen3_queue_rows {self.queue_rows}",
        "# TYPE qwen3_running_rows gauge",
        f"qwen3_running_rows {self.running_rows}",
        "# TYPE qwen3_generated_tokens_total counter",
        f"qwen3_generated_tokens_total {self.generated}",
        "# TYPE qwen3_generated_tokens_per_second gauge",
        f"qwen3_generated_tokens_per_second {rate:.3f}",
        *self.ttft.lines("qwen3_time_to_first_token_seconds"),
        *self.itl.lines("qwen3_inter_token_latency_seconds"),
      ]
    return "\n".join(lines) + "\n"
