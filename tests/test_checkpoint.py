"""Checkpoints: exact resume after SIGKILL, restore onto other meshes, corrupt ones skipped,
params-only save/load."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import checkpoint as ckpt
from qwen3_jax import config as C
from qwen3_jax import sharding as shd
from qwen3_jax.data.pipeline import DataConfig
from qwen3_jax.train import inputs, loop, resume
from qwen3_jax.train.config import OptimConfig, TrainConfig
from qwen3_jax.train.step import make_program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 3  # checkpoint every N steps; runs go to 2N


def write_corpus(path: str) -> str:
  rng = np.random.default_rng(0)
  words = "the a expert router token layer mesh shard batch step loss grad".split()
  paras = [" ".join(rng.choice(words, 60)) + "." for _ in range(300)]
  with open(path, "w") as f:
    f.write("\n\n".join(paras))
  return path


def make_cfg(corpus: str, **kw) -> TrainConfig:
  base = TrainConfig(
    num_steps=2 * N,
    batch_size=8,
    seq_len=32,
    model=C.tiny(vocab_size=320, moe=C.MoEConfig(strategy="dense")),  # no drops
    optim=OptimConfig(lr=3e-3, warmup_steps=2),
    data=DataConfig(sources=(corpus,), vocab_size=320, eval_fraction=0.0),
    mesh=C.MeshConfig(data=2, expert=4),
    eval_every=0,
    checkpoint_every=N,
    log_every=1,
  )
  return dataclasses.replace(base, **kw)


def losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "train/loss" in rec:
        out[rec["step"]] = rec["train/loss"]
  return out


def as_np(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  d = tmp_path_factory.mktemp("ckpt")
  corpus = write_corpus(str(d / "corpus.txt"))
  cfg = make_cfg(corpus)
  summary = loop.train(cfg, str(d / "ref"))
  return cfg, str(d), summary


def test_resume_after_sigkill_is_exact(reference):
  cfg, d, ref = reference
  wd = os.path.join(d, "killed")
  script = textwrap.dedent(f"""
    import os, signal, sys
    sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_default_matmul_precision", "highest")
    from test_checkpoint import make_cfg
    from qwen3_jax.train import loop
    def hook(step, ctx):
      if step == {N + 1}:  # one step past the checkpoint, then die without cleanup
        ctx["checkpointer"].wait()
        os.kill(os.getpid(), signal.SIGKILL)
    loop.train(make_cfg({cfg.data.sources[0]!r}), {wd!r}, on_step=hook)
  """)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
  assert r.returncode == -9, r.stderr[-2000:]
  assert ckpt.step_dirs(os.path.join(wd, "checkpoints")) == [N]

  # Resume; SIGTERM (preemption) at step N+1 saves that step and stops cleanly.
  def term(step, ctx):
    if step == N + 1:
      os.kill(os.getpid(), signal.SIGTERM)

  stopped = loop.train(cfg, wd, on_step=term)
  assert stopped["preempted"] and stopped["steps"] == N + 1
  assert ckpt.step_dirs(os.path.join(wd, "checkpoints")) == [N + 1, N]
  resumed = loop.train(cfg, wd)
  assert resumed["steps"] == 2 * N and not resumed["preempted"]
  ref_losses, got = losses(os.path.join(d, "ref")), losses(wd)
  assert sorted(ref_losses) == list(range(1, 2 * N + 1))
  for s in range(1, 2 * N + 1):  # steps N+1.. were logged twice (before the kill, after resume)
    assert got[s] == ref_losses[s], (s, got[s], ref_losses[s])
  jax.tree.map(np.testing.assert_array_equal, as_np(resumed["state"]), as_np(ref["state"]))


@pytest.fixture(scope="module")
def next_loss8(reference):
  """The loss of step 2N+1 on the 8-device mesh the checkpoint was written on."""
  cfg, d, _ = reference
  wd = os.path.join(d, "ref")
  _, data, _, _ = inputs.build_data(cfg, wd, printer=lambda *_: None)
  prog8 = make_program(cfg, _mesh8())
  with ckpt.Checkpointer(wd, save_every=0) as ck:
    s8, step = resume.initial_state(prog8, ck, data, print)
  return float(prog8.train_step(s8, inputs.to_global(data[step], prog8))[1]["loss"])


@pytest.mark.parametrize("ndev,mesh", [(4, C.MeshConfig(expert=4)), (1, C.MeshConfig())])
def test_restore_onto_other_mesh(reference, next_loss8, ndev, mesh):
  cfg, d, ref = reference
  wd = os.path.join(d, "ref")
  cfg = dataclasses.replace(cfg, mesh=mesh)
  _, data, _, _ = inputs.build_data(cfg, wd, printer=lambda *_: None)
  prog = make_program(cfg, shd.make_mesh(mesh, jax.devices()[:ndev]))
  with ckpt.Checkpointer(wd, save_every=0) as ck:
    state, step = resume.initial_state(prog, ck, data, print)
  assert step == 2 * N and data.step == 2 * N
  jax.tree.map(np.testing.assert_array_equal, as_np(state.params), as_np(ref["state"].params))
  leaf = state.params["layers"]["sub_0"]["mlp"]["gate_proj"]
  assert len(leaf.sharding.device_set) == ndev
  _, m = prog.train_step(state, inputs.to_global(data[step], prog))
  np.testing.assert_allclose(float(m["loss"]), next_loss8, rtol=1e-6)


def _mesh8():
  return shd.make_mesh(C.MeshConfig(data=2, expert=4))


def test_corrupt_checkpoint_skipped(reference, caplog):
  cfg, d, ref = reference
  wd = os.path.join(d, "corrupt")
  shutil.copytree(os.path.join(d, "ref"), wd)
  root = os.path.join(wd, "checkpoints")
  # A half-written save (orbax's tmp dir) must be ignored and left alone.
  tmp = os.path.join(root, f"{3 * N}.orbax-checkpoint-tmp-1")
  os.makedirs(tmp)
  # Corrupt the newest complete step: truncate every data file of its params.
  for dirpath, _, files in os.walk(os.path.join(root, str(2 * N), "params")):
    for name in files:
      if not name.startswith("_") and not name.endswith(".json"):
        open(os.path.join(dirpath, name), "w").close()
  model, mcfg = ckpt.load_params(wd)  # params-only restore falls back to step N too
  assert mcfg == cfg.model
  _, data, _, _ = inputs.build_data(cfg, wd, printer=lambda *_: None)
  prog = make_program(cfg, _mesh8())
  with ckpt.Checkpointer(wd, save_every=0) as ck:
    state, step = resume.initial_state(prog, ck, data, print)
  assert step == N and data.step == N
  assert os.path.isdir(tmp)  # not deleted
  moved = os.listdir(os.path.join(wd, "checkpoints_corrupt"))
  assert len(moved) == 1 and moved[0].startswith(f"{2 * N}-")
  assert any("cannot be restored" in r.getMessage() for r in caplog.records)


def _snapshot(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_config_change_stops_without_touching_the_checkpoints(reference):
  cfg, d, _ = reference
  wd = os.path.join(d, "changed")
  shutil.copytree(os.path.join(d, "ref"), wd)
  before = _snapshot(wd)
  with open(os.path.join(wd, "checkpoints", str(2 * N), "meta", "metadata")) as f:
    assert json.load(f)["train"]["optim"]["clip_norm"] == 1.0  # the whole config is stored
  changed = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, clip_norm=0.0))
  with pytest.raises(ckpt.CheckpointMismatchError) as e:
    loop.train(changed, wd, printer=lambda *_: None)
  msg = str(e.value)
  assert "optim.clip_norm: 1.0 in the checkpoint -> 0.0 now" in msg
  assert "opt_state/opt/" in msg and "Nothing was moved" in msg
  assert "optim.lr" not in msg  # only the fields that differ
  assert _snapshot(wd) == before  # checkpoints, config.json, metrics: byte for byte
  assert not os.path.exists(os.path.join(wd, "checkpoints_corrupt"))
  # The packing statistics of the run that wrote it are in its metrics.
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  assert first["step"] == 0 and 0.5 < first["data/packing_efficiency"] <= 1


def test_params_only_roundtrip(tmp_path):
  from flax import nnx

  from qwen3_jax.model import Qwen3

  cfg = C.tiny()
  model = shd.create_sharded(lambda: Qwen3(cfg, rngs=nnx.Rngs(3)), _mesh8())
  ckpt.save_params(str(tmp_path / "p"), model, cfg)
  with pytest.raises(FileExistsError):
    ckpt.save_params(str(tmp_path / "p"), model, cfg)
  ref = as_np(nnx.state(model, nnx.Param).to_pure_dict())
  for mesh in (shd.make_mesh(C.MeshConfig(expert=2), jax.devices()[:2]), None):
    m2, cfg2 = ckpt.load_params(str(tmp_path / "p"), mesh)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, as_np(nnx.state(m2, nnx.Param).to_pure_dict()), ref)
  # Overrides take dtypes as JAX users write them; the restore casts to the new storage dtype.
  m3, cfg3 = ckpt.load_params(str(tmp_path / "p"), None, param_dtype=jnp.bfloat16)
  assert cfg3.param_dtype == "bfloat16" and cfg3 == cfg.replace(param_dtype="bfloat16")
  assert {a.dtype for a in jax.tree.leaves(nnx.state(m3, nnx.Param))} == {jnp.dtype("bfloat16")}
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    ckpt.load_params(str(tmp_path))


def test_init_from_loads_params_only(reference, tmp_path):
  cfg, d, ref = reference
  _, data, _, _ = inputs.build_data(cfg, os.path.join(d, "ref"), printer=lambda *_: None)
  prog = make_program(cfg, _mesh8())
  with ckpt.Checkpointer(str(tmp_path / "new"), save_every=0) as ck:
    state, step = resume.initial_state(prog, ck, data, print, init_from=os.path.join(d, "ref"))
  assert step == 0 and int(state.step) == 0  # a fresh optimizer, the previous run's weights
  jax.tree.map(np.testing.assert_array_equal, as_np(state.params), as_np(ref["state"].params))
  fresh = as_np(prog.init().opt_state)
  jax.tree.map(np.testing.assert_array_equal, as_np(state.opt_state), fresh)
