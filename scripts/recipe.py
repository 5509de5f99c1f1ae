r"""The whole Qwen3 post-training recipe on one preset: pretrain, then the four stages, each
evaluated on the same held-out prompts, then one report comparing the stages.

  python scripts/recipe.py --workdir=runs/recipe [--preset=mini] [--quick]

Stages run as the project's own scripts; every command is printed and appended to
WORKDIR/commands.sh, so any stage can be rerun or changed by hand:
  pretrain  scripts/train.py configs/pretrain.py (embedded corpus with every task family)
  stage1    scripts/build_sft_data.py, then scripts/train.py configs/stage1_cold_start.py
  stage2    scripts/train.py configs/stage2_reasoning_rl.py (GRPO from stage 1)
  stage3    scripts/build_fusion_data.py (rejection sampling with the stage-2 model), then
            scripts/train.py configs/stage3_fusion.py
  stage4    scripts/train.py configs/stage4_general_rl.py (weighted rewards, tool loops)
each followed by scripts/evaluate.py on its workdir (WORKDIR/STAGE/eval.json). A finished stage
(WORKDIR/STAGE/DONE) is skipped when the recipe runs again; a killed one resumes from its own
checkpoints. The report: `qwen3_jax/eval/recipe_report.py` (WORKDIR/report.md, report.json,
curves.png).
"""

import json
import os
import resource
import shlex
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qwen3_jax.eval import recipe_report  # noqa: E402

STAGES = recipe_report.STAGES

flags.DEFINE_string("workdir", None, "Recipe directory: one sub-directory per stage.")
flags.DEFINE_enum(
  "size",
  "full",
  ["full", "quick"],
  "full: the `make run` recipe on `mini`; "
  "quick: `tiny` with a few steps per stage (checks the pipeline, for tests).",
)
flags.DEFINE_list("stages", list(STAGES), "Stages to run, in order (earlier ones must be DONE).")
flags.DEFINE_integer("num_cpu_devices", 8, "Simulated CPU devices (0 = the real devices).")
flags.DEFINE_string("mesh", "data=2,expert=4", "Mesh axis sizes of every stage.")
flags.mark_flags_as_required(["workdir"])

# Per size: model preset, steps and data sizes of each stage, evaluation sizes.
SIZES = {
  "full": dict(
    model="mini",
    pretrain_steps=300,
    sft_per_family=300,
    stage1_steps=80,
    stage2_steps=20,
    fusion_per_family=48,
    stage3_steps=60,
    stage4_steps=12,
    eval_per_family=16,
    eval_n=2,
  ),
  "quick": dict(
    model="tiny",
    pretrain_steps=4,
    sft_per_family=4,
    stage1_steps=2,
    stage2_steps=2,
    fusion_per_family=2,
    stage3_steps=2,
    stage4_steps=2,
    eval_per_family=1,
    eval_n=1,
  ),
}


def stage_commands(stage: str, w: str, s: dict, mesh_flags: list[str]) -> list[list[str]]:
  """The commands of one stage (argv lists), in order: data, training, evaluation."""
  py = sys.executable
  script = lambda name, *args: [py, os.path.join(ROOT, "scripts", name), *args]  # noqa: E731
  d = lambda name: os.path.join(w, name)  # noqa: E731

  def train(config: str, steps: int, **args) -> list[str]:
    args = ",".join(f"{k}={v}" for k, v in dict(model=s["model"], steps=steps, **args).items())
    config = os.path.join(ROOT, "configs", config)
    return script("train.py", f"--config={config}:{args}", f"--workdir={d(stage)}", *mesh_flags)

  if stage == "pretrain":
    cmds = [train("pretrain.py", s["pretrain_steps"])]
  elif stage == "stage1":
    data, tokenizer = d("stage1_data.jsonl"), os.path.join(d("pretrain"), "tokenizer.json")
    build = f"--per_family={s['sft_per_family']}", f"--tokenizer={tokenizer}", "--max_tokens=513"
    cmds = [
      script("build_sft_data.py", f"--out={data}", *build),
      train("stage1_cold_start.py", s["stage1_steps"], init_from=d("pretrain"), data=data),
    ]
  elif stage == "stage2":
    cmds = [train("stage2_reasoning_rl.py", s["stage2_steps"], init_from=d("stage1"))]
  elif stage == "stage3":
    data = d("stage3_data.jsonl")
    build = f"--workdir={d('stage2')}", f"--out={data}", f"--per_family={s['fusion_per_family']}"
    cmds = [
      script("build_fusion_data.py", *build),
      train("stage3_fusion.py", s["stage3_steps"], init_from=d("stage2"), data=data),
    ]
  elif stage == "stage4":
    cmds = [train("stage4_general_rl.py", s["stage4_steps"], init_from=d("stage3"))]
  else:
    raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
  n = f"--per_family={s['eval_per_family']}", f"--n={s['eval_n']}"
  return cmds + [script("evaluate.py", f"--workdir={d(stage)}", *n)]


def run(cmd: list[str], log: str) -> None:
  """Runs one command, its output to the console and appended to `log`; raises on failure."""
  line = shlex.join(cmd)
  print(f"$ {line}", flush=True)
  with open(os.path.join(os.path.dirname(log), "commands.sh"), "a") as f:
    f.write(line + "\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  with open(log, "a") as out:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)  # fmt: skip
    for text in proc.stdout:
      out.write(text)
      if "Warning" not in text:
        print(text, end="", flush=True)
  if proc.wait() != 0:
    raise RuntimeError(f"command failed ({proc.returncode}); its output is in {log}:\n{line}")


def _children_cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def main(argv):
  del argv
  f = flags.FLAGS
  w = os.path.abspath(f.workdir)
  os.makedirs(w, exist_ok=True)
  s = SIZES[f.size]
  mesh_flags = [f"--num_cpu_devices={f.num_cpu_devices}"] if f.num_cpu_devices else []
  for item in filter(None, f.mesh.split(",")):
    mesh_flags.append(f"--config.mesh.{item}")
  unknown = [st for st in f.stages if st not in STAGES]
  if unknown:
    raise app.UsageError(f"unknown stages {unknown}; stages: {list(STAGES)}")
  times_path = os.path.join(w, "times.json")
  times = json.load(open(times_path)) if os.path.exists(times_path) else {}
  cpu_path = os.path.join(w, "cpu_seconds.json")  # user + system time of the stage's processes
  cpu = json.load(open(cpu_path)) if os.path.exists(cpu_path) else {}
  for stage in f.stages:
    done = os.path.join(w, stage, "DONE")
    if os.path.exists(done):
      print(f"== {stage}: done, skipped ({done})")
      continue
    os.makedirs(os.path.join(w, stage), exist_ok=True)
    print(f"== {stage}", flush=True)
    t0, cpu0 = time.time(), _children_cpu()
    for cmd in stage_commands(stage, w, s, mesh_flags):
      run(cmd, os.path.join(w, f"{stage}.log"))
    times[stage] = times.get(stage, 0.0) + time.time() - t0
    cpu[stage] = cpu.get(stage, 0.0) + _children_cpu() - cpu0
    with open(cpu_path, "w") as fh:
      json.dump(cpu, fh, indent=1)
    with open(times_path, "w") as fh:
      json.dump(times, fh, indent=1)
    open(done, "w").close()
  report = recipe_report.build(w, times, cpu)
  print(report["markdown"])
  print(f"wrote {recipe_report.save(w, report)}")


if __name__ == "__main__":
  app.run(main)
