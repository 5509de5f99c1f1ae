"""Tools a model may call: a registry that runs only registered Python callables, after
checking each call against the tool's JSON schema and a policy, with a timeout, a cap on the
result and a JSONL audit log.

A call from the model is data, never code. `ToolRegistry.execute` looks the name up in the
registry, parses the arguments as JSON (never `eval`), validates them with jsonschema, asks the
policy, and only then calls the registered function with the arguments as keywords. Every
failure (malformed call, unknown tool, bad JSON, schema violation, denial, exception, timeout)
becomes a `ToolResult` with `ok=False` and a short "Error: ..." message in `content`, which is
what the model sees as the tool response; nothing else runs. Every `execute` writes exactly one
audit record, failures included.

Timeouts: the function runs in a daemon worker thread and `execute` waits at most `timeout_s`
for it. Python cannot kill a thread, so a timed-out call is left to finish in the background
(its result is discarded). The threads are daemons, so a hung tool never blocks interpreter
exit (a `ThreadPoolExecutor` would: its workers are joined at exit). `max_running` bounds how
many calls may run at once, hung ones included; past it, new calls are refused with an error.

Schemas are checked with `check_schema` at registration; `$ref`s resolve only inside the
schema (jsonschema does not fetch remote references); `format` keywords are asserted.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import copy
import dataclasses
import datetime
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jsonschema import exceptions as js_exceptions
from jsonschema import validators as js_validators

# OpenAI's function-name rule, plus the dots some MCP servers use.
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Longest exception / schema / policy message quoted back to the model.
_MAX_MESSAGE_CHARS = 300
_JSON_TYPE_NAMES = {
  dict: "object",
  list: "array",
  str: "string",
  int: "number",
  float: "number",
  bool: "boolean",
  type(None): "null",
}


class ToolError(Exception):
  """Raised by a tool for an error the model should see as is: "Error: {message}"."""


@dataclasses.dataclass(frozen=True)
class Tool:
  """A Python callable the model may call.

  Attributes:
    name: what the model calls it by (letters, digits, `_`, `-`, `.`; at most 64).
    description: what it does, for the model.
    parameters: JSON schema of the keyword arguments (an object schema).
    fn: called as `fn(**arguments)` with the validated arguments. Returns a str (given to the
      model as is) or a JSON-serialisable value (given as JSON). May raise `ToolError`.
    timeout_s: seconds `execute` waits for `fn`; None takes the registry's default.
  """

  name: str
  description: str
  parameters: Mapping[str, Any]
  fn: Callable[..., Any]
  timeout_s: float | None = None

  def __post_init__(self):
    # A private copy: callers mutating their dict must not change a registered schema.
    object.__setattr__(self, "parameters", copy.deepcopy(self.parameters))

  @classmethod
  def from_spec(
    cls, spec: Mapping[str, Any], fn: Callable[..., Any], *, timeout_s: float | None = None
  ) -> Tool:
    """Builds a tool from a spec in the OpenAI or the MCP form.

    Args:
      spec: `{"type": "function", "function": {"name", "description", "parameters"}}`, the
        bare `{"name", "description", "parameters"}`, or MCP's `{"name", "description",
        "inputSchema"}`. A missing schema means no arguments.
      fn: the callable (see `Tool.fn`).
      timeout_s: see `Tool.timeout_s`.

    Returns:
      The tool (not yet registered).
    """
    if not isinstance(spec, Mapping):
      raise TypeError(f"tool spec must be a mapping, got {type(spec).__name__}")
    if "function" in spec:
      if spec.get("type", "function") != "function":
        raise ValueError(f"unsupported tool type {spec.get('type')!r}; expected 'function'")
      spec = spec["function"]
      if not isinstance(spec, Mapping):
        raise TypeError("tool spec's 'function' must be a mapping")
    if "name" not in spec:
      raise ValueError(f"tool spec has no 'name': {sorted(spec)}")
    if "parameters" in spec and "inputSchema" in spec:
      raise ValueError(f"tool spec {spec['name']!r} has both 'parameters' and 'inputSchema'")
    schema = spec.get("parameters", spec.get("inputSchema"))
    if schema is None:
      schema = {"type": "object", "properties": {}}
    return cls(spec["name"], spec.get("description", ""), schema, fn, timeout_s)

  def spec(self) -> dict[str, Any]:
    """The OpenAI form `{"type": "function", "function": {...}}` the chat template renders."""
    return {
      "type": "function",
      "function": {
        "name": self.name,
        "description": self.description,
        "parameters": copy.deepcopy(self.parameters),
      },
    }


@dataclasses.dataclass(frozen=True)
class ToolResult:
  """The outcome of one `ToolRegistry.execute`.

  Attributes:
    name: the tool name as called (it may not be a registered one).
    ok: whether the tool ran and returned a value.
    content: what the model sees as the tool response: the result, or "Error: {error}";
      at most the registry's `max_content_chars`.
    error: what went wrong, or None.
    duration_s: wall time of the whole `execute`.
    status: "ok", or which check failed: "parse_error", "unknown_tool", "invalid_json",
      "invalid_arguments", "denied", "busy", "exception", "timeout", "bad_result".
  """

  name: str
  ok: bool
  content: str
  error: str | None = None
  duration_s: float = 0.0
  status: str = "ok"


@dataclasses.dataclass(frozen=True)
class CallContext:
  """What a policy knows about a call besides its name and arguments."""

  conversation_id: str
  tool: Tool
  extra: Mapping[str, Any]  # `execute(context=...)`: whatever the caller passes (user, turn)


# Decides a validated call: True allows it; False or a string (the reason) denies it.
Policy = Callable[[str, dict, CallContext], "bool | str"]


class AuditLog:
  """Append-only JSONL log of tool calls; thread-safe, each record flushed as written.

  Each line is one JSON object: time (ISO 8601 UTC, when the call started), conversation_id,
  tool, arguments (as parsed, or the raw value when they did not parse), ok, status, error,
  result_chars (length of the content the model saw), truncated, duration_s.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    parent = os.path.dirname(self.path)
    if parent:
      os.makedirs(parent, exist_ok=True)
    self._lock = threading.Lock()

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one record (values JSON cannot hold are written as their repr)."""
    line = json.dumps(record, ensure_ascii=False, default=repr) + "\n"
    with self._lock, open(self.path, "a", encoding="utf-8") as f:
      f.write(line)
      f.flush()

  def read(self) -> list[dict[str, Any]]:
    """All records so far, oldest first."""
    if not os.path.exists(self.path):
      return []
    with self._lock, open(self.path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]


class _Failure(Exception):
  """A failed check inside `execute`; becomes an error `ToolResult`."""

  def __init__(self, status: str, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


def _clip(text: str, limit: int = _MAX_MESSAGE_CHARS) -> str:
  text = str(text)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
  return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _reject_constant(name: str):
  raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  # Duplicate keys are ambiguous (which one did the policy see?), so refuse them.
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"duplicate key {key!r}")
    out[key] = value
  return out


def _parse_arguments(arguments: Any) -> dict[str, Any]:
  """Arguments as a JSON object (dict of JSON values); raises `_Failure("invalid_json")`."""
  if arguments is None:
    return {}
  if isinstance(arguments, str):
    if not arguments.strip():  # some models send "" for a tool without arguments
      return {}
    try:
      value = json.loads(
        arguments, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys
      )
    except (ValueError, RecursionError) as e:
      raise _Failure("invalid_json", f"arguments are not valid JSON: {_clip(e)}") from None
  elif isinstance(arguments, Mapping):
    try:  # normalise to plain JSON values, as if the arguments had come as a string
      value = json.loads(json.dumps(dict(arguments), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as e:
      raise _Failure("invalid_json", f"arguments are not JSON values: {_clip(e)}") from None
  else:
    value = arguments
  if not isinstance(value, dict):
    raise _Failure("invalid_json", f"arguments must be a JSON object, got {_json_type(value)}")
  return value


def _schema_message(name: str, error: js_exceptions.ValidationError) -> str:
  where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
  return f"invalid arguments for {name!r}: {'arguments' + where}: {_clip(error.message)}"


def _render(value: Any) -> str:
  return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _run_tool(tool: Tool, kwargs: dict, ctx: contextvars.Context) -> tuple[str, str]:
  """Calls the tool (in the worker thread); returns ("ok", content) or (status, message)."""
  try:
    value = ctx.run(tool.fn, **kwargs)
  except ToolError as e:
    return "exception", _clip(e) or f"tool {tool.name!r} failed"
  except BaseException as e:  # SystemExit and the like stay in this thread
    return "exception", f"tool {tool.name!r} raised {type(e).__name__}: {_clip(e)}"
  try:
    return "ok", _render(value)
  except (TypeError, ValueError, RecursionError) as e:
    kind = type(value).__name__
    return "bad_result", f"tool {tool.name!r} returned a {kind} that is not JSON: {_clip(e)}"


class ToolRegistry:
  """Registered tools and the only way to run them: `execute`.

  Args:
    tools: tools to register now.
    policy: optional `(name, arguments, CallContext) -> bool | str`, asked after validation;
      only `True` allows the call, False or a string (the reason) denies it, and a policy
      that raises denies it too.
    audit_log: optional `AuditLog`; every `execute` writes one record to it.
    max_content_chars: cap on `ToolResult.content`; longer results are cut and end with a
      truncation marker.
    default_timeout_s: timeout for tools without their own; None waits forever.
    max_running: most tool calls running at once (timed-out ones still running count).
  """

  def __init__(
    self,
    tools: Iterable[Tool] = (),
    *,
    policy: Policy | None = None,
    audit_log: AuditLog | None = None,
    max_content_chars: int = 16_384,
    default_timeout_s: float | None = 30.0,
    max_running: int = 16,
  ):
    if max_content_chars < 100:
      raise ValueError(f"max_content_chars must be at least 100, got {max_content_chars}")
    if max_running < 1:
      raise ValueError(f"max_running must be at least 1, got {max_running}")
    self.policy = policy
    self.audit_log = audit_log
    self.max_content_chars = max_content_chars
    self.default_timeout_s = default_timeout_s
    self.max_running = max_running
    self._tools: dict[str, Tool] = {}
    self._validators: dict[str, Any] = {}
    self._lock = threading.Lock()
    self._running = 0
    for tool in tools:
      self.register(tool)

  def register(self, tool: Tool) -> Tool:
    """Adds `tool`; raises on a duplicate name, a bad name or an invalid JSON schema."""
    if not isinstance(tool, Tool):
      raise TypeError(f"expected a Tool, got {type(tool).__name__}")
    if not isinstance(tool.name, str) or not _NAME_RE.fullmatch(tool.name):
      raise ValueError(f"invalid tool name {tool.name!r}: use 1-64 of [A-Za-z0-9_.-]")
    if not callable(tool.fn):
      raise TypeError(f"tool {tool.name!r}: fn is not callable")
    if tool.timeout_s is not None and not tool.timeout_s > 0:
      raise ValueError(f"tool {tool.name!r}: timeout_s must be positive, got {tool.timeout_s}")
    schema = tool.parameters
    if not isinstance(schema, Mapping):
      raise TypeError(f"tool {tool.name!r}: the JSON schema must be an object")
    if schema.get("type", "object") != "object":
      raise ValueError(
        f"tool {tool.name!r}: the JSON schema must describe an object (the keyword "
        f"arguments), got type {schema.get('type')!r}"
      )
    validator_cls = js_validators.validator_for(schema)
    try:
      validator_cls.check_schema(schema)
    except js_exceptions.SchemaError as e:
      where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
      raise ValueError(f"tool {tool.name!r}: invalid JSON schema at {where}: {e.message}") from e
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    with self._lock:
      if tool.name in self._tools:
        raise ValueError(f"tool {tool.name!r} is already registered")
      self._tools[tool.name] = tool
      self._validators[tool.name] = validator
    return tool

  def add(
    self, spec: Mapping[str, Any], fn: Callable[..., Any], *, timeout_s: float | None = None
  ) -> Tool:
    """`register(Tool.from_spec(spec, fn, timeout_s=timeout_s))`."""
    return self.register(Tool.from_spec(spec, fn, timeout_s=timeout_s))

  def names(self) -> list[str]:
    """Registered tool names in registration order."""
    with self._lock:
      return list(self._tools)

  def get(self, name: str) -> Tool | None:
    return self._tools.get(name)

  def __contains__(self, name: object) -> bool:
    return name in self._tools

  def __len__(self) -> int:
    return len(self._tools)

  def specs(self) -> list[dict[str, Any]]:
    """OpenAI-form specs of every tool, in registration order, for the chat template."""
    with self._lock:
      tools = list(self._tools.values())
    return [t.spec() for t in tools]

  def execute(
    self,
    call_name: str,
    arguments: dict | str | None,
    *,
    conversation_id: str = "",
    parse_error: str | None = None,
    context: Mapping[str, Any] | None = None,
  ) -> ToolResult:
    """Runs one tool call from the model, if every check passes; never raises for bad calls.

    Checks, in order: `parse_error` (the chat parser could not read the call), the name is
    registered, `arguments` is a JSON object (a dict, a JSON string of one, or None / "" for
    none), the arguments satisfy the tool's schema, the policy allows the call, a worker is
    free. Then the tool runs in a worker thread with its timeout.

    Args:
      call_name: the tool name the model wrote.
      arguments: the arguments the model wrote.
      conversation_id: recorded in the audit log and given to the policy.
      parse_error: the parser's message when the call was malformed; the call is refused.
      context: anything else the policy should see (`CallContext.extra`).

    Returns:
      A `ToolResult`; `content` is what the model should see as the tool response.
    """
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.UTC)
    name = call_name if isinstance(call_name, str) else repr(call_name)
    logged_args: Any = arguments
    truncated = False
    try:
      if parse_error is not None:
        raise _Failure("parse_error", f"malformed tool call: {_clip(parse_error)}")
      with self._lock:
        tool, validator = self._tools.get(name), self._validators.get(name)
        available = ", ".join(self._tools) or "(none)"
      if tool is None:
        raise _Failure("unknown_tool", f"unknown tool {_clip(name, 80)!r}; available: {available}")
      args = _parse_arguments(arguments)
      logged_args = args
      error = js_exceptions.best_match(validator.iter_errors(args))
      if error is not None:
        raise _Failure("invalid_arguments", _schema_message(name, error))
      self._check_policy(tool, args, CallContext(conversation_id, tool, dict(context or {})))
      content, truncated = self._cap(self._call(tool, args))
      result = ToolResult(name, True, content, None, time.perf_counter() - t0, "ok")
    except _Failure as f:
      content, _ = self._cap(f"Error: {f.message}")
      result = ToolResult(name, False, content, f.message, time.perf_counter() - t0, f.status)
    if self.audit_log is not None:
      self.audit_log.write(
        {
          "time": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
          "conversation_id": conversation_id,
          "tool": name,
          "arguments": logged_args,
          "ok": result.ok,
          "status": result.status,
          "error": result.error,
          "result_chars": len(result.content),
          "truncated": truncated,
          "duration_s": round(result.duration_s, 6),
        }
      )
    return result

  def _check_policy(self, tool: Tool, args: dict, ctx: CallContext) -> None:
    if self.policy is None:
      return
    try:  # a copy: the policy must not change what runs
      verdict = self.policy(tool.name, copy.deepcopy(args), ctx)
    except Exception as e:  # fail closed
      raise _Failure(
        "denied", f"call to {tool.name!r} denied: the policy failed ({type(e).__name__})"
      ) from None
    if verdict is True:
      return
    reason = verdict if isinstance(verdict, str) and verdict else "not allowed by policy"
    raise _Failure("denied", f"call to {tool.name!r} denied: {_clip(reason)}")

  def _call(self, tool: Tool, args: dict) -> str:
    """Runs `tool.fn(**args)` in a daemon thread; returns its rendered result."""
    timeout = tool.timeout_s if tool.timeout_s is not None else self.default_timeout_s
    with self._lock:
      if self._running >= self.max_running:
        raise _Failure(
          "busy", f"too many tool calls still running ({self._running}); try again later"
        )
      self._running += 1
    future: concurrent.futures.Future = concurrent.futures.Future()
    ctx = contextvars.copy_context()
    kwargs = copy.deepcopy(args)

    def work():
      outcome = _run_tool(tool, kwargs, ctx)
      with self._lock:  # free the slot before the waiter can start another call
        self._running -= 1
      future.set_result(outcome)

    try:
      threading.Thread(target=work, name=f"tool-{tool.name}", daemon=True).start()
    except RuntimeError as e:  # cannot start a thread
      with self._lock:
        self._running -= 1
      raise _Failure("busy", f"could not start tool {tool.name!r}: {_clip(e)}") from None
    try:
      status, payload = future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
      raise _Failure("timeout", f"tool {tool.name!r} did not finish within {timeout:g} s") from None
    if status != "ok":
      raise _Failure(status, payload)
    return payload

  def _cap(self, text: str) -> tuple[str, bool]:
    """`text` cut to `max_content_chars`, marker included; and whether it was cut."""
    if len(text) <= self.max_content_chars:
      return text, False
    marker = f"\n[truncated: the full result has {len(text)} characters]"
    return text[: self.max_content_chars - len(marker)] + marker, True
