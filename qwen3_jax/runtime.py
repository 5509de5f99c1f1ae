"""Process-level settings for running JAX on CPU hosts: glibc malloc tuning.

XLA:CPU allocates every temporary buffer of a step with malloc and frees it at the end. With
glibc's defaults, buffers above the mmap threshold (at most 32 MiB) are fresh `mmap`s, and
freed memory at the top of a heap is given back to the kernel, so each step page-faults its
working set in again (hundreds of thousands of minor faults per `small`-preset train step).
Keeping freed memory in one heap (no mmap, one arena, no trimming) lets the next step reuse
it: about no faults, and a faster step (docs/cpu_allocator.md; `scripts/benchmark.py
--suite=train` with and without QWEN3_JAX_MALLOC=default, its `minor_faults` column). glibc
reads these settings only when the process starts (GLIBC_TUNABLES), so an entry point that
wants them re-executes itself once.

One arena serialises malloc across threads, which made the 8-simulated-device `make run`
slower (docs/cpu_allocator.md). So the benchmark (one device) tunes by default and training
only when asked:
QWEN3_JAX_MALLOC=tuned | default overrides both.
"""

from __future__ import annotations

import os
import platform
import sys

# No mmap for large blocks, one arena for all threads, never trim the heap top.
MALLOC_TUNABLES = (
  "glibc.malloc.mmap_max=0",
  "glibc.malloc.arena_max=1",
  "glibc.malloc.trim_threshold=1099511627776",
)
CHOICE = "QWEN3_JAX_MALLOC"  # tuned | default | unset (the entry point decides)


def malloc_env(environ: dict[str, str] | None = None) -> dict[str, str]:
  """`environ` (default os.environ) with MALLOC_TUNABLES added to GLIBC_TUNABLES.

  Tunables already set keep their values (a user's own setting wins).
  """
  env = dict(os.environ if environ is None else environ)
  current = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  names = {t.split("=", 1)[0] for t in current}
  added = [t for t in MALLOC_TUNABLES if t.split("=", 1)[0] not in names]
  env["GLIBC_TUNABLES"] = ":".join(current + added)
  return env


def malloc_tuned(environ: dict[str, str] | None = None) -> bool:
  """True when every malloc tunable is set (to any value) in the environment."""
  env = os.environ if environ is None else environ
  names = {t.split("=", 1)[0] for t in env.get("GLIBC_TUNABLES", "").split(":") if t}
  return all(t.split("=", 1)[0] in names for t in MALLOC_TUNABLES)


def reexec_with_tuned_malloc(by_default: bool) -> None:
  """Re-executes this process (same interpreter, same arguments) with MALLOC_TUNABLES set.

  Call it first thing in a script's `__main__`, before JAX starts. It re-executes when
  QWEN3_JAX_MALLOC=tuned, or when it is unset and `by_default`; never when the tunables are
  already set, when QWEN3_JAX_MALLOC=default, or on a platform without glibc.
  """
  choice = os.environ.get(CHOICE, "")
  if choice not in ("", "tuned", "default"):
    raise ValueError(f"{CHOICE}={choice!r}: use 'tuned' or 'default'")
  wanted = choice == "tuned" or (choice == "" and by_default)
  if not wanted or malloc_tuned():
    return
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], malloc_env())
