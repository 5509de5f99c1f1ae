"""End to end through the command line: scripts/train.py trains, checkpoints and resumes."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cli(workdir, steps, *extra):
  cmd = [
    sys.executable, os.path.join(ROOT, "scripts", "train.py"),
    f"--config={os.path.join(ROOT, 'configs', 'pretrain.py')}:model=tiny,steps={steps}",
    f"--workdir={workdir}", "--num_cpu_devices=8", "--config.mesh.data=2",
    "--config.mesh.expert=4", "--config.batch_size=8", "--config.seq_len=32",
    "--config.eval_every=2", "--config.checkpoint_every=2", "--config.log_every=1",
    "--config.sample_tokens=4", "--config.async_checkpoint=False", *extra,
  ]  # fmt: skip
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  # orbax's per-checkpoint INFO logs stay off unless --verbosity asks for them.
  assert "checkpoint_manager.py" not in proc.stderr, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cli"))
  first = train_cli(workdir, 2)
  second = train_cli(workdir, 4)  # same workdir: resumes at step 2
  return workdir, first, second


def test_train_cli_trains_checkpoints_and_samples(run):
  workdir, first, _ = run
  summary = json.loads(first.split("summary: ", 1)[1].splitlines()[0])
  assert summary["steps"] == 2 and summary["skipped_steps"] == 0
  assert 0 < summary["final_loss"] < 10
  assert "sample: " in first
  for name in ("metrics.jsonl", "tokenizer.json", "tb", "checkpoints"):
    assert os.path.exists(os.path.join(workdir, name)), name


def test_train_cli_resumes_and_appends_metrics(run):
  workdir, _, second = run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"train/loss"' in line]
  assert steps == [1, 2, 3, 4], steps  # the second run continued at step 3, nothing rewritten
  assert json.loads(second.split("summary: ", 1)[1].splitlines()[0])["steps"] == 4


def test_train_cli_rejects_a_bad_config_field(tmp_path):
  cmd = [
    sys.executable, os.path.join(ROOT, "scripts", "train.py"),
    f"--config={os.path.join(ROOT, 'configs', 'pretrain.py')}:model=tiny",
    f"--workdir={tmp_path}", "--config.batch_size=0",
  ]  # fmt: skip
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode != 0
  assert "batch_size" in proc.stderr + proc.stdout
