"""UTF-8-safe incremental detokenization with stop strings, for streaming generation.

`TokenBytes` maps each token id of a byte-level BPE (GPT-2 / Qwen3 style) to the exact bytes it
stands for, so a row's text can grow a token at a time without decoding the whole sequence
again. `TextStream` turns one row's token ids into text deltas:

  table = TokenBytes(tokenizer)                  # built once per tokenizer, then cached
  stream = TextStream(table, stop=("\\n\\nUser:",))
  delta = stream.push(new_ids)                   # Delta(text, consumed, stopped, stop)
  ...
  tail = stream.finish()                         # when the row ends without a stop string

Guarantee: the deltas plus `finish()` concatenate to `tokenizer.decode(ids,
skip_special_tokens=False)`, cut right before the first stop string when one occurs (the stop
string itself is left out, as in OpenAI's API, unless `include_stop=True`). A delta never ends
inside a UTF-8 character, and never shows text that may still turn out to begin a stop string.

Only tokenizers whose decoder is `ByteLevel` are supported (every Qwen3 and GPT-2 style
`tokenizer.json`); others raise a `ValueError`, since their decoders are not per-token (e.g.
Metaspace strips the leading space of the first token only).
"""

from __future__ import annotations

import codecs
import dataclasses
import weakref
from collections.abc import Iterable, Sequence
from typing import ClassVar

from tokenizers import Tokenizer, decoders


def _byte_to_char() -> dict[int, str]:
  """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in.

  Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, 0x7f-0xa0, 0xad)
  take the characters U+0100.. in byte order.
  """
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  keep += range(ord("®"), ord("ÿ") + 1)
  shifted = [b for b in range(256) if b not in keep]
  return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


BYTE_TO_CHAR = _byte_to_char()
# str.translate table: a vocabulary character -> the Latin-1 character of its byte, so that
# `.encode("latin-1")` yields the bytes. Latin-1 characters outside the map (space, controls)
# go to U+FFFF, which (like any character above U+00FF left untouched) makes that encode fail.
_TO_LATIN1 = {ord(c): chr(b) for b, c in BYTE_TO_CHAR.items()}
_TO_LATIN1.update({c: "\uffff" for c in range(256) if c not in _TO_LATIN1})


def token_string_bytes(token: str) -> bytes:
  """The bytes the ByteLevel decoder turns one token string into.

  As in `tokenizers`' ByteLevel decoder: if every character is in the byte map, the bytes
  they stand for; otherwise (an added token such as "\\n" or "é x") its UTF-8 encoding.
  """
  try:
    return token.translate(_TO_LATIN1).encode("latin-1")
  except UnicodeEncodeError:
    return token.encode("utf-8")


class TokenBytes:
  """Token id -> the exact bytes it decodes to, for a tokenizer with a ByteLevel decoder.

  `TokenBytes(tokenizer)` builds the table once per tokenizer object and returns the cached one
  after that (it is rebuilt if tokens were added since). For any ids,
  `b"".join(table[i] for i in ids).decode("utf-8", errors="replace")` equals
  `tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)`: the ByteLevel decoder also
  concatenates the tokens' bytes and decodes them once, replacing invalid UTF-8 with U+FFFD.
  Ids the tokenizer does not know (e.g. the model's vocab padding) map to b"", as `decode`
  drops them.

  Attributes:
    table: tuple of bytes, indexed by token id.
  """

  _cache: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()
  table: tuple[bytes, ...]

  def __new__(cls, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> TokenBytes:
    """Returns the table of `tokenizer`, built on first use.

    Args:
      tokenizer: a `tokenizers.Tokenizer` whose decoder is ByteLevel.
      skip_special_tokens: map special added tokens (`<|im_end|>`, ...) to b"", matching
        `decode(..., skip_special_tokens=True)`.

    Raises:
      ValueError: if the tokenizer's decoder is not ByteLevel.
    """
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    per_tokenizer = cls._cache.setdefault(tokenizer, {})
    hit = per_tokenizer.get(skip_special_tokens)
    if hit is not None and hit._vocab_size == size:
      return hit
    self = super().__new__(cls)
    self.table = _build_table(tokenizer, skip_special_tokens)
    self._vocab_size = size
    per_tokenizer[skip_special_tokens] = self
    return self

  def __len__(self) -> int:
    return len(self.table)

  def __getitem__(self, token_id: int) -> bytes:
    if 0 <= token_id < len(self.table):
      return self.table[token_id]
    return b""

  def decode(self, ids: Iterable[int]) -> str:
    """One-shot decode; equals `tokenizer.decode` (see the class docstring)."""
    return b"".join(self[i] for i in ids).decode("utf-8", errors="replace")


def _build_table(tokenizer: Tokenizer, skip_special_tokens: bool) -> tuple[bytes, ...]:
  if not isinstance(tokenizer.decoder, decoders.ByteLevel):
    raise ValueError(
      f"TokenBytes needs a tokenizer whose decoder is ByteLevel (GPT-2 / Qwen3 style byte-level "
      f"BPE); this one has {type(tokenizer.decoder).__name__}, whose output is not a "
      f"concatenation of per-token bytes"
    )
  vocab = tokenizer.get_vocab(with_added_tokens=True)  # token string -> id
  table = [b""] * (max(vocab.values(), default=-1) + 1)
  for token, i in vocab.items():
    table[i] = token_string_bytes(token)
  # `decode` looks added tokens up first, so their content wins over a model token's string.
  for i, added in tokenizer.get_added_tokens_decoder().items():
    table[i] = b"" if skip_special_tokens and added.special else token_string_bytes(added.content)
  return tuple(table)


@dataclasses.dataclass(frozen=True)
class Delta:
  """What one `TextStream.push` produced.

  Attributes:
    text: the newly available text (possibly empty).
    consumed: how many of the pushed ids belong to the output: all of them, or, when a stop
      string completed, those up to and including the token that completed it (the engine
      truncates its ids / log-probs there). 0 when pushed after the stream had stopped.
    stopped: a stop string occurred; the stream produces nothing more.
    stop: the stop string that occurred, else None.
  """

  text: str
  consumed: int
  stopped: bool = False
  stop: str | None = None


class TextStream:
  """Incremental decoder for one row: token ids in, UTF-8-safe text deltas out.

  Bytes go through an incremental UTF-8 decoder with errors="replace": a token that ends
  inside a multi-byte character yields nothing until the character completes, and invalid
  bytes become U+FFFD exactly where a one-shot decode puts them.

  Stop strings are matched on the decoded text after each token: text that could still be
  the beginning of a stop string is held back until the next tokens settle it. After the first
  token whose text completes a stop string the stream stops; its text ends right before the
  earliest-starting stop string in the text so far (ties: the shorter), and whatever follows
  is dropped. Matching is per token, so with stop strings ("abcd", "bc") and tokens
  "a", "b", "c", "d" the stream stops at "bc".

  Args:
    token_bytes: the tokenizer's `TokenBytes`.
    stop: stop strings (non-empty); a single str is one stop string.
    include_stop: end the text with the stop string instead of right before it.
  """

  def __init__(
    self, token_bytes: TokenBytes, stop: str | Sequence[str] = (), include_stop: bool = False
  ):
    stop = (stop,) if isinstance(stop, str) else tuple(dict.fromkeys(stop))
    if not all(stop):
      raise ValueError("stop strings must be non-empty")
    self._token_bytes = token_bytes
    self._stops = stop
    self._include_stop = include_stop
    self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    self._held = ""  # decoded text that may begin a stop string (only with stop strings)
    self._finished = False
    self.stopped = False
    self.stop: str | None = None

  def push(self, ids: Sequence[int]) -> Delta:
    """Feeds the next token ids of the row and returns the text they make available.

    Raises:
      RuntimeError: if called after `finish()`.
    """
    if self._finished:
      raise RuntimeError("TextStream.push after finish()")
    if self.stopped:
      return Delta("", 0, True, self.stop)
    if not self._stops:
      return Delta(
        "".join(self._utf8.decode(self._token_bytes[i]) for i in ids), len(ids), False, None
      )
    out = []
    for n, i in enumerate(ids, 1):
      text = self._utf8.decode(self._token_bytes[i])
      if not text:
        continue
      text, self._held = self._held + text, ""
      cut = self._cut_at_stop(text)
      if cut is not None:
        out.append(cut)
        return Delta("".join(out), n, True, self.stop)
      keep = self._partial_stop_len(text)
      out.append(text[: len(text) - keep])
      self._held = text[len(text) - keep :]
    return Delta("".join(out), len(ids), False, None)

  def finish(self) -> str:
    """Ends the row; returns the text still held back (empty once stopped).

    Held-back beginnings of stop strings are ordinary text now, and an incomplete UTF-8
    character at the end becomes U+FFFD, as in a one-shot decode. If that U+FFFD completes a
    stop string, the text is cut there and `stopped` is set (all pushed ids count).
    """
    if self._finished or self.stopped:
      self._finished = True
      return ""
    self._finished = True
    text, self._held = self._held + self._utf8.decode(b"", final=True), ""
    cut = self._cut_at_stop(text) if self._stops else None
    return text if cut is None else cut

  def _cut_at_stop(self, text: str) -> str | None:
    """If `text` holds a stop string: marks the stream stopped and returns `text` cut there."""
    best = None  # (start, stop string): earliest start, then shortest
    for s in self._stops:
      k = text.find(s)
      if k >= 0 and (best is None or (k, len(s)) < (best[0], len(best[1]))):
        best = (k, s)
    if best is None:
      return None
    k, s = best
    self.stopped, self.stop = True, s
    return text[:k] + (s if self._include_stop else "")

  def _partial_stop_len(self, text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in self._stops:
      for k in range(min(len(s) - 1, len(text)), best, -1):
        if text.endswith(s[:k]):
          best = k
          break
    return best
