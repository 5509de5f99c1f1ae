r"""Compile the real train or decode step ahead of time for a TPU pod or a simulated CPU mesh.

  python scripts/aot.py --model=qwen3_30b_a3b --topology=v5p:4x4x4 \
      --mesh=fsdp=4,expert=16 --batch=256 --seq_len=4096 [--step=decode] [--out=r.json]
  python scripts/aot.py --model=small --cpu_devices=64 --mesh=data=4,expert=16
  python scripts/aot.py --model=qwen3_235b_a22b --topology=v5p:4x4x8 --search

Nothing is allocated: per-chip memory, XLA costs, collectives, roofline and MFU on paper come
from the compiler (qwen3_jax/aot/report.py). TPU topologies need the `tpu` extra (libtpu).
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("model", "tiny", "Preset in qwen3_jax/config.py (PRESETS).")
flags.DEFINE_string("topology", "", "TPU topology, e.g. v5p:4x4x4 (needs libtpu).")
flags.DEFINE_integer("cpu_devices", 0, "Simulated CPU devices instead of a TPU topology.")
flags.DEFINE_string("mesh", "data=-1", "Mesh sizes, e.g. fsdp=4,expert=16 (others 1).")
flags.DEFINE_enum("step", "train", ["train", "decode"], "Which step to compile.")
flags.DEFINE_integer("batch", 8, "Global batch (train: sequences; decode: rows).")
flags.DEFINE_integer("seq_len", 128, "Train: tokens per sequence; decode: cache length.")
flags.DEFINE_integer("decode_steps", 1, "Decode steps per engine call.")
flags.DEFINE_integer("micro_batches", 1, "Train: gradient accumulation micro-batches.")
flags.DEFINE_string("remat", "", "none | full | dots (default: the preset's).")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (decode also stores params in it).")
flags.DEFINE_bool("probe", True, "Compile 1- and 2-period unrolled probes for per-step costs.")
flags.DEFINE_bool("search", False, "Try candidate meshes x remat policies; rank by MFU.")
flags.DEFINE_integer("max_candidates", 8, "--search: most candidates compiled.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.DEFINE_string("hlo_out", "", "Write the optimised HLO text here (i-th candidate: .i).")
flags.DEFINE_string("reread", "", "JSON,HLO of an earlier run: re-derive its per-step costs.")


def parse_mesh(text: str):
  from qwen3_jax.config import MeshConfig

  sizes = {}
  for part in filter(None, text.split(",")):
    name, _, value = part.partition("=")
    if name not in MeshConfig.AXES or not value.lstrip("-").isdigit():
      raise app.UsageError(f"--mesh: bad entry {part!r}; use e.g. fsdp=4,expert=16")
    sizes[name] = int(value)
  return MeshConfig(**sizes)


def reread(f):
  """Per-step collectives and roofline of a saved --out JSON row from its --hlo_out text."""
  from qwen3_jax.aot import chips, hlo, report

  path, hlo_path = f.reread.split(",")
  with open(path) as fh, open(hlo_path) as text:
    (row,) = json.load(fh)
    name = row["topology"].split(":")[0]
    row = report.with_costs(row, hlo.per_step(text.read()), chips.CHIPS.get(name))
  print(report.table([row]))
  print(json.dumps({k: row[k] for k in ("memory", "per_step", "roofline") if k in row}, indent=1))


def main(argv):
  del argv
  f = flags.FLAGS
  if f.reread:
    return reread(f)
  if bool(f.topology) == bool(f.cpu_devices):
    raise app.UsageError("give exactly one of --topology and --cpu_devices")
  import jax

  jax.config.update("jax_platforms", "cpu")  # TPU topologies need no TPU backend
  if f.cpu_devices:
    jax.config.update("jax_num_cpu_devices", f.cpu_devices)
  from qwen3_jax import config, sharding
  from qwen3_jax.aot import chips, report, search

  if f.topology:
    devices, chip = chips.topology_devices(f.topology), chips.chip_of(f.topology)
  else:
    devices, chip = chips.cpu_devices(f.cpu_devices), None
  model = config.preset(f.model, dtype=f.dtype)
  if f.remat:
    model = model.replace(remat=f.remat)
  if f.step == "decode":
    model = model.replace(param_dtype=f.dtype)
  if f.search:
    pairs = search.candidates(model, len(devices), f.batch, max_candidates=f.max_candidates)
  else:
    pairs = [(parse_mesh(f.mesh), model.remat)]
  rows = []
  for i, (mesh_cfg, remat) in enumerate(pairs):
    spec = report.Spec(
      model=model.replace(remat=remat),
      mesh=mesh_cfg,
      batch=f.batch,
      seq_len=f.seq_len,
      step=f.step,
      decode_steps=f.decode_steps,
      micro_batches=f.micro_batches,
    )
    mesh = sharding.make_mesh(mesh_cfg, devices)
    try:
      hlo_path = f.hlo_out and (f"{f.hlo_out}.{i}" if f.search else f.hlo_out)
      row = report.analyse(
        spec, mesh, chip, probe=f.probe, log=lambda m: print(m, flush=True), hlo_path=hlo_path
      )
    except Exception as e:  # noqa: BLE001  (a search reports failing candidates and goes on)
      if not f.search:
        raise
      print(f"candidate {mesh_cfg} remat={remat} failed: {type(e).__name__}: {e}"[:400])
      continue
    row.update(model=f.model, topology=f.topology or f"cpu:{f.cpu_devices}")
    rows.append(row)
    print(report.table([row]).splitlines()[-1], flush=True)
  if f.search:
    rows.sort(key=lambda r: (not r["fits"], -r.get("roofline", {}).get("mfu", 0.0)))
  print(f"\n{f.model} on {f.topology or f'{f.cpu_devices} CPU devices'}:")
  print(report.table(rows))
  for r in rows:
    if r["fits"] is False:
      need = r.get("compile_error") or f"{r['memory']['total'] / 2**30:.1f} GiB"
      print(f"does not fit ({need}); largest arguments per chip:")
      for b in r["largest_arguments"]:
        print(f"  {b['bytes'] / 2**30:8.2f} GiB {b['path']} {b['shape']} {b['spec']}")
  if f.out:
    with open(f.out, "w") as fh:
      json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
