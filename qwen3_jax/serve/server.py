"""An engine, its scheduler and the HTTP app behind uvicorn, in one object.

`Server(model, tokenizer, ...)` builds them; `run()` serves in the calling thread (the script),
`start()` in a background thread (tests, benchmarks) and returns once the socket listens;
`close()` stops both. Port 0 picks a free port (`server.port` says which).
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from qwen3_jax.infer.engine import Engine
from qwen3_jax.serve.app import create_app
from qwen3_jax.serve.protocol import Limits
from qwen3_jax.serve.scheduler import Scheduler


class Server:
  """See the module docstring.

  Args:
    model, tokenizer: what to serve; mesh: the mesh its params live on (None: one device).
    model_name: the id clients must send as `model`.
    batch_size: engine rows decoding together; max_len: KV length per row (prompt + reply).
    max_queue: most rows waiting for a free engine row (429 past it).
    steps_per_call: decode steps per engine call (a new request waits at most that many).
    prefill_chunk: widest prefill call; prefill_calls: most prefill calls per engine step
      (None: a new row's whole prompt at once); max_n: most choices per request.
    top_logprobs: compute the top-20 alternatives of every token (needed for `top_logprobs`).
    api_key: required as `Authorization: Bearer` on `/v1/` (None: open).
    max_body_bytes: largest request body; host, port: where to listen (port 0: any free one).
  """

  def __init__(
    self,
    model,
    tokenizer,
    *,
    mesh=None,
    model_name: str = "qwen3_jax",
    batch_size: int = 32,
    max_len: int = 2048,
    max_queue: int = 256,
    steps_per_call: int = 4,
    prefill_chunk: int = 128,
    prefill_calls: int | None = 4,
    max_n: int = 8,
    top_logprobs: bool = True,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    host: str = "127.0.0.1",
    port: int = 0,
  ):
    self.engine = Engine(
      model, tokenizer, mesh=mesh, prefill_chunk=prefill_chunk, steps_per_call=steps_per_call
    )
    self.scheduler = Scheduler(
      self.engine,
      batch_size=batch_size,
      max_len=max_len,
      max_queue=max_queue,
      top_logprobs=top_logprobs,
      prefill_calls=prefill_calls,
    )
    limits = Limits(model_name, max_len, max_n, top_logprobs)
    self.app = create_app(
      self.engine, self.scheduler, limits, api_key=api_key, max_body_bytes=max_body_bytes
    )
    self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.sock.bind((host, port))
    self.host, self.port = host, self.sock.getsockname()[1]
    config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1)
    self.uvicorn = uvicorn.Server(config)
    self.thread: threading.Thread | None = None

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def run(self) -> None:
    """Serves until interrupted (Ctrl-C / SIGTERM)."""
    self.scheduler.start()
    try:
      self.uvicorn.run(sockets=[self.sock])
    finally:
      self.scheduler.close()

  def start(self, timeout_s: float = 60.0) -> Server:
    """Serves in a daemon thread; returns once uvicorn has started."""
    self.scheduler.start()
    self.thread = threading.Thread(
      target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True
    )
    self.thread.start()
    deadline = time.monotonic() + timeout_s
    while not self.uvicorn.started:
      if time.monotonic() > deadline or not self.thread.is_alive():
        raise RuntimeError(f"the server did not start on {self.url}")
      time.sleep(0.02)
    return self

  def close(self) -> None:
    self.uvicorn.should_exit = True
    if self.thread is not None:
      self.thread.join(timeout=10)
    self.scheduler.close()
    self.sock.close()
