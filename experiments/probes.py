"""Routing probes of a trained MoE: experts per token by token type and by task difficulty,
expert-load spread, dropped fraction under the capacity strategy, and specialisation.

Probe sets (held out from training, one document type each; a token's type is the type of its
document): `code` (Python stdlib files past the ones the corpus embeds), `chat` (held-out
reasoning-task transcripts other than arithmetic), `arith_easy` / `arith_hard` (held-out
arithmetic transcripts at difficulty 1 / 4: digits, operators and their worked steps).

The trained parameters run in a copy of the model whose MoE uses the `capacity` strategy
(factor from the config, 1.25 by default): routing and its statistics are those of training,
and the dropped fraction is what that strategy would drop on these batches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qwen3_jax.config import ModelConfig
from qwen3_jax.data import chat, pipeline, tasks
from qwen3_jax.data.corpus import stdlib_documents
from qwen3_jax.model import Qwen3
from qwen3_jax.train.config import TrainConfig

TYPES = {"code": ("code",), "chat": ("chat",), "arith": ("arith_easy", "arith_hard")}


def _transcripts(families, n, level) -> list[str]:
  per = -(-n // len(families))
  out = []
  for fam in families:
    split = tasks.make_split(fam, "heldout", per, level, seed=0, unique=False)
    out += [chat.render(tasks.messages(t)) for t in split]
  return out[:n]


def probe_sets(cfg: TrainConfig, tok, rows: int) -> dict[str, dict[str, np.ndarray]]:
  """{set name: packed rows (inputs, targets, segment_ids, loss_mask) [rows, seq_len]}."""
  seen = len(stdlib_documents(cfg.data.max_corpus_bytes))
  code = stdlib_documents(cfg.data.max_corpus_bytes + 200 * rows * cfg.seq_len)[seen:]
  others = tuple(f for f in tasks.reasoning_families if f != "arithmetic")
  n = 2 * rows  # transcripts are a few hundred tokens: enough to fill `rows` rows
  docs = {
    "code": code,
    "chat": _transcripts(others, 4 * n, tasks.LEVELS),
    "arith_easy": _transcripts(("arithmetic",), 4 * n, 1),
    "arith_hard": _transcripts(("arithmetic",), 4 * n, 4),
  }
  out = {}
  for name, texts in docs.items():
    ids, loss, doc = pipeline.tokenize([[(t, True)] for t in texts], tok)
    packed, _ = pipeline.pack(
      ids, loss, doc, cfg.seq_len, max_docs_per_row=cfg.data.max_docs_per_row
    )
    if len(packed["inputs"]) < rows:
      raise ValueError(f"probe set {name!r} filled {len(packed['inputs'])} rows, need {rows}")
    out[name] = {k: v[:rows] for k, v in packed.items()}
  return out


def _model_fn(mcfg: ModelConfig):
  cap = dataclasses.replace(mcfg, moe=dataclasses.replace(mcfg.moe, strategy="capacity"))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen3(cap, rngs=nnx.Rngs(0))))

  @jax.jit
  def run(params, batch):
    out = nnx.merge(graphdef, params)(batch["inputs"], segment_ids=batch["segment_ids"])
    w = batch["loss_mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(
      out.logits[..., : mcfg.vocab_size], batch["targets"]
    )
    return (ce * w).sum() / jnp.maximum(w.sum(), 1.0), out.aux

  return run


def load_cv(counts: np.ndarray) -> float:
  """Coefficient of variation (std / mean) of the slots per expert, averaged over layers.
  counts: [n_moe, E]."""
  counts = np.asarray(counts, np.float64)
  return float(np.mean(counts.std(-1) / np.maximum(counts.mean(-1), 1e-12)))


def mutual_information(counts: np.ndarray) -> float:
  """I(type; expert) in nats from slot counts [types, n_moe, E], averaged over layers."""
  c = np.asarray(counts, np.float64).transpose(1, 0, 2)  # [n_moe, types, E]
  p = c / np.maximum(c.sum((1, 2), keepdims=True), 1e-12)
  pt, pe = p.sum(2, keepdims=True), p.sum(1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * np.log(p / (pt * pe)), 0.0)
  return float(terms.sum((1, 2)).mean())


def probe(mcfg: ModelConfig, params, sets: dict, batch_size: int) -> dict:
  """Routing metrics of trained `params` on the probe sets (see the module docstring).

  Returns (floats unless noted): ce_<set>, experts_<set> (mean experts per token, averaged
  over MoE layers), experts_by_layer_<set> (list), and over all sets: load_cv, dropped_fraction,
  mi_type_expert (I(type; expert) with types code / chat / arithmetic).
  """
  run = _model_fn(mcfg)
  params = jax.device_get(params)
  out, counts, dropped = {}, {}, []
  for name, rows in sets.items():
    ce, agg = [], []
    for i in range(0, len(rows["inputs"]) - batch_size + 1, batch_size):
      batch = {k: jnp.asarray(v[i : i + batch_size]) for k, v in rows.items()}
      c, aux = jax.device_get(run(params, batch))
      n_tok = float((rows["segment_ids"][i : i + batch_size] > 0).sum())
      ce.append(float(c))
      agg.append((np.asarray(aux["tokens_per_expert"]), n_tok, float(aux["dropped_fraction"])))
    out[f"ce_{name}"] = float(np.mean(ce))
    counts[name] = sum(a[0] for a in agg)
    n_tok = sum(a[1] for a in agg)
    per_layer = counts[name].sum(-1) / n_tok
    out[f"experts_{name}"] = float(per_layer.mean())
    out[f"experts_by_layer_{name}"] = per_layer.tolist()
    dropped += [a[2] for a in agg]
  out["load_cv"] = load_cv(sum(counts.values()))
  out["dropped_fraction"] = float(np.mean(dropped))
  by_type = [sum(counts[s] for s in members) for members in TYPES.values()]
  out["mi_type_expert"] = mutual_information(np.stack(by_type))
  return out
