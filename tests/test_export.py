"""scripts/export.py writes StableHLO programs; a fresh process that imports no model code (nor
flax) reloads them and reproduces the engine's greedy tokens."""

import json
import os
import subprocess
import sys

import numpy as np
from test_tool_loop import TEXTS, VOCAB, random_model

from qwen3_jax import checkpoint
from qwen3_jax.data.tokenizer import train_tokenizer
from qwen3_jax.infer.engine import Engine, Request
from qwen3_jax.infer.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
RUNNER = """
import json, sys
from qwen3_jax.infer.exported import ExportedModel
m = ExportedModel(sys.argv[1])
out = [m.greedy(p, 12) for p in json.loads(sys.argv[2])]
loaded = sorted(k for k in sys.modules if k.startswith(("qwen3_jax.model", "flax")))
print(json.dumps({"ids": out, "model_code": loaded}))
"""


def test_exported_programs_reproduce_the_engine_greedy_tokens(tmp_path):
  tok, model = train_tokenizer(TEXTS * 4, VOCAB), random_model()
  ckpt = str(tmp_path / "params")
  checkpoint.save_params(ckpt, model, model.cfg)
  tok.save(os.path.join(ckpt, "tokenizer.json"))
  out = str(tmp_path / "export")
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "export.py"), f"--checkpoint={ckpt}",
         f"--output={out}", "--max_len=64", "--chunk=16"]  # fmt: skip
  proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert {"init.stablehlo", "prefill.stablehlo", "step.stablehlo"} <= set(os.listdir(out))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(10, VOCAB - 1, n).tolist() for n in (5, 40)]  # 40: 3 prefill chunks
  proc = subprocess.run(
    [sys.executable, "-c", RUNNER, out, json.dumps(prompts)],
    capture_output=True,
    text=True,
    env=ENV,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.splitlines()[-1])
  assert got["model_code"] == []
  want = Engine(model, tok).generate([Request(p, SamplingParams.greedy(), 12) for p in prompts])
  assert got["ids"] == [c.token_ids for [c] in want]
