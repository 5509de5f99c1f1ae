"""Incremental detokenization: TokenBytes matches `tokenizer.decode`; TextStream deltas are
UTF-8 safe, chunking-independent, and stop where the first stop string completes."""

import codecs
import random
import time

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models

from qwen3_jax.data.tokenizer import IM_END, SPECIAL_TOKENS, THINK, train_tokenizer
from qwen3_jax.infer.detokenize import BYTE_TO_CHAR, Delta, TextStream, TokenBytes

TEXTS = [
  "héllo wörld 日本語 🙂 naïve café Grüße ça va",
  "日本語のテキストと中文文本 😀🎉 👩‍👩‍👧 ñandú façade",
  "User: hi\nAssistant: héllo! 🙂\n\nUser: bye\nAssistant: 再见 👋",
]
# Characters the random texts draw from: ASCII, 2-, 3- and 4-byte UTF-8, a ZWJ emoji sequence.
ALPHABET = list("abc xyz\n:!") + list("éöçñ") + list("日本語中文テ") + ["🙂", "😀", "👩‍👧", "🎉"]


@pytest.fixture(scope="module")
def tok():
  t = train_tokenizer(TEXTS * 4, vocab_size=400)
  t.add_tokens([AddedToken("\n\n", special=False), AddedToken("Ġdup", special=False)])
  return t


def byte_ids(tok, text):
  """`text` as one single-byte token per UTF-8 byte (splits every multi-byte character)."""
  return [tok.token_to_id(BYTE_TO_CHAR[b]) for b in text.encode()]


def mixed_ids(tok, rng, n_chars):
  """Valid text tokenized by the BPE, with random characters re-spelled as byte tokens."""
  ids = []
  for _ in range(rng.randint(1, 4)):
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, n_chars)))
    ids += byte_ids(tok, text) if rng.random() < 0.4 else tok.encode(text).ids
  return ids


def chunks(ids, rng):
  """Splits ids into random pieces (empty ones included)."""
  out, i = [], 0
  while i < len(ids):
    n = rng.randint(0, 4)
    out.append(ids[i : i + n])
    i += n
  return out


def run(stream, pieces):
  deltas = [stream.push(p) for p in pieces]
  return deltas, stream.finish()


def expected(tok, tb, ids, stops, include_stop=False):
  """Reference: decode each prefix (its complete characters only); stop at the first prefix
  that holds a stop string, cut at the earliest one. Returns (text, tokens consumed, stop)."""
  data = b""
  for n, i in enumerate(ids, 1):
    data += tb[i]
    text = codecs.utf_8_decode(data, "replace", False)[0]
    hits = sorted((text.find(s), len(s), s) for s in stops if s in text)
    if hits:
      k, _, s = hits[0]
      return text[:k] + (s if include_stop else ""), n, s
  return tok.decode(ids, skip_special_tokens=False), len(ids), None


def test_byte_map_is_the_byte_level_alphabet():
  from tokenizers import pre_tokenizers

  assert sorted(BYTE_TO_CHAR) == list(range(256))
  assert set(BYTE_TO_CHAR.values()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_token_bytes_matches_decode_on_random_ids(tok):
  tb = TokenBytes(tok)
  tb_skip = TokenBytes(tok, skip_special_tokens=True)
  rng = random.Random(0)
  vocab = tok.get_vocab_size(with_added_tokens=True)
  assert len(tb) == vocab
  for _ in range(300):
    ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 12))]
    assert tb.decode(ids) == tok.decode(ids, skip_special_tokens=False), ids
    assert tb_skip.decode(ids) == tok.decode(ids, skip_special_tokens=True), ids
  for _ in range(100):
    ids = mixed_ids(tok, rng, 8) + [tok.token_to_id(IM_END)]
    assert tb.decode(ids) == tok.decode(ids, skip_special_tokens=False)
  # Added tokens: special ones are their text; "\n\n" is not in the byte alphabet (its UTF-8);
  # "Ġdup" is (the decoder maps it to " dup"); unknown ids decode to nothing.
  assert tb[tok.token_to_id(THINK)] == b"<think>"
  assert tb[tok.token_to_id("\n\n")] == b"\n\n"
  assert tb[tok.token_to_id("Ġdup")] == b" dup"
  assert tb[vocab + 5] == b"" and tok.decode([vocab + 5]) == ""


def test_token_bytes_is_cached_per_tokenizer(tok):
  assert TokenBytes(tok) is TokenBytes(tok)
  assert TokenBytes(tok, skip_special_tokens=True) is not TokenBytes(tok)
  other = Tokenizer.from_str(tok.to_str())
  assert TokenBytes(other) is not TokenBytes(tok)
  assert TokenBytes(other).table == TokenBytes(tok).table
  before = TokenBytes(other)
  other.add_tokens(["new token", "é_added"])
  after = TokenBytes(other)
  assert after is not before and after[other.token_to_id("new token")] == b"new token"
  # Every character of "é_added" is in the byte alphabet, so the decoder reads é as byte 0xe9.
  i = other.token_to_id("é_added")
  assert after[i] == b"\xe9_added" and after.decode([i]) == other.decode([i]) == "\ufffd_added"


def test_token_bytes_is_fast_on_a_qwen3_sized_vocab():
  rng = random.Random(0)
  chars = list(BYTE_TO_CHAR.values())
  vocab = {c: i for i, c in enumerate(chars)}
  while len(vocab) < 151_643:
    vocab.setdefault("".join(rng.choices(chars, k=rng.randint(2, 8))), len(vocab))
  big = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  big.decoder = decoders.ByteLevel()
  big.add_special_tokens(list(SPECIAL_TOKENS))
  start = time.perf_counter()
  tb = TokenBytes(big)
  assert time.perf_counter() - start < 2.0  # ~0.2 s; loose for shared CI cores
  ids = rng.sample(range(len(tb)), 200)
  assert tb.decode(ids) == big.decode(ids, skip_special_tokens=False)


def test_non_byte_level_decoder_raises(tok):
  other = Tokenizer.from_str(tok.to_str())
  other.decoder = decoders.Metaspace()
  with pytest.raises(ValueError, match="ByteLevel"):
    TokenBytes(other)


def test_stream_without_stops_matches_decode_and_never_splits_characters(tok):
  tb = TokenBytes(tok)
  rng = random.Random(1)
  for _ in range(200):
    ids = mixed_ids(tok, rng, 10)
    pieces = chunks(ids, rng)
    deltas, tail = run(TextStream(tb), pieces)
    assert "".join(d.text for d in deltas) + tail == tok.decode(ids)
    assert all("\ufffd" not in d.text for d in deltas) and "\ufffd" not in tail
    assert all(not d.stopped and d.consumed == len(p) for d, p in zip(deltas, pieces, strict=True))


def test_character_split_across_byte_tokens_waits_for_the_last_byte(tok):
  tb = TokenBytes(tok)
  stream = TextStream(tb)
  b1, b2, b3, b4 = byte_ids(tok, "🙂")
  assert stream.push([b1]) == Delta("", 1)
  assert stream.push([b2, b3]) == Delta("", 2)
  assert stream.push([b4] + byte_ids(tok, "日")[:2]) == Delta("🙂", 3)
  # The stream ends inside 日: the incomplete tail becomes U+FFFD, as in a one-shot decode.
  assert stream.finish() == "\ufffd" == tok.decode(byte_ids(tok, "日")[:2])


def test_invalid_bytes_match_one_shot_decode(tok):
  tb = TokenBytes(tok)
  rng = random.Random(2)
  byte_tokens = [tok.token_to_id(c) for c in BYTE_TO_CHAR.values()]
  for _ in range(300):
    ids = [rng.choice(byte_tokens) for _ in range(rng.randint(0, 10))]
    ids = [i for k in ids for i in ([k] if rng.random() < 0.8 else byte_ids(tok, "é🙂"))]
    deltas, tail = run(TextStream(tb), chunks(ids, rng))
    assert "".join(d.text for d in deltas) + tail == tok.decode(ids), ids


@pytest.mark.parametrize("include_stop", [False, True])
def test_random_streams_with_stop_strings(tok, include_stop):
  tb = TokenBytes(tok)
  rng = random.Random(3 + include_stop)
  n_stopped = 0
  for _ in range(300):
    ids = mixed_ids(tok, rng, 10)
    text = tok.decode(ids)
    stops = []
    for _ in range(rng.randint(1, 3)):  # substrings of the text (they occur) or random ones
      if rng.random() < 0.7 and text:
        k = rng.randrange(len(text))
        stops.append(text[k : k + rng.randint(1, 4)])
      else:
        stops.append("".join(rng.choices(ALPHABET, k=rng.randint(1, 3))))
    want, want_consumed, want_stop = expected(tok, tb, ids, stops, include_stop)
    pieces = chunks(ids, rng)
    deltas, tail = run(TextStream(tb, stops, include_stop=include_stop), pieces)
    assert "".join(d.text for d in deltas) + tail == want, (ids, stops)
    assert "\ufffd" not in "".join(d.text for d in deltas)
    consumed = sum(d.consumed for d in deltas)
    assert consumed == want_consumed
    stopped = [d for d in deltas if d.stopped]
    if want_stop is None:
      assert not stopped and consumed == len(ids)
    else:
      n_stopped += 1
      first = stopped[0]
      assert first.stop == want_stop and not any(d.stopped for d in deltas[: deltas.index(first)])
      assert all(d == Delta("", 0, True, want_stop) for d in deltas[deltas.index(first) + 1 :])
      assert tail == ""
  assert n_stopped > 100


def test_stop_string_split_across_tokens_and_inside_a_character(tok):
  tb = TokenBytes(tok)
  stream = TextStream(tb, stop="日本")
  ids = byte_ids(tok, "ab日本cd")  # a b e6 97 a5 e6 9c ac c d
  assert stream.push(ids[:3]) == Delta("ab", 3)
  assert stream.push(ids[3:5]) == Delta("", 2)  # 日 could begin the stop string: held back
  assert stream.push(ids[5:7]) == Delta("", 2)  # 本 is not complete yet
  d = stream.push(ids[7:])  # the byte completing 本 completes the stop string
  assert d == Delta("", 1, True, "日本") and stream.stopped and stream.stop == "日本"
  assert stream.push(ids[:2]) == Delta("", 0, True, "日本")
  assert stream.finish() == ""


def test_numpy_ids(tok):
  ids = np.asarray(tok.encode("héllo 🙂 wörld").ids, np.int32)
  for stop in ((), ("🙂",)):
    stream = TextStream(TokenBytes(tok), stop)
    text = "".join(stream.push(ids[k : k + 2]).text for k in range(0, len(ids), 2))
    assert text + stream.finish() == ("héllo " if stop else "héllo 🙂 wörld")


def test_stop_at_the_very_first_token(tok):
  tb = TokenBytes(tok)
  im_end = tok.token_to_id(IM_END)
  hello = tok.encode("héllo").ids
  stream = TextStream(tb, stop=[IM_END])
  assert stream.push([im_end] + hello) == Delta("", 1, True, IM_END)
  stream = TextStream(tb, stop=[IM_END], include_stop=True)
  assert stream.push([im_end] + hello) == Delta(IM_END, 1, True, IM_END)


def test_several_stop_strings_earliest_wins(tok):
  tb = TokenBytes(tok)
  ids = byte_ids(tok, "xyUser: 🙂 Assistant:")
  # Both occur in the same token window: the earlier one wins whatever the order given.
  for stops in (["Assistant:", "User:"], ["User:", "Assistant:"]):
    deltas, tail = run(TextStream(tb, stops), [ids])
    assert deltas == [Delta("xy", 7, True, "User:")] and tail == ""
  # "Us" then "er:" ... with "🙂" completing later: the stop that completes first wins.
  deltas, tail = run(TextStream(tb, ["🙂", "xyUser: 🙂 A"]), [[i] for i in ids])
  assert "".join(d.text for d in deltas) == "xyUser: " and deltas[-1].stop == "🙂"


def test_no_stop_finish_flushes_held_text(tok):
  tb = TokenBytes(tok)
  stream = TextStream(tb, stop=["wörld", "\n\nUser:"])
  assert stream.push(tok.encode("héllo wö").ids).text == "héllo "  # "wö" may begin "wörld"
  assert stream.push(tok.encode("\n").ids).text == "wö"  # "\n" may begin "\n\nUser:"
  assert stream.push(tok.encode("\nUs").ids).text == ""
  assert stream.finish() == "\n\nUs"
  assert not stream.stopped and stream.finish() == ""
  with pytest.raises(RuntimeError):
    stream.push([1])


def test_stop_completed_by_the_final_replacement_character(tok):
  stream = TextStream(TokenBytes(tok), stop="a\ufffd")
  assert stream.push(byte_ids(tok, "xa日")[:3]) == Delta("x", 3)  # "a" held back
  assert stream.finish() == "" and stream.stopped and stream.stop == "a\ufffd"


def test_empty_stop_string_is_rejected(tok):
  with pytest.raises(ValueError):
    TextStream(TokenBytes(tok), stop=["ok", ""])
