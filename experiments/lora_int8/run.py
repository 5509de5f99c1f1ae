r"""LoRA vs full fine-tuning and int8 / int4 inference, measured on the task families.

  nice -n 10 python -m experiments.lora_int8.run --base=runs/pt --out=experiments/results/lora_int8

What it does (every number in the written tables comes from this run):
1. Data: gold chain-of-thought transcripts of the reasoning families (arithmetic, countdown,
   reverse_words, parity): `--train_per_family` train-split chats, `--heldout_per_family`
   held-out-split chats (prompts disjoint by hash, `qwen3_jax.data.tasks`).
2. SFT from the `--base` checkpoint (`configs/lora_sft.py`: loss on assistant turns, equal
   steps) for each arm (full fine-tuning, LoRA q/v, LoRA q/k/v/o) and seed: held-out CE of the
   assistant tokens and greedy accuracy per family (verifier reward, `--acc_per_family`
   held-out prompts) of the final (LoRA: merged) model.
3. Inference variants of the seed-0 full-FT and LoRA-q/v models: float32, bfloat16 (params and
   compute), int8 and int4 weight-only: parameter bytes, held-out CE, accuracy, decode
   tokens/s (engine, greedy, batch `--decode_batch`, `--decode_tokens` new tokens).
4. Trainable fractions and optimizer-state bytes (AdamW: 2 float32 values per trainable
   parameter), from abstract shapes, for the presets and Qwen3-30B-A3B / 235B-A22B.
Writes results.json and tables.md under --out.
"""

from __future__ import annotations

import glob
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from configs import common, lora_sft
from qwen3_jax import adapters, checkpoint
from qwen3_jax import config as C
from qwen3_jax.data import chat, pipeline, tasks
from qwen3_jax.data.tokenizer import load_tokenizer
from qwen3_jax.infer.engine import Engine, Request
from qwen3_jax.infer.sampling import SamplingParams
from qwen3_jax.model import Qwen3, lora, quant
from qwen3_jax.train.loop import train

FLAGS = flags.FLAGS
flags.DEFINE_string("base", None, "Base model: a training workdir or params checkpoint.")
flags.DEFINE_string("tokenizer", "", "tokenizer.json ('' = the one in --base).")
flags.DEFINE_string("out", "experiments/results/lora_int8", "Output directory.")
flags.DEFINE_string("work", "/tmp/lora_int8", "Scratch directory for the runs.")
flags.DEFINE_integer("steps", 200, "SFT steps per run (equal for every arm).")
flags.DEFINE_integer("seeds", 3, "Seeds per arm.")
flags.DEFINE_integer("train_per_family", 400, "Train chats per family.")
flags.DEFINE_integer("heldout_per_family", 64, "Held-out chats per family (CE).")
flags.DEFINE_integer("acc_per_family", 32, "Held-out prompts per family (accuracy).")
flags.DEFINE_integer("max_new_tokens", 160, "Generation length for accuracy.")
flags.DEFINE_integer("decode_batch", 8, "Rows for the decode-speed measurement.")
flags.DEFINE_integer("decode_tokens", 64, "New tokens for the decode-speed measurement.")
flags.DEFINE_list(
  "arms", ["full", "lora_qv"], "SFT arms (keys of ARMS); none: the base's inference variants."
)
flags.DEFINE_integer("batch_size", 8, "SFT batch (sequences of SEQ_LEN tokens).")
flags.DEFINE_bool("tables_only", False, "Only rewrite tables.md from the results in --out.")
flags.DEFINE_string(
  "speed_preset", "", "Only the decode-speed table, on a randomly initialised model of this preset."
)

FAMILIES = tasks.reasoning_families
ARMS = {"full": (0, ""), "lora_qv": (8, "qv"), "lora_qkvo": (8, "qkvo")}
GREEDY = SamplingParams(temperature=0.0)
SEQ_LEN = 256  # rows of SFT and held-out evaluation: every gold transcript fits whole


def write_data(work: str) -> tuple[str, str]:
  """train.jsonl / heldout.jsonl of gold transcripts."""
  paths = []
  for split, n in (("train", FLAGS.train_per_family), ("heldout", FLAGS.heldout_per_family)):
    path = os.path.join(work, f"{split}.jsonl")
    with open(path, "w") as f:
      for fam in FAMILIES:
        for t in tasks.make_split(fam, split, n, seed=0):
          f.write(json.dumps({"messages": tasks.messages(t)}) + "\n")
    paths.append(path)
  return paths[0], paths[1]


def heldout_rows(path: str, tok, seq_len: int) -> dict:
  dcfg = pipeline.DataConfig(sources=(path,), loss_on="assistant")
  ids, loss, doc = pipeline.tokenize(pipeline.read_documents(dcfg, 0), tok)
  rows, _ = pipeline.pack(ids, loss, doc, seq_len, split_long=False, max_docs_per_row=0)
  return rows


def heldout_ce(model, rows: dict, batch: int = 16) -> float:
  """Mean CE per assistant token of the held-out chats."""

  @nnx.jit
  def sums(m, x, y, seg, w):
    logp = jax.nn.log_softmax(m(x, segment_ids=seg).logits.astype(jnp.float32))
    ce = -jnp.take_along_axis(logp, y[..., None], -1)[..., 0]
    return (ce * w).sum(), w.sum()

  tot = n = 0.0
  for i in range(0, len(rows["inputs"]), batch):  # the last batch may be shorter
    s, c = sums(model, *(jnp.asarray(rows[k][i : i + batch]) for k in pipeline_keys()))
    tot, n = tot + float(s), n + float(c)
  return tot / n


def pipeline_keys():
  return ("inputs", "targets", "segment_ids", "loss_mask")


def accuracy(model, tok) -> dict:
  """Greedy accuracy (mean verifier reward) per family on held-out prompts."""
  items = [
    (fam, t)
    for fam in FAMILIES
    for t in tasks.make_split(fam, "heldout", FLAGS.acc_per_family, seed=1)
  ]
  reqs = [
    Request(
      chat.render(tasks.messages(t, with_gold=False), add_generation_prompt=True),
      sampling=GREEDY,
      max_new_tokens=FLAGS.max_new_tokens,
    )
    for _, t in items
  ]
  outs = Engine(model, tok, prefill_chunk=64).generate(reqs, batch_size=32)
  scores = {fam: [] for fam in FAMILIES}
  for (fam, t), [c] in zip(items, outs, strict=True):
    scores[fam].append(tasks.reward(t, c.text))
  acc = {fam: float(np.mean(v)) for fam, v in scores.items()}
  acc["mean"] = float(np.mean(list(acc.values())))
  return acc


def decode_speed(model, tok) -> float:
  """Generated tokens per second (engine, greedy, eos off), the second of two runs."""
  eng = Engine(model, tok, prefill_chunk=64)
  eng.eos_ids = ()
  reqs = [
    Request([10 + i, 20 + i, 30 + i], sampling=GREEDY, max_new_tokens=FLAGS.decode_tokens)
    for i in range(FLAGS.decode_batch)
  ]
  eng.generate(reqs)
  t = time.perf_counter()
  eng.generate(reqs)
  return FLAGS.decode_batch * FLAGS.decode_tokens / (time.perf_counter() - t)


def sft(arm: str, seed: int, base_cfg, train_path: str, tok_path: str) -> tuple[nnx.Module, dict]:
  """One SFT run; returns the final model (LoRA: merged) and its summary numbers."""
  rank, targets = ARMS[arm]
  cd = lora_sft.get_config(f"steps={FLAGS.steps},rank={rank},targets={targets or 'qv'}")
  cd.model = common.ml_collections.ConfigDict(C.to_dict(base_cfg))
  cd.model.lora = common.lora_config(rank, targets or "qv")
  cd.seq_len = SEQ_LEN
  cd.batch_size = FLAGS.batch_size
  cd.init_from = os.path.abspath(FLAGS.base)
  cd.data.sources = train_path
  cd.data.tokenizer = tok_path
  cd.seed = seed
  cd.eval_every = 0
  cd.log_every = 50
  cfg = common.to_train_config(cd)
  workdir = os.path.join(FLAGS.work, f"{arm}_s{seed}")
  t = time.time()
  summary = train(cfg, workdir, printer=lambda s: None)
  wall = time.time() - t
  graphdef, abs_state, _ = checkpoint.abstract_model(cfg.model, None)
  model = checkpoint.merge_params(graphdef, abs_state, jax.device_get(summary["state"].params))
  n_lora, n_all = lora.count(nnx.state(model, nnx.Param).to_pure_dict())
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(summary["state"].opt_state))
  if cfg.model.lora is not None:
    model = adapters.merged(model)
  info = dict(
    final_loss=summary["final_loss"],
    wall_s=round(wall, 1),
    trainable=n_lora or n_all,
    params=n_all,
    opt_state_bytes=opt_bytes,
  )
  return model, info


def variants(model) -> dict:
  """float32 / bfloat16 / int8 / int4 versions of a float32 model."""
  cfg = model.cfg
  bf = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  g, s, _ = checkpoint.abstract_model(bf, None)
  params = jax.tree.map(
    lambda a: a.astype(jnp.bfloat16), nnx.state(model, nnx.Param).to_pure_dict()
  )
  return {
    "float32": model,
    "bfloat16": checkpoint.merge_params(g, s, params),
    "int8": quant.quantized(model, C.QuantConfig(bits=8)),
    "int4": quant.quantized(model, C.QuantConfig(bits=4)),
  }


def trainable_table() -> list[dict]:
  """Trainable fraction and AdamW state bytes per preset, rule set and rank (abstract)."""
  rows = []
  for preset in ("tiny", "small", "qwen3_30b_a3b", "qwen3_235b_a22b"):
    base = C.preset(preset)
    total = sum(
      math.prod(x.shape)
      for x in jax.tree.leaves(nnx.eval_shape(lambda b=base: Qwen3(b, rngs=nnx.Rngs(0))))
    )
    for targets in ("qv", "qkvo"):
      for rank in (8, 64):
        lcd = common.lora_config(rank, targets)
        cfg = base.replace(lora=C.LoraConfig(**lcd.to_dict()))
        abs_model = nnx.eval_shape(lambda c=cfg: Qwen3(c, rngs=nnx.Rngs(0)))
        n_lora = sum(
          math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abs_model, nnx.LoRAParam))
        )
        rows.append(
          dict(
            preset=preset,
            targets=targets,
            rank=rank,
            trainable=n_lora,
            base_params=total,
            fraction=n_lora / total,
            adamw_bytes_lora=8 * n_lora,
            adamw_bytes_full=8 * total,
          )
        )
  return rows


def speed_only(preset: str) -> None:
  """Decode tokens/s of float32 / bfloat16 / int8 / int4 variants of a random `preset`
  model (the speed does not depend on the weights' values)."""
  from qwen3_jax.data.tokenizer import train_tokenizer

  tok = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 64], 400)
  model = Qwen3(C.preset(preset), rngs=nnx.Rngs(0))
  rows = []
  for name, m in variants(model).items():
    row = dict(preset=preset, variant=name, param_bytes=quant.param_bytes(m))
    row["decode_tokens_per_s"] = decode_speed(m, tok)
    print(json.dumps(row), flush=True)
    rows.append(row)
  with open(os.path.join(FLAGS.out, f"speed_{preset}.json"), "w") as f:
    json.dump(
      {
        "flags": {"decode_batch": FLAGS.decode_batch, "decode_tokens": FLAGS.decode_tokens},
        "rows": rows,
      },
      f,
      indent=1,
    )


def main(_):
  os.makedirs(FLAGS.out, exist_ok=True)
  if FLAGS.speed_preset:
    return speed_only(FLAGS.speed_preset)
  if FLAGS.tables_only:  # rewrite tables.md from results.json (+ speed_*.json)
    with open(os.path.join(FLAGS.out, "results.json")) as f:
      results = json.load(f)
    with open(os.path.join(FLAGS.out, "tables.md"), "w") as f:
      f.write(tables(results))
    return None
  if not FLAGS.base:
    raise app.UsageError("--base (the model to fine-tune) is required")
  os.makedirs(FLAGS.work, exist_ok=True)
  results = {
    "flags": {
      k: FLAGS[k].value
      for k in (
        "base",
        "steps",
        "seeds",
        "train_per_family",
        "heldout_per_family",
        "acc_per_family",
        "max_new_tokens",
        "decode_batch",
        "decode_tokens",
        "arms",
        "batch_size",
      )
    }
  }
  results["trainable"] = trainable_table()
  train_path, heldout_path = write_data(FLAGS.work)
  tok_path = FLAGS.tokenizer or os.path.join(os.path.abspath(FLAGS.base), "tokenizer.json")
  tok = load_tokenizer(tok_path)
  base, _ = checkpoint.load_params(FLAGS.base)
  rows = heldout_rows(heldout_path, tok, SEQ_LEN)
  results["base"] = {"heldout_ce": heldout_ce(base, rows), "accuracy": accuracy(base, tok)}
  print("base", results["base"], flush=True)
  runs, keep = [], {}
  for arm in FLAGS.arms:
    for seed in range(FLAGS.seeds):
      model, info = sft(arm, seed, base.cfg, train_path, tok_path)
      info.update(
        arm=arm, seed=seed, heldout_ce=heldout_ce(model, rows), accuracy=accuracy(model, tok)
      )
      print(json.dumps(info), flush=True)
      runs.append(info)
      if seed == 0 and arm in ("full", "lora_qv"):
        keep[arm] = model
  results["runs"] = runs
  if not FLAGS.arms:  # --arms= : the inference variants of the base itself (e.g. stage 4)
    keep["base"] = base
  results["infer"] = []
  for arm, model in keep.items():
    for name, m in variants(model).items():
      row = dict(
        arm=arm,
        variant=name,
        param_bytes=quant.param_bytes(m),
        heldout_ce=heldout_ce(m, rows),
        accuracy=accuracy(m, tok),
        decode_tokens_per_s=decode_speed(m, tok),
      )
      print(json.dumps(row), flush=True)
      results["infer"].append(row)
  with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(FLAGS.out, "tables.md"), "w") as f:
    f.write(tables(results))
  print(tables(results))


def _ms(xs) -> str:
  return f"{statistics.mean(xs):.4f} +- {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def tables(r: dict) -> str:
  out = [
    "## Trainable parameters and AdamW state (abstract shapes)",
    "",
    "| preset | targets | rank | trainable | of all params | AdamW state LoRA | AdamW state full |",
    "|---|---|---|---|---|---|---|",
  ]
  for t in r["trainable"]:
    out.append(
      f"| {t['preset']} | {t['targets']} | {t['rank']} | {t['trainable']:,} | "
      f"{t['fraction']:.4%} | {t['adamw_bytes_lora'] / 2**20:,.2f} MiB | "
      f"{t['adamw_bytes_full'] / 2**30:,.2f} GiB |"
    )
  out += [
    "",
    f"## SFT from the base, {r['flags']['steps']} steps, {r['flags']['seeds']} seeds (mean +- std)",
    "",
    f"Base model: held-out CE {r['base']['heldout_ce']:.4f}, accuracy {r['base']['accuracy']}",
    "",
    "| arm | trainable | optimizer state (measured) | held-out CE | accuracy (mean of families) | "
    + " | ".join(FAMILIES)
    + " | wall s |",
    "|---|---|---|---|---|" + "---|" * len(FAMILIES) + "---|",
  ]
  for arm in r["flags"]["arms"]:
    rs = [x for x in r["runs"] if x["arm"] == arm]
    fams = " | ".join(_ms([x["accuracy"][f] for x in rs]) for f in FAMILIES)
    out.append(
      f"| {arm} | {rs[0]['trainable']:,} of {rs[0]['params']:,} | "
      f"{rs[0]['opt_state_bytes'] / 2**10:,.1f} KiB | {_ms([x['heldout_ce'] for x in rs])} | "
      f"{_ms([x['accuracy']['mean'] for x in rs])} | {fams} | "
      f"{statistics.mean(x['wall_s'] for x in rs):.0f} |"
    )
  out += [
    "",
    "## Inference variants (seed 0)",
    "",
    "| model | weights | param bytes | held-out CE | CE change | accuracy | relative change "
    "| decode tok/s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for row in r["infer"]:
    ref = next(x for x in r["infer"] if x["arm"] == row["arm"] and x["variant"] == "float32")
    acc, acc0 = row["accuracy"]["mean"], ref["accuracy"]["mean"]
    rel = f"{(acc - acc0) / acc0:+.1%}" if acc0 else "n/a (float32 accuracy 0)"
    out.append(
      f"| {row['arm']} | {row['variant']} | {row['param_bytes'] / 2**20:.2f} MiB | "
      f"{row['heldout_ce']:.4f} | {row['heldout_ce'] - ref['heldout_ce']:+.4f} | {acc:.3f} | "
      f"{rel} | {row['decode_tokens_per_s']:.0f} |"
    )
  for path in sorted(glob.glob(os.path.join(FLAGS.out, "speed_*.json"))):
    with open(path) as f:
      sp = json.load(f)
    out += [
      "",
      f"## Decode speed, random `{sp['rows'][0]['preset']}` model (engine, greedy, batch "
      f"{sp['flags']['decode_batch']}, {sp['flags']['decode_tokens']} new tokens)",
      "",
      "| weights | param bytes | decode tok/s |",
      "|---|---|---|",
    ]
    for row in sp["rows"]:
      out.append(
        f"| {row['variant']} | {row['param_bytes'] / 2**20:.1f} MiB | "
        f"{row['decode_tokens_per_s']:.0f} |"
      )
  return "\n".join(out) + "\n"


if __name__ == "__main__":
  app.run(main)
