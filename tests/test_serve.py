"""The OpenAI-compatible server against the real `openai` client, on a free local port.

Two servers per module: one over the real engine (a random tiny model; every greedy answer is
checked against `Engine.generate` on the same prompt, an independent path through no HTTP,
no scheduler and no server-side parsing), and one whose engine session is scripted (fixed
reply texts: reasoning, tool calls, endless rows), for what a random model never writes.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque

import httpx
import jax
import numpy as np
import openai
import pytest
from test_tool_loop import TEXTS, VOCAB, random_model

from qwen3_jax import checkpoint
from qwen3_jax.data import chat
from qwen3_jax.data.tokenizer import IM_END, train_tokenizer
from qwen3_jax.infer.engine import Completion, Engine, Event, Request
from qwen3_jax.infer.example_tools import calculate, example_tools
from qwen3_jax.infer.sampling import SamplingParams, row_params, sample
from qwen3_jax.serve.server import Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "secret"
MAX_LEN = 128
USER = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(TEXTS * 4, VOCAB)


@pytest.fixture(scope="module")
def model():
  return random_model()  # test_tool_loop's random tiny model (numpy init, no compile)


@pytest.fixture(scope="module")
def server(model, tok):
  srv = Server(model, tok, model_name="tiny", batch_size=8, max_len=MAX_LEN, max_queue=40)
  srv.start()
  yield srv
  srv.close()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def engine(model, tok):
  return Engine(model, tok, steps_per_call=4)


def _greedy(engine, prompt, n_new, **request):
  """The engine's completions of one request, alone in a session shaped as the server's (so
  the compiled programs are shared)."""
  sampling = request.pop("sampling", SamplingParams.greedy())
  req = Request(prompt, sampling, n_new, **request)
  session = engine.session(8, MAX_LEN, top_logprobs=True)
  session.submit(req, key=0)
  while not session.idle:
    session.step()
  return [session.results[(0, j)] for j in range(req.n)]


def _render(messages=USER, **kw):
  return chat.render(messages, add_generation_prompt=True, **kw)


def test_chat_non_stream_and_stream_equal_the_engine(client, engine):
  [want] = _greedy(engine, _render(), 12)
  parsed = chat.parse(want.text)
  r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0)
  msg = r.choices[0].message
  assert (msg.content or "") == parsed.content
  assert (getattr(msg, "reasoning_content", None) or "") == parsed.reasoning
  assert r.choices[0].finish_reason == want.finish_reason
  assert r.usage.completion_tokens == len(want.token_ids)
  assert r.usage.prompt_tokens == len(want.prompt_ids)
  chunks = list(
    client.chat.completions.create(
      model="tiny",
      messages=USER,
      max_tokens=12,
      temperature=0,
      stream=True,
      stream_options={"include_usage": True},
    )
  )
  assert chunks[0].choices[0].delta.role == "assistant"
  content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert content == parsed.content
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_thinking_switches_in_both_conventions_and_the_budget(client, engine):
  off = _greedy(engine, _render(enable_thinking=False), 8)[0].text
  on = _greedy(engine, _render(), 8)[0].text
  budget = _greedy(engine, _render(), 8, thinking_budget=2)[0].text
  assert on != off  # the switch changes the prompt

  def ask(**extra):
    r = client.chat.completions.create(
      model="tiny", messages=USER, max_tokens=8, temperature=0, extra_body=extra
    )
    m = r.choices[0].message
    return (f"<think>\n{m.reasoning_content}\n</think>\n\n" if m.reasoning_content else "") + (
      m.content or ""
    )

  assert ask(chat_template_kwargs={"enable_thinking": False}) == chat.parse(off).content
  assert ask(enable_thinking=False) == chat.parse(off).content
  assert ask(thinking_budget=0) == chat.parse(off).content  # budget 0 = thinking off
  assert ask(enable_thinking=True) == chat.parse(on).content
  parsed = chat.parse(budget)
  want = (f"<think>\n{parsed.reasoning}\n</think>\n\n" if parsed.reasoning else "") + parsed.content
  assert ask(thinking_budget=2) == want


def test_n_seed_stop_and_logprobs(client, engine, tok):
  sampling = SamplingParams.qwen3(True, seed=7)
  want = _greedy(engine, _render(), 10, sampling=sampling, n=2)
  r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, n=2, seed=7)
  assert [chat.parse(c.text).content for c in want] == [c.message.content or "" for c in r.choices]
  [greedy] = _greedy(engine, _render(), 16)
  stop = greedy.text[5:8]
  cut = greedy.text[: greedy.text.index(stop)]
  r = client.chat.completions.create(
    model="tiny", messages=USER, max_tokens=16, temperature=0, stop=[stop]
  )
  assert r.choices[0].message.content == chat.parse(cut).content
  assert r.choices[0].finish_reason == "stop"
  r = client.chat.completions.create(
    model="tiny", messages=USER, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
  )
  [greedy] = _greedy(engine, _render(), 6, sampling=SamplingParams.greedy(top_logprobs=3))
  got = r.choices[0].logprobs.content
  np.testing.assert_allclose([t.logprob for t in got], greedy.logprobs, atol=1e-5)
  for t, top in zip(got, greedy.top_logprobs, strict=True):
    assert [a.token for a in t.top_logprobs] == [
      tok.decode([i], skip_special_tokens=False) for i, _ in top
    ]
    assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob


def test_completions_endpoint(client, engine):
  [want] = _greedy(engine, "The quick", 6)
  r = client.completions.create(model="tiny", prompt="The quick", max_tokens=6, temperature=0)
  assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
  r = client.completions.create(
    model="tiny", prompt="The quick", max_tokens=6, temperature=0, logprobs=2
  )
  np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs, want.logprobs, atol=1e-5)


def test_32_concurrent_clients_equal_each_request_served_alone(server, client):
  """Mixed prompt and output lengths; greedy; each result equals the one served alone."""
  words = "the quick brown fox jumps over the lazy dog again and again".split()
  asks = [
    ([{"role": "user", "content": " ".join(words[: 1 + i % 11])}], 2 + (7 * i) % 23)
    for i in range(32)
  ]
  aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

  async def one(messages, n):
    r = await aclient.chat.completions.create(
      model="tiny", messages=messages, max_tokens=n, temperature=0
    )
    return r.choices[0].message.content, r.usage.completion_tokens

  async def all_at_once():
    return await asyncio.gather(*(one(m, n) for m, n in asks))

  together = asyncio.run(all_at_once())
  alone = [
    (r.choices[0].message.content, r.usage.completion_tokens)
    for r in (
      client.chat.completions.create(model="tiny", messages=m, max_tokens=n, temperature=0)
      for m, n in asks
    )
  ]
  assert together == alone
  assert {t for _, t in alone} != {alone[0][1]}  # the lengths did vary


def test_bad_inputs_get_openai_errors_and_the_server_stays_healthy(server, client):
  url = server.url + "/v1/chat/completions"
  r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
  assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
  with pytest.raises(openai.NotFoundError, match="does not exist"):
    client.chat.completions.create(model="nope", messages=USER)
  long = [{"role": "user", "content": "fox " * 200}]
  with pytest.raises(openai.BadRequestError, match=f"limit is {MAX_LEN - 1}"):
    client.chat.completions.create(model="tiny", messages=long)
  schema = {"type": "object", "properties": {"a": {"type": 3}}}
  bad_tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
  with pytest.raises(openai.BadRequestError, match="invalid JSON schema"):
    client.chat.completions.create(model="tiny", messages=USER, tools=[bad_tool])
  with pytest.raises(openai.BadRequestError, match="temperature"):
    client.chat.completions.create(model="tiny", messages=USER, temperature=-1)
  assert httpx.get(server.url + "/health").json() == {"status": "ok"}
  assert client.models.list().data[0].id == "tiny"
  r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
  assert r.choices[0].finish_reason in ("stop", "length")
  text = httpx.get(server.url + "/metrics").text
  assert "qwen3_running_rows 0" in text and "qwen3_time_to_first_token_seconds_count" in text


def test_session_cancel_frees_the_row_for_the_next_request(engine):
  """A cancelled running row gives its slot to the queued request at the next step; no result
  appears for it and the other rows go on exactly as if alone."""
  rng = np.random.default_rng(1)
  prompts = [rng.integers(10, VOCAB - 1, 6 + i).tolist() for i in range(9)]
  session = engine.session(8, MAX_LEN, top_logprobs=True)
  for i, p in enumerate(prompts):
    session.submit(Request(p, SamplingParams.greedy(), 12), key=i)
  session.step()
  assert session.queue and session.cancel(3) == 1 and session.cancel(3) == 0
  session.step()
  assert not session.queue and 8 in {k[0] for k in session.slots if k is not None}
  while not session.idle:
    session.step()
  assert (3, 0) not in session.results and len(session.results) == 8
  for i in (0, 8):
    assert session.results[(i, 0)].token_ids == _greedy(engine, prompts[i], 12)[0].token_ids


def test_long_prompt_prefills_between_decode_calls(engine, model, tok):
  """prefill_calls=1, chunk 8: a 41-token prompt goes in over 5 steps while a running row keeps
  decoding; both give the tokens they give alone."""
  eng = Engine(model, tok, prefill_chunk=8, steps_per_call=4)
  session = eng.session(8, MAX_LEN, top_logprobs=True, prefill_calls=1)
  rng = np.random.default_rng(2)
  short, long = rng.integers(10, VOCAB - 1, 4).tolist(), rng.integers(10, VOCAB - 1, 41).tolist()
  session.submit(Request(short, SamplingParams.greedy(), 40), key="short")
  session.step()
  session.submit(Request(long, SamplingParams.greedy(), 6), key="long")
  seen = [{k for (k, _), _ in session.step()} for _ in range(5)]
  assert seen[:4] == [{"short"}] * 4 and seen[4] == {"short", "long"}
  while not session.idle:
    session.step()
  for key, prompt, n in (("short", short, 40), ("long", long, 6)):
    assert session.results[(key, 0)].token_ids == _greedy(engine, prompt, n)[0].token_ids


def test_sampling_never_picks_the_banned_token():
  """tool_choice=none bans `<tool_call>`: a banned argmax gives way to the runner-up."""
  logits = np.asarray([[0.0, 3.0, 2.0, 1.0], [0.0, 3.0, 2.0, 1.0]], np.float32)
  params = [SamplingParams.greedy(banned_token=1), SamplingParams(seed=3, banned_token=1)]
  rp = row_params(params, [0, 0], 2)
  draw = jax.jit(sample)
  for t in range(8):
    s = draw(logits, rp, np.full(2, t, np.int32))
    assert int(s.token[0]) == 2 and int(s.token[1]) != 1


# ----------------------------------------------------------------------------- scripted


class ScriptedSession:
  """Test double of `engine.Session`: row (key, j)'s reply is `reply(prompt_text)`, handed out
  8 characters per step; one row slot per `slots`. Real admission, queue and cancel logic."""

  def __init__(self, engine, reply, slots):
    self.engine, self.reply = engine, reply
    self.slots = [None] * slots
    self.queue, self.rows, self.results = deque(), {}, {}

  @property
  def idle(self):
    return not self.queue and all(s is None for s in self.slots)

  def submit(self, request, prompt, key):
    for j in range(request.n):
      self.queue.append(((key, j), request, prompt))

  def cancel(self, key):
    self.queue = deque(q for q in self.queue if q[0][0] != key)
    for r, k in enumerate(self.slots):
      if k is not None and k[0] == key:
        self.slots[r] = None

  def step(self, state=None):
    for r in range(len(self.slots)):
      if self.slots[r] is None and self.queue:
        key, req, prompt = self.queue.popleft()
        self.slots[r] = key
        text = self.reply(self.engine.tokenizer.decode(prompt, skip_special_tokens=False))
        self.rows[key] = (req, prompt, text, 0)
    events = []
    for r, key in enumerate(self.slots):
      if key is None:
        continue
      req, prompt, text, at = self.rows[key]
      piece, at = text[at : at + 8], at + 8
      self.rows[key] = (req, prompt, text, at)
      ids = self.engine.tokenizer.encode(piece).ids
      done = at >= len(text)
      ev = Event(key[0], key[1], piece, ids, [0.0] * len(ids), "stop" if done else None)
      if done:
        self.slots[r] = None
        ids = self.engine.tokenizer.encode(text).ids + [self.engine.tokenizer.token_to_id(IM_END)]
        self.results[key] = Completion(key[0], key[1], prompt, ids, [0.0] * len(ids), text=text)
        self.results[key].finish_reason = "stop"
      events.append((key, ev))
    return events


def _script(prompt):
  if "<tool_response>\n42\n</tool_response>" in prompt:
    return "<think>\nThe tool said 42.\n</think>\n\nSix times seven is 42."
  if prompt.endswith('"arguments": '):  # a forced named call
    return '{"expression": "1 + 1"}}\n</tool_call>'
  if "endless" in prompt:
    return "x" * 10_000_000  # never ends within the test
  if "6*7" in prompt:
    call = {"name": "calculator", "arguments": {"expression": "6*7"}}
    return f"Let me compute.\n<tool_call>\n{json.dumps(call)}\n</tool_call>"
  return "<think>\nLet me add 1 and 2.\n</think>\n\nThe answer is 3."


@pytest.fixture(scope="module")
def scripted(model, tok):
  srv = Server(model, tok, model_name="s", batch_size=1, max_len=1024, max_queue=1, api_key=KEY)
  srv.scheduler.session = ScriptedSession(srv.engine, _script, slots=1)
  srv.start()
  yield srv
  srv.close()


@pytest.fixture(scope="module")
def sclient(scripted):
  return openai.OpenAI(base_url=scripted.url + "/v1", api_key=KEY, max_retries=0)


def test_reasoning_content_apart_from_content(sclient):
  r = sclient.chat.completions.create(model="s", messages=USER)
  msg = r.choices[0].message
  assert msg.reasoning_content == "Let me add 1 and 2." and msg.content == "The answer is 3."
  assert r.usage.completion_tokens_details.reasoning_tokens > 0
  chunks = list(sclient.chat.completions.create(model="s", messages=USER, stream=True))
  deltas = [c.choices[0].delta for c in chunks]
  assert (
    "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == msg.reasoning_content
  )
  assert "".join(d.content or "" for d in deltas) == msg.content


def test_tool_call_round_trip(sclient):
  """The client runs the tool the model called and sends the result back."""
  tools = [example_tools()[0].spec()]
  messages = [{"role": "user", "content": "What is 6*7?"}]
  r = sclient.chat.completions.create(model="s", messages=messages, tools=tools)
  assert r.choices[0].finish_reason == "tool_calls"
  [call] = r.choices[0].message.tool_calls
  assert call.function.name == "calculator" and call.id.startswith("call_")
  result = calculate(**json.loads(call.function.arguments))
  messages += [
    r.choices[0].message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": call.id, "content": str(result)},
  ]
  r = sclient.chat.completions.create(model="s", messages=messages, tools=tools)
  assert r.choices[0].message.content == "Six times seven is 42."
  chunks = list(
    sclient.chat.completions.create(model="s", messages=messages[:1], tools=tools, stream=True)
  )
  calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
  assert [(tc.index, tc.function.name) for tc in calls] == [(0, "calculator")]
  assert json.loads(calls[0].function.arguments) == {"expression": "6*7"}
  assert chunks[-1].choices[0].finish_reason == "tool_calls"
  named = {"type": "function", "function": {"name": "calculator"}}
  r = sclient.chat.completions.create(model="s", messages=USER, tools=tools, tool_choice=named)
  [call] = r.choices[0].message.tool_calls
  assert call.function.name == "calculator" and json.loads(call.function.arguments) == {
    "expression": "1 + 1"
  }


def test_api_key_queue_full_and_disconnect_frees_the_row(scripted, sclient):
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=scripted.url + "/v1", api_key="wrong", max_retries=0).models.list()
  endless = [{"role": "user", "content": "endless"}]
  headers = {"Authorization": f"Bearer {KEY}"}
  body = {"model": "s", "messages": endless, "stream": True}
  with httpx.Client(timeout=30) as h:
    with h.stream("POST", scripted.url + "/v1/chat/completions", json=body, headers=headers) as s:
      lines = s.iter_lines()
      assert next(lines).startswith("data: ")  # the stream runs: the one row is taken
      waiting = asyncio.new_event_loop()
      pending = waiting.run_in_executor(
        None, lambda: sclient.chat.completions.create(model="s", messages=USER)
      )
      for _ in range(200):  # the second request waits in the queue (its one place)
        if scripted.scheduler.waiting == 1:
          break
        waiting.run_until_complete(asyncio.sleep(0.01))
      with pytest.raises(openai.RateLimitError, match="queue is full"):
        sclient.chat.completions.create(model="s", messages=USER)
    # the stream closed mid-reply: its row is freed and the waiting request is served
    r = waiting.run_until_complete(asyncio.wait_for(pending, 10))
    waiting.close()
  assert r.choices[0].message.content == "The answer is 3."
  assert httpx.get(scripted.url + "/health").json() == {"status": "ok"}


def test_serve_script_subprocess(model, tok, tmp_path):
  """scripts/serve.py end to end: load a params checkpoint, listen on a free port, answer,
  stop on SIGTERM."""
  ckpt = str(tmp_path / "params")
  checkpoint.save_params(ckpt, model, model.cfg)
  tok.save(os.path.join(ckpt, "tokenizer.json"))
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "serve.py"), f"--checkpoint={ckpt}",
         "--port=0", "--batch_size=2", "--max_len=64", "--model_name=m"]  # fmt: skip
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    line = proc.stdout.readline()
    assert line.startswith("serving m on http://127.0.0.1:"), proc.stderr.read()[-3000:]
    url = line.split()[-1]
    for _ in range(600):
      try:
        if httpx.get(url + "/health").status_code == 200:
          break
      except httpx.TransportError:
        time.sleep(0.1)
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    r = c.completions.create(model="m", prompt="The quick", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
  finally:
    proc.send_signal(signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
