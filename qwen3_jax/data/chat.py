"""Qwen3's chat format: the one renderer for training data and inference, so the two agree.

`render` writes a conversation as the exact text of Qwen3's official chat template;
`pieces` is the same text cut into `(text, by_assistant)` runs, which `encode` turns into
token ids and an SFT loss mask; `parse` reads a generated assistant reply back into reasoning,
content and tool calls; `thinking_mode` reads the `/think` / `/no_think` soft switches.

The official template's rules, as implemented here:
  * a first `system` message opens the text; with tools it is followed by the tools block;
    a `system` message anywhere else is an ordinary turn;
  * the "last query" is the latest `user` message that is not a wrapped tool result (content
    starting with `<tool_response>` and ending with `</tool_response>`); with none, it is the
    last message;
  * an assistant's reasoning is `reasoning_content`, or else the text before `</think>` in its
    content (the content is then what follows the last `</think>`); it is shown, as
    `<think>\\n{reasoning}\\n</think>\\n\\n{content}`, only by assistant turns after the last
    query, and there only by the conversation's last message or a turn with reasoning;
  * tool calls follow the content, each on a new line (no line before the first one when the
    content is empty); consecutive `tool` messages merge into one `user` turn.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from qwen3_jax.data.tokenizer import (
  END_THINK,
  END_TOOL_CALL,
  END_TOOL_RESPONSE,
  EOS,
  IM_END,
  IM_START,
  THINK,
  TOOL_CALL,
  TOOL_RESPONSE,
)

ROLES = ("system", "user", "assistant", "tool")
EMPTY_THINK = f"{THINK}\n\n{END_THINK}\n\n"  # what a non-thinking reply starts with
_TOOLS_HEAD = (
  "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
  "\n</tools>\n\nFor each function call, return a json object with function name and "
  "arguments within <tool_call></tool_call> XML tags:\n"
  f'{TOOL_CALL}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{END_TOOL_CALL}'
)
_SOFT_SWITCH = re.compile(r"(?:^|\s)/(think|no_think)\s*$")


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One `<tool_call>` block of a reply; `error` says why it could not be read (else None)."""

  name: str  # "" when the block names no function
  arguments: dict | None  # None when `error` is set
  error: str | None
  raw: str  # the text between the tags, stripped of surrounding whitespace


@dataclasses.dataclass(frozen=True)
class Parsed:
  """A generated assistant reply, split the way `render` writes one."""

  reasoning: str
  content: str
  tool_calls: list[ToolCall]


# ----------------------------------------------------------------------------- rendering


def render(
  messages: Sequence[dict],
  tools: Sequence[dict] | None = None,
  add_generation_prompt: bool = False,
  enable_thinking: bool = True,
) -> str:
  """The conversation as Qwen3's official chat template writes it.

  Args:
    messages: dicts with `role` (system, user, assistant or tool) and `content` (a string;
      None counts as ""); assistant messages may add `reasoning_content` and `tool_calls`
      (OpenAI form `{"type": "function", "function": {"name", "arguments"}}` or the bare
      inner dict; `arguments` a dict, or a JSON string inserted as is).
    tools: function schemas, OpenAI form or bare `{"name": ..., "parameters": ...}` (wrapped).
    add_generation_prompt: end with the header of the assistant's next turn.
    enable_thinking: hard switch for the next reply (see `thinking_mode`).

  Returns:
    The text. With `add_generation_prompt`, the prompt ends in an empty think block when the
    next reply is non-thinking. The official template adds it only for
    `enable_thinking=False` and leaves `/no_think` to the model, which was trained to obey
    the latest flag; we also add it when the latest flag is `/no_think`, so that what the
    engine treats as the reply's mode is the mode the prompt puts the model in.
  """
  return "".join(
    text for text, _ in pieces(messages, tools, add_generation_prompt, enable_thinking)
  )


def pieces(
  messages: Sequence[dict],
  tools: Sequence[dict] | None = None,
  add_generation_prompt: bool = False,
  enable_thinking: bool = True,
) -> list[tuple[str, bool]]:
  """`render`'s text as `(text, by_assistant)` runs; their concatenation is `render`'s result.

  `by_assistant` is True on what the assistant wrote in its turns: its reasoning, content,
  tool calls and closing `<|im_end|>`; False on everything else, its `<|im_start|>assistant\\n`
  header and the `\\n` after its `<|im_end|>` included.
  """
  messages = [_checked(m, i) for i, m in enumerate(messages)]
  out = []
  system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
  if tools:
    head = f"{system}\n\n" if system is not None else ""
    specs = "".join("\n" + json.dumps(_tool_spec(t), ensure_ascii=False) for t in tools)
    out.append((f"{IM_START}system\n{head}{_TOOLS_HEAD}{specs}{_TOOLS_TAIL}{IM_END}\n", False))
  elif system is not None:
    out.append((f"{IM_START}system\n{system}{IM_END}\n", False))

  last_query = next(
    (i for i in reversed(range(len(messages))) if _is_query(messages[i])), len(messages) - 1
  )
  for i, m in enumerate(messages):
    role, content = m["role"], m["content"]
    if role == "user" or (role == "system" and i > 0):
      out.append((f"{IM_START}{role}\n{content}{IM_END}\n", False))
    elif role == "assistant":
      reasoning, content = _split_reasoning(m)
      is_last = i == len(messages) - 1
      if i > last_query and (is_last or reasoning):
        shown, answer = reasoning.strip("\n"), content.lstrip("\n")
        body = f"{THINK}\n{shown}\n{END_THINK}\n\n{answer}"
      else:
        body = content
      for j, call in enumerate(m.get("tool_calls") or ()):
        if j > 0 or content:  # `content` before the think block's lstrip, as the template has it
          body += "\n"
        body += _tool_call_text(call)
      out += [(f"{IM_START}assistant\n", False), (f"{body}{IM_END}", True), ("\n", False)]
    elif role == "tool":
      first = i == 0 or messages[i - 1]["role"] != "tool"
      last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
      text = f"\n{TOOL_RESPONSE}\n{content}\n{END_TOOL_RESPONSE}"
      out.append(
        ((f"{IM_START}user" if first else "") + text + (f"{IM_END}\n" if last else ""), False)
      )
  if add_generation_prompt:
    head = f"{IM_START}assistant\n"
    out.append((head if thinking_mode(messages, enable_thinking) else head + EMPTY_THINK, False))
  return out


def thinking_mode(messages: Sequence[dict], enable_thinking: bool = True) -> bool:
  """Whether the next assistant reply thinks.

  `enable_thinking=False` is a hard switch: no thinking, whatever the messages say (Qwen3's
  documented behaviour: soft switches are ignored then). Otherwise the soft switches decide:
  the latest `/think` or `/no_think` that ends a user or system message (after whitespace, or
  as the whole message) wins, and with none the reply thinks.
  """
  if not enable_thinking:
    return False
  for m in reversed(messages):
    content = m.get("content")
    if m.get("role") in ("user", "system") and isinstance(content, str):
      if flag := _SOFT_SWITCH.search(content):
        return flag.group(1) == "think"
  return True


def _checked(m: dict, i: int) -> dict:
  if not isinstance(m, dict) or m.get("role") not in ROLES:
    raise ValueError(f"message {i} needs a 'role' in {ROLES}, got {m!r:.200}")
  content = "" if m.get("content") is None else m["content"]
  if not isinstance(content, str):
    raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
  return {**m, "content": content}


def _is_tool_result(content: str) -> bool:
  """Content that is a tool result wrapped in `<tool_response>` tags (sent as a user turn)."""
  return content.startswith(TOOL_RESPONSE) and content.endswith(END_TOOL_RESPONSE)


def _is_query(m: dict) -> bool:
  return m["role"] == "user" and not _is_tool_result(m["content"])


def _split_reasoning(m: dict) -> tuple[str, str]:
  """(reasoning, content) of an assistant message, the template's way."""
  content = m["content"]
  if m.get("reasoning_content") is not None:
    return m["reasoning_content"], content
  if END_THINK not in content:
    return "", content
  parts = content.split(END_THINK)
  return parts[0].rstrip("\n").split(THINK)[-1].lstrip("\n"), parts[-1].lstrip("\n")


def _tool_spec(tool: dict) -> dict:
  if "function" in tool:
    return tool
  if "name" in tool:
    return {"type": "function", "function": tool}
  raise ValueError(f"a tool needs 'function' (OpenAI form) or 'name', got keys {sorted(tool)}")


def _tool_call_text(call: dict) -> str:
  fn = call.get("function") or call
  if "name" not in fn:
    raise ValueError(f"a tool call needs a function name, got {call!r:.200}")
  args = fn.get("arguments", {})
  args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
  # The name goes in unescaped, as the template writes it.
  return f'{TOOL_CALL}\n{{"name": "{fn["name"]}", "arguments": {args}}}\n{END_TOOL_CALL}'


# ----------------------------------------------------------------------------- parsing


def parse(text: str) -> Parsed:
  """Reads a generated assistant reply (the text after `<|im_start|>assistant\\n`).

  Reasoning is the text inside `<think>...</think>`, or before `</think>` when the prompt held
  the opening tag; as in the template, the content is what follows the last `</think>`. A
  reply cut off inside its reasoning (an opening tag, no closing one) is all reasoning. Tool
  calls are read from the content and removed from it; a malformed one becomes a `ToolCall`
  with `error` set. A trailing `<|im_end|>` / `<|endoftext|>` is dropped, and the reasoning
  and content are stripped of surrounding newlines (the template adds them around both).
  """
  while text.endswith((IM_END, EOS)):
    text = text.removesuffix(IM_END).removesuffix(EOS)
  if END_THINK in text:
    parts = text.split(END_THINK)
    reasoning, rest = parts[0].split(THINK)[-1], parts[-1]
  elif text.lstrip().startswith(THINK):
    reasoning, rest = text.lstrip().removeprefix(THINK), ""
  else:
    reasoning, rest = "", text
  kept, calls = [], []
  while (start := rest.find(TOOL_CALL)) >= 0:
    kept.append(rest[:start])
    rest = rest[start + len(TOOL_CALL) :]
    end = rest.find(END_TOOL_CALL)
    if end < 0:
      calls.append(ToolCall("", None, f"unclosed {TOOL_CALL} (no {END_TOOL_CALL})", rest.strip()))
      rest = ""
      break
    calls.append(_read_call(rest[:end].strip()))
    rest = rest[end + len(END_TOOL_CALL) :]
  kept.append(rest)
  return Parsed(reasoning.strip("\n"), "".join(kept).strip("\n"), calls)


def _read_call(raw: str) -> ToolCall:
  try:
    obj = json.loads(raw)
  except json.JSONDecodeError as e:
    return ToolCall("", None, f"tool call is not valid JSON: {e}", raw)
  if not isinstance(obj, dict):
    return ToolCall("", None, f"tool call is a JSON {type(obj).__name__}, not an object", raw)
  name = obj.get("name")
  if not isinstance(name, str) or not name:
    return ToolCall("", None, "tool call has no 'name' string", raw)
  args = obj.get("arguments", {})
  if isinstance(args, str):  # some replies quote the arguments object
    try:
      args = json.loads(args)
    except json.JSONDecodeError:
      pass
  if not isinstance(args, dict):
    return ToolCall(
      name, None, f"tool call arguments are {type(args).__name__}, not an object", raw
    )
  return ToolCall(name, args, None, raw)


# ----------------------------------------------------------------------------- tokens


def encode(
  tokenizer: Tokenizer,
  messages: Sequence[dict],
  tools: Sequence[dict] | None = None,
  enable_thinking: bool = True,
  add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
  """Token ids of `render(...)` and the SFT loss mask: True on the assistant's own tokens.

  The ids are the tokenization of the whole text (`ids == tokenizer.encode(render(...)).ids`);
  see `encode_pieces` for how the mask is laid on them. `enable_thinking` matters only with
  `add_generation_prompt` (a prompt for inference, all False).
  """
  runs = pieces(messages, tools, add_generation_prompt, enable_thinking)
  return encode_pieces(tokenizer, [runs])[0]


def encode_pieces(
  tokenizer: Tokenizer, docs: Sequence[Sequence[tuple[str, bool]]]
) -> list[tuple[list[int], list[bool]]]:
  """Each document's `(text, flag)` runs as (ids of the joined text, flag per token).

  Tokenizing run by run could split differently where runs meet (BPE merges and the
  pre-tokenizer's whitespace rules see across the boundary), so each document is tokenized
  whole, as inference will, and a token is flagged when any character it covers is (a token
  straddling the boundary into an assistant turn counts as the assistant's).
  """
  texts = ["".join(t for t, _ in runs) for runs in docs]
  encs = tokenizer.encode_batch(texts, add_special_tokens=False)
  out = []
  for runs, text, enc in zip(docs, texts, encs, strict=True):
    lengths = [len(t) for t, _ in runs]
    flags = [f for _, f in runs]
    if all(flags) or not any(flags):
      out.append((enc.ids, [bool(flags and flags[0])] * len(enc.ids)))
      continue
    # count[p] = flagged characters before position p; token (s, e) is flagged iff
    # count[e] > count[s]. A zero-width span (none in byte-level BPE) takes char s's flag.
    count = np.concatenate([[0], np.cumsum(np.repeat(flags, lengths))])
    spans = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
    start = np.minimum(spans[:, 0], len(text) - 1)
    end = np.maximum(spans[:, 1], start + 1)
    out.append((enc.ids, (count[end] > count[start]).tolist()))
  return out
