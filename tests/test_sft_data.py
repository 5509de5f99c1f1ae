"""SFT stage data: stage 1's verified gold transcripts and stage 3's rejection sampling."""

import dataclasses
import json

import pytest

from qwen3_jax.data import chat, cold_start, fusion, pipeline, tasks
from qwen3_jax.data.tokenizer import (
  END_THINK,
  END_TOOL_RESPONSE,
  THINK,
  TOOL_RESPONSE,
  train_tokenizer,
)


def _corrupt(task, turns):
  """A copy of the gold turns that must fail verification: a wrong final answer, or (tool
  tasks) a tool response the tools would not give."""
  turns = [dict(m) for m in turns]
  if isinstance(task, tasks.ToolTask):
    k = next(i for i, m in enumerate(turns) if m["role"] == "tool")
    turns[k]["content"] = turns[k]["content"].replace("1", "7", 1) + " "
  else:
    turns[-1]["content"] = {"even": "odd", "odd": "even"}.get(task.answer, task.answer + "1")
  return turns


def test_cold_start_writes_only_verified_gold(monkeypatch):
  real_gold = tasks.gold
  drawn = []

  def gold(task):  # every other task's gold transcript is broken
    drawn.append(task.prompt)
    turns = real_gold(task)
    return _corrupt(task, turns) if len(drawn) % 2 == 0 else turns

  monkeypatch.setattr(tasks, "gold", gold)
  rows, stats = cold_start.build_cold_start(["parity", "flight_tools"], 4, (2, 3), seed=5)
  monkeypatch.undo()
  assert stats.drawn == {"parity": 4, "flight_tools": 4}
  assert stats.written == {"parity": 2, "flight_tools": 2}
  assert {f: len(r) for f, r in stats.rejected.items()} == {"parity": 2, "flight_tools": 2}
  kept = [r["messages"][0]["content"] for r in rows]
  assert kept == [p for i, p in enumerate(drawn) if i % 2 == 0]
  by_prompt = {
    t.prompt: t
    for f in ("parity", "flight_tools")
    for t in tasks.make_split(f, "train", 4, (2, 3), 5)
  }
  for row in rows:  # an independent check: the written transcript is the real gold one
    task = by_prompt[row["messages"][0]["content"]]
    assert row["messages"] == tasks.messages(task)
    assert row["difficulty"] == task.difficulty and row["family"] == task.family
    assert ("tools" in row) == isinstance(task, tasks.ToolTask)
    if task.family == "parity":
      assert tasks.reward(task, cold_start.thinking_completion(row["messages"][-1])) == 1.0
  # the user turn carries no flag: thinking is the default mode
  assert all(chat.thinking_mode(r["messages"][:1]) for r in rows)


def test_cold_start_rejects_transcripts_longer_than_max_tokens():
  tok = train_tokenizer(
    [tasks.render_gold(t) for t in tasks.make_split("parity", "train", 8, 1, 0)], 300
  )
  rows, stats = cold_start.build_cold_start(
    ["parity"], 6, (1, 4), seed=0, tokenizer=tok, max_tokens=10_000
  )
  lengths = sorted(len(tok.encode(chat.render(r["messages"])).ids) + 1 for r in rows)
  assert len(rows) == 6 and stats.max_tokens == lengths[-1]
  cut = lengths[2]  # keeps the 3 shortest (and ties)
  rows, stats = cold_start.build_cold_start(
    ["parity"], 6, (1, 4), seed=0, tokenizer=tok, max_tokens=cut
  )
  assert len(rows) == sum(n <= cut for n in lengths) and stats.max_tokens <= cut
  assert len(stats.rejected["parity"]) == 6 - len(rows)
  with pytest.raises(ValueError, match="tokenizer"):
    cold_start.build_cold_start(["parity"], 1, max_tokens=5)


def test_assistant_loss_mask_excludes_tool_responses(tmp_path):
  rows, _ = cold_start.build_cold_start(["unit_tools"], 2, 3, seed=0)
  path = str(tmp_path / "s1.jsonl")
  cold_start.write_jsonl(rows, path)
  cfg = pipeline.DataConfig(sources=(path,), loss_on="assistant")
  docs = pipeline.read_documents(cfg)
  tok = train_tokenizer(["".join(t for t, _ in d) for d in docs] * 2, 400)
  for row, doc in zip(rows, docs, strict=True):
    text = "".join(t for t, _ in doc)
    assert text == chat.render(row["messages"], row["tools"])
    [(ids, mask)] = chat.encode_pieces(tok, [doc])
    trained = tok.decode(
      [i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False
    )
    untrained = tok.decode(
      [i for i, m in zip(ids, mask, strict=True) if not m], skip_special_tokens=False
    )
    tool_msgs = [m for m in row["messages"] if m["role"] == "tool"]
    assert len(tool_msgs) >= 2
    for m in tool_msgs:  # every tool response is in the text, none of it trained
      block = f"{TOOL_RESPONSE}\n{m['content']}\n{END_TOOL_RESPONSE}"
      assert block in text and block in untrained and block not in trained
    assert TOOL_RESPONSE not in trained and "# Tools" not in trained
    for m in row["messages"]:
      if m["role"] == "assistant":  # reasoning, answer and calls are all trained
        assert m["reasoning_content"] in trained
        for call in m.get("tool_calls") or ():
          assert json.dumps(call["function"]["arguments"]) in trained
    assert row["messages"][0]["content"] in untrained


@dataclasses.dataclass
class ScriptedSampler:
  """Per prompt: a verified thinking reply when the task's index is even, else none; always a
  wrong thinking reply, a right answer without thinking and a reply cut off mid-thought."""

  task_list: list
  calls: int = 0

  def __call__(self, prompts):
    self.calls += 1
    out = []
    for i, (task, prompt) in enumerate(zip(self.task_list, prompts, strict=True)):
      assert prompt == chat.render(
        [{"role": "user", "content": task.prompt}], add_generation_prompt=True
      )
      gold = tasks.gold(task)[-1]
      right = f"{THINK}\n{gold['reasoning_content']}\n{END_THINK}\n\n{gold['content']}"
      wrong = f"{THINK}\nhmm\n{END_THINK}\n\nwrong {gold['content']}"
      texts = [wrong, f"{THINK}\n\n{END_THINK}\n\n{gold['content']}", f"{THINK}\nstill thinking"]
      out.append(texts + ([right, right] if i % 2 == 0 else []))
    return out


def test_rejection_sampling_keeps_only_verified_answers_with_flags_and_switches(tmp_path):
  task_list = tasks.make_split("parity", "train", 4, 1, 7) + tasks.make_split(
    "arithmetic", "train", 4, 2, 7
  )
  sampler = ScriptedSampler(task_list)
  rows, report = fusion.build_fusion(task_list, sampler, multi_turn=6, seed=1)
  assert sampler.calls == 1  # one batched call for every prompt
  assert report["rejection"] == {
    f: {"prompts": 4, "samples": 4 * 3 + 2 * 2, "kept": 4, "prompts_kept": 2}
    for f in ("parity", "arithmetic")
  }
  assert report["no_think_answers"] == {"sample": 4, "gold": 4}
  assert report["rows"] == {"think": 4, "no_think": 8, "think->no_think": 3, "no_think->think": 3}
  by_prompt = {t.prompt: t for t in task_list}
  for row in rows:
    users = [m for m in row["messages"] if m["role"] == "user"]
    assert all(u["content"].endswith((" /think", " /no_think")) for u in users)
    final = row["messages"][-1]
    task = by_prompt[users[-1]["content"].rsplit(" ", 1)[0]]
    thinking = chat.thinking_mode(row["messages"][:-1])
    assert thinking == (row["mode"] in ("think", "no_think->think"))
    text = chat.render(row["messages"])
    reply = text[text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n") :]
    if thinking:  # a kept sample: it thought, and its verifier accepts it
      assert final["reasoning_content"].strip() and tasks.reward(task, reply) == 1.0
    else:  # the empty think block, then the answer
      assert reply.startswith(chat.EMPTY_THINK) and tasks.reward(task, reply) == 1.0
    if len(users) == 2:  # a flag switch; only the last reply is trained
      assert chat.thinking_mode(row["messages"][:1]) != thinking
      assert row["loss_on"] == "last" and text.count(THINK) == 1
  # the packer honours "loss_on": "last": the history reply is not trained
  path = str(tmp_path / "s3.jsonl")
  cold_start.write_jsonl(rows, path)
  docs = pipeline.read_documents(pipeline.DataConfig(sources=(path,), loss_on="assistant"))
  for row, doc in zip(rows, docs, strict=True):
    trained = [t for t, a in doc if a]
    assert len(trained) == 1 and trained[0].endswith("<|im_end|>")
    assert row["messages"][-1]["content"] in trained[0]


def test_rejection_sampling_refuses_tool_tasks():
  with pytest.raises(ValueError, match="tool"):
    fusion.rejection_sample(tasks.make_split("unit_tools", "train", 1, 1, 0), lambda p: [[]])


def test_a_record_loss_on_other_than_last_or_all_is_refused(tmp_path):
  path = tmp_path / "bad.jsonl"
  row = {"messages": [{"role": "user", "content": "hi"}], "loss_on": "first"}
  path.write_text(json.dumps(row) + "\n")
  with pytest.raises(ValueError, match="bad.jsonl:1: record loss_on must be 'last' or 'all'"):
    pipeline.read_documents(pipeline.DataConfig(sources=(str(path),)))


def test_without_verified_samples_no_think_rows_take_the_gold_answer():
  task_list = tasks.make_split("parity", "train", 3, 1, 2)
  rows, report = fusion.build_fusion(
    task_list, lambda p: [["<think>\nx</think>\n\nno"]] * len(p), multi_turn=2
  )
  assert report["rejection"]["parity"]["kept"] == 0
  assert report["rows"] == {"no_think": 3, "think->no_think": 2}
  assert [r["messages"][-1]["content"] for r in rows[:3]] == [t.answer for t in task_list]
