"""Data: tokenizer, packing with segment ids and loss masks, seeded sharded batches,
embedded corpus tasks, bad inputs."""

import json
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from qwen3_jax.data import corpus, pipeline
from qwen3_jax.data import tokenizer as T


@pytest.fixture(scope="module")
def tok():
  texts = corpus.reasoning_transcripts(200, seed=0) + ["def f(x):\n  return x + 1\n"] * 20
  return T.train_tokenizer(texts, 400)


def test_tokenizer_special_tokens_and_roundtrip(tok, tmp_path):
  ids = [tok.token_to_id(t) for t in T.SPECIAL_TOKENS]
  assert ids == list(range(len(T.SPECIAL_TOKENS)))
  text = "<|im_start|>user\nReverse 'héllo' 🙂<|im_end|>\n<think>\nok\n</think>"
  enc = tok.encode(text, add_special_tokens=False).ids
  assert enc[0] == tok.token_to_id("<|im_start|>") and tok.token_to_id("</think>") == enc[-1]
  assert tok.decode(enc, skip_special_tokens=False) == text  # byte-level: lossless
  tok.save(str(tmp_path / "tokenizer.json"))
  assert T.load_tokenizer(str(tmp_path)).get_vocab() == tok.get_vocab()
  with pytest.raises(ValueError, match="at least 263"):
    T.train_tokenizer(["abc"], 100)


def test_tokenizer_without_special_tokens_fails(tmp_path):
  plain = Tokenizer(models.BPE())
  plain.pre_tokenizer = pre_tokenizers.ByteLevel()
  plain.add_special_tokens(["<|endoftext|>"])
  plain.save(str(tmp_path / "t.json"))
  with pytest.raises(ValueError, match="lacks the special tokens \\['<\\|im_start\\|>'"):
    T.load_tokenizer(str(tmp_path / "t.json"))
  with pytest.raises(FileNotFoundError, match="No tokenizer file"):
    T.load_tokenizer(str(tmp_path / "missing.json"))


def test_pack_segments_and_loss_mask():
  e = 0  # EOS id
  ids = np.array([1, 2, 3, e, 4, 5, e, 6, 7, 8, 9, e], np.int32)
  doc = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2], np.int32)
  loss = np.ones(12, bool)
  loss[7:9] = False  # e.g. a prompt in document 2
  rows = pipeline.pack(ids, loss, doc, seq_len=4)  # rows of 5 tokens: 3 rows, 3 pad
  np.testing.assert_array_equal(rows["inputs"], [[1, 2, 3, e], [5, e, 6, 7], [9, e, 0, 0]])
  np.testing.assert_array_equal(rows["targets"], [[2, 3, e, 4], [e, 6, 7, 8], [e, 0, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 0, 0]])
  # No loss across documents (e -> 4, e -> 6), on masked targets (7 at idx 8), or padding.
  np.testing.assert_array_equal(rows["loss_mask"], [[1, 1, 1, 0], [1, 0, 0, 1], [1, 0, 0, 0]])


def test_jsonl_chat_loss_only_on_assistant(tok, tmp_path):
  path = tmp_path / "chat.jsonl"
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  path.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"text": "plain"}) + "\n")
  cfg = pipeline.DataConfig(sources=(str(path),), loss_on="assistant")
  docs = pipeline.read_documents(cfg)
  ids, loss, _ = pipeline.tokenize(docs, tok)
  trained = tok.decode(
    [int(i) for i, m in zip(ids, loss, strict=True) if m], skip_special_tokens=False
  )
  assert trained == "yo<|im_end|><|endoftext|>plain<|endoftext|>"


def test_bad_data_sources(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pipeline.read_documents(pipeline.DataConfig(sources=(str(tmp_path / "nope.txt"),)))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="is empty"):
    pipeline.read_documents(pipeline.DataConfig(sources=(str(tmp_path / "empty.txt"),)))
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
  with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
    pipeline.read_documents(pipeline.DataConfig(sources=(str(tmp_path / "bad.jsonl"),)))


def test_batches_seeded_epochs_process_shards_and_state():
  n, b = 10, 4
  rows = {k: np.arange(n)[:, None] * np.ones((1, 3), np.int32) for k in ("inputs", "x")}
  full = pipeline.Batches(rows, b, seed=1)
  seen = np.concatenate([full[s]["x"][:, 0] for s in range(5)])  # 20 rows = 2 epochs
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
  assert list(seen[:10]) != list(seen[10:20])  # a new permutation each epoch
  other = pipeline.Batches(rows, b, seed=2)
  assert any(not np.array_equal(full[s]["x"], other[s]["x"]) for s in range(3))
  parts = [pipeline.Batches(rows, b, seed=1, process_index=p, process_count=2) for p in range(2)]
  for s in range(4):
    np.testing.assert_array_equal(np.concatenate([p[s]["x"] for p in parts]), full[s]["x"])
  it = iter(full)
  [next(it) for _ in range(3)]
  state = full.get_state()
  resumed = pipeline.Batches(rows, b, seed=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(iter(resumed))["x"], next(it)["x"])
  with pytest.raises(ValueError, match="does not match this data"):
    pipeline.Batches(rows, b, seed=3).set_state(state)


def test_reasoning_tasks_are_correct():
  for text in corpus.reasoning_transcripts(40, seed=3):
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n")
    q = re.search(r"user\n(.*?)<\|im_end\|>", text).group(1)
    answer = text.split("</think>\n\n")[1].split("<|im_end|>")[0]
    if m := re.match(r"What is (\d+) \+ (\d+) \* (\d+)\?", q):
      a, b, c = map(int, m.groups())
      assert int(answer) == a + b * c
    elif m := re.match(r"Using the numbers \[(.*)\] .* reach (\d+)\.", q):
      expr, target = answer.split(" = ")
      assert eval(expr) == int(target) == int(m.group(2))  # noqa: S307 - our own arithmetic
      assert sorted(map(int, re.findall(r"\d+", expr))) == sorted(map(int, m.group(1).split(",")))
    elif m := re.match(r"Reverse the string '(\w+)'", q):
      assert answer == m.group(1)[::-1]
    else:
      bits = re.search(r"in (\d+) even", q).group(1)
      assert answer == ("even" if bits.count("1") % 2 == 0 else "odd")


def test_embedded_corpus_has_code_and_chats():
  docs = corpus.embedded_corpus(max_bytes=100_000, num_tasks=50)
  assert any("def " in d and '"""' in d for d in docs)
  assert sum(d.startswith("<|im_start|>user") for d in docs) == 50
