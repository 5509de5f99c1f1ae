"""Training inputs: the tokenizer (trained here when none is given), packed train / eval
batches, and their placement on the mesh.

`build_data(cfg, workdir)` reads the documents, loads or trains the tokenizer (saved as
`WORKDIR/tokenizer.json`, so a resumed run tokenizes the same way), packs whole documents into
rows of `seq_len + 1` tokens and splits off the held-out rows. Every process of a
multi-process run calls it and gets its own slice of every global batch; `to_global` turns
those process-local numpy rows into global arrays sharded over the batch axes.
"""

from __future__ import annotations

import os
import time

import jax

from qwen3_jax import checkpoint as ckpt
from qwen3_jax.data import pipeline
from qwen3_jax.data.tokenizer import load_tokenizer, train_tokenizer
from qwen3_jax.model import global_tokens
from qwen3_jax.train.config import TrainConfig
from qwen3_jax.train.step import Program


def build_data(cfg: TrainConfig, workdir: str, printer=print):
  """(tokenizer, train Batches, eval Batches or None, PackStats).

  A tokenizer trained here is saved in workdir. Documents are packed whole (`pipeline.pack`);
  how many were dropped or split and the packing efficiency are printed here and written to
  the metrics by the loop.
  """
  dcfg = cfg.data
  docs = pipeline.read_documents(dcfg, cfg.seed)
  saved = os.path.join(workdir, "tokenizer.json")
  exists = os.path.exists(saved)
  ckpt.sync_processes("tokenizer_check")  # every process looked before process 0 may write it
  if dcfg.tokenizer:
    tok = load_tokenizer(dcfg.tokenizer)
  elif exists:
    tok = load_tokenizer(saved)
  else:
    if jax.process_index() == 0:
      t0 = time.time()
      tok = train_tokenizer((t for d in docs for t, _ in d), dcfg.vocab_size)
      tok.save(saved + ".tmp")
      os.replace(saved + ".tmp", saved)
      printer(f"trained a {tok.get_vocab_size()}-token BPE in {time.time() - t0:.1f}s -> {saved}")
    ckpt.sync_processes("tokenizer")
    tok = load_tokenizer(saved)
  if tok.get_vocab_size() > cfg.model.vocab_size:
    raise ValueError(
      f"tokenizer has {tok.get_vocab_size()} tokens but model.vocab_size={cfg.model.vocab_size}"
    )
  ids, loss, doc = pipeline.tokenize(docs, tok)
  max_docs = dcfg.max_docs_per_row
  model_cap = cfg.model.attention.max_docs_per_row if global_tokens.global_every(cfg.model) else 0
  if model_cap and not 0 < max_docs <= model_cap:
    max_docs = model_cap  # the model's global-token slots per row bound its documents per row
  rows, stats = pipeline.pack(
    ids,
    loss,
    doc,
    cfg.seq_len,
    split_long=dcfg.loss_on == "all",
    max_docs_per_row=max_docs,
  )
  train_rows, eval_rows = pipeline.split_rows(rows, dcfg.eval_fraction)
  kw = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train = pipeline.Batches(train_rows, cfg.batch_size, seed=cfg.seed, **kw)
  evals = None
  if cfg.eval_every and len(eval_rows["inputs"]) >= cfg.batch_size:
    evals = pipeline.Batches(eval_rows, cfg.batch_size, seed=0, shuffle=False, **kw)
  printer(
    f"data: {len(ids):,} tokens in {stats.documents:,} documents -> {train.num_rows:,} train "
    f"rows, {len(eval_rows['inputs'])} eval rows of {cfg.seq_len} tokens; packing efficiency "
    f"{stats.efficiency:.1%}"
  )
  if stats.dropped:
    printer(
      f"WARNING: dropped {stats.dropped:,} of {stats.documents:,} documents longer than a row "
      f"(seq_len + 1 = {cfg.seq_len + 1} tokens): loss_on=assistant never splits a conversation"
    )
  if stats.split:
    printer(f"data: split {stats.split:,} documents longer than a row across rows")
  return tok, train, evals, stats


def to_global(local: dict, prog: Program) -> dict:
  """Process-local numpy rows {name: [B / processes, ...]} -> global jax arrays [B, ...]
  sharded over the batch axes."""
  b = prog.cfg.batch_size
  return {
    k: jax.make_array_from_process_local_data(prog.batch_sharding, v, (b,) + v.shape[1:])
    for k, v in local.items()
  }
