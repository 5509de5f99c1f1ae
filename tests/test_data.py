"""Data: tokenizer, packing with segment ids and loss masks, seeded sharded batches,
embedded corpus tasks, bad inputs."""

import json
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from qwen3_jax.data import corpus, pipeline, tasks
from qwen3_jax.data import tokenizer as T


@pytest.fixture(scope="module")
def tok():
  texts = corpus.task_transcripts(200, seed=0) + ["def f(x):\n  return x + 1\n"] * 20
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
  with pytest.raises(ValueError, match="at least 265"):
    T.train_tokenizer(["abc"], 100)


def test_tokenizer_spells_numbers_digit_by_digit(tok):
  """Like Qwen3's tokenizer: no multi-digit token, however often a number occurs."""
  text = "What is 123 + 4567 * 89? 1000000 2026-02-08"
  enc = tok.encode(text)
  digit_tokens = [t for t in enc.tokens if any(ch.isdigit() for ch in t)]
  assert digit_tokens and all(len(t) == 1 for t in digit_tokens), enc.tokens
  assert tok.decode(enc.ids) == text


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
  rows, stats = pipeline.pack(ids, loss, doc, seq_len=5)  # rows of 6 tokens
  # Longest first (doc 2, 5 tokens) opens row A; doc 0 (4) opens row B; doc 1 (3) fits neither
  # (free 1 and 2) and opens row C. Rows are ordered by their first document: B, C, A.
  want = {
    "inputs": [[1, 2, 3, e, 0], [4, 5, e, 0, 0], [6, 7, 8, 9, e]],
    "targets": [[2, 3, e, 0, 0], [5, e, 0, 0, 0], [7, 8, 9, e, 0]],
    "segment_ids": [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]],
    # No loss on padding or on masked targets (6 and 7, the "prompt" of document 2).
    "loss_mask": [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]],
  }
  for k, v in want.items():
    np.testing.assert_array_equal(rows[k], v, err_msg=k)
  assert (stats.documents, stats.dropped, stats.split, stats.rows) == (3, 0, 0, 3)
  assert stats.efficiency == pytest.approx(12 / 15)
  # Two documents share a row when they fit: seq_len=7 -> rows of 8: [doc2 doc1], [doc0].
  rows, _ = pipeline.pack(ids, loss, doc, seq_len=7)
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 2, 2, 2, 2]])
  np.testing.assert_array_equal(rows["loss_mask"][1], [1, 1, 0, 0, 1, 1, 1])  # none for e -> 6


def _chats(rng, n, max_len):
  """n synthetic conversations; token = 1000 * (doc + 1) + position in the doc, so every
  token says where it came from. A random-length prompt (no loss), then the answer (loss)."""
  ids, loss, doc = [], [], []
  for d in range(n):
    length = int(rng.integers(2, max_len + 1))
    prompt = int(rng.integers(1, length))
    ids += [1000 * (d + 1) + p for p in range(length)]
    loss += [p >= prompt for p in range(length)]
    doc += [d] * length
  return np.asarray(ids, np.int32), np.asarray(loss), np.asarray(doc, np.int32)


@pytest.mark.parametrize("cap", [0, 3])
def test_pack_keeps_conversations_whole(cap):
  from qwen3_jax.model.global_tokens import default_positions

  seq_len = 24
  ids, loss, doc = _chats(np.random.default_rng(cap), 300, max_len=40)  # some longer than 25
  lens = np.bincount(doc)
  rows, stats = pipeline.pack(ids, loss, doc, seq_len, split_long=False, max_docs_per_row=cap)
  again, _ = pipeline.pack(ids, loss, doc, seq_len, split_long=False, max_docs_per_row=cap)
  for k in rows:  # deterministic
    np.testing.assert_array_equal(rows[k], again[k])
  full = np.concatenate([rows["inputs"], rows["targets"][:, -1:]], axis=1)  # [N, L + 1]
  seg_full = np.concatenate([rows["segment_ids"], rows["segment_ids"][:, -1:]], axis=1)
  seg_full[:, -1] = np.where(full[:, -1] > 0, seg_full[:, -1], 0)  # a last token's own segment
  kept = set()
  for r in range(len(full)):
    nseg = seg_full[r].max()
    assert cap == 0 or nseg <= cap
    assert set(seg_full[r][seg_full[r] > 0]) == set(range(1, nseg + 1))
    for s in range(1, nseg + 1):
      tok = full[r][seg_full[r] == s]
      d, pos = tok // 1000 - 1, tok % 1000
      assert (d == d[0]).all() and d[0] not in kept
      np.testing.assert_array_equal(pos, np.arange(lens[d[0]]))  # the whole conversation
      kept.add(int(d[0]))
  # The model's positions restart at every document: they equal the token's place in it.
  pos = np.asarray(default_positions(rows["inputs"], rows["segment_ids"]))
  real = rows["segment_ids"] > 0
  np.testing.assert_array_equal(pos[real], rows["inputs"][real] % 1000)
  # Every trained target is an answer token whose prompt (position 0 on) sits before it.
  m = rows["loss_mask"] > 0
  t = rows["targets"][m]
  assert loss[np.searchsorted(ids, t)].all()
  assert (pos[m] + 1 == t % 1000).all()  # so tokens 0 .. pos of its conversation are in the row
  too_long = set(np.flatnonzero(lens > seq_len + 1).tolist())
  assert too_long and kept == set(range(len(lens))) - too_long
  assert (stats.documents, stats.dropped, stats.split) == (len(lens), len(too_long), 0)
  assert stats.rows == len(full)
  used = lens[sorted(kept)].sum()
  assert stats.efficiency == pytest.approx(real.mean())
  assert real.sum() == used - len(full) + (seg_full[:, -1] == 0).sum()  # inputs = row minus last
  if cap == 0:  # best-fit decreasing is within 11/9 OPT + 1 rows of the tokens' lower bound
    assert stats.rows <= 11 / 9 * np.ceil(used / (seq_len + 1)) + 1


def test_pack_splits_long_documents_when_loss_on_all():
  seq_len = 8
  ids, _, doc = _chats(np.random.default_rng(1), 40, max_len=30)
  loss = np.ones(len(ids), bool)
  lens = np.bincount(doc)
  rows, stats = pipeline.pack(ids, loss, doc, seq_len, split_long=True, max_docs_per_row=2)
  assert stats.dropped == 0 and stats.split == int((lens > seq_len + 1).sum()) > 0
  assert rows["segment_ids"].max() <= 2
  # Every (token -> next token) pair of every document is trained exactly once.
  m = rows["loss_mask"] > 0
  pairs = sorted(zip(rows["inputs"][m].tolist(), rows["targets"][m].tolist(), strict=True))
  same = doc[1:] == doc[:-1]
  want = sorted(zip(ids[:-1][same].tolist(), ids[1:][same].tolist(), strict=True))
  assert pairs == want


def test_pack_all_dropped_and_bad_args_raise():
  ids, loss, doc = np.arange(20, dtype=np.int32), np.ones(20, bool), np.repeat([0, 1], 10)
  with pytest.raises(ValueError, match="all 2 documents are longer than a row of seq_len"):
    pipeline.pack(ids, loss, doc, 4, split_long=False)
  with pytest.raises(ValueError, match="max_docs_per_row must be >= 0"):
    pipeline.DataConfig(max_docs_per_row=-1)


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
  # Qwen3's template gives a final reply without reasoning an empty think block.
  think = "<think>\n\n</think>\n\n"
  assert trained == f"{think}yo<|im_end|><|endoftext|>plain<|endoftext|>"


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
  texts = corpus.task_transcripts(40, seed=3)
  for task, text in zip(corpus.corpus_tasks(40, seed=3), texts, strict=True):
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n")
    assert re.search(r"user\n(.*?)<\|im_end\|>", text, re.S).group(1) == task.prompt
    reply = text.split("<|im_start|>assistant\n")[1]
    assert "<think>" in reply and tasks.reward(task, reply) == 1.0
  assert {t.family for t in corpus.corpus_tasks(40, seed=3)} == set(tasks.reasoning_families)


def test_embedded_corpus_has_code_and_chats():
  docs = corpus.embedded_corpus(max_bytes=100_000, num_tasks=50)
  assert any("def " in d and '"""' in d for d in docs)
  assert sum(d.startswith("<|im_start|>user") for d in docs) == 50


def test_build_data_reports_dropped_and_efficiency(tmp_path):
  from qwen3_jax import config as C
  from qwen3_jax.train import inputs
  from qwen3_jax.train.config import TrainConfig

  chat = lambda q, a: {
    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
  }  # noqa: E501
  recs = [chat(f"what is {i} + {i}?", str(2 * i)) for i in range(40)]
  recs += [chat("tell me a long story " * 30, "no " * 30) for _ in range(3)]
  path = tmp_path / "chat.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  data = pipeline.DataConfig(sources=(str(path),), loss_on="assistant", eval_fraction=0.0)
  cfg = TrainConfig(num_steps=1, batch_size=2, seq_len=64, model=C.tiny(vocab_size=512), data=data)
  lines = []
  _, train, _, stats = inputs.build_data(cfg, str(tmp_path), printer=lines.append)
  assert (stats.documents, stats.dropped, stats.split) == (43, 3, 0)
  assert train.num_rows == stats.rows and 0.5 < stats.efficiency <= 1
  text = "\n".join(lines)
  assert f"packing efficiency {stats.efficiency:.1%}" in text
  assert "dropped 3 of 43 documents longer than a row" in text


def test_build_data_obeys_the_models_global_token_bound(tmp_path):
  """A sparse model with global tokens bounds its documents per row
  (attention.max_docs_per_row = 2): the packer, uncapped by the data config, packs no more,
  and a tighter data cap (1) is kept."""
  from qwen3_jax import config as C
  from qwen3_jax.train import inputs
  from qwen3_jax.train.config import TrainConfig

  path = tmp_path / "short.txt"
  path.write_text("".join(f"doc {i}\n\n" for i in range(60)))
  att = C.AttentionConfig(kind="sparse", window=8, global_every=4, max_docs_per_row=2)
  model = C.tiny(vocab_size=512, attention=att)
  for data_cap, want in ((0, 2), (1, 1)):
    data = pipeline.DataConfig(sources=(str(path),), eval_fraction=0.0, max_docs_per_row=data_cap)
    cfg = TrainConfig(num_steps=1, batch_size=2, seq_len=64, model=model, data=data)
    workdir = tmp_path / f"cap{data_cap}"
    workdir.mkdir()
    _, train, _, _ = inputs.build_data(cfg, str(workdir), printer=lambda _: None)
    assert train.rows["segment_ids"].max() == want
