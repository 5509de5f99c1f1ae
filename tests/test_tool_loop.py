"""The tool loop (scripted policy and the real engine), the streaming reply splitter, model
loading, and `scripts/chat.py` end to end (piped stdin, subprocess)."""

import json
import os
import random
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3_jax import checkpoint, hf
from qwen3_jax import config as C
from qwen3_jax.data import chat
from qwen3_jax.data.tokenizer import IM_END, train_tokenizer
from qwen3_jax.infer import example_tools
from qwen3_jax.infer.chat_session import ChatSession, TerminalPrinter
from qwen3_jax.infer.engine import Completion, Engine
from qwen3_jax.infer.load import load_model, load_tokenizer_for
from qwen3_jax.infer.reply_stream import CONTENT, REASONING, TOOL_CALL_TEXT, ReplySplitter
from qwen3_jax.infer.tool_loop import (
  TOOL_RESULT,
  EnginePolicy,
  ScriptedPolicy,
  run_tool_loop,
  run_tool_loops,
)
from qwen3_jax.infer.tools import AuditLog, Tool, ToolError, ToolRegistry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320
TEXTS = [
  "The quick brown fox jumps over the lazy dog. Flights from AMS to LHR, cheapest first.",
  '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
  '{"type": "function", "function": {"name": "search_flights", "parameters": {}}}',
  "Reasoning: 12 * 7 = 84, then 84 + 5 = 89. The answer is 89.",
]
USER = [{"role": "user", "content": "Book me the cheapest flight from AMS to LHR on 2025-03-01."}]


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(TEXTS * 4, VOCAB)


@pytest.fixture(scope="module")
def model():
  return random_model()


def random_model():
  """A random tiny model, its weights drawn with numpy (`Qwen3(cfg, rngs=...)` compiles some
  35 init programs, ~10 s on 2 cores, which these tests do not need): norms 1, the rest
  N(0, 0.1), the vocabulary padding 0 as in a real init."""
  cfg = C.tiny(vocab_size=VOCAB)
  graphdef, abs_state, target = checkpoint.abstract_model(cfg, None)
  rng = np.random.default_rng(0)

  def draw(path, a):
    if "norm" in jax.tree_util.keystr(path):
      return jnp.ones(a.shape, a.dtype)
    x = rng.normal(0.0, 0.1, a.shape)
    for axis, n in enumerate(a.shape):
      if n == cfg.padded_vocab_size:
        x[(slice(None),) * axis + (slice(VOCAB, None),)] = 0.0
    return jnp.asarray(x, a.dtype)

  return checkpoint.merge_params(
    graphdef, abs_state, jax.tree_util.tree_map_with_path(draw, target)
  )


@pytest.fixture(scope="module")
def engine(model, tok):
  return Engine(model, tok, prefill_chunk=128, steps_per_call=8)


@pytest.fixture(scope="module")
def ckpt_dir(model, tok, tmp_path_factory):
  """A params checkpoint with its tokenizer, as convert_hf.py + a copied tokenizer leave it."""
  path = str(tmp_path_factory.mktemp("ckpt") / "params")
  checkpoint.save_params(path, model, model.cfg)
  tok.save(os.path.join(path, "tokenizer.json"))
  return path


def _call(name, **arguments):
  return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def _reply(reasoning, content="", calls=()):
  """A reply in exactly the template's text."""
  body = f"<think>\n{reasoning}\n</think>\n\n{content}"
  for j, call in enumerate(calls):
    body += ("\n" if j or content else "") + call
  return body


def _add_registry(audit=None, counter=None):
  """A small registry: `add` (counted), `boom` (raises), `sleepy` (times out)."""
  counter = counter if counter is not None else {}

  def add(a, b):
    counter["add"] = counter.get("add", 0) + 1
    return a + b

  def boom():
    raise ToolError("the tool broke")

  def sleepy():
    time.sleep(1.0)
    counter["sleepy_done"] = True

  obj = {"type": "object", "additionalProperties": False}
  ints = {"a": {"type": "integer"}, "b": {"type": "integer"}}
  return ToolRegistry(
    [
      Tool("add", "Add.", {**obj, "properties": ints, "required": ["a", "b"]}, add),
      Tool("boom", "Fails.", {**obj, "properties": {}}, boom),
      Tool("sleepy", "Slow.", {**obj, "properties": {}}, sleepy, timeout_s=0.1),
    ],
    audit_log=audit,
  )


# ----------------------------------------------------------------------------- scripted


def test_three_tool_chain_flights_cheapest_email(tok, tmp_path):
  """search_flights -> calculator min(prices) -> send_email -> answer, each reply reading the
  previous tool result from its prompt. Audit log, outbox, messages, and the token transcript:
  every prompt is a prefix of it, the loss mask covers exactly the replies, and (the replies
  being the template's own text) it equals the official rendering of the final messages."""
  audit, outbox = AuditLog(tmp_path / "audit.jsonl"), example_tools.Outbox()
  registry = example_tools.example_registry(audit, outbox=outbox)
  state = {}

  def last_result(turn):
    text = tok.decode(turn.prompt_ids, skip_special_tokens=False)
    return text.rsplit("<tool_response>\n", 1)[1].split("\n</tool_response>")[0]

  def script(turn):
    if turn.step == 0:
      return _reply("Search first.", calls=[_call("search_flights", origin="AMS",
                    destination="LHR", date="2025-03-01")])  # fmt: skip
    if turn.step == 1:
      state["flights"] = json.loads(last_result(turn))["flights"]
      prices = ", ".join(str(f["price_eur"]) for f in state["flights"])
      return _reply("Find the lowest price.", "Comparing.", [_call("calculator",
                    expression=f"min({prices})")])  # fmt: skip
    if turn.step == 2:
      cheapest = next(f for f in state["flights"] if f["price_eur"] == int(last_result(turn)))
      state["cheapest"] = cheapest["flight"]
      body = f"Flight {cheapest['flight']} at {cheapest['depart']}"
      return _reply("Email it.", calls=[_call("send_email", to="me@example.com",
                    subject="Your flight", body=body)])  # fmt: skip
    return _reply("Done.", f"Booked {state['cheapest']}; the details are in your inbox.")

  policy = ScriptedPolicy(tok, script)
  events = []
  t = run_tool_loop(policy, USER, registry, conversation_id="trip-1", on_event=events.append)

  assert t.finish_reason == "stop" and len(t.steps) == 4
  assert [r.status for r in t.results] == ["ok"] * 3
  assert [m["role"] for m in t.messages] == ["user"] + ["assistant", "tool"] * 3 + ["assistant"]
  assert t.messages[1]["reasoning_content"] == "Search first."
  assert t.messages[1]["tool_calls"][0]["function"]["name"] == "search_flights"
  assert json.loads(t.messages[1]["tool_calls"][0]["function"]["arguments"])["origin"] == "AMS"
  assert t.messages[3]["content"] == "Comparing."
  assert t.messages[2]["tool_call_id"] == t.messages[1]["tool_calls"][0]["id"]
  [email] = outbox.messages
  assert state["cheapest"] in email.body and email.to == "me@example.com"
  records = audit.read()
  assert [r["tool"] for r in records] == ["search_flights", "calculator", "send_email"]
  assert {r["conversation_id"] for r in records} == {"trip-1"} and all(r["ok"] for r in records)

  ids, mask = t.token_ids, t.loss_mask
  assert len(mask) == len(t.logprobs) == len(ids)
  first = tok.encode(chat.render(USER, registry.specs(), add_generation_prompt=True)).ids
  assert policy.turns[0].prompt_ids == first
  im_end = tok.token_to_id(IM_END)
  for k, (turn, step) in enumerate(zip(policy.turns, t.steps, strict=True)):
    assert ids[: step.prompt_len] == turn.prompt_ids
    assert ids[step.prompt_len : step.end] == tok.encode(step.text).ids + [im_end]
    assert all(mask[step.prompt_len : step.end])
    nxt = t.steps[k + 1].prompt_len if k + 1 < len(t.steps) else len(ids)
    assert not any(mask[step.end : nxt])
  assert not any(mask[: t.steps[0].prompt_len])
  assert sum(mask) == sum(s.end - s.prompt_len for s in t.steps)
  assert ids == tok.encode(chat.render(t.messages, registry.specs())).ids[:-1]  # all but "\n"

  kinds = [(e.step, e.kind) for e in events]
  assert (0, REASONING) in kinds and (0, TOOL_CALL_TEXT) in kinds and (3, CONTENT) in kinds
  results = [e for e in events if e.kind == TOOL_RESULT]
  assert [e.result.name for e in results] == ["search_flights", "calculator", "send_email"]
  text = "".join(e.text for e in events if e.step == 3 and e.kind == CONTENT)
  assert text == t.messages[-1]["content"]


def test_bad_calls_become_error_responses_and_the_loop_goes_on(tok, tmp_path):
  """One reply with six calls: unknown tool, bad JSON, schema violation, a tool that raises,
  one that times out, and a good one. Each bad one gets an "Error: ..." response, nothing runs
  for the first three, the good one runs; all six responses reach the next prompt in order."""
  audit, counter = AuditLog(tmp_path / "audit.jsonl"), {}
  registry = _add_registry(audit, counter)
  calls = [
    _call("rm_rf", path="/"),
    '<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call>',
    _call("add", a="one", b=2),
    _call("boom"),
    _call("sleepy"),
    _call("add", a=2, b=3),
  ]
  policy = ScriptedPolicy(tok, [_reply("Try them all.", calls=calls), _reply("Ok.", "Five.")])
  t = run_tool_loop(policy, USER, registry, conversation_id="c-err")
  statuses = ["unknown_tool", "parse_error", "invalid_arguments", "exception", "timeout", "ok"]
  assert [r.status for r in t.results] == statuses
  assert all(r.content.startswith("Error: ") for r in t.results[:5])
  assert t.results[5].content == "5" and counter["add"] == 1
  assert t.finish_reason == "stop" and len(t.steps) == 2
  tool_msgs = [m for m in t.messages if m["role"] == "tool"]
  assert [m["content"] for m in tool_msgs] == [r.content for r in t.results]
  prompt = tok.decode(policy.turns[1].prompt_ids, skip_special_tokens=False)
  assert prompt.count("<tool_response>") == 6
  assert prompt.index("unknown tool") < prompt.index("malformed") < prompt.index("did not finish")
  assert [r["status"] for r in audit.read()] == statuses
  assert t.messages[1]["tool_calls"][1]["function"]["arguments"].startswith('{"name": "add"')


def test_max_steps_leaves_the_last_calls_unrun(tok, tmp_path):
  """A model that always calls a tool: max_steps=2 gives two replies, only the first reply's
  call runs, and the conversation ends on the second reply with its call unanswered."""
  audit, counter = AuditLog(tmp_path / "audit.jsonl"), {}
  policy = ScriptedPolicy(tok, lambda turn: _reply("Again.", calls=[_call("add", a=1, b=1)]))
  t = run_tool_loop(policy, USER, _add_registry(audit, counter), max_steps=2)
  assert t.finish_reason == "max_steps" and len(t.steps) == 2 and counter["add"] == 1
  assert [m["role"] for m in t.messages] == ["user", "assistant", "tool", "assistant"]
  assert t.messages[-1]["tool_calls"] and len(audit.read()) == 1
  assert len(t.token_ids) == t.steps[-1].end


def test_conversations_are_batched_per_step(tok, tmp_path):
  """Three conversations needing 1, 2 and 3 replies: one policy call per step for those still
  going (3, 2, 1 turns), each with its own seed; audit records carry each one's id."""
  audit = AuditLog(tmp_path / "audit.jsonl")
  needs = {"a": 1, "b": 2, "c": 3}

  def script(turn):
    if turn.step + 1 < needs[turn.conversation_id]:
      return _reply("More.", calls=[_call("add", a=turn.step, b=1)])
    return _reply("Done.", f"{turn.conversation_id} finished.")

  policy = ScriptedPolicy(tok, script)
  out = run_tool_loops(policy, [USER] * 3, _add_registry(audit), conversation_ids=list("abc"))
  assert policy.batch_sizes == [3, 2, 1]
  assert [len(t.steps) for t in out] == [1, 2, 3]
  assert [t.messages[-1]["content"] for t in out] == [f"{c} finished." for c in "abc"]
  assert [r["conversation_id"] for r in audit.read()] == ["b", "c", "c"]
  seeds = {(t.conversation_id, t.step): t.sampling.seed for t in policy.turns}
  assert len(set(seeds.values())) == len(seeds)
  assert policy.turns[0].sampling.temperature == 0.6  # Qwen3's thinking preset


def test_cut_reply_ends_the_loop_and_unknown_tools_are_refused(tok):
  """A reply cut by max_new_tokens (no <|im_end|>) ends the loop: its calls are not run.
  Tools shown to the model must be registered ones."""
  ran = []
  registry = ToolRegistry([Tool("add", "Add.", {"type": "object"}, lambda **k: ran.append(k))])

  def cut(turns, on_text=None):
    text = _call("add")
    ids, p = tok.encode(text).ids, list(turns[0].prompt_ids)
    return [Completion(0, 0, p, ids, [0.0] * len(ids), [False] * len(ids), None, text, "length")]

  cut.tokenizer = tok
  t = run_tool_loop(cut, USER, registry)
  assert t.finish_reason == "length" and not ran and t.results == []
  with pytest.raises(ValueError, match="not in the registry"):
    run_tool_loop(cut, USER, registry, tools=[{"name": "other", "parameters": {}}])


def test_forced_tokens_and_prompt_extensions_are_loss_off(tok):
  """Tokens the policy added to the prompt (the engine's empty think block for budget 0) and
  tokens it forced (thinking-budget early stop) are in the transcript with the loss off; a
  policy whose prompt_ids do not extend the prompt is refused."""
  im_end = tok.token_to_id(IM_END)

  def policy(turns, on_text=None):
    ids = tok.encode("ok").ids + [im_end]
    forced = [True] + [False] * (len(ids) - 1)
    p = list(turns[0].prompt_ids) + [7, 7]
    return [Completion(0, 0, p, ids, [-1.0] * len(ids), forced, None, "ok", "stop")]

  policy.tokenizer = tok
  t = run_tool_loop(policy, USER, ToolRegistry())
  n, reply = t.steps[0].prompt_len, t.steps[0].end - t.steps[0].prompt_len
  assert t.token_ids[n - 2 : n] == [7, 7] and t.token_ids[-1] == im_end
  assert t.loss_mask == [False] * (n + 1) + [True] * (reply - 1)
  assert t.logprobs == [0.0] * n + [-1.0] * reply

  def wrong(turns, on_text=None):
    return [Completion(0, 0, [1, 2], [im_end], [0.0], [False], None, "", "stop")]

  wrong.tokenizer = tok
  with pytest.raises(ValueError, match="do not extend"):
    run_tool_loop(wrong, USER, ToolRegistry())


# ----------------------------------------------------------------------------- splitter


SPLIT_CASES = [
  _reply("Let me think.\n\nStep 2.", "The answer\n\nis 4.", [_call("add", a=1, b=2)] * 2),
  "Plain answer with a < b and </thin without tags.\n",
  "\n<think>\nnever closed <tool_call> inside",
  _reply("", "", [_call("add", a=1, b=2)]) + "\nAfter the call.",
  "<tool_call>\n{broken",
  "",
]


@pytest.mark.parametrize("text", SPLIT_CASES)
def test_splitter_agrees_with_parse_for_any_chunking(text):
  rng = random.Random(0)
  want = chat.parse(text)
  for trial in range(30):
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), trial % 7)))
    chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    split = ReplySplitter()
    pieces = [p for c in chunks for p in split.push(c)] + split.finish()
    got = {k: "".join(t for kind, t in pieces if kind == k) for k in (REASONING, CONTENT)}
    assert got[REASONING] == want.reasoning and got[CONTENT] == want.content
    calls = [t for kind, t in pieces if kind == TOOL_CALL_TEXT]
    assert "".join(calls).count("<tool_call>") == len(want.tool_calls)


def test_splitter_starting_inside_the_think_block():
  split = ReplySplitter(in_reasoning=True)
  pieces = split.push("hmm\n</th") + split.push("ink>\n\nyes") + split.finish()
  assert pieces == [(REASONING, "hmm"), (CONTENT, "yes")]


# ----------------------------------------------------------------------------- engine


def _recomputed(model, ids):
  """log_softmax(logits) of token t+1 given tokens 0..t, one forward pass."""
  logits = np.asarray(nnx.jit(lambda m, s: m(s).logits)(model, jnp.asarray([ids])))[0]
  lp = np.asarray(jax.nn.log_softmax(logits[:-1]))
  return np.concatenate([[0.0], np.take_along_axis(lp, np.asarray(ids[1:])[:, None], 1)[:, 0]])


def test_engine_end_to_end_masks_and_logprobs(tok, model, engine):
  """The real engine, a random tiny model: three conversations batched with a thinking budget
  of 0 (the engine appends the empty think block to each prompt: template tokens, loss off),
  then a two-step conversation whose first reply is scripted (a tool call) and whose second
  the engine writes after the tool turn. The transcripts are prompt + replies, the masks cover
  what the engine sampled, and its log-probs equal the model's, recomputed in one pass over
  the whole transcript (so the engine saw exactly those tokens)."""
  policy = EnginePolicy(engine, batch_size=4)
  temp1 = {"temperature": 1.0}
  registry = _add_registry()
  out = run_tool_loops(
    policy, [USER] * 3, registry, max_new_tokens=10, thinking_budget=0, sampling=temp1
  )
  empty_think = tok.encode(chat.EMPTY_THINK).ids
  prompt = tok.encode(chat.render(USER, registry.specs(), add_generation_prompt=True)).ids
  for t in out:
    s = t.steps[0]
    assert t.token_ids[: s.prompt_len] == prompt + empty_think
    assert len(t.token_ids) == len(t.loss_mask) == len(t.logprobs) == t.steps[-1].end
    assert not any(t.loss_mask[: s.prompt_len]) and all(t.loss_mask[s.prompt_len : s.end])
  assert len({tuple(t.token_ids) for t in out}) > 1  # different seeds per conversation

  scripted = ScriptedPolicy(tok, [_reply("Add.", calls=[_call("add", a=2, b=2)])])
  seen = []

  def mixed(turns, on_text=None):
    seen.append(turns[0])
    return (scripted if turns[0].step == 0 else policy)(turns, on_text)

  mixed.tokenizer = tok
  events = []
  t = run_tool_loop(
    mixed, USER, registry, max_new_tokens=12, sampling=temp1, max_steps=2, on_event=events.append
  )
  assert len(t.steps) == 2 and t.results[0].content == "4"
  s0, s1 = t.steps
  assert t.token_ids[: s1.prompt_len] == seen[1].prompt_ids
  glue = tok.decode(t.token_ids[s0.end : s1.prompt_len], skip_special_tokens=False)
  assert glue == "\n<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n" + (
    "<|im_start|>assistant\n"
  )
  assert sum(t.loss_mask) == s0.end - s0.prompt_len + s1.end - s1.prompt_len
  want = _recomputed(model, t.token_ids)
  on = np.asarray(t.loss_mask)
  on[: s1.prompt_len] = False  # the engine's reply only (the scripted one has log-prob 0)
  np.testing.assert_allclose(np.asarray(t.logprobs)[on], want[on], atol=2e-4)
  streamed = "".join(e.text for e in events if e.step == 1 and e.kind != TOOL_RESULT)
  parsed = chat.parse(t.steps[1].text)
  assert len(streamed) >= len(parsed.reasoning) + len(parsed.content)


# ----------------------------------------------------------------------------- loading


def test_load_model_from_checkpoint_workdir_and_hf_dir(tok, model, ckpt_dir, tmp_path):
  want = nnx.state(model, nnx.Param).to_pure_dict()

  def same(loaded):
    got = nnx.state(loaded, nnx.Param).to_pure_dict()
    jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want
    )

  m, t = load_model(checkpoint=ckpt_dir)
  same(m)
  assert t.get_vocab() == tok.get_vocab()

  workdir = tmp_path / "run"
  with checkpoint.Checkpointer(str(workdir), save_every=1, async_save=False) as ck:
    meta = {"model": C.to_dict(model.cfg)}
    ck.save(3, want, {"step": np.zeros((), np.int32)}, {}, meta, force=True)
  tok.save(str(workdir / "tokenizer.json"))
  m, t = load_model(workdir=str(workdir))
  same(m)
  assert load_tokenizer_for(checkpoint=str(workdir / "checkpoints" / "3")).get_vocab_size() == VOCAB

  hf_dir = str(tmp_path / "hf")
  hf.save_pretrained(model, model.cfg, hf_dir)
  tok.save(os.path.join(hf_dir, "tokenizer.json"))
  m, _ = load_model(hf_dir=hf_dir)
  same(m)

  with pytest.raises(ValueError, match="exactly one"):
    load_model(workdir=str(workdir), hf_dir=hf_dir)
  os.remove(workdir / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    load_model(workdir=str(workdir))


# ----------------------------------------------------------------------------- chat


def test_chat_session_drops_old_reasoning_and_reads_soft_switches(tok):
  """Second user turn: the prompt re-renders the conversation (the first turn's reasoning is
  dropped, as the official template does) and `/no_think` closes the think block."""
  policy = ScriptedPolicy(tok, [_reply("secret thoughts", "Hello!"), "Fine."])
  session = ChatSession(policy)
  session.send("Hi")
  session.send("How are you? /no_think")
  second = tok.decode(policy.turns[1].prompt_ids, skip_special_tokens=False)
  assert "secret thoughts" not in second and "Hello!" in second
  assert second.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert policy.turns[1].sampling.temperature == 0.7  # the non-thinking preset
  assert session.messages[-1]["content"] == "Fine." and session.max_steps == 1


def _run_chat(args, stdin, timeout=120):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "chat.py"), "--color=never", *args]
  proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_chat_script_piped_with_scripted_replies_and_a_tool_call(ckpt_dir, tmp_path):
  """scripts/chat.py as a subprocess, stdin piped: two user turns, the first answered with a
  calculator call through the tool loop (audit log written), the second with /no_think. The
  replies come from --scripted_replies (a random model calls no tools); everything else is
  the script's real path."""
  replies = [
    _reply("I will use the calculator.", calls=[_call("calculator", expression="6 * 7")]),
    _reply("It said 42.", "6 times 7 is 42."),
    "You are welcome.",
  ]
  path = tmp_path / "replies.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in replies))
  audit = tmp_path / "audit.jsonl"
  args = [f"--checkpoint={ckpt_dir}", "--tools", f"--audit_log={audit}"]
  out = _run_chat(args + [f"--scripted_replies={path}"], "What is 6 * 7?\n\nThanks /no_think\n")
  lines = out.splitlines()
  assert lines[0] == "> What is 6 * 7?"
  assert "[thinking] I will use the calculator." in lines
  assert any(x.startswith("[tool call] <tool_call>") for x in lines)
  assert "[tool result] calculator: 42" in lines
  assert "[thinking] It said 42." in lines and "[answer] 6 times 7 is 42." in lines
  assert lines[-2:] == ["> Thanks /no_think", "[answer] You are welcome."]
  [record] = [json.loads(x) for x in audit.read_text().splitlines()]
  assert record["tool"] == "calculator" and record["ok"]


def test_chat_script_with_the_real_tiny_model(ckpt_dir):
  """The real path: load the checkpoint, stream from the engine, two piped turns."""
  out = _run_chat([f"--checkpoint={ckpt_dir}", "--max_new_tokens=6"], "hello\nagain /no_think\n")
  assert out.splitlines()[0] == "> hello" and "> again /no_think" in out


def test_terminal_printer_colours_reasoning_on_a_terminal(tok):
  import io

  buf = io.StringIO()
  session = ChatSession(ScriptedPolicy(tok, [_reply("hm", "Yes.")]))
  printer = TerminalPrinter(buf, color=True)
  printer.end(session.send("Hi", on_event=printer))
  assert buf.getvalue() == "\x1b[2mhm\x1b[0m\nYes.\n"


def test_generate_script_writes_one_row_per_prompt(ckpt_dir, model, tok, tmp_path):
  """scripts/generate.py on a params checkpoint: a text prompt and a chat row (thinking off),
  greedy; each output row's tokens, text and counts agree with the engine run in-process."""
  from qwen3_jax.data import chat
  from qwen3_jax.infer.engine import Engine, Request
  from qwen3_jax.infer.sampling import SamplingParams

  msgs = [{"role": "user", "content": "hi"}]
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text(json.dumps({"prompt": "The quick"}) + "\n" + json.dumps({"messages": msgs}) + "\n")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "generate.py"), f"--checkpoint={ckpt_dir}"]
  cmd += [f"--input={src}", f"--output={dst}", "--temperature=0", "--max_new_tokens=5"]
  cmd += ["--enable_thinking=false"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in dst.read_text().splitlines()]
  prompts = ["The quick", chat.render(msgs, add_generation_prompt=True, enable_thinking=False)]
  greedy = SamplingParams.greedy()
  want = Engine(model, tok).generate([Request(p, greedy, 5) for p in prompts])
  for row, [c] in zip(rows, want, strict=True):
    assert row["token_ids"] == c.token_ids and row["text"] == c.text
    assert row["completion_tokens"] == len(c.token_ids) and row["finish_reason"] == c.finish_reason
    assert row["prompt_tokens"] == len(c.prompt_ids)
