"""Loading a model and its tokenizer for inference from any of the places one is kept.

* a training workdir: the newest readable checkpoint in `WORKDIR/checkpoints/` and
  `WORKDIR/tokenizer.json` (or the tokenizer its `config.json` names in `data.tokenizer`);
* a params checkpoint (`checkpoint.save_params`, e.g. written by `scripts/convert_hf.py`) or
  a training step directory `WORKDIR/checkpoints/<step>`: the tokenizer is looked for in the
  directory, in its `hf_files/` (where convert_hf.py copies the Hugging Face files) and, for a
  step directory, in the workdir above it;
* a Hugging Face directory (`config.json`, safetensors, `tokenizer.json`).
"""

from __future__ import annotations

import json
import os

from jax.sharding import Mesh
from tokenizers import Tokenizer

from qwen3_jax import checkpoint as ckpt
from qwen3_jax import hf
from qwen3_jax.data.tokenizer import load_tokenizer
from qwen3_jax.model import Qwen3

TOKENIZER = "tokenizer.json"


def load_model(
  workdir: str | None = None,
  checkpoint: str | None = None,
  hf_dir: str | None = None,
  mesh: Mesh | None = None,
) -> tuple[Qwen3, Tokenizer]:
  """The model and tokenizer kept in a workdir, a params checkpoint or a Hugging Face dir.

  Args:
    workdir: a training run directory (its newest readable checkpoint).
    checkpoint: a `save_params` directory or a training step directory.
    hf_dir: a Hugging Face Qwen3 / Qwen3-MoE directory (loaded in float32).
    mesh: parameters are placed with the sharding rules on this mesh; None = one device.
    Exactly one of `workdir`, `checkpoint` and `hf_dir` must be given.

  Returns:
    (model, tokenizer); the model's config is `model.cfg`.

  Raises:
    ValueError: not exactly one source, or a tokenizer larger than the model's vocabulary.
    FileNotFoundError: no checkpoint, or no tokenizer in any of the places looked at.
  """
  _one_source(workdir, checkpoint, hf_dir)
  tokenizer = load_tokenizer_for(workdir=workdir, checkpoint=checkpoint, hf_dir=hf_dir)
  if hf_dir:
    model, cfg = hf.from_pretrained(hf_dir, mesh=mesh)
  else:
    model, cfg = ckpt.load_params(workdir or checkpoint, mesh)
  if tokenizer.get_vocab_size() > cfg.vocab_size:
    raise ValueError(
      f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
      f"{cfg.vocab_size}"
    )
  return model, tokenizer


def load_tokenizer_for(
  workdir: str | None = None, checkpoint: str | None = None, hf_dir: str | None = None
) -> Tokenizer:
  """The tokenizer `load_model` would return for the same source, without the model."""
  _one_source(workdir, checkpoint, hf_dir)
  places = tokenizer_places(workdir=workdir, checkpoint=checkpoint, hf_dir=hf_dir)
  for path in places:
    if os.path.isfile(path):
      return load_tokenizer(path)
  raise FileNotFoundError(
    "no tokenizer.json found; looked at:\n  " + "\n  ".join(places) + "\n(copy the model's "
    "tokenizer.json into the checkpoint directory)"
  )


def tokenizer_places(
  workdir: str | None = None, checkpoint: str | None = None, hf_dir: str | None = None
) -> list[str]:
  """Where the tokenizer of a source is looked for, in order."""
  if hf_dir:
    return [os.path.join(os.path.abspath(hf_dir), TOKENIZER)]
  if workdir:
    return _workdir_places(os.path.abspath(workdir))
  path = os.path.abspath(checkpoint)
  places = [os.path.join(path, TOKENIZER), os.path.join(path, "hf_files", TOKENIZER)]
  parent = os.path.dirname(path)
  if os.path.basename(parent) == ckpt.CKPT_DIR:  # WORKDIR/checkpoints/<step>
    places += _workdir_places(os.path.dirname(parent))
  elif os.path.isdir(os.path.join(path, ckpt.CKPT_DIR)):  # a workdir after all
    places += _workdir_places(path)
  return places


def _workdir_places(workdir: str) -> list[str]:
  places = [os.path.join(workdir, TOKENIZER)]
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      named = json.load(f).get("data", {}).get("tokenizer", "")
  except (OSError, ValueError, AttributeError):
    named = ""
  if named:
    places.append(named if named.endswith(".json") else os.path.join(named, TOKENIZER))
  return places


def _one_source(workdir, checkpoint, hf_dir) -> None:
  given = [
    name for name, v in (("workdir", workdir), ("checkpoint", checkpoint), ("hf_dir", hf_dir)) if v
  ]
  if len(given) != 1:
    raise ValueError(f"give exactly one of workdir, checkpoint and hf_dir, got {given or 'none'}")
