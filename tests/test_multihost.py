"""Two processes x 4 CPU devices (jax.distributed, gloo, localhost) train like 1 x 8 devices."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from qwen3_jax import checkpoint as ckpt
from qwen3_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from test_checkpoint import N, losses, make_cfg, write_corpus  # noqa: E402

STEPS = 2 * N  # the same config as test_checkpoint's reference: its compiled step is reused


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
  corpus = write_corpus(str(tmp_path / "corpus.txt"))
  wd = str(tmp_path / "multi")
  port = _free_port()
  script = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id=int(sys.argv[1]))
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    from test_checkpoint import make_cfg
    from qwen3_jax.train import loop
    cfg = make_cfg({corpus!r})
    loop.train(cfg, {wd!r})
  """)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", script, str(i)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
  assert ckpt.step_dirs(os.path.join(wd, "checkpoints")) == [STEPS, N]

  cfg = make_cfg(corpus)
  ref = loop.train(cfg, str(tmp_path / "single"))
  got, want = losses(wd), losses(str(tmp_path / "single"))
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], 1e-6)
  model, _ = ckpt.load_params(wd)
  from flax import nnx

  params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
  want_p = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), ref["state"].params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params, want_p)
