"""One AOT study: compile a step for a mesh, then memory, XLA costs, collectives, roofline, MFU.

Every figure is per chip unless its name says otherwise.
- memory: `Compiled.memory_analysis()`: argument, output, alias (outputs written into donated
  arguments), temp and code bytes; total = argument + output - alias + temp + code, compared
  with the chip's HBM.
- XLA costs: `Compiled.cost_analysis()` counts a loop body once, so a scanned layer stack
  counts one layer group. The per-step figures come from a depth probe: the same step with
  the layers unrolled at one and at two layer periods p (`period.layer_period`) is compiled
  too; every cost is linear in depth (c(n) = c0 + n c1), so a step of N layers costs
  c(p) + (N / p - 1) (c(2p) - c(p)). Collectives (`hlo.py`) are extrapolated the same way.
- roofline: step time = max(compute, HBM, ICI) with compute = XLA FLOPs / peak, HBM = XLA
  bytes accessed / HBM bandwidth, ICI = collective wire bytes / ICI bandwidth (`chips.Chip`).
- MFU on paper = analytic model FLOPs (`flops.py`) / (step time x chips x peak).
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable

import jax
from jax.sharding import Mesh

from qwen3_jax.aot import flops, hlo
from qwen3_jax.aot.chips import Chip
from qwen3_jax.aot.programs import Lowered, lower_decode, lower_train, per_chip_buffers
from qwen3_jax.config import MeshConfig, ModelConfig
from qwen3_jax.model.period import layer_period
from qwen3_jax.train.config import TrainConfig

STEPS = ("train", "decode")
# Executed / model FLOPs of a train step without the depth probe: full remat runs the forward
# twice (8 instead of 6 FLOPs per parameter and token); dots keeps the matmul outputs.
REMAT_FLOPS = {"none": 1.0, "dots": 1.0, "full": 4.0 / 3.0}


@dataclasses.dataclass(frozen=True)
class Spec:
  """What to compile. step: "train" (batch x seq_len tokens) or "decode" (batch rows with a
  cache of seq_len tokens, `decode_steps` steps per call); micro_batches: gradient
  accumulation (train)."""

  model: ModelConfig
  mesh: MeshConfig
  batch: int
  seq_len: int
  step: str = "train"
  decode_steps: int = 1
  micro_batches: int = 1

  def __post_init__(self):
    if self.step not in STEPS:
      raise ValueError(f"step={self.step!r} is not one of {STEPS}")

  def lower(self, mesh: Mesh, model: ModelConfig | None = None) -> Lowered:
    """Lowers this spec's step on `mesh` (for `model`, default the spec's)."""
    model = self.model if model is None else model
    if self.step == "train":
      cfg = TrainConfig(
        num_steps=1000,
        batch_size=self.batch,
        seq_len=self.seq_len,
        model=model,
        mesh=self.mesh,
        micro_batches=self.micro_batches,
      )
      return lower_train(cfg, mesh)
    return lower_decode(model, mesh, self.batch, self.seq_len, self.decode_steps)

  def model_flops(self) -> float:
    if self.step == "train":
      return flops.train_flops(self.model, self.batch, self.seq_len)
    return flops.decode_flops(self.model, self.batch, self.seq_len) * self.decode_steps


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(lowered: Lowered, hlo_path: str = "") -> dict:
  """Compiles and reads memory, XLA costs and collectives (loop bodies once), with the compile's
  wall and CPU seconds."""
  t0, c0 = time.perf_counter(), time.process_time()
  compiled = lowered.lowered.compile()
  compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
  m = compiled.memory_analysis()
  memory = dict(
    argument=m.argument_size_in_bytes,
    output=m.output_size_in_bytes,
    alias=m.alias_size_in_bytes,
    temp=m.temp_size_in_bytes,
    code=m.generated_code_size_in_bytes,
  )
  memory["total"] = (
    memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["code"]
  )
  cost = compiled.cost_analysis()
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(text)
  return dict(
    compile_s=compile_s,
    compile_cpu_s=compile_cpu_s,  # all threads: the wall time on a shared host varies
    memory=memory,
    xla=dict(flops=float(cost.get("flops", 0.0)), bytes=float(cost.get("bytes accessed", 0.0))),
    collectives=hlo.collectives(text),
    per_step_hlo=hlo.per_step(text),
  )


def _probe_model(cfg: ModelConfig, layers: int) -> ModelConfig:
  return cfg.replace(
    num_hidden_layers=layers,
    scan_layers=False,
    mlp_only_layers=tuple(i for i in cfg.mlp_only_layers if i < layers),
  )


def per_step_costs(spec: Spec, mesh: Mesh, lower: Callable | None = None) -> dict:
  """XLA FLOPs, bytes and collective wire bytes of one whole step (the depth probe above)."""
  lower = lower or spec.lower
  p = layer_period(spec.model)
  one, two = (measure(lower(mesh, _probe_model(spec.model, n * p))) for n in (1, 2))
  repeats = spec.model.num_hidden_layers // p

  def extend(a: float, b: float) -> float:
    return a + (repeats - 1) * (b - a)

  coll = {
    k: {
      f: extend(one["collectives"][k][f], two["collectives"][k][f])
      for f in ("count", "bytes", "wire_bytes")
    }
    for k in hlo.KINDS
  }
  return dict(
    flops=extend(one["xla"]["flops"], two["xla"]["flops"]),
    bytes=extend(one["xla"]["bytes"], two["xla"]["bytes"]),
    collectives=coll,
    wire_bytes=sum(c["wire_bytes"] for c in coll.values()),
    per_layer_flops=(two["xla"]["flops"] - one["xla"]["flops"]) / p,
    probe_compile_s=one["compile_s"] + two["compile_s"],
  )


def roofline(costs: dict, model_flops: float, chips: int, chip: Chip) -> dict:
  """Step time bound and MFU on paper from per-step, per-chip costs; costs["bytes"] None
  leaves the HBM term out."""
  times = dict(
    compute_s=costs["flops"] / chip.peak_flops,
    hbm_s=None if costs["bytes"] is None else costs["bytes"] / chip.hbm_bw,
    ici_s=costs["wire_bytes"] / chip.ici_bw,
  )
  times = {k: v for k, v in times.items() if v is not None}
  step_s = max(times.values())
  return dict(
    **times,
    step_s=step_s,
    bound=max(times, key=times.get).removesuffix("_s"),
    mfu=model_flops / (step_s * chips * chip.peak_flops),
  )


def analyse(
  spec: Spec,
  mesh: Mesh,
  chip: Chip | None,
  probe: bool = True,
  log=lambda msg: None,
  hlo_path: str = "",
) -> dict:
  """The full study of one spec on one mesh (module docstring); a JSON-able dict. `log`
  receives a line before each compile; `hlo_path`: write the optimised HLO text there."""
  log(f"compiling the {spec.step} step on {dict(mesh.shape)}")
  lowered = spec.lower(mesh)
  chips = mesh.size
  model_flops = spec.model_flops()
  out = dict(
    step=spec.step,
    mesh=dict(mesh.shape),
    chips=chips,
    chip=None if chip is None else dataclasses.asdict(chip),
    batch=spec.batch,
    seq_len=spec.seq_len,
    remat=spec.model.remat,
    dtype=spec.model.dtype,
    largest_arguments=per_chip_buffers(lowered.args, top=8),
    model_flops=model_flops,
  )
  try:
    result = measure(lowered, hlo_path)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # libtpu refuses a program that cannot fit the chip's HBM: that is the answer.
    out.update(fits=False, memory=None, compile_error=str(e).splitlines()[0][:400])
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out
  out.update(
    compile_s=result["compile_s"],
    compile_cpu_s=result["compile_cpu_s"],
    memory=result["memory"],
    fits=None if chip is None else result["memory"]["total"] <= chip.hbm_bytes,
    xla_loop_bodies_once=result["xla"],
    collectives_in_hlo=result["collectives"],
  )
  out["peak_rss_bytes"] = peak_rss_bytes()
  if probe:
    log(f"compiled in {result['compile_s']:.0f} s; depth probe (two small compiles)")
    costs = per_step_costs(spec, mesh)
    out["xla_over_model_flops"] = costs["flops"] * chips / model_flops
    return with_costs(out, result["per_step_hlo"], chip, costs)
  return with_costs(out, result["per_step_hlo"], chip)


def with_costs(row: dict, per_step_hlo: dict, chip: Chip | None, costs: dict | None = None):
  """`row` with its per-step costs and roofline. costs None: analytic FLOPs x the remat
  factor, the HLO's collectives by trip count (`per_step_hlo` = `hlo.per_step(text)`), and an
  HBM term only for decode: its argument bytes (a decode step reads at least the weights and
  cache it holds). Also re-derives a saved row from its saved HLO (`scripts/aot.py --reread`)."""
  row = dict(row, per_step_collectives_hlo=per_step_hlo)
  if costs is None:
    decode = row["step"] == "decode"
    costs = dict(
      flops=row["model_flops"] * REMAT_FLOPS["none" if decode else row["remat"]] / row["chips"],
      bytes=row["memory"]["argument"] if decode else None,
      wire_bytes=per_step_hlo["wire_bytes"],
      source="analytic FLOPs x remat factor; collectives of the HLO by trip count; HBM: "
      + ("the argument bytes" if decode else "none"),
    )
  row["per_step"] = costs
  if chip is not None:
    row["roofline"] = roofline(costs, row["model_flops"], row["chips"], chip)
  return row


def _gib(x: float) -> str:
  return f"{x / (1 << 30):.2f}"


def table(rows: list[dict]) -> str:
  """A markdown table of `analyse` results, one row each."""
  head = (
    "| step | mesh (d,f,e,t) | remat | GiB/chip | fits | coll. wire GiB/step "
    "| XLA/model FLOPs | bound | step ms | MFU | compile s |"
  )
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    m = r["mesh"]
    mesh = ",".join(str(m[a]) for a in MeshConfig.AXES)
    step = r.get("per_step", {})
    roof = r.get("roofline", {})
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    memory = "compiler: does not fit" if r["memory"] is None else _gib(r["memory"]["total"])
    lines.append(
      f"| {r['step']} | {mesh} | {r['remat']} | {memory} | "
      f"{'-' if r['fits'] is None else ('yes' if r['fits'] else 'NO')} | "
      f"{'-' if not step else _gib(step['wire_bytes'])} | "
      f"{fmt(r.get('xla_over_model_flops'), '.2f')} | {roof.get('bound', '-')} | "
      f"{fmt(roof.get('step_s') and roof['step_s'] * 1e3, '.1f')} | "
      f"{fmt(roof.get('mfu'), '.3f')} | {fmt(r.get('compile_s'), '.1f')} |"
    )
  return "\n".join(lines)
