"""An interactive chat over the tool loop: what `scripts/chat.py` drives.

`ChatSession.send(text)` adds a user turn and runs `tool_loop.run_tool_loop` on the whole
conversation (re-rendered with the official template each turn, so the reasoning of earlier
turns is dropped, as Qwen3 expects); `TerminalPrinter` shows the streamed `LoopEvent`s with the
reasoning set apart from the answer (dim on a terminal, labelled otherwise); `user_lines`
reads user turns from a terminal (with a prompt) or from piped stdin (one turn per line).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

from qwen3_jax.infer.reply_stream import CONTENT, REASONING, TOOL_CALL_TEXT
from qwen3_jax.infer.sampling import SamplingParams
from qwen3_jax.infer.tool_loop import TOOL_RESULT, LoopEvent, ModelPolicy, Transcript, run_tool_loop
from qwen3_jax.infer.tools import ToolRegistry

QUIT, RESET = ("/exit", "/quit"), "/reset"


class ChatSession:
  """A conversation with a model, one user turn at a time.

  Args:
    policy: the model (`tool_loop.EnginePolicy`) or a `tool_loop.ScriptedPolicy`.
    registry: the tools the model may call (their specs go into the system turn); None = no
      tools, and one reply per user turn (a tool call in it is not run).
    system: system prompt, if any.
    enable_thinking: the hard switch; `/think` and `/no_think` in a user turn are the soft ones.
    thinking_budget: most reasoning tokens per reply (None = no limit).
    sampling: as `run_tool_loops`; the seed moves on with every user turn.
    max_new_tokens: most tokens per reply.
    max_steps: most replies per user turn (tool calls and their results in between).
    conversation_id: the audit log's conversation id; None = a random one.
  """

  def __init__(
    self,
    policy: ModelPolicy,
    *,
    registry: ToolRegistry | None = None,
    system: str | None = None,
    enable_thinking: bool = True,
    thinking_budget: int | None = None,
    sampling: SamplingParams | Mapping[str, Any] | None = None,
    max_new_tokens: int = 2048,
    max_steps: int = 4,
    conversation_id: str | None = None,
  ):
    self.policy = policy
    self.registry = registry if registry is not None else ToolRegistry()
    self.system = system
    self.enable_thinking, self.thinking_budget = enable_thinking, thinking_budget
    self.sampling, self.max_new_tokens = sampling, max_new_tokens
    self.max_steps = max_steps if len(self.registry) else 1
    self.conversation_id = conversation_id
    self.reset()

  def reset(self) -> None:
    """Forgets the conversation (the system prompt stays)."""
    self.messages = [{"role": "system", "content": self.system}] if self.system else []
    self.turns = 0

  def send(self, text: str, on_event: Callable[[LoopEvent], None] | None = None) -> Transcript:
    """Adds the user turn `text`, runs the tool loop, keeps its messages; returns its transcript."""
    sampling = self.sampling
    if isinstance(sampling, SamplingParams):
      sampling = dataclasses.replace(sampling, seed=sampling.seed + self.turns)
    else:
      sampling = dict(sampling or {})
      sampling["seed"] = sampling.get("seed", 0) + self.turns
    transcript = run_tool_loop(
      self.policy,
      self.messages + [{"role": "user", "content": text}],
      self.registry,
      conversation_id=self.conversation_id,
      max_steps=self.max_steps,
      enable_thinking=self.enable_thinking,
      sampling=sampling,
      max_new_tokens=self.max_new_tokens,
      thinking_budget=self.thinking_budget,
      on_event=on_event,
    )
    self.conversation_id = transcript.conversation_id
    self.messages = transcript.messages
    self.turns += 1
    return transcript


_DIM, _CYAN, _YELLOW, _RESET = "\x1b[2m", "\x1b[36m", "\x1b[33m", "\x1b[0m"
_STYLE = {REASONING: _DIM, TOOL_CALL_TEXT: _CYAN, TOOL_RESULT: _YELLOW}
_LABEL = {
  REASONING: "[thinking] ",
  CONTENT: "[answer] ",
  TOOL_CALL_TEXT: "[tool call] ",
  TOOL_RESULT: "[tool result] ",
}


class TerminalPrinter:
  """Writes `LoopEvent`s as they come: on a terminal the reasoning is dim and the tools are in
  colour; otherwise each part starts on a new line with a label ("[thinking] ", "[answer] ",
  "[tool call] ", "[tool result] ").

  Args:
    out: where to write.
    color: ANSI styles; None = when `out` is a terminal.
  """

  def __init__(self, out: TextIO = sys.stdout, color: bool | None = None):
    self.out = out
    self.color = out.isatty() if color is None else color
    self._part: tuple | None = None  # (step, kind) being written
    self._styled = False  # an ANSI style is on

  def __call__(self, event: LoopEvent) -> None:
    part = (event.step, event.kind)
    text = event.text
    if event.kind == TOOL_RESULT:
      name = event.result.name if event.result else ""
      text = f"{name}: {text}" + ("" if event.result is None or event.result.ok else " (failed)")
      part = (event.step, event.kind, id(event))  # each result on its own line
    if part != self._part:
      if self._part is not None:
        self._close_part()
      style = _STYLE.get(event.kind, "") if self.color else _LABEL.get(event.kind, "")
      self.out.write(style)
      self._styled = self.color and bool(style)
      self._part = part
    self.out.write(text)
    self.out.flush()

  def end(self, transcript: Transcript | None = None) -> None:
    """Closes the reply (and says why it stopped, when not on its own)."""
    if self._part is not None:
      self._close_part()
    self._part = None
    if transcript is not None and transcript.finish_reason != "stop":
      why = {"length": "the reply hit max_new_tokens", "max_steps": "tool steps ran out"}
      self.out.write(f"[stopped: {why.get(transcript.finish_reason, transcript.finish_reason)}]\n")
    self.out.flush()

  def _close_part(self) -> None:
    self.out.write((_RESET if self._styled else "") + "\n")
    self._styled = False


def user_lines(inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> Iterator[str]:
  """User turns: from a terminal with a "> " prompt (until EOF), or one per line of piped input
  (blank lines skipped, each echoed after "> " so the transcript reads as a chat)."""
  if inp.isatty():
    while True:
      try:
        line = input("> ")
      except EOFError:
        out.write("\n")
        return
      if line.strip():
        yield line.strip()
  else:
    for line in inp:
      if line.strip():
        out.write(f"> {line.strip()}\n")
        out.flush()
        yield line.strip()
