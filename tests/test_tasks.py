"""Task families: verifiers against gold and wrong answers, countdown partial credit, format
checks by hand, train / held-out disjointness, determinism, gold transcripts, tool chains
replayed through the example registry, and a corpus free of held-out prompts."""

import json
import os
import random
import re
import subprocess
import sys

import pytest

from qwen3_jax.data import chat, corpus, tasks
from qwen3_jax.data.tasks import countdown, expr, flight_tools, formats, registry
from qwen3_jax.data.tasks.base import Family, Task

IM_ASSISTANT = "<|im_start|>assistant\n"


def replies(text: str) -> list[str]:
  """The assistant turns of rendered chat text, each as the model would have generated it."""
  return [part.split("<|im_end|>")[0] + "<|im_end|>" for part in text.split(IM_ASSISTANT)[1:]]


def run_gold(task: Task) -> tuple[str, tasks.ToolEnv | None]:
  """The gold final reply as generated text; for tool tasks, the tool calls are read back from
  the rendered gold turns (`chat.parse`) and run through a fresh environment."""
  text = tasks.render_gold(task)
  turns = replies(text)
  if not isinstance(task, tasks.ToolTask):
    assert len(turns) == 1
    return turns[0], None
  env = task.env()
  results = [m["content"] for m in tasks.gold(task) if m["role"] == "tool"]
  for turn in turns[:-1]:
    for call in chat.parse(turn).tool_calls:
      assert call.error is None
      result = env.execute(call.name, call.arguments)
      assert result.ok, result.content
      assert result.content == results.pop(0)  # what the gold transcript shows
  assert not results and not chat.parse(turns[-1]).tool_calls
  return turns[-1], env


def wrong_answer(task: Task) -> str:
  """A plausible wrong answer for the task."""
  f, a = task.family, task.answer
  if f == "arithmetic":
    return str(int(a) + 1)
  if f == "countdown":
    return "(" + a + ") + 1"  # well-formed: scores 0.1, checked separately
  if f == "reverse_words":
    return " ".join(task.meta["words"])
  if f == "parity":
    return "even" if a == "odd" else "odd"
  if f == "format":
    cons = task.meta["constraints"]
    if "key" in cons:
      return a.replace(f'"{cons["key"]}"', '"wrong"', 1)
    if "words" in cons:
      return a.split(" ", 1)[1]
    return a.upper()
  if f == "unit_tools":
    return tasks.base.fmt_decimal(task.meta["value"] + 0.02)
  assert f == "flight_tools"
  return next(x for x in task.meta["flights"] if x != a)


@pytest.mark.parametrize("family", list(tasks.FAMILIES))
def test_gold_scores_one_and_wrong_answers_do_not(family):
  n = 12 if family in tasks.tool_families else 40
  for level in tasks.LEVELS:
    for split in tasks.SPLITS:
      for task in tasks.make_split(family, split, n, level, seed=7):
        assert task.family == family and task.difficulty == level
        reply, env = run_gold(task)
        assert "<think>\n" in reply and "</think>\n\n" in reply
        assert tasks.reward(task, reply, env) == 1.0, (task, reply)
        bad = wrong_answer(task)
        score = tasks.reward(task, bad, env)
        if family == "countdown":
          assert score == countdown.WELL_FORMED
        elif family == "flight_tools" and level > 1:
          assert score == 0.5  # the email is right (gold calls ran), the answer is not
        else:
          assert score == 0.0, (task, bad)
        side_effect_only = 0.5 if family == "flight_tools" and level > 1 else 0.0
        assert tasks.reward(task, "", env) == side_effect_only
        assert tasks.reward(task, "<think>\n" + task.answer, env) == side_effect_only


def test_difficulty_grows():
  def mean(family, level, measure):
    ts = tasks.make_split(family, "train", 40, level, seed=1)
    return sum(measure(t) for t in ts) / len(ts)

  ops = lambda t: len(re.findall(r" [-+*] ", t.meta["expression"]))  # noqa: E731
  assert [mean("arithmetic", d, ops) for d in tasks.LEVELS] == [2, 3, 3, pytest.approx(4.5, 0.2)]
  assert all("(" in t.prompt for t in tasks.make_split("arithmetic", "train", 30, (3, 4)))
  assert all("(" not in t.prompt for t in tasks.make_split("arithmetic", "train", 30, (1, 2)))
  sizes = [mean("countdown", d, lambda t: len(t.meta["numbers"])) for d in tasks.LEVELS]
  assert sizes == [2, 3, 4, 5]
  words = [mean("reverse_words", d, lambda t: len(t.meta["words"])) for d in tasks.LEVELS]
  assert words == sorted(words) and words[0] == 3
  cons = [mean("format", d, lambda t: len(t.meta["constraints"])) for d in tasks.LEVELS]
  assert cons == [1, 2, 3, 4]
  calls = lambda t: sum(len(m.get("tool_calls", ())) for m in tasks.gold(t))  # noqa: E731
  for family in tasks.tool_families:
    assert [mean(family, d, calls) for d in tasks.LEVELS] == [1, 2, 3, 3]


def test_prompts_and_answers_are_short():
  for family in tasks.FAMILIES:
    for task in tasks.make_split(family, "train", 40, tasks.LEVELS, seed=2):
      pieces = re.findall(r"\w+|[^\w\s]", task.prompt)
      assert 5 <= len(pieces) <= 40, task.prompt
      assert len(task.answer) <= 80, task.answer


# ----------------------------------------------------------------------------- countdown


def test_countdown_partial_credit_and_safe_parsing():
  task = Task(
    "countdown", 2, "Reach 24 with 4, 2, 6 ...", "4 * 6", {"numbers": [4, 2, 6], "target": 24}
  )
  cases = {
    "4 * 6": 1.0,  # a subset of the numbers is allowed
    "(6 - 2) * 6": 0.1,  # 6 used twice
    "(2+4)*(6-2)": 0.1,  # two uses of 2
    "6 * (2 + 4) - 12": 0.1,  # 12 was not given
    "4*(2+6)-8": 0.1,
    "((4)) * (6)": 1.0,
    "6 * 2 * 2": 0.1,
    "4 * 6 = 24": 1.0,
    "4 * 6 = 25": 1.0,  # the trailing "= N" is ignored; the expression is what counts
    "4 * 6 = twenty four": 0.0,
    "24": 0.1,
    "4 * 5": 0.1,
    "4 x 6": 0.0,
    "4 * 6.0": 0.0,
    "-4 + 28": 0.0,  # no unary minus
    "2 ** 3": 0.0,
    "48 / 2": 0.0,
    "(4 * 6": 0.0,
    "4 6": 0.0,
    "": 0.0,
    "__import__('os').system('true')": 0.0,
    "4 * 6\nThe answer is above.": 0.0,
    "１ + ２": 0.0,  # full-width digits are not ASCII digits
    "9" * 300: 0.0,  # too long to parse
  }
  for answer, want in cases.items():
    assert tasks.reward(task, answer) == want, answer
  assert tasks.reward(task, "<think>\nhmm, 4 * 6 = 24\n</think>\n\n4 * 6<|im_end|>") == 1.0
  assert tasks.reward(task, "<think>\nI tried (6 - 2) * 6\n</think>\n\n(6 - 2) * 6") == 0.1


def test_expression_parser_matches_python():
  rng = random.Random(0)
  for _ in range(500):
    leaves = [rng.randint(0, 30) for _ in range(rng.randint(1, 6))]
    tree = expr.random_tree(rng, leaves)
    text = expr.render(tree)
    # eval is safe here: our own text of digits, operators and parentheses.
    assert expr.evaluate(expr.parse(text)) == expr.evaluate(tree) == eval(text)
    assert expr.literals(expr.parse(text)) == leaves
    steps = expr.reduce_steps(expr.parse(text))
    assert len(steps) == len(leaves) - 1
    if steps:
      assert steps[-1].value == eval(text) and steps[-1].rest == expr.render(eval(text))
  assert expr.render(expr.parse("1 - (2 - 3)")) == "1 - (2 - 3)"
  assert expr.render(expr.parse("(1 - 2) - 3")) == "1 - 2 - 3"
  assert expr.render(expr.parse("(2 * 3) + (4 * 5)")) == "2 * 3 + 4 * 5"
  for bad in ["", "()", "1 +", "+1", "1 2", "(1", "1)", "2 ** 3", "1 / 2", "a", "1e3", "1.5"]:
    with pytest.raises(expr.ExprError):
      expr.parse(bad)
  with pytest.raises(expr.ExprError):
    expr.parse("(" * 40 + "1" + ")" * 40)


# ----------------------------------------------------------------------------- format


def test_format_verifier_hand_examples():
  check = formats.check
  assert formats.count_words("Blue, deep, and wide.") == 4
  assert formats.count_words("Blue - deep and wide!") == 4  # a lone dash is no word
  assert formats.count_words("well-known deep blue sea") == 4
  assert formats.count_words("  \n ") == 0
  four = {"words": 4}
  assert check(four, "Blue, deep, and wide.")
  assert check(four, "It's 5 o'clock now.")
  assert not check(four, "Blue, deep and wide and cold.")
  assert not check(four, "Blue deep wide.")
  key = {"key": "note"}
  assert check(key, '{"note": "deep blue sea"}')
  assert check(key, '  {"note":"Deep"}  ')
  assert not check(key, '{"text": "deep blue sea"}')  # the wrong key
  assert not check(key, '{"Note": "deep blue sea"}')
  assert not check(key, '{"note": "a", "text": "b"}')  # an extra key
  assert not check(key, '{"note": "a", "note": "b"}')  # a duplicate key
  assert not check(key, '{"note": 5}')
  assert not check(key, '{"note": ""}')
  assert not check(key, '["note"]')
  assert not check(key, '```json\n{"note": "deep"}\n```')
  assert not check(key, "note: deep blue sea")
  lower = {"lower": True}
  assert check(lower, "deep blue sea, 3 waves.")
  assert not check(lower, "Deep blue sea.")
  assert not check(lower, "deep blue SEA")
  assert not check(lower, "123 456")  # no letters at all
  assert not check(lower, "")
  both = {"key": "note", "lower": True, "words": 3, "start": "deep"}
  assert check(both, '{"note": "deep blue sea."}')
  assert not check(both, '{"note": "Deep blue sea."}')
  assert not check(both, '{"note": "\\u0044eep blue sea."}')  # an escaped capital D
  assert not check(both, '{"note": "deep blue sea today"}')
  assert not check(both, '{"note": "blue deep sea"}')
  assert check({"start": "deep", "words": 3}, '"Deep," blue sea')
  task = tasks.make_split("format", "train", 1, 4)[0]
  assert tasks.reward(task, "<think>\nok\n</think>\n\n" + task.answer) == 1.0
  assert tasks.reward(task, "<think>\nok\n</think>\n\n" + task.answer.upper()) == 0.0


def test_topic_vocabularies_are_big_enough():
  for topic, words in formats.TOPICS.items():
    assert len(set(words.split())) == len(words.split()) >= 12, topic
    assert words == words.lower()


# ----------------------------------------------------------------------------- tools


def test_tool_tasks_gold_chain_through_the_registry():
  for family in tasks.tool_families:
    for level in tasks.LEVELS:
      for task in tasks.make_split(family, "heldout", 5, level, seed=3):
        assert isinstance(task, tasks.ToolTask)
        assert {t["function"]["name"] for t in tasks.tools(task)} == set(task.tools)
        reply, env = run_gold(task)
        assert tasks.reward(task, reply, env) == 1.0
        assert len(env.calls) == min(level, 3)
        if family == "flight_tools" and level > 1:
          (mail,) = env.outbox.messages
          assert mail.to == task.meta["email"] and task.answer in mail.body


def _flight_env(task, to=None, body=None, times=1):
  env = task.env()
  for _ in range(times):
    env.execute("send_email", {"to": to or task.meta["email"], "subject": "Flight", "body": body})
  return env


def test_flight_side_effect_is_what_counts():
  task = tasks.make_split("flight_tools", "train", 1, 3, seed=5)[0]
  right, other = task.answer, next(f for f in task.meta["flights"] if f != task.answer)
  assert tasks.reward(task, right, _flight_env(task, body=f"Take {right}.")) == 1.0
  assert tasks.reward(task, other, _flight_env(task, body=f"Take {right}.")) == 0.5
  assert tasks.reward(task, right, task.env()) == 0.0  # no email
  assert tasks.reward(task, right, _flight_env(task, to="eve@example.com", body=right)) == 0.0
  assert tasks.reward(task, right, _flight_env(task, body=f"Take {other}.")) == 0.0
  assert tasks.reward(task, right, _flight_env(task, body=f"{right}, or {other}")) == 0.0
  assert tasks.reward(task, right, _flight_env(task, body=f"{right}", times=2)) == 0.0
  assert tasks.reward(task, right, _flight_env(task, body=f"{right}9")) == 0.0  # another number
  with pytest.raises(ValueError, match="side effect"):
    tasks.reward(task, right)
  # Level 1 asks for no email: the answer alone counts, and a stray email scores 0.
  task1 = tasks.make_split("flight_tools", "train", 1, 1, seed=5)[0]
  assert tasks.reward(task1, task1.answer) == 1.0
  assert tasks.reward(task1, task1.answer, task1.env()) == 1.0
  stray = _flight_env(task1, to="eve@example.com", body=task1.answer)
  assert tasks.reward(task1, task1.answer, stray) == 0.0


def test_level4_flights_need_the_time_filter():
  for task in tasks.make_split("flight_tools", "train", 10, 4, seed=0):
    flights = [
      f
      for d in task.meta["dates"]
      for f in flight_tools.search_flights(task.meta["origin"], task.meta["destination"], d)[
        "flights"
      ]
    ]
    assert min(flights, key=lambda f: f["price_eur"])["flight"] != task.answer
    assert "after 12:00" in task.prompt


def test_unit_answers_within_tolerance():
  task = tasks.make_split("unit_tools", "train", 1, 3, seed=0)[0]
  exact = task.meta["value"]
  assert tasks.reward(task, f"{exact:.2f}") == 1.0
  assert tasks.reward(task, f"{exact:.6f}") == 1.0
  assert tasks.reward(task, f"{exact + 0.004:.3f}") == 1.0
  assert tasks.reward(task, f"{exact + 0.01:.2f}") == 0.0
  assert tasks.reward(task, f"{exact:.2f} m") == 0.0  # the number alone
  assert tasks.reward(task, "about four") == 0.0


# ----------------------------------------------------------------------------- splits


def test_split_hash_is_stable_and_normalised():
  # Pinned: changing the hash would silently move prompts between the splits.
  assert tasks.split_hash("What is 2 + 3 * 4?") == 0x281C839D5ED550BC
  h = tasks.split_hash("What is 2 + 3 * 4?")
  assert h == tasks.split_hash("  what IS 2 +  3 * 4?\n")
  assert h != tasks.split_hash("What is 2 + 3 * 5?")
  prompts = [f"What is {i} + {j}?" for i in range(80) for j in range(50)]
  held = sum(tasks.split_of(p) == "heldout" for p in prompts) / len(prompts)
  assert abs(held - 1 / tasks.HELDOUT_BUCKETS) < 0.02


def test_train_and_heldout_are_disjoint_by_hash():
  for family in tasks.FAMILIES:
    n_train = 400 if family in tasks.tool_families else 1200
    train = tasks.make_split(family, "train", n_train, tasks.LEVELS, seed=0)
    held = tasks.make_split(family, "heldout", 200, tasks.LEVELS, seed=0)
    assert all(tasks.split_of(t.prompt) == "train" for t in train)
    assert all(tasks.split_of(t.prompt) == "heldout" for t in held)
    train_keys = {tasks.normalise_prompt(t.prompt) for t in train}
    held_keys = {tasks.normalise_prompt(t.prompt) for t in held}
    assert len(train_keys) == n_train and len(held_keys) == 200  # unique by default
    assert not train_keys & held_keys


def test_colliding_generators_cannot_leak(monkeypatch):
  # Two "families" drawing from the same tiny pool of prompts under different seeds: each
  # prompt still lands on one side only.
  pool = [f"Say {i}." for i in range(40)]

  def sample(rng, difficulty):
    p = rng.choice(pool)
    return Task("pool", difficulty, p, p, {})

  fams = dict(tasks.FAMILIES)
  for name in ("pool", "pool2"):
    fams[name] = Family(name, "reasoning", sample, lambda t, c: 0.0, lambda t: {})
  monkeypatch.setattr(registry, "FAMILIES", fams)
  train = registry.make_split("pool", "train", 300, 1, seed=1, unique=False)
  train += registry.make_split("pool2", "train", 300, 2, seed=9, unique=False)
  held = registry.make_split("pool", "heldout", 50, 1, seed=1, unique=False)
  held += registry.make_split("pool2", "heldout", 50, 3, seed=4, unique=False)
  assert held and not {t.prompt for t in train} & {t.prompt for t in held}
  n_held = sum(tasks.split_of(p) == "heldout" for p in pool)
  with pytest.raises(ValueError, match="ran out of distinct prompts"):
    registry.make_split("pool", "heldout", n_held + 1, 1)


def test_make_split_is_deterministic():
  for family in tasks.FAMILIES:
    a = tasks.make_split(family, "train", 20, tasks.LEVELS, seed=3)
    assert a == tasks.make_split(family, "train", 20, tasks.LEVELS, seed=3)
    assert a != tasks.make_split(family, "train", 20, tasks.LEVELS, seed=4)
    assert [t.difficulty for t in a] == [1, 2, 3, 4] * 5
  mix = tasks.make_split("parity", "train", 200, {1: 0.75, 4: 0.25}, seed=0)
  assert {t.difficulty for t in mix} == {1, 4} and 120 < sum(t.difficulty == 1 for t in mix) < 180
  with pytest.raises(ValueError):
    tasks.make_split("parity", "test", 1)
  with pytest.raises(ValueError):
    tasks.make_split("parity", "train", 1, 5)
  with pytest.raises(KeyError):
    tasks.make_split("chess", "train", 1)


def test_make_split_is_the_same_in_another_process():
  code = (
    "from qwen3_jax.data import tasks; import json\n"
    "print(json.dumps([[t.prompt, t.answer] for f in tasks.FAMILIES "
    "for t in tasks.make_split(f, 'heldout', 8, (1, 2, 3, 4), seed=11)]))"
  )
  env = {**os.environ, "PYTHONHASHSEED": "12345"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  here = [
    [t.prompt, t.answer]
    for f in tasks.FAMILIES
    for t in tasks.make_split(f, "heldout", 8, (1, 2, 3, 4), seed=11)
  ]
  assert json.loads(out.stdout) == here


# ----------------------------------------------------------------------------- corpus


def test_corpus_has_no_heldout_prompt():
  held = {
    t.prompt
    for f in tasks.reasoning_families
    for seed in range(3)
    for t in tasks.make_split(f, "heldout", 150, tasks.LEVELS, seed=seed)
  }
  for seed in (0, 1):
    texts = corpus.task_transcripts(800, seed=seed)
    prompts = [re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", t, re.S).group(1) for t in texts]
    assert all(tasks.split_of(p) == "train" for p in prompts)
    assert not set(prompts) & held
  docs = corpus.embedded_corpus(max_bytes=20_000, num_tasks=100)
  chats = [d for d in docs if d.startswith("<|im_start|>user")]
  assert len(chats) == 100
  for d in chats:
    prompt = d.split("\n", 1)[1].split("<|im_end|>")[0]
    assert tasks.split_of(prompt) == "train" and prompt not in held


def test_corpus_of_every_family_has_tool_transcripts_and_no_heldout_prompt():
  """`families` adds the format and tool families (tool transcripts: the tools block in the
  system turn, calls and responses), still from the train split only."""
  docs = corpus.embedded_corpus(max_bytes=20_000, num_tasks=70, families=tasks.FAMILIES)
  chats = [d for d in docs if "<|im_start|>user" in d]
  assert len(chats) == 70
  prompts = [re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", d, re.S).group(1) for d in chats]
  assert all(tasks.split_of(p) == "train" for p in prompts)
  with_tools = [d for d in chats if "<tools>" in d]
  assert len(with_tools) == 20 and all("<tool_response>" in d for d in with_tools)
  with pytest.raises(ValueError, match="unknown task families"):
    corpus.embedded_corpus(max_bytes=20_000, num_tasks=7, families=("arithmetic", "chess"))
