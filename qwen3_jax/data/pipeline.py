"""Tokenise -> pack whole documents into fixed-length rows -> shuffle (seeded) -> shard.

Packing (`pack`): every document (ending in `<|endoftext|>`) goes into ONE row of L + 1 tokens,
so no row starts inside a document and every assistant turn has its prompt in the same row.
Rows are filled best-fit decreasing (documents longest first, each into the open row whose
free space fits it most tightly; ties by corpus order, so the result is deterministic), with
at most `max_docs_per_row` documents per row when that is > 0, and padding at the end of rows.
A document longer than a row:
  * loss_on="all" (pretraining): is cut into pieces of L + 1 tokens that overlap by one token
    (piece k = tokens [kL, kL + L + 1)), so every next-token pair is trained once; full pieces
    fill rows of their own and the tail is packed like a document; positions restart at 0
    in each piece.
  * loss_on="assistant" (SFT): is dropped (a conversation is never trained without its
    prompt) and counted in `PackStats.dropped`; it is an error when every document is.
Rows are ordered by the first (in corpus order) document they hold, so the evaluation rows
split off the end hold the corpus' last documents. `PackStats.efficiency` is the fraction of
input positions that hold a document token (1 - padding).

A batch holds, all [B, L] int32:
  inputs = row[:-1], targets = row[1:], segment_ids = seg[:-1] (documents numbered 1, 2, ...
  inside each row, 0 = padding; positions restart at each, see `Qwen3.__call__`),
  loss_mask = 1 where the target is in the same document and marked trainable (all tokens
  for plain text; only assistant turns for chat data with `loss_on="assistant"`; a chat record
  with `"loss_on": "last"` trains its final assistant turn only, not the earlier turns it
  carries as history).

Order: `grain.MapDataset` over the row indices, shuffled with the seed (a new permutation
every epoch), batched by the *global* batch size. The batch of step s is item s, so the
pipeline's whole state is the next step number: saved with every checkpoint, resume is exact.
Each process materialises only its own slice of rows [p*B/P, (p+1)*B/P) of that batch.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import os

import grain
import numpy as np
from tokenizers import Tokenizer

from qwen3_jax.data import chat
from qwen3_jax.data.corpus import embedded_corpus
from qwen3_jax.data.tokenizer import EOS, check_special_tokens

LOSS_ON = ("all", "assistant")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where text comes from and how it becomes batches."""

  sources: tuple[str, ...] = ()  # .txt / .jsonl files; empty = the embedded corpus.
  tokenizer: str = ""  # tokenizer.json path or dir; "" = train one on the data (saved in workdir).
  vocab_size: int = 512  # Size of a tokenizer trained here (ignored when one is given).
  max_corpus_bytes: int = 2_000_000  # Embedded corpus: stdlib source bytes to use.
  num_tasks: int = 4000  # Embedded corpus: generated task transcripts (gold replies).
  task_families: tuple[str, ...] = ()  # Embedded corpus: their families; () = reasoning ones.
  text_key: str = "text"  # JSONL: field with plain text (or "messages" with a chat list).
  loss_on: str = "all"  # all | assistant: which target tokens count in the loss.
  eval_fraction: float = 0.02  # Rows held out for evaluation.
  # Most documents packed into one row (0 = no cap). Training lowers it to the model's
  # attention.max_docs_per_row when the model has global tokens (their slots per row are
  # bounded by it); a lower cap costs packing efficiency.
  max_docs_per_row: int = 0

  def __post_init__(self):
    if self.loss_on not in LOSS_ON:
      raise ValueError(f"data.loss_on={self.loss_on!r} is not one of {LOSS_ON}")
    if not 0.0 <= self.eval_fraction < 0.5:
      raise ValueError(f"data.eval_fraction must be in [0, 0.5), got {self.eval_fraction}")
    if self.max_docs_per_row < 0:
      raise ValueError(
        f"data.max_docs_per_row must be >= 0 (0 = no cap), got {self.max_docs_per_row}"
      )


# ----------------------------------------------------------------------------- documents


def read_documents(cfg: DataConfig, seed: int = 0) -> list[list[tuple[str, bool]]]:
  """Documents as lists of `(text, trainable)` pieces."""
  if not cfg.sources:
    return [
      [(t, True)]
      for t in embedded_corpus(cfg.max_corpus_bytes, cfg.num_tasks, seed, cfg.task_families)
    ]
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
        try:
          pieces = chat.pieces(rec["messages"], rec.get("tools"))
        except ValueError as e:
          raise ValueError(f"{path}:{n}: bad chat record ({e})") from None
        if rec.get("loss_on") == "last":  # only the final assistant turn (not its history)
          last = max((i for i, (_, a) in enumerate(pieces) if a), default=-1)
          pieces = [(t, a and i == last) for i, (t, a) in enumerate(pieces)]
        elif rec.get("loss_on") not in (None, "all"):
          raise ValueError(
            f"{path}:{n}: record loss_on must be 'last' or 'all', got {rec['loss_on']!r}"
          )
        docs.append([(t, a or cfg.loss_on == "all") for t, a in pieces])
      elif cfg.text_key in rec:
        docs.append([(str(rec[cfg.text_key]), True)])
      else:
        raise ValueError(f"{path}:{n}: record has neither 'messages' nor '{cfg.text_key}'")
  return docs


# ----------------------------------------------------------------------------- packing


def tokenize(docs: list[list[tuple[str, bool]]], tok: Tokenizer) -> tuple[np.ndarray, ...]:
  """Concatenated (ids, loss flags, document index) streams, an EOS after each document.

  Each document is tokenized whole (`chat.encode_pieces`), so a chat trains on the very ids
  inference will see for the same text; its pieces' flags are laid on those tokens.
  """
  check_special_tokens(tok)
  eos = tok.token_to_id(EOS)
  ids, loss, doc = [], [], []
  for d, (d_ids, d_loss) in enumerate(chat.encode_pieces(tok, docs)):
    ids.append(np.asarray(d_ids + [eos], np.int32))
    loss.append(np.asarray(d_loss + [True], bool))
    doc.append(np.full(len(d_ids) + 1, d, np.int32))
  return np.concatenate(ids), np.concatenate(loss), np.concatenate(doc)


@dataclasses.dataclass(frozen=True)
class PackStats:
  """What `pack` did; logged when training starts and written to the metrics (prefix data/)."""

  documents: int  # Documents given.
  dropped: int  # Longer than a row and dropped (loss_on="assistant").
  split: int  # Longer than a row and cut into overlapping pieces (loss_on="all").
  rows: int  # Rows produced.
  efficiency: float  # Fraction of the [rows, L] input positions that hold a document token.

  def metrics(self) -> dict[str, float]:
    return {
      "documents": self.documents,
      "dropped_documents": self.dropped,
      "split_documents": self.split,
      "rows": self.rows,
      "packing_efficiency": self.efficiency,
    }


def pack(
  ids: np.ndarray,
  loss: np.ndarray,
  doc: np.ndarray,
  seq_len: int,
  *,
  split_long: bool = True,
  max_docs_per_row: int = 0,
) -> tuple[dict, PackStats]:
  """Whole documents into rows of seq_len + 1 tokens (see the module docstring).

  Args:
    ids, loss, doc: the streams from `tokenize` (each document a contiguous run of `doc`).
    seq_len: L; a row holds L + 1 tokens (inputs are its first L, targets its last L).
    split_long: True (loss_on="all") cuts documents longer than a row into overlapping
      pieces; False (loss_on="assistant") drops them.
    max_docs_per_row: most documents (or pieces) per row; 0 = no cap.

  Returns:
    (rows, stats): rows = dict of [N, L] int32 arrays inputs, targets, segment_ids, loss_mask.
  """
  if seq_len < 1 or max_docs_per_row < 0:
    raise ValueError(
      f"pack needs seq_len >= 1, max_docs_per_row >= 0; got {seq_len}, {max_docs_per_row}"
    )
  row = seq_len + 1
  starts = np.flatnonzero(np.diff(doc, prepend=doc[:1] - 1))  # first token of each document
  lens = np.diff(starts, append=len(doc))
  long = lens > row
  if not split_long and long.all():
    raise ValueError(
      f"all {len(lens)} documents are longer than a row of seq_len + 1 = {row} tokens (the "
      f"shortest has {lens.min()}); raise seq_len, or use loss_on=all to split them"
    )
  # Pieces [P] in corpus order: whole documents, or overlapping cuts of long ones.
  p_start, p_len = [], []
  for s0, n, is_long in zip(starts.tolist(), lens.tolist(), long.tolist(), strict=True):
    if not is_long:
      p_start.append(s0)
      p_len.append(n)
    elif split_long:
      for off in range(0, n - 1, seq_len):
        p_start.append(s0 + off)
        p_len.append(min(row, n - off))
        if off + row >= n:
          break
  p_start, p_len = np.asarray(p_start, np.int64), np.asarray(p_len, np.int64)
  row_of = _best_fit_decreasing(p_len, row, max_docs_per_row)  # [P]
  # Rows in order of their first piece; pieces inside a row in corpus order.
  first = np.full(row_of.max() + 1, len(p_len), np.int64)
  np.minimum.at(first, row_of, np.arange(len(p_len)))
  row_of = np.argsort(np.argsort(first, kind="stable"), kind="stable")[row_of]
  order = np.lexsort((np.arange(len(p_len)), row_of))
  r, n, src0 = row_of[order], p_len[order], p_start[order]
  new_row = np.r_[True, r[1:] != r[:-1]]
  head = np.maximum.accumulate(np.where(new_row, np.arange(len(r)), 0))  # row's first piece
  rank = np.arange(len(r)) - head  # piece number inside its row: segment id - 1
  excl = np.cumsum(n) - n  # tokens before each piece, over all rows
  row_base = excl[head]
  within = np.arange(n.sum()) - np.repeat(excl, n)  # token offset inside its piece
  dst = np.repeat(r * row + excl - row_base, n) + within
  src = np.repeat(src0, n) + within
  num_rows = int(r.max()) + 1
  out_ids = np.zeros(num_rows * row, np.int32)
  out_loss = np.zeros(num_rows * row, bool)
  seg = np.zeros(num_rows * row, np.int32)
  out_ids[dst], out_loss[dst], seg[dst] = ids[src], loss[src], np.repeat(rank + 1, n)
  out_ids, out_loss, seg = (a.reshape(num_rows, row) for a in (out_ids, out_loss, seg))
  same = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
  rows = {
    "inputs": out_ids[:, :-1],
    "targets": out_ids[:, 1:],
    "segment_ids": seg[:, :-1],
    "loss_mask": (same & out_loss[:, 1:]).astype(np.int32),
  }
  stats = PackStats(
    documents=len(lens),
    dropped=0 if split_long else int(long.sum()),
    split=int(long.sum()) if split_long else 0,
    rows=num_rows,
    efficiency=float((seg[:, :-1] > 0).mean()),
  )
  return rows, stats


def _best_fit_decreasing(lengths: np.ndarray, capacity: int, max_items: int) -> np.ndarray:
  """Bin of each item [P]: longest first, each into the open bin it fills most tightly.

  Open bins are kept by free space (a sorted list of the distinct free sizes, and per size
  the bins in the order they got it), so each item costs one bisect: O(P log capacity).
  """
  order = np.argsort(-lengths, kind="stable")
  bin_of = np.empty(len(lengths), np.int64)
  used, count = [], []
  free_sizes: list[int] = []  # sorted distinct free space of the open bins
  by_free: dict[int, collections.deque[int]] = {}
  for i in order.tolist():
    n = int(lengths[i])
    j = bisect.bisect_left(free_sizes, n)
    if j < len(free_sizes):
      bins = by_free[free_sizes[j]]
      b = bins.popleft()
      if not bins:
        del by_free[free_sizes.pop(j)]
    else:
      b = len(used)
      used.append(0)
      count.append(0)
    used[b] += n
    count[b] += 1
    bin_of[i] = b
    left = capacity - used[b]
    if left > 0 and (max_items == 0 or count[b] < max_items):
      if left not in by_free:
        bisect.insort(free_sizes, left)
        by_free[left] = collections.deque()
      by_free[left].append(b)
  return bin_of


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
        f"seed={self.seed}): the corpus, tokenizer, seq_len or packing changed since the checkpoint"
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
