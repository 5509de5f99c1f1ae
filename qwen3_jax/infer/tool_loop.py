"""The tool loop: the model replies, its tool calls run through a `ToolRegistry`, the results go
back to it, until it answers without calling a tool.

`run_tool_loops(policy, conversations, registry)` runs many conversations at once (RL
rollouts): every step makes ONE policy call for all conversations still going. Per
conversation and step:
  1. the model continues the conversation's token ids (the first prompt is
     `chat.render(messages, tools, add_generation_prompt=True)`, tokenized);
  2. its reply is read with `chat.parse` (reasoning, content, any number of tool calls) and
     appended as an OpenAI-form assistant message;
  3. the loop ends for the conversation when the reply calls no tool ("stop"), when the reply
     did not end with `<|im_end|>` (cut by max_new_tokens: "length"; `<|endoftext|>` or a stop
     string: "stop"), or when it was the `max_steps`-th reply ("max_steps"). The tool calls
     of such a last reply stay in its message and are NOT run: nothing runs whose result the
     model would not see;
  4. otherwise every call goes to `registry.execute` (unknown tool, malformed call, bad
     arguments, a denial, an exception or a timeout all come back as an "Error: ..." tool
     response; only registered Python functions ever run, and nothing is eval'd); the results
     are appended as `tool` messages, and the next prompt is the model's own tokens followed by
     the template's text for the tool turn and the next assistant header.

The token transcript (for RL) is what the model actually saw and produced: step k's prompt is
step k-1's prompt ids + the ids it generated + the tokens of the tool turn, never a
re-rendering of the messages. A re-rendering could differ from the model's own tokens (a
reply's text need not tokenize back to the sampled ids; the template re-formats tool calls and
drops the reasoning of turns before the last user query), and an RL step must score the tokens
the model was conditioned on. So `Transcript.token_ids` is the last step's prompt + reply, and
every step's `prompt_ids + token_ids` (the policy's `Completion`) is a prefix of it. The tool
turn's text is tokenized on its own; it starts right after the `<|im_end|>` special token, which
no BPE merge crosses, so its ids are those a tokenization of the whole text would give. When the
model writes exactly the template's text (think block, tool call JSON) the transcript equals
the tokenized `chat.render(transcript.messages)` (without its final newline).

Loss mask: on for the tokens the policy sampled (each reply, its `<|im_end|>` included); off for
the prompt, the tool turns, the assistant headers, the empty think block the engine adds for a
thinking budget of 0, and the early-stop tokens it forces when a budget runs out (those were
not sampled).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from tokenizers import Tokenizer

from qwen3_jax.data import chat
from qwen3_jax.data.tokenizer import IM_END
from qwen3_jax.infer.engine import Completion, Engine, Request
from qwen3_jax.infer.reply_stream import ReplySplitter
from qwen3_jax.infer.sampling import SamplingParams, fold_seed
from qwen3_jax.infer.tools import ToolRegistry, ToolResult

TOOL_RESULT = "tool_result"  # `LoopEvent.kind` of a tool's result (the others: reply_stream's)


@dataclasses.dataclass(frozen=True)
class Turn:
  """One generation the loop asks of the policy."""

  conversation_id: str
  step: int  # 0 for the first reply of the conversation
  prompt_ids: list[int]  # everything the model has seen so far
  sampling: SamplingParams
  max_new_tokens: int
  thinking_budget: int | None


class ModelPolicy(Protocol):
  """Turns prompts into completions: `EnginePolicy` (the real model) or `ScriptedPolicy`.

  `policy(turns, on_text)` returns one `Completion` per turn, in order: `prompt_ids` must start
  with the turn's `prompt_ids` (the engine may add the empty think block for a thinking
  budget of 0); `token_ids` (the EOS kept), `logprobs` and `forced` cover the generated tokens;
  `text` excludes the EOS. `on_text(i, delta)` (optional) receives turn i's text as it comes.
  """

  tokenizer: Tokenizer

  def __call__(
    self, turns: Sequence[Turn], on_text: Callable[[int, str], None] | None = None
  ) -> list[Completion]: ...


class EnginePolicy:
  """A `ModelPolicy` over an `Engine`: all turns of a step in one session (continuous batching).

  Args:
    engine: the engine.
    state: parameters to sample from (e.g. the RL learner's); None = the engine model's own.
    batch_size: rows of the session; None = the number of turns rounded up to a power of two
      (so that a shrinking set of live conversations reuses compiled programs).
  """

  def __init__(self, engine: Engine, *, state=None, batch_size: int | None = None):
    self.engine, self.state, self.batch_size = engine, state, batch_size
    self.tokenizer = engine.tokenizer

  def __call__(self, turns, on_text=None):
    requests = [
      Request(
        prompt=list(t.prompt_ids),
        sampling=t.sampling,
        max_new_tokens=t.max_new_tokens,
        thinking_budget=t.thinking_budget,
        id=i,
      )
      for i, t in enumerate(turns)
    ]
    prompts = [self.engine.encode_prompt(r) for r in requests]
    need = max(len(p) + r.max_new_tokens - 1 for p, r in zip(prompts, requests, strict=True))
    rows = self.batch_size or 1 << (len(turns) - 1).bit_length()
    session = self.engine.session(batch_size=rows, max_len=_power_of_two(need, 64))
    for i, (r, p) in enumerate(zip(requests, prompts, strict=True)):
      session.submit(r, p, key=i)
    while not session.idle:
      for (i, _), ev in session.step(self.state):
        if on_text is not None and ev.text:
          on_text(i, ev.text)
    return [session.results.pop((i, 0)) for i in range(len(turns))]


class ScriptedPolicy:
  """A `ModelPolicy` that replies with given texts (tests, demos): each reply is tokenized and
  ends with `<|im_end|>`; its log-probs are 0. The text streams to `on_text` in small pieces.
  Sampling settings and the thinking budget are ignored (the prompt is taken as is).

  Args:
    tokenizer: the tokenizer.
    replies: texts handed out in order, one per turn asked (across conversations, in the order
      the loop asks), or a function `turn -> text`.
  """

  def __init__(self, tokenizer: Tokenizer, replies: Sequence[str] | Callable[[Turn], str]):
    self.tokenizer = tokenizer
    self._replies = replies if callable(replies) else list(replies)
    self._next = 0
    self.turns: list[Turn] = []  # every turn asked, for tests
    self.batch_sizes: list[int] = []  # turns per call

  def __call__(self, turns, on_text=None):
    self.batch_sizes.append(len(turns))
    out = []
    for i, turn in enumerate(turns):
      self.turns.append(turn)
      if callable(self._replies):
        text = self._replies(turn)
      else:
        if self._next >= len(self._replies):
          raise IndexError(f"the script has only {len(self._replies)} replies")
        text, self._next = self._replies[self._next], self._next + 1
      ids = self.tokenizer.encode(text, add_special_tokens=False).ids
      ids.append(self.tokenizer.token_to_id(IM_END))
      for k in range(0, len(text), 5):
        if on_text is not None:
          on_text(i, text[k : k + 5])
      out.append(
        Completion(
          request_id=turn.conversation_id,
          index=0,
          prompt_ids=list(turn.prompt_ids),
          token_ids=ids,
          logprobs=[0.0] * len(ids),
          forced=[False] * len(ids),
          text=text,
          finish_reason="stop",
        )
      )
    return out


@dataclasses.dataclass(frozen=True)
class LoopEvent:
  """What `run_tool_loops(on_event=...)` reports as it goes: reply text by kind (reply_stream's
  REASONING, CONTENT, TOOL_CALL_TEXT) as it streams, then each tool's result (TOOL_RESULT)."""

  conversation_id: str
  step: int
  kind: str
  text: str
  result: ToolResult | None = None


@dataclasses.dataclass
class Step:
  """One reply of a conversation: tokens [prompt_len, end) of the transcript are the model's."""

  prompt_len: int
  end: int
  text: str
  finish_reason: str  # the policy's: "stop" or "length"
  results: list[ToolResult]  # of its tool calls, in order (empty when none ran)


@dataclasses.dataclass
class Transcript:
  """One conversation after the loop.

  Attributes:
    conversation_id: as given to the registry (and its audit log).
    messages: the input messages, then per step the assistant message (`content`,
      `reasoning_content` or None, `tool_calls` in OpenAI form, `arguments` a JSON string, or
      the raw text of a call that could not be read) and its `tool` messages (`tool_call_id`,
      `name`, `content`).
    steps: per reply, where its tokens lie and its tool results.
    token_ids: everything the model saw and produced (see the module docstring).
    loss_mask: per token, True where the model sampled it (loss on); False on the prompt, the
      tool turns, the template's headers, and tokens forced by the thinking budget.
    logprobs: per token, the policy's log-prob of a generated token (forced ones included);
      0.0 elsewhere.
    finish_reason: "stop", "length" or "max_steps" (see the module docstring).
  """

  conversation_id: str
  messages: list[dict]
  steps: list[Step]
  token_ids: list[int]
  loss_mask: list[bool]
  logprobs: list[float]
  finish_reason: str

  @property
  def results(self) -> list[ToolResult]:
    """Every tool result, in the order the calls ran."""
    return [r for s in self.steps for r in s.results]


@dataclasses.dataclass
class _Conversation:
  index: int
  id: str
  messages: list[dict]
  ids: list[int]  # what the model has seen and produced so far (the next prompt, between steps)
  loss_mask: list[bool]
  logprobs: list[float]
  steps: list[Step] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None  # set when the loop ends for it

  def take_reply(self, out: Completion) -> None:
    """Appends what the policy added to the prompt (if anything) and its reply."""
    prompt = list(out.prompt_ids)
    if prompt[: len(self.ids)] != self.ids:
      raise ValueError(f"conversation {self.id}: the policy's prompt_ids do not extend the prompt")
    extra = len(prompt) - len(self.ids)  # e.g. the empty think block the engine adds (budget 0)
    self.ids = prompt + list(out.token_ids)
    self.loss_mask += [False] * extra + [not f for f in out.forced]
    self.logprobs += [0.0] * extra + [float(x) for x in out.logprobs]
    self.steps.append(Step(len(prompt), len(self.ids), out.text, out.finish_reason or "stop", []))

  def extend(self, ids: list[int]) -> None:
    """Appends tokens the model did not produce (loss off)."""
    self.ids += ids
    self.loss_mask += [False] * len(ids)
    self.logprobs += [0.0] * len(ids)


def run_tool_loop(
  policy: ModelPolicy,
  messages: Sequence[dict],
  registry: ToolRegistry,
  *,
  conversation_id: str | None = None,
  **kwargs,
) -> Transcript:
  """`run_tool_loops` for one conversation; `conversation_id` None = a fresh random id."""
  ids = None if conversation_id is None else [conversation_id]
  return run_tool_loops(policy, [messages], registry, conversation_ids=ids, **kwargs)[0]


def run_tool_loops(
  policy: ModelPolicy,
  conversations: Sequence[Sequence[dict]],
  registry: ToolRegistry,
  *,
  tools: Sequence[dict] | None = None,
  max_steps: int = 4,
  enable_thinking: bool = True,
  conversation_ids: Sequence[str] | None = None,
  sampling: SamplingParams | Mapping[str, Any] | None = None,
  max_new_tokens: int = 1024,
  thinking_budget: int | None = None,
  on_event: Callable[[LoopEvent], None] | None = None,
) -> list[Transcript]:
  """Runs the tool loop (module docstring) on every conversation, batched per step.

  Args:
    policy: a `ModelPolicy` (`EnginePolicy(engine)` for the real model).
    conversations: message lists (`chat.render`'s form), each ending where the model replies.
    registry: runs the tool calls (its policy, timeouts and audit log apply).
    tools: the tool specs shown to the model; None = `registry.specs()`. Each must name a
      registered tool; what runs is decided by the registry alone.
    max_steps: most replies per conversation.
    enable_thinking: `chat.render`'s hard switch (the messages' `/think`, `/no_think` apply).
    conversation_ids: one per conversation (for the audit log); None = fresh random ids.
    sampling: `SamplingParams`, used as is; or a dict of overrides on Qwen3's preset for each
      reply's mode (`SamplingParams.qwen3`); None = the preset. The seed is mixed with the
      conversation's index and the step, so conversations of one prompt differ.
    max_new_tokens: most tokens per reply.
    thinking_budget: most tokens inside `<think>` per reply (None = no limit).
    on_event: called with `LoopEvent`s: the replies' text as it streams and the tool results.

  Returns:
    A `Transcript` per conversation, in order.
  """
  if max_steps < 1:
    raise ValueError(f"max_steps must be >= 1, got {max_steps}")
  tools = registry.specs() if tools is None else list(tools)
  missing = [n for n in (_spec_name(t) for t in tools) if n not in registry]
  if missing:
    raise ValueError(f"tools {missing} are shown to the model but not in the registry")
  if conversation_ids is None:
    conversation_ids = [uuid.uuid4().hex[:16] for _ in conversations]
  if len(conversation_ids) != len(conversations):
    raise ValueError(f"{len(conversation_ids)} ids for {len(conversations)} conversations")
  tok = policy.tokenizer
  im_end = tok.token_to_id(IM_END)
  convs = []
  for i, (messages, cid) in enumerate(zip(conversations, conversation_ids, strict=True)):
    text = chat.render(messages, tools, add_generation_prompt=True, enable_thinking=enable_thinking)
    prompt = tok.encode(text, add_special_tokens=False).ids
    convs.append(_Conversation(i, cid, [dict(m) for m in messages], [], [], []))
    convs[-1].extend(prompt)

  for step in range(max_steps):
    live = [c for c in convs if c.finish_reason is None]
    if not live:
      break
    turns = []
    for c in live:
      thinking = thinking_budget != 0 and chat.thinking_mode(c.messages, enable_thinking)
      params = _sampling(sampling, c.index, step, thinking)
      turns.append(Turn(c.id, step, list(c.ids), params, max_new_tokens, thinking_budget))
    splitters = [ReplySplitter() for _ in live]

    def show(i: int, text: str, turns=turns, splitters=splitters, step=step) -> None:
      for kind, piece in splitters[i].push(text):
        on_event(LoopEvent(turns[i].conversation_id, step, kind, piece))

    outs = policy(turns, show if on_event else None)
    for i, (c, out) in enumerate(zip(live, outs, strict=True)):
      if on_event is not None:
        for kind, piece in splitters[i].finish():
          on_event(LoopEvent(c.id, step, kind, piece))
      c.take_reply(out)
      parsed = chat.parse(out.text)
      c.messages.append(_assistant_message(parsed, step))
      closed = bool(out.token_ids) and out.token_ids[-1] == im_end
      if not parsed.tool_calls or not closed or step == max_steps - 1:
        cut = out.finish_reason == "length"
        c.finish_reason = (
          "max_steps" if parsed.tool_calls and closed else "length" if cut else "stop"
        )
        continue
      for call, spec in zip(parsed.tool_calls, c.messages[-1]["tool_calls"], strict=True):
        result = registry.execute(
          call.name,
          call.arguments,
          conversation_id=c.id,
          parse_error=call.error,
          context={"step": step},
        )
        c.steps[-1].results.append(result)
        c.messages.append(
          {"role": "tool", "tool_call_id": spec["id"], "name": call.name, "content": result.content}
        )
        if on_event is not None:
          on_event(LoopEvent(c.id, step, TOOL_RESULT, result.content, result))
      # The tool turn and the next assistant header, after the model's own `<|im_end|>`.
      glue = _after_last_reply(c.messages, tools, enable_thinking)
      c.extend(tok.encode(glue, add_special_tokens=False).ids)

  return [
    Transcript(c.id, c.messages, c.steps, c.ids, c.loss_mask, c.logprobs, c.finish_reason)
    for c in convs
  ]


def _assistant_message(parsed: chat.Parsed, step: int) -> dict:
  """The reply as an OpenAI-form assistant message (call ids `call_{step}_{j}`)."""
  calls = []
  for j, call in enumerate(parsed.tool_calls):
    args = call.raw if call.error else json.dumps(call.arguments, ensure_ascii=False)
    fn = {"name": call.name, "arguments": args}
    calls.append({"id": f"call_{step}_{j}", "type": "function", "function": fn})
  message = {"role": "assistant", "content": parsed.content}
  message["reasoning_content"] = parsed.reasoning or None
  return {**message, "tool_calls": calls} if calls else message


def _sampling(sampling, index: int, step: int, thinking: bool) -> SamplingParams:
  """The reply's sampling settings, its seed mixed with the conversation index and step."""
  if isinstance(sampling, SamplingParams):
    base = sampling
  else:
    base = SamplingParams.qwen3(thinking, **dict(sampling or {}))
  mix = hashlib.sha256(f"{base.seed}/{index}/{step}".encode()).digest()
  return dataclasses.replace(base, seed=fold_seed(int.from_bytes(mix[:8], "little")))


def _after_last_reply(messages: list[dict], tools: list[dict], enable_thinking: bool) -> str:
  """The template's text after the last assistant reply's `<|im_end|>`: the newline, the tool
  turn, and the next assistant header (with the empty think block in non-thinking mode)."""
  runs = chat.pieces(messages, tools, add_generation_prompt=True, enable_thinking=enable_thinking)
  last = max(i for i, (_, by_assistant) in enumerate(runs) if by_assistant)
  return "".join(text for text, _ in runs[last + 1 :])


def _spec_name(spec: dict) -> str:
  return (spec.get("function") or spec).get("name", "")


def _power_of_two(n: int, least: int) -> int:
  return max(least, 1 << (max(n, 1) - 1).bit_length())
