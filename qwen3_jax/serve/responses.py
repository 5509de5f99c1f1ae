"""Engine completions and events -> OpenAI response bodies and stream chunks.

Non-streaming, a chat choice's text (the forced prefix, if any, then the generated text) is read
with `chat.parse`: `reasoning_content` (None when empty), `content` (None when the reply only
calls tools) and `tool_calls` (`{"id", "type": "function", "function": {"name", "arguments"}}`,
arguments a JSON string). A malformed `<tool_call>` block is not a call: its text stays in the
content. `finish_reason` is the engine's (`stop` / `length`), or `tool_calls` when a reply that
ended on its own called tools.

Streaming, `ChoiceStream` turns each engine `Event` into deltas: `reasoning_content` and
`content` pieces as `ReplySplitter` releases them (a tag split across events is held back), and
one `tool_calls` delta per call (`index` counts the choice's calls from 0, the whole call in
one delta) once its `</tool_call>` has arrived. Its concatenated deltas equal the non-streaming
message, except that the non-streaming one reads the last `</think>` and the stream the first
(they differ only for replies with two think blocks).

`usage.completion_tokens_details.reasoning_tokens` counts the generated tokens up to and
including the `</think>` that closes the reply's think block (all of them if it never closes).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

from qwen3_jax.data import chat
from qwen3_jax.data.tokenizer import END_TOOL_CALL, THINK, TOOL_CALL
from qwen3_jax.infer.engine import Completion, Engine, Event
from qwen3_jax.infer.reply_stream import CONTENT, REASONING, ReplySplitter
from qwen3_jax.serve.protocol import Job


def new_id(kind: str) -> str:
  return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _call_json(call: chat.ToolCall) -> dict:
  return {
    "id": f"call_{uuid.uuid4().hex[:24]}",
    "type": "function",
    "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
  }


def _raw_call(call: chat.ToolCall) -> str:
  return f"{TOOL_CALL}\n{call.raw}\n{END_TOOL_CALL}"


def message(job: Job, text: str) -> tuple[dict, bool]:
  """The assistant message of a chat choice whose generated text is `text`, and whether it
  holds tool calls."""
  parsed = chat.parse((THINK if job.in_reasoning else "") + job.prefix + text)
  calls = [c for c in parsed.tool_calls if c.error is None] if job.tools else []
  content = parsed.content
  for c in parsed.tool_calls:
    if c.error is not None or not job.tools:  # not a call: keep its text
      content += _raw_call(c)
  out = {
    "role": "assistant",
    "content": content or (None if calls else ""),
    "reasoning_content": None,
  }
  if parsed.reasoning:
    out["reasoning_content"] = parsed.reasoning
  if calls:
    out["tool_calls"] = [_call_json(c) for c in calls]
  return out, bool(calls)


def reasoning_tokens(engine: Engine, job: Job, token_ids: Sequence[int]) -> int:
  """Generated tokens inside the reply's think block (see the module docstring)."""
  if engine.think_ids is None or job.kind != "chat":
    return 0
  open_id, close_id = engine.think_ids
  if not job.in_reasoning and open_id not in token_ids:
    return 0
  return token_ids.index(close_id) + 1 if close_id in token_ids else len(token_ids)


def _token(engine: Engine, i: int) -> tuple[str, list[int]]:
  raw = engine.token_bytes.table[i] if i < len(engine.token_bytes.table) else b""
  return raw.decode("utf-8", errors="replace"), list(raw)


def logprobs(engine: Engine, job: Job, ids, lps, tops) -> dict | None:
  """The `logprobs` object of a choice (chat or completions form) for tokens `ids`."""
  if not job.logprobs:
    return None
  tops = tops or [[] for _ in ids]
  if job.kind == "completion":
    tokens = [_token(engine, i)[0] for i in ids]
    offsets, at = [], 0
    for t in tokens:
      offsets.append(at)
      at += len(t)
    return {
      "tokens": tokens,
      "token_logprobs": lps,
      "top_logprobs": [{_token(engine, t)[0]: lp for t, lp in top} for top in tops],
      "text_offset": offsets,
    }
  content = []
  for i, lp, top in zip(ids, lps, tops, strict=True):
    text, raw = _token(engine, i)
    alts = [
      {"token": _token(engine, t)[0], "logprob": v, "bytes": _token(engine, t)[1]} for t, v in top
    ]
    content.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": alts})
  return {"content": content}


def usage(engine: Engine, job: Job, completions: Sequence[Completion]) -> dict:
  generated = sum(len(c.token_ids) for c in completions)
  thought = sum(reasoning_tokens(engine, job, c.token_ids) for c in completions)
  return {
    "prompt_tokens": len(job.prompt_ids),
    "completion_tokens": generated,
    "total_tokens": len(job.prompt_ids) + generated,
    "completion_tokens_details": {"reasoning_tokens": thought},
  }


def response(
  engine: Engine, job: Job, completions: Sequence[Completion], rid, model, created
) -> dict:
  """The non-streaming response body for the finished `completions` (one per choice)."""
  choices = []
  for c in completions:
    lp = logprobs(engine, job, c.token_ids, c.logprobs, c.top_logprobs)
    if job.kind == "chat":
      msg, called = message(job, c.text)
      reason = "tool_calls" if called and c.finish_reason == "stop" else c.finish_reason
      choices.append({"index": c.index, "message": msg, "logprobs": lp, "finish_reason": reason})
    else:
      choices.append(
        {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}
      )
  kind = "chat.completion" if job.kind == "chat" else "text_completion"
  return {
    "id": rid,
    "object": kind,
    "created": created,
    "model": model,
    "choices": choices,
    "usage": usage(engine, job, completions),
  }


class ChoiceStream:
  """One choice's events -> stream `choices[]` entries (see the module docstring)."""

  def __init__(self, engine: Engine, job: Job, index: int):
    self.engine, self.job, self.index = engine, job, index
    self.split = ReplySplitter(in_reasoning=job.in_reasoning)
    self.pending = job.prefix  # forced reply text, released with the first event
    self.call_text = ""
    self.calls = 0

  def first(self) -> dict:
    delta = {"role": "assistant", "content": ""} if self.job.kind == "chat" else None
    return self._choice(delta, None, "")

  def push(self, ev: Event) -> dict | None:
    """The choice entry for one event (None when it releases nothing and does not finish)."""
    lp = logprobs(self.engine, self.job, ev.token_ids, ev.logprobs, ev.top_logprobs)
    reason = ev.finish_reason
    if self.job.kind == "completion":
      if not ev.text and reason is None and lp is None:
        return None
      return self._choice(None, lp, ev.text, reason)
    text, self.pending = self.pending + ev.text, ""
    pieces = self.split.push(text) + (self.split.finish() if reason else [])
    delta: dict = {}
    calls = []
    for kind, piece in pieces:
      if kind in (REASONING, CONTENT):
        key = "reasoning_content" if kind == REASONING else "content"
        delta[key] = delta.get(key, "") + piece
        continue
      self.call_text += piece
      if END_TOOL_CALL in self.call_text or reason:
        calls += self._calls(self.call_text, delta)
        self.call_text = ""
    if calls:
      delta["tool_calls"] = calls
    if reason == "stop" and self.calls:
      reason = "tool_calls"
    if not delta and reason is None and lp is None:
      return None
    return self._choice(delta, lp, "", reason)

  def _calls(self, text: str, delta: dict) -> list[dict]:
    out = []
    for c in chat.parse(text).tool_calls:
      if c.error is not None or not self.job.tools:
        delta["content"] = delta.get("content", "") + _raw_call(c)
        continue
      out.append({"index": self.calls, **_call_json(c)})
      self.calls += 1
    return out

  def _choice(self, delta, lp, text, reason=None) -> dict:
    if self.job.kind == "chat":
      return {"index": self.index, "delta": delta, "logprobs": lp, "finish_reason": reason}
    return {"index": self.index, "text": text, "logprobs": lp, "finish_reason": reason}
