r"""Serve suite: the HTTP server's throughput and latency under 1, 8 and 32 concurrent streams.

python scripts/benchmark.py --suite=serve [--quick]

`small` (E16 k2), float32, one CPU device, randomly initialised; `scripts/serve.py`'s server
(`Server`: batch 32 rows, KV 256 slots, prefill chunk 128, `STEPS_PER_CALL` decode steps per
engine call, no top log-probs) in this process on a free local port, and an asyncio client
(httpx, one connection per stream) sending 32 streamed `/v1/completions` requests: prompts of
128 random token ids, 128 new tokens, greedy, `logprobs: 0` (so that every generated token
shows up in the stream even when the small tokenizer has no text for it). A closed loop: C
streams at a time (C = 1, 8, 32), each taking the next request when its last one ends. C = 1
is "the same requests sent one at a time". A warm-up round at C = 32 compiles everything first.
The server's session has a fixed 32-row bucket, so at C = 1 each decode step still runs 32
rows (31 idle); `c1_rows1` sends the same requests one at a time to a 1-row server instead,
the best a lone request gets.

Per C:
  tokens_per_s      generated tokens (counted from the stream) / wall time of the round
  ttft p50 / p99    request sent -> first chunk carrying a token
  itl_chunk p50/p99 time between consecutive chunks of a stream (the engine hands a row's
                    tokens over once per decode call, so a chunk carries up to STEPS_PER_CALL)
  itl_token p50/p99 the same gap divided by the tokens the later chunk carries
Target: tokens_per_s at C = 32 >= 5x that at C = 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import numpy as np
from flax import nnx

from experiments.benchmarks.common import print_load, report
from qwen3_jax import config as C
from qwen3_jax.data.tokenizer import train_tokenizer
from qwen3_jax.model import Qwen3
from qwen3_jax.serve.server import Server

STEPS_PER_CALL = 8
TARGET = 5.0  # tokens/s at 32 streams over one at a time
REQUESTS = 32


async def _one(client, url, body, out):
  t0 = time.perf_counter()
  times, tokens = [], []
  async with client.stream("POST", url, json=body) as r:
    r.raise_for_status()
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      n = sum(len((c.get("logprobs") or {}).get("tokens", [])) for c in chunk["choices"])
      if n:
        times.append(time.perf_counter())
        tokens.append(n)
  out.append((t0, times, tokens))


async def _round(url, prompts, new, concurrency):
  out, queue = [], list(prompts)
  limits = httpx.Limits(max_connections=concurrency + 1)
  async with httpx.AsyncClient(timeout=600, limits=limits) as client:

    async def worker():
      while queue:
        prompt = queue.pop(0)
        body = {"model": "small", "prompt": prompt, "max_tokens": new, "temperature": 0,
                "stream": True, "logprobs": 0}  # fmt: skip
        await _one(client, url, body, out)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
  return wall, out


def _pct(xs, q):
  return float(np.percentile(xs, q)) * 1e3 if len(xs) else float("nan")


def _measure(server, prompts, new, concurrency, case) -> dict:
  url = server.url + "/v1/completions"
  wall, out = asyncio.run(_round(url, prompts, new, concurrency))
  ttft = [times[0] - t0 for t0, times, _ in out if times]
  gaps = np.concatenate([np.diff(times) for _, times, _ in out])
  per = np.concatenate([np.diff(times) / np.asarray(toks[1:]) for _, times, toks in out])
  total = sum(sum(toks) for _, _, toks in out)
  return dict(
    suite="serve",
    case=case,
    rows=server.scheduler.session.batch,
    streams=concurrency,
    requests=len(out),
    prompt=len(prompts[0]),
    new_tokens=new,
    generated=total,
    wall_s=wall,
    tokens_per_s=total / wall,
    ttft_p50_ms=_pct(ttft, 50),
    ttft_p99_ms=_pct(ttft, 99),
    itl_chunk_p50_ms=_pct(gaps, 50),
    itl_chunk_p99_ms=_pct(gaps, 99),
    itl_token_p50_ms=_pct(per, 50),
    itl_token_p99_ms=_pct(per, 99),
  )


def _server(model, tok, batch_size) -> Server:
  return Server(
    model,
    tok,
    model_name="small",
    batch_size=batch_size,
    max_len=256,
    max_queue=256,
    steps_per_call=STEPS_PER_CALL,
    top_logprobs=False,
  ).start()


def run(flags) -> list[dict]:
  logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
  prompt_len, new = (32, 32) if flags.quick else (128, 128)
  print_load("at start")
  cfg = C.small()
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  tok = train_tokenizer(["The quick brown fox jumps over the lazy dog."], 300)
  rng = np.random.default_rng(0)
  prompts = rng.integers(10, cfg.vocab_size, (REQUESTS, prompt_len)).tolist()
  rows = []
  server = _server(model, tok, 32)
  try:
    _measure(server, prompts, new, 32, "warm-up")  # compiles every program
    for concurrency in (1, 8, 32):
      rows.append(_measure(server, prompts, new, concurrency, f"small_E16k2_c{concurrency}"))
  finally:
    server.close()
  alone = _server(model, tok, 1)  # one at a time on a 1-row server: the best a single row does
  try:
    _measure(alone, prompts[:2], new, 1, "warm-up")
    rows.append(_measure(alone, prompts, new, 1, "small_E16k2_c1_rows1"))
  finally:
    alone.close()
  base = rows[0]["tokens_per_s"]
  for r in rows:
    r["vs_one_at_a_time"] = r["tokens_per_s"] / base
  print_load("at end")
  report(
    rows,
    [
      "case",
      "rows",
      "generated",
      "wall_s",
      "tokens_per_s",
      "vs_one_at_a_time",
      "ttft_p50_ms",
      "ttft_p99_ms",
      "itl_chunk_p50_ms",
      "itl_chunk_p99_ms",
      "itl_token_p50_ms",
      "itl_token_p99_ms",
    ],
  )
  ratio = rows[2]["vs_one_at_a_time"]
  verdict = "PASS" if ratio >= TARGET else "FAIL"
  print(f"target: 32 streams >= {TARGET}x one at a time (same server): {ratio:.2f}x {verdict}")
  best_alone = rows[2]["tokens_per_s"] / rows[3]["tokens_per_s"]
  print(f"32 streams vs one at a time on a 1-row server: {best_alone:.2f}x")
  return rows
