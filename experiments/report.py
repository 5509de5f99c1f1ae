"""An ablation's results page: `results.md` (arms table as mean +- std over seeds, claims with
their paired 95% intervals and verdicts, the command, commit, date and machine) and PNG plots."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.ablations.spec import Ablation  # noqa: E402
from experiments.verdict import RULE, paired_verdict  # noqa: E402

PROBE_SETS = ("code", "chat", "arith_easy", "arith_hard")


def arm_metrics(records: list[dict]) -> dict[str, dict[str, list[float]]]:
  """arm -> metric -> values in seed order (scalar metrics only)."""
  out: dict[str, dict[str, list[float]]] = {}
  for r in sorted(records, key=lambda r: r["seed"]):
    m = out.setdefault(r["arm"], {})
    for k, v in r.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed":
        m.setdefault(k, []).append(float(v))
  return out


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  cores = f"{os.cpu_count()} CPU threads ({cpu})"
  return f"{platform.system()} {platform.machine()}, {cores}, no accelerator"


def commit() -> str:
  def git(*args):
    return subprocess.run(
      ["git", *args], capture_output=True, text=True, check=False
    ).stdout.strip()

  sha = git("rev-parse", "--short", "HEAD") or "unknown"
  # Results being written (experiments/results/) do not count as a change to the code.
  dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!experiments/results")
  return sha + (" (with uncommitted changes)" if dirty else "")


def _fmt(values: list[float]) -> str:
  v = np.asarray(values, np.float64)
  scale = max(abs(v.mean()), 1e-12)
  digits = 4 if scale < 100 else 0
  mean = f"{v.mean():,.{digits}f}"
  return mean if v.size < 2 else f"{mean} +- {v.std(ddof=1):,.{digits}f}"


def _plot_curves(ab: Ablation, records: list[dict], x: str, path: str, xlabel: str) -> None:
  fig, ax = plt.subplots(figsize=(6, 4))
  for arm in dict.fromkeys(r["arm"] for r in records):
    curves = [r["curve"] for r in records if r["arm"] == arm]
    n = min(len(c) for c in curves)
    xs = np.mean([[p[x] for p in c[:n]] for c in curves], 0)
    ys = np.asarray([[p["eval_ce"] for p in c[:n]] for c in curves])
    ax.plot(xs, ys.mean(0), marker="o", ms=3, label=arm)
    if len(curves) > 1:
      ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.15)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("held-out cross-entropy (nats)")
  ax.set_title(f"{ab.name}: mean over seeds (band: min-max)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_bars(m: dict, keys: dict[str, str], ylabel: str, title: str, path: str) -> None:
  """Grouped bars: per arm, one bar per key (mean over seeds, error bar = std)."""
  arms = [a for a in m if all(k in m[a] for k in keys)]
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(arms)), 4))
  width = 0.8 / len(keys)
  for i, (key, label) in enumerate(keys.items()):
    vals = [np.mean(m[a][key]) for a in arms]
    errs = [np.std(m[a][key], ddof=1) if len(m[a][key]) > 1 else 0 for a in arms]
    ax.bar(np.arange(len(arms)) + i * width, vals, width, yerr=errs, label=label)
  ax.set_xticks(np.arange(len(arms)) + 0.4 - width / 2, arms, rotation=20, fontsize=8)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plots(ab: Ablation, records: list[dict], outdir: str) -> list[tuple[str, str]]:
  """Writes the PNGs; returns [(file name, caption)]."""
  m = arm_metrics(records)
  out = [
    ("eval_ce_vs_tokens.png", "held-out CE against training tokens"),
    ("eval_ce_vs_flops.png", "held-out CE against training FLOPs (experiments/flops.py)"),
  ]
  _plot_curves(ab, records, "tokens", os.path.join(outdir, out[0][0]), "training tokens")
  _plot_curves(ab, records, "tflops", os.path.join(outdir, out[1][0]), "training TFLOPs")
  if any("experts_code" in v for v in m.values()):
    keys = {f"experts_{s}": s for s in PROBE_SETS}
    _plot_bars(
      m,
      keys,
      "experts per token",
      "experts per token by probe set",
      os.path.join(outdir, "experts_by_type.png"),
    )
    out.append(
      ("experts_by_type.png", "mean experts per token (over MoE layers) by token type / difficulty")
    )
  if any("recall_by_distance" in r for r in records):
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in dict.fromkeys(r["arm"] for r in records):
      accs = [r["recall_by_distance"] for r in records if r["arm"] == arm]
      ds = sorted(accs[0], key=int)
      ax.plot(
        [int(d) for d in ds], [np.mean([a[d] for a in accs]) for d in ds], marker="o", label=arm
      )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("key-value distance (tokens)")
    ax.set_ylabel("recall accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "recall_by_distance.png"), dpi=110)
    plt.close(fig)
    out.append(
      (
        "recall_by_distance.png",
        "synthetic key-value recall accuracy by distance (mean over seeds)",
      )
    )
  return out


def write_results(
  ab: Ablation,
  records: list[dict],
  *,
  outdir: str,
  command: str,
  seeds: int,
  quick: bool,
  wall_s: float,
) -> str:
  """Writes results.md and the plots into outdir; returns the markdown text."""
  m = arm_metrics(records)
  figures = plots(ab, records, outdir)
  notes = {a.name: a.note for a in ab.arms}
  cols = [c for c in ab.columns if any(c in v for v in m.values())]
  lines = [
    f"# Ablation `{ab.name}`{' (quick run: 2 arms, a few steps)' if quick else ''}",
    "",
    f"**Claim.** {ab.claim}",
    "",
    f"**Matched.** {ab.matched}",
    "",
    f"- command: `{command}`",
    f"- commit: {commit()}; date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
    f"- machine: {machine()}",
    f"- {len(m)} arms x {seeds} seed(s), {records[0]['steps']} steps each; total run time "
    f"{wall_s / 60:.1f} min",
  ]
  if not quick and (records[0]["steps"] < ab.steps or seeds < 3):
    lines.append(
      f"- **reduced run**: {records[0]['steps']} steps (full: {ab.steps}) and {seeds} seed(s) "
      "(full: 3), to fit the time this machine had; intervals are correspondingly wider"
    )
  lines += [
    "",
    "## Arms (mean +- std over seeds)",
    "",
    "| arm | what | " + " | ".join(cols) + " |",
    "|---|---|" + "---|" * len(cols),
  ]
  for arm, v in m.items():
    cells = [_fmt(v[c]) if c in v else "-" for c in cols]
    lines.append(f"| {arm} | {notes[arm]} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "Columns: eval_ce = held-out cross-entropy (nats/token) after the last step; us_per_token "
    "= median training step time per token; mflops_per_token / total_tflops = training FLOPs "
    "(experiments/flops.py); experts_* = mean experts per token (over MoE layers), on the probe "
    "set named; load_cv = std / mean of slots per expert; dropped_fraction = share of slots the "
    "capacity strategy (factor 1.25) would drop; mi_type_expert = I(token type; expert) in nats; "
    "recall_near / recall_far = key-value recall at half / 8x the window.",
    "",
    "## Claims",
    "",
    "| claim | d per seed | mean d | 95% interval | verdict |",
    "|---|---|---|---|---|",
  ]
  for c in ab.comparisons(m):
    v = paired_verdict(c.high, c.low, c.margin)
    interval = "-" if v.n < 2 else f"[{v.lo:+.4f}, {v.hi:+.4f}]"
    lines.append(f"| {c.claim} | `{c.what}` | {v.mean:+.4f} | {interval} | **{v.verdict}** |")
  lines += ["", f"**Verdict rule.** {RULE}", "", "## Plots", ""]
  lines += [f"![{cap}]({name})  \n{cap}\n" for name, cap in figures]
  lines += [
    "## Notes",
    "",
    ab.notes,
    "",
    "Raw data: `runs.jsonl` (one record per run: metrics, eval curve, probes) and "
    "`metrics.jsonl` (every logged training step of every run, tagged with arm and seed).",
    "",
  ]
  text = "\n".join(lines)
  with open(os.path.join(outdir, "results.md"), "w") as f:
    f.write(text)
  return text
