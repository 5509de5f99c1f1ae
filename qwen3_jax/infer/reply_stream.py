"""Splitting a streamed assistant reply into reasoning, answer and tool-call text.

The engine streams plain text deltas; a reader wants the reasoning (inside `<think>...
</think>`) apart from the answer, and the `<tool_call>` blocks apart from both. Tags may arrive
split across deltas (`</th` + `ink>`), so `ReplySplitter` holds back any tail that may still
become a tag:

  split = ReplySplitter()
  for delta in deltas:
    for kind, text in split.push(delta):   # kind: REASONING, CONTENT or TOOL_CALL
      show(kind, text)
  for kind, text in split.finish():
    show(kind, text)

What it yields agrees with `chat.parse` of the whole reply: the REASONING pieces join to
`parse(reply).reasoning`, the CONTENT pieces to `parse(reply).content` (newlines around each are
dropped, as `parse` strips them), and the TOOL_CALL pieces are the `<tool_call>...</tool_call>`
blocks, tags included. As in `parse`, a reply that opens a think block and never closes it is
all reasoning. Unlike `parse`, which looks for the last `</think>`, the first one ends the
reasoning: a streamed piece cannot be taken back. The two differ only on replies with more than
one think block.
"""

from __future__ import annotations

from qwen3_jax.data.tokenizer import END_THINK, END_TOOL_CALL, THINK, TOOL_CALL

REASONING, CONTENT, TOOL_CALL_TEXT = "reasoning", "content", "tool_call"
_START = "start"  # nothing but whitespace seen yet: the reply may still open a think block


def _partial_tag(text: str, tag: str) -> int:
  """Length of the longest tail of `text` that is a proper prefix of `tag`."""
  for k in range(min(len(tag) - 1, len(text)), 0, -1):
    if text.endswith(tag[:k]):
      return k
  return 0


class ReplySplitter:
  """Text deltas of one reply in, `(kind, text)` pieces out (see the module docstring).

  Args:
    in_reasoning: the prompt already opened the think block (the reply starts inside it).
  """

  def __init__(self, in_reasoning: bool = False):
    self._state = REASONING if in_reasoning else _START
    self._buf = ""  # text not yet classified
    self._started = {REASONING: False, CONTENT: False}  # leading newlines are dropped
    self._held = {REASONING: "", CONTENT: ""}  # trailing newlines, shown once text follows

  def push(self, text: str) -> list[tuple[str, str]]:
    """The pieces `text` completes (possibly none: a tag may be arriving)."""
    self._buf += text
    return self._drain(final=False)

  def finish(self) -> list[tuple[str, str]]:
    """The pieces still held back, at the end of the reply."""
    return self._drain(final=True)

  def _drain(self, final: bool) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    while True:
      if self._state == _START:
        head = self._buf.lstrip()
        if head.startswith(THINK):
          self._buf, self._state = head[len(THINK) :], REASONING
        elif not final and THINK.startswith(head):  # "", "<", "<thi", ...: wait
          break
        else:
          self._state = CONTENT
        continue
      end_tag = {REASONING: END_THINK, CONTENT: TOOL_CALL, TOOL_CALL_TEXT: END_TOOL_CALL}
      tag = end_tag[self._state]
      at = self._buf.find(tag)
      if at < 0:
        keep = 0 if final else _partial_tag(self._buf, tag)
        cut = len(self._buf) - keep
        self._emit(self._state, self._buf[:cut], out)
        self._buf = self._buf[cut:]
        break
      if self._state == REASONING:
        self._emit(REASONING, self._buf[:at], out)
        self._held[REASONING] = ""  # newlines before `</think>` are the template's
        self._buf, self._state = self._buf[at + len(tag) :], CONTENT
      elif self._state == CONTENT:
        self._emit(CONTENT, self._buf[:at], out)
        self._buf, self._state = self._buf[at:], TOOL_CALL_TEXT
      else:
        self._emit(TOOL_CALL_TEXT, self._buf[: at + len(tag)], out)
        self._buf, self._state = self._buf[at + len(tag) :], CONTENT
    return _merged(out)

  def _emit(self, kind: str, text: str, out: list[tuple[str, str]]) -> None:
    if kind in self._held:
      if not self._started[kind]:
        text = text.lstrip("\n")
        self._started[kind] = bool(text)
      text = self._held[kind] + text
      shown = text.rstrip("\n")
      self._held[kind] = text[len(shown) :]
      text = shown
    if text:
      out.append((kind, text))


def _merged(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
  out: list[tuple[str, str]] = []
  for kind, text in pieces:
    if out and out[-1][0] == kind:
      out[-1] = (kind, out[-1][1] + text)
    else:
      out.append((kind, text))
  return out
