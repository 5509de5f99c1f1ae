"""The malloc re-exec of the entry points (qwen3_jax/runtime.py)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from qwen3_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def test_malloc_env_adds_tunables_and_keeps_the_users():
  env = runtime.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.rtld.x=1", "A": "b"})
  parts = env["GLIBC_TUNABLES"].split(":")
  assert parts[:2] == ["glibc.malloc.arena_max=4", "glibc.rtld.x=1"]  # the user's value wins
  assert "glibc.malloc.mmap_max=0" in parts and "glibc.malloc.arena_max=1" not in parts
  assert env["A"] == "b" and runtime.malloc_tuned(env)
  assert not runtime.malloc_tuned({}) and runtime.malloc_tuned(runtime.malloc_env({}))


# Prints its environment and argv, then the minor page faults of allocating, touching and
# freeing a 64 MiB block twice (the second time is what a training step's buffers see).
PROBE = textwrap.dedent(
  """
  import ctypes, os, resource, sys
  sys.path.insert(0, {root!r})
  from qwen3_jax.runtime import reexec_with_tuned_malloc
  reexec_with_tuned_malloc(by_default={by_default})
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  n = 64 << 20
  faults = []
  for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  print(os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], faults[1])
  """
)


def run_probe(tmp_path, by_default=True, **env):
  script = tmp_path / "probe.py"
  script.write_text(PROBE.format(root=ROOT, by_default=by_default))
  full_env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.CHOICE)}
  out = subprocess.run(
    [sys.executable, "-u", str(script), "--x=1", "y"],
    env={**full_env, **env},
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  return out[0] if len(out) == 4 else "", " ".join(out[-3:-1]), int(out[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_reexec_sets_tunables_keeps_argv_and_stops_page_faults(tmp_path):
  tunables, argv, faults = run_probe(tmp_path)
  assert runtime.malloc_tuned({"GLIBC_TUNABLES": tunables})
  assert argv == "['--x=1', 'y']"
  assert faults < 100  # the freed block was reused, not unmapped and faulted in again
  tunables, argv, faults = run_probe(tmp_path, **{runtime.CHOICE: "default"})
  assert tunables == "" and argv == "['--x=1', 'y']"
  assert faults > 10_000  # glibc's defaults: a fresh mmap, 16k pages faulted in


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_training_entry_point_tunes_only_when_asked(tmp_path):
  tunables, _, faults = run_probe(tmp_path, by_default=False)
  assert tunables == "" and faults > 10_000
  tunables, _, faults = run_probe(tmp_path, by_default=False, **{runtime.CHOICE: "tuned"})
  assert runtime.malloc_tuned({"GLIBC_TUNABLES": tunables}) and faults < 100


def test_bad_choice_raises(monkeypatch):
  monkeypatch.setenv(runtime.CHOICE, "fast")
  with pytest.raises(ValueError, match="QWEN3_JAX_MALLOC='fast'"):
    runtime.reexec_with_tuned_malloc(by_default=True)
