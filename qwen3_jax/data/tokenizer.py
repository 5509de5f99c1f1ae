"""Byte-level BPE tokenizer with Qwen3's special tokens (Hugging Face `tokenizers`).

`train_tokenizer` builds one from text; `load_tokenizer` reads any `tokenizer.json` (a real
Qwen3 one included) and checks that the special tokens the chat format needs are there
(adding the `<tool_response>` pair to one that predates them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, END_TOOL_RESPONSE = "<tool_response>", "</tool_response>"
# Ids 0..8 in this order in a tokenizer trained here; the tool-response pair came last, so the
# first seven keep the ids they had before it.
SPECIAL_TOKENS = (
  EOS,
  IM_START,
  IM_END,
  THINK,
  END_THINK,
  TOOL_CALL,
  END_TOOL_CALL,
  TOOL_RESPONSE,
  END_TOOL_RESPONSE,
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a byte-level BPE (digits split one per token) with `SPECIAL_TOKENS` as ids 0..8;
  deterministic for given texts."""
  if vocab_size < MIN_VOCAB:
    raise ValueError(
      f"tokenizer vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
      f"{MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
    )
  tok = Tokenizer(models.BPE())
  # Every digit is its own token, as in Qwen3's tokenizer: numbers are spelled digit by digit,
  # never as arbitrary multi-digit merges (arithmetic tasks depend on it).
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def check_special_tokens(tok: Tokenizer, source: str = "tokenizer") -> None:
  """Raises if any Qwen3 special token is missing or split into several ids."""
  missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
  if missing:
    raise ValueError(
      f"{source} lacks the special tokens {missing}; the chat format needs all of "
      f"{list(SPECIAL_TOKENS)}"
    )


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a Hugging Face `tokenizer.json` (file, or a directory holding one).

  Qwen3's tokenizer has `<tool_response>` / `</tool_response>` as single tokens; one without
  them (trained here before they were added) gets them as special tokens with the next free
  ids. The other special tokens must be there already.
  """
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No tokenizer file at {path}")
  tok = Tokenizer.from_file(path)
  missing = [t for t in (TOOL_RESPONSE, END_TOOL_RESPONSE) if tok.token_to_id(t) is None]
  if missing:
    tok.add_special_tokens(missing)
  check_special_tokens(tok, path)
  return tok
