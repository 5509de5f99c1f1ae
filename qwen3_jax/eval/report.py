"""The evaluation's printed table and its accuracy-vs-thinking-budget plot."""

from __future__ import annotations

import json
import os

from qwen3_jax.data import tasks

RUNS = ("think", "no_think", "tool")


def _ci(d: dict | None) -> str:
  return "-" if d is None else f"{d['mean']:.3f} [{d['lo']:.2f}, {d['hi']:.2f}]"


def table(result: dict) -> str:
  """Accuracy per family and difficulty (think / no_think / tool), then the other metrics and
  accuracy against the thinking budget, as plain text."""
  s = result["summary"]
  lines = [f"{'family':<14} {'level':>5}  {'think':<22} {'no_think':<22} {'tool':<22}"]

  def fam(key, f, level=None):
    entry = s.get(key, {}).get("families", {}).get(f)
    if entry is None:
      return None
    return entry["accuracy"] if level is None else entry["difficulty"].get(level)

  fams = [f for f in tasks.FAMILIES if any(f in s.get(k, {}).get("families", {}) for k in s)]
  for f in fams:
    levels = sorted(
      {lv for k in RUNS for lv in s.get(k, {}).get("families", {}).get(f, {}).get("difficulty", {})}
    )
    for lv in [*levels, None]:
      cells = [_ci(fam(k, f, lv)) for k in RUNS]
      lines.append(f"{f:<14} {lv or 'all':>5}  {cells[0]:<22} {cells[1]:<22} {cells[2]:<22}")
  cells = [_ci(s[k]["accuracy"]) if k in s else "-" for k in RUNS]
  lines.append(f"{'all':<14} {'all':>5}  {cells[0]:<22} {cells[1]:<22} {cells[2]:<22}")
  lines.append("")
  for key in RUNS:
    if key in s:
      parts = [
        f"{m} {s[key][m]:.3f}"
        if isinstance(s[key][m], float) and m in ("format", "flag")
        else f"{m} {s[key][m]:.1f}"
        for m in ("format", "flag", "tokens", "thinking_tokens", "tool_calls")
        if m in s[key]
      ]
      lines.append(f"{key:<9} " + ", ".join(parts))
  if s.get("budget"):
    lines.append("")
    lines.append(
      "thinking budget -> accuracy: " + "; ".join(f"{b}: {_ci(v)}" for b, v in s["budget"].items())
    )
  return "\n".join(lines)


def plot_budget(result: dict, path: str) -> str | None:
  """Accuracy (with its interval) against the thinking budget, overall: a PNG at `path`.

  Returns the path, or None when there is no budget run or matplotlib is not installed.
  """
  budget = result["summary"].get("budget") or {}
  if not budget:
    return None
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  names = list(budget)
  x = list(range(len(names)))
  mean = [budget[b]["mean"] for b in names]
  err = [
    [budget[b]["mean"] - budget[b]["lo"] for b in names],
    [budget[b]["hi"] - budget[b]["mean"] for b in names],
  ]
  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
  ax.errorbar(x, mean, yerr=err, marker="o", capsize=3)
  ax.set_xticks(x, names)
  ax.set_xlabel("thinking budget (tokens)")
  ax.set_ylabel("held-out accuracy (pass@1)")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def save(result: dict, out: str) -> tuple[str, str | None]:
  """Writes the budget plot (`<out without .json>_budget.png`, named in `meta.plot`) and the
  eval dict as JSON at `out`; returns (json path, png path or None)."""
  png = plot_budget(result, os.path.splitext(out)[0] + "_budget.png")
  result["meta"]["plot"] = png
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  return out, png
