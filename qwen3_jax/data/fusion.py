"""Stage-3 (thinking-mode fusion) SFT data: rejection-sampled thinking answers, non-thinking
answers and conversations whose `/think` / `/no_think` flag switches between turns.

`build_fusion` takes train-split tasks and a `Sampler` (in practice the stage-2 model through
the generation engine, `eval.sampler.EngineSampler`; in tests a scripted one):
  1. Rejection sampling: each task's prompt is rendered as a thinking-mode query
     (`chat.render([user], add_generation_prompt=True)`, no flag: thinking is the default
     the stage-2 model was trained in) and sampled `n` times. A sample is kept only when it
     thought (a closed, non-empty think block) and its family's verifier gives reward 1;
     `keep_per_prompt` distinct kept samples at most per task.
  2. Rows, every user turn ending in a flag (the chat template's soft switch, see
     `chat.thinking_mode`):
     * thinking: `{prompt} /think` -> the kept sample (`reasoning_content` + `content`);
     * non-thinking: `{prompt} /no_think` -> the answer with an empty reasoning, which the
       template renders as the empty think block `<think>\\n\\n</think>\\n\\n{answer}` (Qwen3's
       non-thinking form). The answer is a verified sample's content, or the gold answer when
       no sample of the task was verified;
     * flag switches (`multi_turn` conversations): `{p1} {flag}` -> answer, `{p2} {other flag}`
       -> reply in the other mode. The template drops the reasoning of turns before the last
       query, so the first reply is history without a think block; such rows carry
       `"loss_on": "last"` and train only the final reply (training the history would teach
       answering a `/think` turn without thinking).
Tool families are not sampled here (their rollouts need the tool loop); only reasoning and
format families are accepted.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Sequence

from qwen3_jax.data import chat, tasks
from qwen3_jax.data.tokenizer import END_THINK

THINK_FLAG, NO_THINK_FLAG = "/think", "/no_think"

# Rendered prompts -> for each, the texts of its n sampled replies (after the assistant header).
Sampler = Callable[[list[str]], list[list[str]]]


def flagged(prompt: str, thinking: bool) -> dict:
  """The user turn `prompt` with the soft switch for the mode at its end."""
  return {"role": "user", "content": f"{prompt} {THINK_FLAG if thinking else NO_THINK_FLAG}"}


def verified_reply(task: tasks.Task, text: str) -> dict | None:
  """The reply as an assistant message when it thought and its verifier gives 1, else None."""
  if END_THINK not in text:
    return None  # cut off inside its reasoning, or never opened a think block
  parsed = chat.parse(text)
  if not parsed.reasoning.strip() or parsed.tool_calls:
    return None
  if tasks.reward(task, text) != 1.0:
    return None
  return {"role": "assistant", "reasoning_content": parsed.reasoning, "content": parsed.content}


def rejection_sample(
  task_list: Sequence[tasks.Task], sampler: Sampler, keep_per_prompt: int = 1
) -> tuple[list[list[dict]], dict]:
  """Verified thinking replies per task (at most `keep_per_prompt`, distinct) and per-family
  counts {"samples", "kept", "prompts", "prompts_kept"}."""
  for t in task_list:
    if tasks.FAMILIES[t.family].kind == "tool":
      raise ValueError(f"rejection sampling takes no tool tasks, got family {t.family!r}")
  prompts = [
    chat.render([{"role": "user", "content": t.prompt}], add_generation_prompt=True)
    for t in task_list
  ]
  replies = sampler(prompts)
  if len(replies) != len(task_list):
    raise ValueError(f"the sampler answered {len(replies)} of {len(task_list)} prompts")
  counts = collections.defaultdict(collections.Counter)
  kept = []
  for task, texts in zip(task_list, replies, strict=True):
    c = counts[task.family]
    c["prompts"] += 1
    c["samples"] += len(texts)
    mine, seen = [], set()
    for text in texts:
      msg = verified_reply(task, text)
      if msg is None:
        continue
      c["kept"] += 1
      key = (msg["reasoning_content"], msg["content"])
      if key not in seen and len(mine) < keep_per_prompt:
        seen.add(key)
        mine.append(msg)
    c["prompts_kept"] += bool(mine)
    kept.append(mine)
  fields = ("prompts", "samples", "kept", "prompts_kept")
  return kept, {f: {k: c[k] for k in fields} for f, c in counts.items()}


def build_fusion(
  task_list: Sequence[tasks.Task],
  sampler: Sampler,
  *,
  multi_turn: int = 0,
  keep_per_prompt: int = 1,
  seed: int = 0,
) -> tuple[list[dict], dict]:
  """The stage-3 rows (module docstring) and a report.

  Args:
    task_list: train-split tasks of reasoning / format families.
    sampler: answers rendered thinking-mode prompts, n replies each.
    multi_turn: flag-switching two-turn conversations to add (orders alternate: /think then
      /no_think, /no_think then /think; only the first order when no sample was verified);
      0 = none.
    keep_per_prompt: most verified replies kept per task (each becomes a thinking row).
    seed: the pairing of tasks in multi-turn rows.

  Returns:
    (rows, report): rows {"messages", "mode", "family"} (+ "loss_on": "last" for multi-turn);
    report {"rejection": per-family counts, "rows": rows per mode, "no_think_answers":
    {"sample": k, "gold": g}}.
  """
  kept, counts = rejection_sample(task_list, sampler, keep_per_prompt)
  rows, sources = [], collections.Counter()
  answers = []
  for task, mine in zip(task_list, kept, strict=True):
    for msg in mine:
      rows.append(_row([flagged(task.prompt, True), msg], "think", task.family))
    answer = mine[0]["content"] if mine else tasks.gold(task)[-1]["content"]
    sources["sample" if mine else "gold"] += 1
    answers.append(answer)
    no_think = {"role": "assistant", "reasoning_content": "", "content": answer}
    rows.append(_row([flagged(task.prompt, False), no_think], "no_think", task.family))
  thinkers = [i for i, mine in enumerate(kept) if mine]
  rng = random.Random(f"fusion|{seed}")
  for k in range(multi_turn if len(task_list) > 1 else 0):
    think_last = k % 2 == 1 and bool(thinkers)  # a /think last turn needs a verified sample
    last = rng.choice(thinkers) if think_last else rng.randrange(len(task_list))
    first = rng.choice([i for i in range(len(task_list)) if i != last])
    history = {"role": "assistant", "content": answers[first]}
    final = (
      kept[last][0]
      if think_last
      else {"role": "assistant", "reasoning_content": "", "content": answers[last]}
    )
    msgs = [
      flagged(task_list[first].prompt, not think_last),
      history,
      flagged(task_list[last].prompt, think_last),
      final,
    ]
    mode = "no_think->think" if think_last else "think->no_think"
    rows.append({**_row(msgs, mode, task_list[last].family), "loss_on": "last"})
  report = {
    "rejection": counts,
    "rows": dict(collections.Counter(r["mode"] for r in rows)),
    "no_think_answers": dict(sources),
  }
  return rows, report


def _row(messages: list[dict], mode: str, family: str) -> dict:
  return {"messages": messages, "mode": mode, "family": family}
