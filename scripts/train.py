r"""Train a Qwen3-MoE model: pretraining, SFT or RL (a config with an `rl` section, e.g.
configs/stage2_reasoning_rl.py), resuming from --workdir when it has checkpoints.

  python scripts/train.py --config=configs/pretrain.py:model=tiny --workdir=/tmp/run \
      [--num_cpu_devices=8] [--config.optim.lr=1e-3] [--config.mesh.expert=4]
Multi-process: --coordinator=HOST:PORT --num_processes=N --process_id=I (or a cluster JAX detects).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen3_jax.runtime import reexec_with_tuned_malloc  # noqa: E402

if __name__ == "__main__":
  # Before JAX starts. Only with QWEN3_JAX_MALLOC=tuned: one malloc arena slows multi-device
  # runs (qwen3_jax/runtime.py).
  reexec_with_tuned_malloc(by_default=False)

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, metrics).")
flags.DEFINE_integer("num_cpu_devices", 0, "Simulate this many CPU devices (0 = real devices).")
flags.DEFINE_string("coordinator", "", "Multi-process: coordinator address HOST:PORT.")
flags.DEFINE_integer("num_processes", 1, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", 0, "Multi-process: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    # orbax logs every checkpoint step at INFO; keep the console to our progress lines
    # (pass --verbosity=0 to see them). A flag default is not enough: absl resets it.
    logging.set_verbosity(logging.WARNING)
  import jax

  if f.num_cpu_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", f.num_cpu_devices)
  if f.coordinator or "JAX_COORDINATOR_ADDRESS" in os.environ:
    if jax.default_backend() == "cpu" or f.num_cpu_devices:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if f.coordinator:
      jax.distributed.initialize(f.coordinator, f.num_processes, f.process_id)
    else:  # JAX_COORDINATOR_ADDRESS; process count / id auto-detected (SLURM, TPU, k8s, ...)
      jax.distributed.initialize()

  from configs.common import to_rl_config, to_train_config
  from qwen3_jax.checkpoint import load_params
  from qwen3_jax.data import chat
  from qwen3_jax.infer.engine import Engine, Request
  from qwen3_jax.infer.sampling import SamplingParams
  from qwen3_jax.train.loop import train

  if "rl" in f.config:
    from qwen3_jax.rl.loop import train_rl

    train_rl(to_rl_config(f.config), f.workdir)
    return
  cfg = to_train_config(f.config)
  summary = train(cfg, f.workdir)
  if cfg.sample_tokens and jax.process_index() == 0 and jax.process_count() == 1:
    tok = summary["tokenizer"]
    model, _ = load_params(f.workdir)  # newest checkpoint, on one device
    question = [{"role": "user", "content": "What is 12 + 7 * 3?"}]
    prompts = ("def main(", chat.render(question, add_generation_prompt=True))
    greedy = SamplingParams.greedy()
    reqs = [Request(p, sampling=greedy, max_new_tokens=cfg.sample_tokens) for p in prompts]
    for prompt, [out] in zip(prompts, Engine(model, tok).generate(reqs), strict=True):
      print(f"sample: {prompt!r} -> {out.text!r}")


if __name__ == "__main__":
  app.run(main)
