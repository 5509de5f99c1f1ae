r"""Convert a Hugging Face Qwen3 / Qwen3-MoE directory to a params-only orbax checkpoint, and back.

  python scripts/convert_hf.py --hf_dir=/models/Qwen3-30B-A3B --out=/ckpt/q30b [--dtype=bfloat16]
  python scripts/convert_hf.py --to_hf --ckpt=/ckpt/q30b --out=/models/mine

The orbax side is `qwen3_jax.checkpoint.save_params` (`params/` + `config.json`), which a
training config reads with `init_from`. Files of the Hugging Face directory that are not
weights (tokenizer, generation config, the original config.json as `hf_config.json`) travel in
`<out>/hf_files/` and are written back by --to_hf, so token ids and the tokenizer survive.
"""

import json
import os
import shutil
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("hf_dir", None, "Hugging Face directory to read (HF -> orbax).")
flags.DEFINE_string("ckpt", None, "--to_hf: params dir, training step dir or workdir to read.")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_bool("to_hf", False, "Convert an orbax checkpoint back to a Hugging Face directory.")
flags.DEFINE_string("dtype", "float32", "HF -> orbax: parameter (and compute) dtype.")
flags.DEFINE_bool("shard", False, "Spread parameters over all devices (mesh fsdp axis).")
flags.mark_flags_as_required(["out"])
FILES = "hf_files"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")


def main(argv):
  del argv
  f = flags.FLAGS
  from qwen3_jax import checkpoint, hf, sharding
  from qwen3_jax.config import MeshConfig

  mesh = sharding.make_mesh(MeshConfig(fsdp=-1)) if f.shard else None
  if not f.to_hf:
    if not f.hf_dir:
      raise app.UsageError("--hf_dir is required (or pass --to_hf --ckpt=...)")
    model, cfg = hf.from_pretrained(f.hf_dir, mesh=mesh, dtype=f.dtype)
    checkpoint.save_params(f.out, model, cfg)
    os.makedirs(os.path.join(f.out, FILES), exist_ok=True)
    for name in sorted(os.listdir(f.hf_dir)):
      src = os.path.join(f.hf_dir, name)
      if os.path.isfile(src) and not name.endswith(WEIGHT_SUFFIXES) and name != hf.INDEX:
        dst = "hf_config.json" if name == "config.json" else name
        shutil.copy(src, os.path.join(f.out, FILES, dst))
    print(f"wrote {f.out}: {cfg.num_hidden_layers} layers, {cfg.num_experts} experts")
    return
  if not f.ckpt:
    raise app.UsageError("--to_hf needs --ckpt (a params dir, step dir or workdir)")
  model, cfg = checkpoint.load_params(f.ckpt, mesh)
  files = os.path.join(f.ckpt, FILES)
  extra = {}
  if os.path.exists(os.path.join(files, "hf_config.json")):
    with open(os.path.join(files, "hf_config.json")) as fh:
      original = json.load(fh)
    ours = hf.config_to_hf(cfg)
    extra = {k: v for k, v in original.items() if k not in ours}  # token ids, max positions...
  hf.save_pretrained(model, cfg, f.out, extra_config=extra)
  for name in sorted(os.listdir(files)) if os.path.isdir(files) else ():
    if name != "hf_config.json":
      shutil.copy(os.path.join(files, name), os.path.join(f.out, name))
  print(f"wrote {f.out}")


if __name__ == "__main__":
  app.run(main)
