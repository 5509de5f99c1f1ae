"""Instruction-format tasks: describe a topic under format constraints, checked exactly.

"Describe the sea. Reply in exactly 5 words, all lowercase, as JSON with the key "note"."
-> `{"note": "deep blue salty waves calm."}`

Constraints (what the verifier checks; the text is the content, or the JSON value):
  * `json`: the content is a JSON object with exactly one key, the given one (no duplicates),
    whose value is a string: the text;
  * `words`: the text has exactly N words; a word is a whitespace-separated run that holds at
    least one letter or digit ("well-known," is one word, a lone "-" none);
  * `lower`: the content has no uppercase letter and the text has at least one letter;
  * `start`: the text's first word, stripped of punctuation, is the given word (any case).
Difficulty (how many constraints, and N): 1: one of json / words / lower, N 3-8;
  2: two of them, N 3-8;  3: all three, N 4-9;  4: all three and `start`, N 5-10.
Answer: the reply's content itself. Reward: 1 when every constraint holds, else 0.
"""

from __future__ import annotations

import json
import random

from qwen3_jax.data.tasks.base import Family, Task, assistant, final_answer

NAME = "format"
KINDS = ("json", "words", "lower")
KEYS = ("answer", "text", "note", "reply", "summary", "result", "output", "message")
VERBS = ("Describe", "Write about", "Say something about")
TOPICS = {
  "the sea": "deep blue salty wide calm cold waves tide foam vast green wild",
  "a cat": "soft small quiet furry quick curious sleepy warm proud playful calm sly",
  "winter": "cold snow ice white dark long frost quiet grey crisp still bare",
  "the sun": "hot bright yellow warm big round light golden strong high early red",
  "a forest": "green tall trees moss quiet damp dark old wild leaves deep shady",
  "the city": "busy loud tall bright crowded fast noisy streets lights concrete vast late",
  "rain": "wet grey cool soft steady light heavy drops puddles quiet dark fresh",
  "a dog": "loyal happy loud fast friendly warm big playful brave eager muddy kind",
  "music": "loud soft happy sad slow fast rhythm melody bright deep warm lively",
  "the moon": "pale round silver cold quiet bright full distant white calm high lonely",
  "a garden": "green bright fresh flowers quiet small neat busy sunny lush colorful calm",
  "coffee": "hot dark bitter strong rich warm black fresh bold smooth early daily",
  "a river": "long wide cold fast clear deep blue calm winding quiet old green",
  "the desert": "hot dry vast sandy empty quiet bright harsh still golden wide lonely",
  "a storm": "loud dark wild wet fast cold heavy windy grey fierce sudden violent",
  "spring": "green fresh warm bright new soft rainy sunny mild lively young busy",
  "bread": "warm soft fresh brown crusty plain simple golden light daily sweet crisp",
  "a mountain": "tall cold steep high rocky old vast white quiet hard grey distant",
  "the night": "dark quiet cold still long black calm deep starry late silent cool",
  "a train": "fast long loud busy heavy steel late early crowded smooth quiet old",
  "autumn": "cool red golden crisp brown damp windy mild short quiet bright dry",
  "the kitchen": "warm busy bright small clean noisy crowded cozy messy white tidy hot",
}
# level -> (how many of KINDS, with `start`, smallest N, largest N)
_LEVELS = {1: (1, False, 3, 8), 2: (2, False, 3, 8), 3: (3, False, 4, 9), 4: (3, True, 5, 10)}


def sample(rng: random.Random, difficulty: int) -> Task:
  count, with_start, lo, hi = _LEVELS[difficulty]
  topic = rng.choice(sorted(TOPICS))
  kinds = set(rng.sample(KINDS, count))
  n = rng.randint(lo, hi)
  words = rng.sample(TOPICS[topic].split(), n)
  cons, phrases = {}, []
  if "words" in kinds:
    cons["words"] = n
    phrases.append(f"in exactly {n} words")
  if with_start:
    cons["start"] = words[0]
    phrases.append(f'starting with "{words[0]}"')
  if "lower" in kinds:
    cons["lower"] = True
    phrases.append("all lowercase")
  if "json" in kinds:
    cons["key"] = rng.choice(KEYS)
    phrases.append(f'as JSON with the key "{cons["key"]}"')
  text = " ".join(words) + "."
  if "lower" not in kinds:
    text = text[0].upper() + text[1:]
  answer = json.dumps({cons["key"]: text}) if "key" in cons else text
  prompt = f"{rng.choice(VERBS)} {topic}. Reply " + ", ".join(phrases) + "."
  return Task(NAME, difficulty, prompt, answer, {"constraints": cons, "topic": topic})


def count_words(text: str) -> int:
  """Whitespace-separated runs holding at least one letter or digit."""
  return sum(any(ch.isalnum() for ch in token) for token in text.split())


def _first_word(text: str) -> str:
  for token in text.split():
    if any(ch.isalnum() for ch in token):
      start = next(i for i, ch in enumerate(token) if ch.isalnum())
      end = len(token) - next(i for i, ch in enumerate(reversed(token)) if ch.isalnum())
      return token[start:end].casefold()
  return ""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    raise ValueError("duplicate key")
  return dict(pairs)


def check(constraints: dict, content: str) -> bool:
  """Whether a reply's content meets every constraint (see the module docstring)."""
  text = content
  if "key" in constraints:
    try:
      obj = json.loads(content, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):
      return False
    if not isinstance(obj, dict) or list(obj) != [constraints["key"]]:
      return False
    text = obj[constraints["key"]]
    if not isinstance(text, str):
      return False
  if not text.strip():
    return False
  if "words" in constraints and count_words(text) != constraints["words"]:
    return False
  if constraints.get("lower"):
    if content != content.lower() or text != text.lower():
      return False
    if not any(ch.isalpha() for ch in text):
      return False
  if "start" in constraints and _first_word(text) != constraints["start"].casefold():
    return False
  return True


def reward(task: Task, completion: str) -> float:
  """1 when the reply's content meets every constraint, else 0."""
  return float(check(task.meta["constraints"], final_answer(completion)))


def gold(task: Task) -> dict:
  cons = task.meta["constraints"]
  text = json.loads(task.answer)[cons["key"]] if "key" in cons else task.answer
  words = text.rstrip(".").split()
  rules = []
  if "words" in cons:
    rules.append(f"exactly {cons['words']} words")
  if "start" in cons:
    rules.append(f'"{cons["start"]}" as the first word')
  if "lower" in cons:
    rules.append("no capital letters")
  if "key" in cons:
    rules.append(f'a JSON object whose only key is "{cons["key"]}", holding the text')
  lines = [f"The reply needs {'; '.join(rules)}."]
  lines.append(f"Words that fit {task.meta['topic']}: {', '.join(w.lower() for w in words)}.")
  if "words" in cons:
    counted = ", ".join(f"{w.lower()} {i}" for i, w in enumerate(words, 1))
    lines.append(f"Counting them: {counted}. That is {len(words)}.")
  lines.append(f"The text: {text}")
  if "key" in cons:
    lines.append(f"Wrapped: {task.answer}")
  checks = [f"{count_words(text)} words"] if "words" in cons else []
  if "start" in cons:
    checks.append(f'starts with "{_first_word(text)}"')
  if "lower" in cons:
    checks.append("no capitals")
  if "key" in cons:
    checks.append(f'one key, "{cons["key"]}"')
  lines.append(f"Check: {', '.join(checks)}. All met.")
  return assistant("\n".join(lines), task.answer)


FAMILY = Family(NAME, "format", sample, reward, gold)
