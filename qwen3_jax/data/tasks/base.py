"""What every task family shares: the `Task` record, the train / held-out rule, reading the
answer out of a reply, and the tool environment of tool tasks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qwen3_jax.data import chat
from qwen3_jax.infer.example_tools import Outbox, example_tools
from qwen3_jax.infer.tools import AuditLog, ToolRegistry, ToolResult

SPLITS = ("train", "heldout")
LEVELS = (1, 2, 3, 4)
HELDOUT_BUCKETS = 8  # one prompt in 8 (by hash) is held out


@dataclasses.dataclass(frozen=True)
class Task:
  """One verifiable problem.

  Attributes:
    family: the family's name (a key of `registry.FAMILIES`).
    difficulty: its level, 1 (easiest) to 4.
    prompt: the user message text.
    answer: the gold answer, written as a correct reply's content is.
    meta: what the verifier and the gold writer need (numbers, target, constraints, ...).
  """

  family: str
  difficulty: int
  prompt: str
  answer: str
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ToolTask(Task):
  """A task solved through tool calls; `tools` names the example tools it offers."""

  tools: tuple[str, ...] = ()

  def env(self, audit_log: AuditLog | None = None) -> ToolEnv:
    """A fresh environment (registry + empty outbox) for one attempt at the task."""
    return ToolEnv(self.tools, audit_log=audit_log)

  def tool_specs(self) -> list[dict]:
    """The OpenAI-form specs of the task's tools, for `chat.render(tools=...)`."""
    return self.env().registry.specs()


class ToolEnv:
  """The example tools named in `tools`, an outbox for `send_email`, and a record of calls.

  `audit_log`, if given, records every call (see `ToolRegistry`).

  Attributes:
    registry: a `ToolRegistry` holding only the named tools; run calls through `execute`
      (or the registry directly: the outbox sees the emails either way).
    outbox: where `send_email` puts what it sends (the side effect verifiers look at).
    calls: `(name, arguments, ToolResult)` of every `execute`, in order.
  """

  def __init__(self, tools: Sequence[str], *, audit_log: AuditLog | None = None):
    self.outbox = Outbox()
    wanted = set(tools)
    chosen = [t for t in example_tools(self.outbox) if t.name in wanted]
    self.registry = ToolRegistry(chosen, audit_log=audit_log)
    missing = wanted - set(self.registry.names())
    if missing:
      raise ValueError(f"no example tools named {sorted(missing)}")
    self.calls: list[tuple[str, Any, ToolResult]] = []

  def execute(self, name: str, arguments: dict | str | None) -> ToolResult:
    """`registry.execute(name, arguments)`, recorded in `calls`."""
    result = self.registry.execute(name, arguments)
    self.calls.append((name, arguments, result))
    return result

  def run(self, call: dict) -> ToolResult:
    """Executes a gold `tool_call(...)` dict; raises if the tool refuses it (a gold chain
    must run cleanly, so a changed tool shows up here rather than as a bad transcript)."""
    fn = call["function"]
    result = self.execute(fn["name"], fn["arguments"])
    if not result.ok:
      raise RuntimeError(f"gold call {fn['name']}({fn['arguments']}) failed: {result.content}")
    return result


@dataclasses.dataclass(frozen=True)
class Family:
  """A task family: how to draw a task, score a reply, and write the gold reply.

  Attributes:
    name: registry key.
    kind: "reasoning", "format" or "tool".
    sample: `(rng, difficulty) -> Task`, drawing only from `rng` (a `random.Random`).
    reward: `(task, completion_text) -> float in [0, 1]`; tool families take a third
      argument, the `ToolEnv` the completion's calls ran in.
    gold: `(task) -> message`: one assistant message dict (reasoning and format families), or
      the list of messages after the user turn (tool families: assistant turns with tool
      calls, tool results, and the final assistant answer).
  """

  name: str
  kind: str
  sample: Callable[..., Task]
  reward: Callable[..., float]
  gold: Callable[[Task], dict | list[dict]]


# ----------------------------------------------------------------------------- splits


def normalise_prompt(prompt: str) -> str:
  """The prompt with whitespace runs collapsed and case folded: what splits and dedup compare."""
  return " ".join(prompt.split()).casefold()


def split_hash(prompt: str) -> int:
  """A 64-bit hash of the prompt (whitespace runs collapsed, case folded): SHA-256, so the same
  on every machine and in every process whatever PYTHONHASHSEED."""
  digest = hashlib.sha256(normalise_prompt(prompt).encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big")


def split_of(prompt: str) -> str:
  """ "heldout" for one prompt in `HELDOUT_BUCKETS` (by `split_hash`), else "train".

  Membership depends on the prompt text alone, not on the family, seed or generator that drew
  it, so no two generators can put the same prompt on both sides.
  """
  return "heldout" if split_hash(prompt) % HELDOUT_BUCKETS == 0 else "train"


# ----------------------------------------------------------------------------- replies


def final_answer(completion: str) -> str:
  """The answer in a generated reply: its content (the text after `</think>`, tool calls
  removed, see `chat.parse`), stripped of surrounding whitespace. A trailing `<|im_end|>`
  (or `<|endoftext|>`), with whitespace after it, is not part of it."""
  return chat.parse(completion.rstrip()).content.strip()


def tool_call(name: str, arguments: dict) -> dict:
  """A tool call in the OpenAI form `chat.render` takes."""
  return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_message(call: dict, result: ToolResult) -> dict:
  """The `tool` message that answers `call`."""
  return {"role": "tool", "name": call["function"]["name"], "content": result.content}


def assistant(reasoning: str, content: str, tool_calls: list[dict] | None = None) -> dict:
  """An assistant message dict as `chat.render` takes it."""
  msg = {"role": "assistant", "reasoning_content": reasoning, "content": content}
  if tool_calls:
    msg["tool_calls"] = tool_calls
  return msg


# ----------------------------------------------------------------------------- numbers

_INT_RE = re.compile(r"[+-]?\d+")
_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def read_int(text: str) -> int | None:
  """`text` as an integer when it is one (optional sign, digits, nothing else), else None."""
  text = text.strip()
  return int(text) if _INT_RE.fullmatch(text) else None


def read_number(text: str) -> float | None:
  """`text` as a decimal number when it is one (no exponent, no units), else None."""
  text = text.strip()
  return float(text) if _NUMBER_RE.fullmatch(text) else None


def fmt_decimal(x: float, places: int = 2) -> str:
  """`x` rounded to `places` decimals, trailing zeros dropped: 3.6576 -> "3.66", 300.0 -> "300"."""
  text = f"{x:.{places}f}"
  text = text.rstrip("0").rstrip(".") if "." in text else text
  return "0" if text in ("-0", "") else text
