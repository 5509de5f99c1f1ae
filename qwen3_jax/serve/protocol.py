"""OpenAI-compatible request bodies -> engine requests, with OpenAI-style errors.

`parse_chat(body, limits, engine)` and `parse_completion(...)` validate a decoded JSON body and
return a `Job`: the engine `Request` (prompt ids, sampling, stop, n, thinking budget) plus
what the response needs (stream flags, log-prob settings, a forced reply prefix). Every bad
field raises `ApiError` naming the field; nothing reaches the engine thread unvalidated.

Semantics of the fields (chat):
  * `messages` are rendered with Qwen3's chat template (`data/chat.py`); `content` may be a
    string or a list of `{"type": "text", "text": ...}` parts.
  * thinking: `chat_template_kwargs.enable_thinking` (vLLM / SGLang) or `enable_thinking`
    (Qwen's API); False renders the empty think block (the soft `/think` / `/no_think`
    switches still apply when it is True). `thinking_budget` (Qwen's API) caps the reasoning
    tokens (the engine forces Qwen3's early-stop text at the budget).
  * sampling: unset fields take Qwen3's preset for the reply's mode (thinking: T 0.6, top-p
    0.95, top-k 20; else T 0.7, top-p 0.8, top-k 20); `temperature: 0` is greedy. `top_k`
    -1 or 0 is off; `seed` makes a request reproducible in any batch.
  * `tool_choice`: "auto" (the default with tools); "none" (the default without) keeps the
    tools, if any, in the prompt but bans the `<tool_call>` token; "required" or
    `{"type": "function", "function": {"name": N}}` starts the reply with a forced
    `<tool_call>\\n{"name": "` (plus `N", "arguments": ` for a named function) after an
    empty think block (a forced call does not think first).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from qwen3_jax.data import chat
from qwen3_jax.data.chat import EMPTY_THINK
from qwen3_jax.data.tokenizer import TOOL_CALL
from qwen3_jax.infer.engine import Engine, Request
from qwen3_jax.infer.sampling import MAX_TOP_LOGPROBS, SamplingParams
from qwen3_jax.infer.tools import Tool, ToolRegistry

MAX_STOP = 4  # stop strings per request (OpenAI's limit)


class ApiError(Exception):
  """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code

  def body(self) -> dict[str, Any]:
    kind = {
      400: "invalid_request_error",
      401: "authentication_error",
      404: "not_found_error",
      413: "invalid_request_error",
      429: "rate_limit_error",
    }.get(self.status, "server_error")
    return {
      "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
    }


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the server accepts: `max_len` is the session's KV length (prompt + reply tokens)."""

  model_name: str
  max_len: int
  max_n: int = 8
  top_logprobs: bool = True  # the session computes alternatives (else top_logprobs is refused)


@dataclasses.dataclass(frozen=True)
class Job:
  """A validated request: `request` for the engine, the rest for the response.

  Attributes:
    kind: "chat" or "completion".
    request: the engine request (prompt ids, sampling with seed, stop, n, budget).
    prompt_ids: its prompt token ids (what `usage.prompt_tokens` counts).
    prefix: reply text already in the prompt (a forced tool call start); the response's text
      is prefix + generated text.
    in_reasoning: the reply starts inside a think block the prompt opened.
    tools: whether tool calls are read from the reply.
    stream, include_usage: server-sent events; a last chunk with the usage.
    logprobs, top_logprobs: return log-probs (and this many alternatives) per token.
  """

  kind: str
  request: Request
  prompt_ids: list[int]
  prefix: str = ""
  in_reasoning: bool = False
  tools: bool = False
  stream: bool = False
  include_usage: bool = False
  logprobs: bool = False
  top_logprobs: int = 0


def parse_json(raw: bytes) -> dict[str, Any]:
  """The body as a JSON object, or a 400 ApiError."""
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
  if not isinstance(body, dict):
    raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
  return body


def parse_chat(body: Mapping[str, Any], limits: Limits, engine: Engine) -> Job:
  """A `/v1/chat/completions` body as a `Job` (see the module docstring)."""
  _check_model(body, limits)
  messages = _messages(body.get("messages"))
  tools = _tools(body.get("tools"))
  choice = body.get("tool_choice", "auto" if tools else "none")
  kwargs = _get(body, "chat_template_kwargs", dict, {})
  thinking_on = kwargs.get("enable_thinking", body.get("enable_thinking", True))
  if not isinstance(thinking_on, bool):
    raise ApiError(
      400, f"enable_thinking must be a boolean, got {thinking_on!r}", "enable_thinking"
    )
  prefix, banned = "", -1
  if choice == "none":
    banned = engine.tokenizer.token_to_id(TOOL_CALL)
    banned = -1 if banned is None else banned
  elif choice == "required" or isinstance(choice, dict):
    if not tools:
      raise ApiError(400, f"tool_choice {choice!r} needs tools", "tool_choice")
    prefix = f'{TOOL_CALL}\n{{"name": "'
    if isinstance(choice, dict):
      name = (choice.get("function") or {}).get("name")
      names = [t["function"]["name"] for t in tools]
      if name not in names:
        raise ApiError(
          400, f"tool_choice names {name!r}, not one of the tools {names}", "tool_choice"
        )
      prefix += f'{name}", "arguments": '
    thinking_on = False
  elif choice != "auto":
    raise ApiError(
      400, f"tool_choice must be auto, none, required or a function, got {choice!r}", "tool_choice"
    )
  try:
    text = chat.render(
      messages, tools or None, add_generation_prompt=True, enable_thinking=thinking_on
    )
  except ValueError as e:
    raise ApiError(400, str(e), "messages") from e
  budget = _get(body, "thinking_budget", int, None)
  if budget is not None and budget < 0:
    raise ApiError(400, f"thinking_budget must be >= 0, got {budget}", "thinking_budget")
  thinking = chat.thinking_mode(messages, thinking_on) and budget != 0
  if prefix and not text.endswith(EMPTY_THINK):
    text += EMPTY_THINK  # a /think soft switch does not make a forced call think first
  logprobs = _get(body, "logprobs", bool, False)
  top = _get(body, "top_logprobs", int, 0)
  if top and not logprobs:
    raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
  job = _job(
    "chat",
    body,
    limits,
    engine,
    text + prefix,
    qwen_preset=True,
    thinking=thinking,
    top=top,
    banned=banned,
    budget=budget,
  )
  return dataclasses.replace(job, prefix=prefix, tools=bool(tools), logprobs=logprobs)


def parse_completion(body: Mapping[str, Any], limits: Limits, engine: Engine) -> Job:
  """A `/v1/completions` body as a `Job`: the prompt as is; OpenAI's defaults (T 1, top-p 1);
  `logprobs: k` returns k alternatives per token."""
  _check_model(body, limits)
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
    prompt = prompt[0]
  if not (isinstance(prompt, str) and prompt) and not (
    isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
  ):
    raise ApiError(400, "prompt must be a non-empty string or a list of token ids", "prompt")
  if body.get("echo") or body.get("suffix"):
    raise ApiError(400, "echo and suffix are not supported", "echo")
  k = body.get("logprobs")
  if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
    raise ApiError(400, f"logprobs must be an integer >= 0, got {k!r}", "logprobs")
  job = _job("completion", body, limits, engine, prompt, qwen_preset=False, top=k or 0)
  return dataclasses.replace(job, logprobs=k is not None)


# ----------------------------------------------------------------------------- pieces


def _job(
  kind,
  body,
  limits: Limits,
  engine: Engine,
  prompt,
  *,
  qwen_preset,
  top,
  thinking=True,
  banned=-1,
  budget=None,
):
  """The engine request shared by both endpoints: sampling (Qwen3's preset for the mode under
  the given fields, or OpenAI's defaults), limits, stop, n, prompt ids."""
  if top > MAX_TOP_LOGPROBS or top < 0:
    raise ApiError(
      400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs"
    )
  if top and not limits.top_logprobs:
    raise ApiError(400, "this server was started without top log-probs", "top_logprobs")
  given = {}
  for name, field, kind_ in (
    ("temperature", "temperature", float),
    ("top_p", "top_p", float),
    ("top_k", "top_k", int),
    ("min_p", "min_p", float),
    ("presence_penalty", "presence_penalty", float),
    ("frequency_penalty", "frequency_penalty", float),
    ("seed", "seed", int),
  ):
    value = _get(body, name, kind_, None)
    if value is not None:
      given[field] = value
  if given.get("top_k") == -1:
    given["top_k"] = 0  # vLLM's "off"
  for name in ("presence_penalty", "frequency_penalty"):
    if not -2 <= given.get(name, 0) <= 2:
      raise ApiError(400, f"{name} must be in [-2, 2], got {given[name]}", name)
  if given.get("temperature", 0) > 2:
    raise ApiError(400, f"temperature must be in [0, 2], got {given['temperature']}", "temperature")
  extra = {"top_logprobs": top, "banned_token": banned}
  try:
    if qwen_preset:
      sampling = SamplingParams.qwen3(thinking, **given, **extra)
    else:
      sampling = SamplingParams(**{**given, **extra})
  except ValueError as e:  # "SamplingParams.<field> must be ..."
    message = str(e).removeprefix("SamplingParams.")
    raise ApiError(400, message, message.split()[0]) from e
  n = _get(body, "n", int, 1)
  if not 1 <= n <= limits.max_n:
    raise ApiError(400, f"n must be in [1, {limits.max_n}], got {n}", "n")
  stop = body.get("stop") or ()
  stop = (stop,) if isinstance(stop, str) else stop
  if not isinstance(stop, list | tuple) or len(stop) > MAX_STOP:
    raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP}", "stop")
  if not all(isinstance(s, str) and s for s in stop):
    raise ApiError(400, "stop strings must be non-empty strings", "stop")
  max_new = _get(body, "max_completion_tokens", int, None) or _get(body, "max_tokens", int, None)
  if max_new is not None and max_new < 1:
    raise ApiError(400, f"max_tokens must be >= 1, got {max_new}", "max_tokens")
  request = Request(
    prompt, sampling, max_new or limits.max_len, tuple(stop), n, thinking_budget=budget
  )
  try:
    ids = engine.encode_prompt(request)
  except ValueError as e:
    raise ApiError(400, str(e), "prompt") from e
  if len(ids) >= limits.max_len:
    raise ApiError(
      400,
      f"the prompt has {len(ids)} tokens; this server's limit is {limits.max_len - 1} "
      f"(max_len {limits.max_len} = prompt + reply)",
      "messages" if kind == "chat" else "prompt",
      "context_length_exceeded",
    )
  options = _get(body, "stream_options", dict, {}) or {}
  return Job(
    kind,
    dataclasses.replace(request, prompt=ids),
    ids,
    in_reasoning=engine.think_state(ids) == 1,
    stream=_get(body, "stream", bool, False),
    include_usage=bool(options.get("include_usage", False)),
    top_logprobs=top,
  )


def _check_model(body, limits: Limits) -> None:
  model = body.get("model")
  if model != limits.model_name:
    raise ApiError(
      404,
      f"the model {model!r} does not exist; this server serves {limits.model_name!r}",
      "model",
      "model_not_found",
    )


def _get(body, name: str, kind: type, default):
  value = body.get(name)
  if value is None:
    return default
  ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
  if kind is float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
  if not ok:
    raise ApiError(400, f"{name} must be a {kind.__name__}, got {value!r:.100}", name)
  return float(value) if kind is float else value


def _messages(messages) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "messages must be a non-empty list", "messages")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise ApiError(400, f"messages[{i}] must be an object", "messages")
    content = m.get("content")
    if isinstance(content, list):  # OpenAI content parts: text only
      if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        raise ApiError(400, f"messages[{i}]: only text content parts are supported", "messages")
      content = "".join(str(p.get("text", "")) for p in content)
    out.append({**m, "content": content})
  return out


def _tools(tools) -> list[dict]:
  """The tools in OpenAI form, each schema checked (jsonschema) as the registry checks them."""
  if tools is None:
    return []
  if not isinstance(tools, list):
    raise ApiError(400, "tools must be a list", "tools")
  registry = ToolRegistry()
  for i, spec in enumerate(tools):
    try:
      registry.register(Tool.from_spec(spec, lambda **_: None))
    except (TypeError, ValueError) as e:
      raise ApiError(400, f"tools[{i}]: {e}", "tools", "invalid_tool_schema") from e
  return registry.specs()
