"""Tokenise -> pack into fixed-length rows with segment ids -> shuffle (seeded) -> shard.

Packing: documents (each ending in `<|endoftext|>`) are concatenated into one stream and cut
into rows of L + 1 tokens; `segment_ids` number the documents inside a row from 1 (0 =
padding, only at the end of the last row). A batch holds, all [B, L] int32:
  inputs = row[:-1], targets = row[1:], segment_ids = seg[:-1],
  loss_mask = 1 where the target is in the same document and marked trainable (all tokens
  for plain text; only assistant turns for chat data with `loss_on="assistant"`).

Order: `grain.MapDataset` over the row indices, shuffled with the seed (a new permutation
every epoch), batched by the *global* batch size. The batch of step s is item s, so the
pipeline's whole state is the next step number: saved with every checkpoint, resume is exact.
Each process materialises only its own slice of rows [p*B/P, (p+1)*B/P) of that batch.
"""

from __future__ import annotations

import dataclasses
import json
import os

import grain
import numpy as np
from tokenizers import Tokenizer

from qwen3_jax.data.corpus import embedded_corpus, render_chatml
from qwen3_jax.data.tokenizer import EOS, check_special_tokens

LOSS_ON = ("all", "assistant")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where text comes from and how it becomes batches."""

  sources: tuple[str, ...] = ()  # .txt / .jsonl files; empty = the embedded corpus.
  tokenizer: str = ""  # tokenizer.json path or dir; "" = train one on the data (saved in workdir).
  vocab_size: int = 512  # Size of a tokenizer trained here (ignored when one is given).
  max_corpus_bytes: int = 2_000_000  # Embedded corpus: stdlib source bytes to use.
  num_tasks: int = 4000  # Embedded corpus: generated reasoning transcripts.
  text_key: str = "text"  # JSONL: field with plain text (or "messages" with a chat list).
  loss_on: str = "all"  # all | assistant: which target tokens count in the loss.
  eval_fraction: float = 0.02  # Rows held out for evaluation.

  def __post_init__(self):
    if self.loss_on not in LOSS_ON:
      raise ValueError(f"data.loss_on={self.loss_on!r} is not one of {LOSS_ON}")
    if not 0.0 <= self.eval_fraction < 0.5:
      raise ValueError(f"data.eval_fraction must be in [0, 0.5), got {self.eval_fraction}")


# ----------------------------------------------------------------------------- documents


def read_documents(cfg: DataConfig, seed: int = 0) -> list[list[tuple[str, bool]]]:
  """Documents as lists of `(text, trainable)` pieces."""
  if not cfg.sources:
    return [[(t, True)] for t in embedded_corpus(cfg.max_corpus_bytes, cfg.num_tasks, seed)]
  docs = []
  for path in cfg.sources:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data source {path!r} does not exist")
    if os.path.getsize(path) == 0:
      raise ValueError(f"data source {path!r} is empty")
    if path.endswith(".jsonl"):
      docs.extend(_read_jsonl(path, cfg))
    else:
      with open(path, encoding="utf-8") as f:
        docs.extend([(t, True)] for t in f.read().split("\n\n") if t.strip())
  if not docs:
    raise ValueError(f"data sources {list(cfg.sources)} hold no text")
  return docs


def _read_jsonl(path: str, cfg: DataConfig) -> list[list[tuple[str, bool]]]:
  docs = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      if "messages" in rec:
        pieces = render_chatml(rec["messages"])
        docs.append([(t, a or cfg.loss_on == "all") for t, a in pieces])
      elif cfg.text_key in rec:
        docs.append([(str(rec[cfg.text_key]), True)])
      else:
        raise ValueError(f"{path}:{n}: record has neither 'messages' nor '{cfg.text_key}'")
  return docs


# ----------------------------------------------------------------------------- packing


def tokenize(docs: list[list[tuple[str, bool]]], tok: Tokenizer) -> tuple[np.ndarray, ...]:
  """Concatenated (ids, loss flags, document index) streams, an EOS after each document."""
  check_special_tokens(tok)
  eos = tok.token_to_id(EOS)
  flat = [(d, t, a) for d, doc in enumerate(docs) for t, a in doc]
  encs = tok.encode_batch([t for _, t, _ in flat], add_special_tokens=False)
  ids, loss, doc = [], [], []
  for (d, _, a), enc, nxt in zip(flat, encs, flat[1:] + [(-1, "", False)], strict=True):
    ids.append(np.asarray(enc.ids, np.int32))
    loss.append(np.full(len(enc.ids), a, bool))
    doc.append(np.full(len(enc.ids), d, np.int32))
    if nxt[0] != d:  # end of document
      ids.append(np.asarray([eos], np.int32))
      loss.append(np.asarray([True]))
      doc.append(np.asarray([d], np.int32))
  return np.concatenate(ids), np.concatenate(loss), np.concatenate(doc)


def pack(ids: np.ndarray, loss: np.ndarray, doc: np.ndarray, seq_len: int) -> dict:
  """Rows of seq_len + 1 tokens -> arrays [N, seq_len] (see the module docstring)."""
  row = seq_len + 1
  n = -(-len(ids) // row)
  pad = n * row - len(ids)
  ids = np.concatenate([ids, np.zeros(pad, np.int32)]).reshape(n, row)
  loss = np.concatenate([loss, np.zeros(pad, bool)]).reshape(n, row)
  doc = np.concatenate([doc, np.full(pad, -1, np.int32)]).reshape(n, row)
  # Segment ids: 1 + number of document changes so far in the row; 0 on padding.
  change = np.concatenate([np.zeros((n, 1), np.int32), (doc[:, 1:] != doc[:, :-1])], axis=1)
  seg = np.where(doc >= 0, 1 + np.cumsum(change, axis=1), 0).astype(np.int32)
  same = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
  return {
    "inputs": ids[:, :-1],
    "targets": ids[:, 1:],
    "segment_ids": seg[:, :-1],
    "loss_mask": (same & loss[:, 1:]).astype(np.int32),
  }


# ----------------------------------------------------------------------------- batches


class Batches:
  """Global batches of packed rows in a seeded order; item `step` is that step's batch.

  Args:
    rows: dict of [N, L] arrays (from `pack`).
    batch_size: global batch (sequences).
    seed: shuffle seed (a different permutation each epoch).
    shuffle: False keeps row order (evaluation).
    process_index, process_count: this process's slice of every batch.
  """

  def __init__(self, rows, batch_size, *, seed, shuffle=True, process_index=0, process_count=1):
    n = len(rows["inputs"])
    if n == 0:
      raise ValueError("the data produced no rows")
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} not divisible by {process_count} processes")
    self.rows, self.batch_size, self.num_rows = rows, batch_size, n
    self.local = batch_size // process_count
    self.lo = process_index * self.local
    ds = grain.MapDataset.range(n)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    self.order = ds.repeat(None).batch(batch_size, drop_remainder=True)
    self.step = 0
    self.seed = seed

  def __getitem__(self, step: int) -> dict:
    """This process's rows of global batch `step`: dict of [B / P, L] int32."""
    idx = np.asarray(self.order[step])[self.lo : self.lo + self.local]
    return {k: v[idx] for k, v in self.rows.items()}

  def __iter__(self):
    while True:
      batch = self[self.step]
      self.step += 1  # the state counts batches handed out
      yield batch

  def get_state(self) -> dict:
    return {"step": self.step, "seed": self.seed, "num_rows": self.num_rows}

  def set_state(self, state: dict) -> None:
    if state.get("num_rows") != self.num_rows or state.get("seed") != self.seed:
      raise ValueError(
        f"checkpointed data state {state} does not match this data (num_rows={self.num_rows}, "
        f"seed={self.seed}): the corpus, tokenizer or seq_len changed since the checkpoint"
      )
    self.step = int(state["step"])


def split_rows(rows: dict, eval_fraction: float) -> tuple[dict, dict]:
  """Last `eval_fraction` of rows (at least one when > 0) held out for evaluation."""
  n = len(rows["inputs"])
  n_eval = 0 if eval_fraction == 0 else max(1, int(n * eval_fraction))
  if n - n_eval < 1:
    raise ValueError(f"only {n} packed rows: too few to hold out {n_eval} for evaluation")
  return {k: v[: n - n_eval] for k, v in rows.items()}, {
    k: v[n - n_eval :] for k, v in rows.items()
  }
