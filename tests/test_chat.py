"""Chat format: exact Qwen3 template text (system, tools, reasoning, tool loops, thinking
switches), render -> parse round trips, malformed tool calls, SFT ids and loss mask.

The expected texts are written out by hand from the official template's rules (see the
`chat` module docstring); they were also checked against the official template rendered by
transformers on random conversations, which this file does not ship.
"""

import json

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from qwen3_jax.data import chat, corpus, pipeline
from qwen3_jax.data import tokenizer as T

TOOLS_HEAD = (
  "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_TAIL = (
  "\n</tools>\n\nFor each function call, return a json object with function name and "
  "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
  '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
WEATHER = {
  "type": "function",
  "function": {
    "name": "weather",
    "description": "Météo",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
  },
}


def user(text):
  return {"role": "user", "content": text}


def turn(role, text):
  return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def call(name, args):
  return {"type": "function", "function": {"name": name, "arguments": args}}


# ----------------------------------------------------------------------------- render


def test_system_and_reasoning_kept_only_after_the_last_query():
  msgs = [
    {"role": "system", "content": "You are terse."},
    user("2+2?"),
    {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},  # reasoning in content
    user("and 3+3?"),
    {"role": "assistant", "reasoning_content": "\nadd again\n", "content": "6"},
  ]
  assert chat.render(msgs) == (
    turn("system", "You are terse.")
    + turn("user", "2+2?")
    + turn("assistant", "4")  # before the last query: reasoning dropped
    + turn("user", "and 3+3?")
    + turn("assistant", "<think>\nadd again\n</think>\n\n6")
  )
  # A final assistant turn without reasoning still gets a (empty) think block; an earlier
  # turn after the last query without reasoning does not.
  msgs = [user("hi"), {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
  assert chat.render(msgs) == (
    turn("user", "hi") + turn("assistant", "a") + turn("assistant", "<think>\n\n</think>\n\nb")
  )
  # No user query at all: no turn keeps reasoning, not even the last one.
  msgs = [{"role": "assistant", "reasoning_content": "r", "content": "x"}]
  assert chat.render(msgs) == turn("assistant", "x")


def test_tools_block_in_the_system_turn():
  bare_tool = {"name": "time", "parameters": {}}  # wrapped into the OpenAI form
  msgs = [{"role": "system", "content": "Be brief."}, user("Weather in Zürich?")]
  want_tools = (
    '\n{"type": "function", "function": {"name": "weather", "description": "Météo", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}'
    '\n{"type": "function", "function": {"name": "time", "parameters": {}}}'
  )
  assert chat.render(msgs, tools=[WEATHER, bare_tool], add_generation_prompt=True) == (
    "<|im_start|>system\nBe brief.\n\n"
    + TOOLS_HEAD
    + want_tools
    + TOOLS_TAIL
    + turn("user", "Weather in Zürich?")
    + "<|im_start|>assistant\n"
  )
  no_system = chat.render(msgs[1:], tools=[WEATHER])
  assert no_system.startswith("<|im_start|>system\n" + TOOLS_HEAD + "\n{")
  with pytest.raises(ValueError, match="a tool needs"):
    chat.render(msgs, tools=[{"description": "nameless"}])


def test_tool_loop_several_calls_and_responses():
  msgs = [
    user("Weather in Paris and Rome?"),
    {
      "role": "assistant",
      "reasoning_content": "Two cities.",
      "content": "",
      "tool_calls": [
        call("weather", {"city": "Paris"}),
        {"function": {"name": "weather", "arguments": '{"city":"Rome"}'}},  # string: as is
      ],
    },
    {"role": "tool", "content": "18C"},
    {"role": "tool", "content": "21C"},
    {"role": "assistant", "content": "<think>\nCompare.\n</think>\n\nRome is warmer."},
  ]
  paris = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
  rome = '<tool_call>\n{"name": "weather", "arguments": {"city":"Rome"}}\n</tool_call>'
  responses = "\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n21C\n</tool_response>"
  # The loop's turns all follow the one query, so both keep their reasoning; an empty
  # content puts no line break before the first call.
  assert chat.render(msgs) == (
    turn("user", "Weather in Paris and Rome?")
    + turn("assistant", f"<think>\nTwo cities.\n</think>\n\n{paris}\n{rome}")
    + f"<|im_start|>user{responses}<|im_end|>\n"
    + turn("assistant", "<think>\nCompare.\n</think>\n\nRome is warmer.")
  )
  # A new query drops the loop's reasoning.
  more = msgs + [user("Thanks"), {"role": "assistant", "content": "You're welcome."}]
  assert chat.render(more) == (
    turn("user", "Weather in Paris and Rome?")
    + turn("assistant", f"{paris}\n{rome}")
    + f"<|im_start|>user{responses}<|im_end|>\n"
    + turn("assistant", "Rome is warmer.")
    + turn("user", "Thanks")
    + turn("assistant", "<think>\n\n</think>\n\nYou're welcome.")
  )
  # Content before a call is separated from it by a line break; a user message that is a
  # wrapped tool result is not a query, so the reasoning before it is still kept.
  msgs = [
    user("q"),
    {
      "role": "assistant",
      "content": "Checking.",
      "reasoning_content": "r1",
      "tool_calls": [call("weather", {"city": "Zürich"})],
    },
    user("<tool_response>\n9C\n</tool_response>"),
    {"role": "assistant", "content": "9C."},
  ]
  text = chat.render(msgs)
  assert (
    turn(
      "assistant",
      '<think>\nr1\n</think>\n\nChecking.\n<tool_call>\n{"name": "weather", "arguments": '
      '{"city": "Zürich"}}\n</tool_call>',
    )
    in text
  )


def test_thinking_off_and_soft_switches():
  prompt = turn("user", "hi") + "<|im_start|>assistant\n"
  assert chat.render([user("hi")], add_generation_prompt=True) == prompt
  off = chat.render([user("hi")], add_generation_prompt=True, enable_thinking=False)
  assert off == prompt + "<think>\n\n</think>\n\n"
  cases = [
    ([user("hi /no_think")], True, False),
    ([user("hi /no_think\n")], True, False),
    ([user("/no_think")], True, False),
    ([{"role": "system", "content": "Be quick. /no_think"}, user("hi")], True, False),
    ([user("a /no_think"), {"role": "assistant", "content": "b"}, user("c /think")], True, True),
    ([user("a /think"), {"role": "assistant", "content": "b"}, user("c")], True, True),
    ([user("a /think"), {"role": "system", "content": "/no_think"}, user("c")], True, False),
    ([user("/no_think please")], True, True),  # a flag counts only at the end
    ([user("see dir/no_think")], True, True),  # ... and as a word of its own
    ([user("hi /think")], False, False),  # enable_thinking=False is a hard switch
  ]
  for msgs, enable, want in cases:
    assert chat.thinking_mode(msgs, enable) is want, msgs
    text = chat.render(msgs, add_generation_prompt=True, enable_thinking=enable)
    assert text.endswith("assistant\n" if want else "assistant\n<think>\n\n</think>\n\n"), msgs
  # The flags stay in the text; they change only the generation prompt.
  assert chat.render([user("hi /no_think")]) == turn("user", "hi /no_think")


def test_bad_messages_raise():
  with pytest.raises(ValueError, match="message 1 needs a 'role'"):
    chat.render([user("a"), {"role": "developer", "content": "b"}])
  with pytest.raises(ValueError, match="content must be a string"):
    chat.render([{"role": "user", "content": [{"type": "text", "text": "a"}]}])
  with pytest.raises(ValueError, match="needs a function name"):
    chat.render([user("a"), {"role": "assistant", "tool_calls": [{"arguments": {}}]}])
  # content None (an OpenAI tool-call message) counts as ""
  msgs = [user("a"), {"role": "assistant", "content": None, "tool_calls": [call("f", {})]}]
  assert '\n\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {}}' in chat.render(msgs)


# ----------------------------------------------------------------------------- parse


def _reply(message):
  """The assistant's text in `render([user, message])`: between its header and <|im_end|>."""
  text = chat.render([user("q"), message])
  return text.split("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")


def test_render_parse_round_trip():
  weather, time = call("weather", {"city": "Paris"}), call("time", '{"tz": "UTC"}')
  cases = [  # (assistant message, its reasoning, its content, its calls)
    ({"role": "assistant", "content": "Plain answer."}, "", "Plain answer.", []),
    (
      {"role": "assistant", "reasoning_content": "Think é 🙂.\nTwo lines.", "content": "Done."},
      "Think é 🙂.\nTwo lines.",
      "Done.",
      [],
    ),
    (
      {"role": "assistant", "content": "<think>\nin content\n</think>\n\nAnswer."},
      "in content",
      "Answer.",
      [],
    ),
    (
      {"role": "assistant", "content": "", "tool_calls": [call("f", {"x": [1, "é"]})]},
      "",
      "",
      [("f", {"x": [1, "é"]})],
    ),
    (
      {
        "role": "assistant",
        "reasoning_content": "Need two calls.",
        "content": "Let me check.",
        "tool_calls": [weather, time],
      },
      "Need two calls.",
      "Let me check.",
      [("weather", {"city": "Paris"}), ("time", {"tz": "UTC"})],  # a string parses to a dict
    ),
  ]
  for m, reasoning, content, calls in cases:
    got = chat.parse(_reply(m))
    assert (got.reasoning, got.content) == (reasoning, content), m
    assert [(c.name, c.arguments, c.error) for c in got.tool_calls] == [
      (n, a, None) for n, a in calls
    ]
    # and back: the parsed reply renders to the same text
    again = {
      "role": "assistant",
      "reasoning_content": got.reasoning,
      "content": got.content,
      "tool_calls": [call(c.name, c.arguments) for c in got.tool_calls],
    }
    assert _reply(again) == _reply(m), m


def test_parse_generated_forms():
  # the prompt held "<think>\n" (the reply starts inside the reasoning), stop token kept
  p = chat.parse("step one\n</think>\n\nanswer<|im_end|>")
  assert (p.reasoning, p.content, p.tool_calls) == ("step one", "answer", [])
  # non-thinking reply after the empty think block of the prompt
  assert chat.parse("just this").content == "just this"
  assert chat.parse("<think>\n\n</think>\n\nhi").reasoning == ""
  # cut off inside the reasoning
  p = chat.parse("<think>\nstill thinking")
  assert (p.reasoning, p.content) == ("still thinking", "")
  # a tool call inside the reasoning is reasoning, not a call
  p = chat.parse('<think>\nmaybe <tool_call>{"name": "f"}</tool_call>\n</think>\n\nno')
  assert p.tool_calls == [] and "<tool_call>" in p.reasoning


def test_malformed_tool_calls_become_errors():
  text = (
    "Trying.\n"
    '<tool_call>\n{"name": "good", "arguments": {"a": 1}}\n</tool_call>\n'
    "<tool_call>\n{not json}\n</tool_call>\n"
    '<tool_call>\n{"arguments": {}}\n</tool_call>\n'
    '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>\n'
    '<tool_call>\n["f"]\n</tool_call>\n'
    '<tool_call>\n{"name": "g", "arguments": "{\\"b\\": 2}"}\n</tool_call>\n'
    '<tool_call>\n{"name": "h", "arguments": {"c"'
  )
  p = chat.parse(text)
  assert p.content == "Trying."
  got = [(c.name, c.arguments, c.error is None) for c in p.tool_calls]
  assert got == [
    ("good", {"a": 1}, True),
    ("", None, False),
    ("", None, False),
    ("f", None, False),
    ("", None, False),
    ("g", {"b": 2}, True),  # arguments given as a JSON string of an object
    ("", None, False),
  ]
  errors = [c.error for c in p.tool_calls if c.error]
  wants = ["not valid JSON", "no 'name'", "list, not an object", "list, not an object", "unclosed"]
  for err, want in zip(errors, wants, strict=True):
    assert want in err
  assert p.tool_calls[1].raw == "{not json}"
  assert p.tool_calls[-1].raw == '{"name": "h", "arguments": {"c"'


# ----------------------------------------------------------------------------- tokens


def _qwen_style_tokenizer(texts):
  """A small BPE with Qwen3's normalizer and pre-tokenizer (its split regex, then bytes)."""
  pattern = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
  )
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=list(T.SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


@pytest.fixture(scope="module")
def tokenizers_used():
  texts = corpus.task_transcripts(200, seed=0) + ["def f(x):\n\n  return x + 1\n"] * 20
  texts += ["a\n\n\n\nb\n\n\n\n" * 20] * 20  # so that runs of newlines merge into one token
  return {"trained": T.train_tokenizer(texts, 400), "qwen_style": _qwen_style_tokenizer(texts)}


CONVERSATIONS = [
  [
    user("Reverse 'héllo' 🙂"),
    {"role": "assistant", "reasoning_content": "o l l é h", "content": "olléh"},
  ],
  [
    {"role": "system", "content": "Use tools."},
    user("Weather?"),
    {
      "role": "assistant",
      "content": "Checking.",
      "tool_calls": [call("weather", {"city": "Zürich"})],
    },
    {"role": "tool", "content": "9C"},
    {"role": "tool", "content": "dry"},
    {"role": "assistant", "content": "<think>\nok\n</think>\n\n9C and dry."},
  ],
  # an earlier reply opening with blank lines: the header's "\n" and the reply's newlines
  # pre-tokenize as one run, so a token straddles the mask boundary
  [
    user("a"),
    {"role": "assistant", "content": "\n\n\nb"},
    user("c"),
    {"role": "assistant", "content": "d"},
  ],
]


def test_encode_ids_are_whole_text_ids_and_mask_is_the_assistants(tokenizers_used):
  for name, tok in tokenizers_used.items():
    for msgs in CONVERSATIONS:
      tools = [WEATHER] if msgs[0]["role"] == "system" else None
      ids, mask = chat.encode(tok, msgs, tools)
      text = chat.render(msgs, tools)
      assert ids == tok.encode(text, add_special_tokens=False).ids, name
      assert len(mask) == len(ids)
      runs = chat.pieces(msgs, tools)
      mine = "".join(t for t, a in runs if a)
      theirs = "".join(t for t, a in runs if not a)
      trained = [i for i, m in zip(ids, mask, strict=True) if m]
      untrained = [i for i, m in zip(ids, mask, strict=True) if not m]
      trained = tok.decode(trained, skip_special_tokens=False)
      untrained = tok.decode(untrained, skip_special_tokens=False)
      if "\n\n\nb" not in text:  # clean boundaries: exactly the assistant's characters
        assert (trained, untrained) == (mine, theirs), name
      else:  # the token holding the header's "\n" and the reply's first ones is the reply's
        assert (trained, untrained) == ("\n" + mine, theirs.replace("assistant\n", "assistant", 1))
  # Why whole-text tokenization: tokenizing piece by piece gives other ids at that boundary.
  tok = tokenizers_used["trained"]
  runs = chat.pieces(CONVERSATIONS[2])
  by_piece = [i for t, _ in runs for i in tok.encode(t, add_special_tokens=False).ids]
  assert by_piece != chat.encode(tok, CONVERSATIONS[2])[0]


def test_generation_prompt_encodes_with_no_loss(tokenizers_used):
  tok = tokenizers_used["trained"]
  ids, mask = chat.encode(tok, [user("hi /no_think")], add_generation_prompt=True)
  assert not any(mask)
  assert tok.decode(ids, skip_special_tokens=False).endswith("assistant\n<think>\n\n</think>\n\n")


def test_pipeline_trains_chat_records_on_the_same_ids(tokenizers_used, tmp_path):
  tok = tokenizers_used["trained"]
  msgs = CONVERSATIONS[1]
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"messages": msgs, "tools": [WEATHER]}, ensure_ascii=False) + "\n")
  docs = pipeline.read_documents(pipeline.DataConfig(sources=(str(path),), loss_on="assistant"))
  ids, loss, _ = pipeline.tokenize(docs, tok)
  want_ids, want_mask = chat.encode(tok, msgs, [WEATHER])
  assert ids.tolist() == want_ids + [tok.token_to_id(T.EOS)]
  assert loss.tolist() == want_mask + [True]
  path.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
  with pytest.raises(ValueError, match="chat.jsonl:1: bad chat record"):
    pipeline.read_documents(pipeline.DataConfig(sources=(str(path),)))


def test_load_tokenizer_adds_the_tool_response_tokens(tmp_path):
  old = Tokenizer(models.BPE())  # a tokenizer trained before the pair was added
  old.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  old.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=270,
    special_tokens=list(T.SPECIAL_TOKENS[:7]),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  old.train_from_iterator(["some text"], trainer=trainer)
  old.save(str(tmp_path / "tokenizer.json"))
  tok = T.load_tokenizer(str(tmp_path))
  ids = [tok.token_to_id(t) for t in T.SPECIAL_TOKENS]
  n = old.get_vocab_size()
  assert ids == [*range(7), n, n + 1]  # the seven keep their ids; the pair takes the next ones
  enc = tok.encode("<tool_response>\nx\n</tool_response>", add_special_tokens=False)
  assert enc.ids[0] == ids[7] and enc.ids[-1] == ids[8]
  assert tok.decode(enc.ids) == "\nx\n"  # special: skipped when decoding for display
