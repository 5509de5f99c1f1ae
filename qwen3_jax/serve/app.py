"""The OpenAI-compatible HTTP app (FastAPI) over a `Scheduler`.

Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (JSON, or server-sent events
`data: {chunk}\\n\\n` ... `data: [DONE]\\n\\n` with `stream: true`), `GET /v1/models`,
`GET /health`, `GET /metrics` (Prometheus text). With an `api_key`, the `/v1/` endpoints need
`Authorization: Bearer <key>` (401 otherwise); `/health` and `/metrics` stay open. Errors are
OpenAI-style bodies `{"error": {"message", "type", "param", "code"}}`: 400 bad JSON or fields,
401, 404 unknown model, 413 body over `max_body_bytes`, 429 queue full, 500 engine failure.

A request's rows are cancelled as soon as its handler ends for any reason: a streaming client
that disconnects frees its engine rows at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from qwen3_jax.infer.engine import Engine
from qwen3_jax.serve import protocol, responses
from qwen3_jax.serve.protocol import ApiError, Limits
from qwen3_jax.serve.scheduler import QueueFull, Scheduler


def create_app(
  engine: Engine,
  scheduler: Scheduler,
  limits: Limits,
  *,
  api_key: str | None = None,
  max_body_bytes: int = 1 << 20,
) -> FastAPI:
  """The app; the caller starts and closes `scheduler` (see the module docstring)."""
  app = FastAPI(title="qwen3_jax", docs_url=None, redoc_url=None)
  ids = itertools.count()

  @app.exception_handler(ApiError)
  async def _api_error(_, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.middleware("http")
  async def _guard(request: Request, call_next):
    try:
      if request.url.path.startswith("/v1/") and api_key is not None:
        if request.headers.get("authorization") != f"Bearer {api_key}":
          raise ApiError(
            401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key"
          )
      size = request.headers.get("content-length")
      if size is not None and size.isdigit() and int(size) > max_body_bytes:
        raise ApiError(413, f"the request body has {size} bytes; the limit is {max_body_bytes}")
    except ApiError as e:
      return JSONResponse(e.body(), status_code=e.status)
    return await call_next(request)

  @app.get("/health")
  async def health():
    alive = scheduler.thread.is_alive()
    return JSONResponse({"status": "ok" if alive else "engine stopped"}, 200 if alive else 503)

  @app.get("/metrics")
  async def metrics():
    return PlainTextResponse(scheduler.metrics.render(), media_type="text/plain; version=0.0.4")

  @app.get("/v1/models")
  async def models():
    card = {"id": limits.model_name, "object": "model", "created": 0, "owned_by": "qwen3_jax"}
    return {"object": "list", "data": [card]}

  async def _body(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > max_body_bytes:
      raise ApiError(413, f"the request body has {len(raw)} bytes; the limit is {max_body_bytes}")
    return protocol.parse_json(raw)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    return await _serve(protocol.parse_chat(await _body(request), limits, engine))

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await _serve(protocol.parse_completion(await _body(request), limits, engine))

  async def _serve(job: protocol.Job):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job_id = next(ids)
    rid, created = responses.new_id(job.kind), int(time.time())

    def sink(item):
      loop.call_soon_threadsafe(queue.put_nowait, item)

    try:
      scheduler.submit(job_id, job.request, sink)
    except QueueFull as e:
      raise ApiError(429, str(e), code="queue_full") from e
    if job.stream:
      return StreamingResponse(
        _stream(job, job_id, queue, rid, created), media_type="text/event-stream"
      )
    try:
      done = {}
      while len(done) < job.request.n:
        item = await queue.get()
        if item[0] == "error":
          raise ApiError(500, item[1])
        if item[3] is not None:
          done[item[1]] = item[3]
    finally:
      scheduler.cancel(job_id)
    finished = [done[j] for j in range(job.request.n)]
    return responses.response(engine, job, finished, rid, limits.model_name, created)

  async def _stream(job, job_id, queue, rid, created):
    kind = "chat.completion.chunk" if job.kind == "chat" else "text_completion"

    def chunk(choices, **extra) -> str:
      body = {"id": rid, "object": kind, "created": created, "model": limits.model_name}
      return f"data: {json.dumps({**body, 'choices': choices, **extra})}\n\n"

    choices = [responses.ChoiceStream(engine, job, j) for j in range(job.request.n)]
    finished = {}
    try:
      if job.kind == "chat":
        yield chunk([c.first() for c in choices])
      while len(finished) < job.request.n:
        item = await queue.get()
        if item[0] == "error":
          yield f"data: {json.dumps(ApiError(500, item[1]).body())}\n\n"
          break
        _, j, ev, done = item
        entry = choices[j].push(ev)
        if entry is not None:
          yield chunk([entry])
        if done is not None:
          finished[j] = done
      else:
        if job.include_usage:
          done = [finished[j] for j in range(job.request.n)]
          yield chunk([], usage=responses.usage(engine, job, done))
      yield "data: [DONE]\n\n"
    finally:
      scheduler.cancel(job_id)

  return app
