"""Tool task: find the cheapest flight with `search_flights`, then email it with `send_email`.

"Email the cheapest AMS to JFK flight on 2025-03-14 to ana@example.com." -> search, email
the flight number to ana@example.com -> "DL456".

Difficulty (tool calls in the gold chain):
  1: one search; name the cheapest flight, no email;
  2: one search, then email the cheapest (2 calls);
  3: two searches (two dates), then email the cheapest of both days (3 calls);
  4: as 3, counting only flights leaving after 12:00; the cheapest of all leaves earlier, so
     the filter changes the answer (3 calls).
The cheapest flight is unique (no price ties, no other flight with its number).
Answer: the flight number, e.g. "DL456".
Reward: levels 2-4 look at the side effect in the `ToolEnv`'s outbox first: exactly one email,
to the asked address, naming the cheapest flight and no other flight found. A right email
scores 0.5, plus 0.5 for the right answer; a wrong, missing or extra email scores 0. Level 1
scores 1 for the right answer, 0 if any email was sent (when an env is given).
"""

from __future__ import annotations

import datetime
import json
import random
import re

from qwen3_jax.data.tasks.base import (
  Family,
  Task,
  ToolEnv,
  ToolTask,
  assistant,
  final_answer,
  tool_call,
  tool_message,
)
from qwen3_jax.infer.example_tools import search_flights

NAME = "flight_tools"
TOOLS = ("search_flights", "send_email")
AIRPORTS = ("AMS", "CDG", "FRA", "LHR", "JFK", "SFO", "NRT", "SIN")
PEOPLE = ("ana", "ben", "cleo", "dan", "eva", "finn", "gia", "hugo", "ida", "jon", "kai", "lea")
DOMAINS = ("example.com", "example.org", "mail.test")
_FIRST_DAY = datetime.date(2025, 1, 1)
_AFTER = "12:00"


def _eligible(task_meta: dict, flight: dict) -> bool:
  return not task_meta["after_noon"] or flight["depart"][11:16] > _AFTER


def sample(rng: random.Random, difficulty: int) -> ToolTask:
  while True:
    origin, destination = rng.sample(AIRPORTS, 2)
    day = _FIRST_DAY + datetime.timedelta(days=rng.randrange(730))
    dates = [day.isoformat()]
    if difficulty >= 3:
      dates.append((day + datetime.timedelta(days=rng.randint(1, 2))).isoformat())
    email = f"{rng.choice(PEOPLE)}@{rng.choice(DOMAINS)}" if difficulty >= 2 else None
    meta = {"origin": origin, "destination": destination, "dates": dates, "email": email}
    meta["after_noon"] = difficulty == 4
    flights = [f for d in dates for f in search_flights(origin, destination, d)["flights"]]
    if any(f["depart"][11:16] == _AFTER for f in flights):
      continue  # "after 12:00" would be ambiguous
    pool = [f for f in flights if _eligible(meta, f)]
    if not pool:
      continue
    best = min(pool, key=lambda f: f["price_eur"])
    if meta["after_noon"] and best is min(flights, key=lambda f: f["price_eur"]):
      continue  # at level 4 the time filter must change the answer
    numbers = [f["flight"] for f in flights]
    prices = [f["price_eur"] for f in pool]
    if prices.count(best["price_eur"]) == 1 and numbers.count(best["flight"]) == 1:
      break
  meta["flights"] = numbers
  route = f"{origin} to {destination}"
  when = " or ".join(dates)
  late = " leaving after 12:00" if meta["after_noon"] else ""
  if difficulty == 1:
    prompt = f"What is the cheapest {route} flight on {when}? Give its flight number."
  else:
    prompt = f"Email the cheapest {route} flight{late} on {when} to {email}."
  return ToolTask(NAME, difficulty, prompt, best["flight"], meta, TOOLS)


def _mentions(text: str, flight: str) -> bool:
  return re.search(rf"(?<![A-Za-z0-9]){re.escape(flight)}(?![0-9])", text) is not None


def email_ok(task: Task, env: ToolEnv) -> bool:
  """Exactly one email, to the asked address, naming the cheapest flight and no other."""
  if len(env.outbox.messages) != 1:
    return False
  mail = env.outbox.messages[0]
  text = f"{mail.subject}\n{mail.body}"
  others = [f for f in task.meta["flights"] if f != task.answer]
  return (
    mail.to.casefold() == task.meta["email"].casefold()
    and _mentions(text, task.answer)
    and not any(_mentions(text, f) for f in others)
  )


def reward(task: Task, completion: str, env: ToolEnv | None = None) -> float:
  """See the module docstring; levels 2-4 need the `env` the completion's calls ran in."""
  right = final_answer(completion) == task.answer
  if task.meta["email"] is None:
    return float(right and (env is None or not env.outbox.messages))
  if env is None:
    raise ValueError(f"{NAME} level {task.difficulty} is judged by its side effect: pass env")
  return 0.5 + 0.5 * right if email_ok(task, env) else 0.0


def gold(task: Task) -> list[dict]:
  """The gold turns after the user's, with the tool results from actually running the tools."""
  meta, env = task.meta, task.env()
  route = f"{meta['origin']} to {meta['destination']}"
  dates = meta["dates"]
  searches = [
    tool_call(
      "search_flights", {"origin": meta["origin"], "destination": meta["destination"], "date": d}
    )
    for d in dates
  ]
  first = f"I need the {route} flights on {' and on '.join(dates)}; I will search"
  msgs = [assistant(first + (" both days." if len(dates) > 1 else "."), "", searches)]
  flights = []
  for call in searches:
    result = env.run(call)
    msgs.append(tool_message(call, result))
    flights += json.loads(result.content)["flights"]
  listed, pool = [], []
  for f in flights:
    note = "" if _eligible(meta, f) else ", leaves before 12:00, skip"
    listed.append(
      f"{f['flight']} {f['depart'][:10]} {f['depart'][11:16]} {f['price_eur']} EUR{note}"
    )
    if not note:
      pool.append(f)
  best = min(pool, key=lambda f: f["price_eur"])
  higher = ", ".join(str(f["price_eur"]) for f in pool if f is not best) or "none"
  found = (
    f"Found: {'; '.join(listed)}. The cheapest is {best['flight']} at {best['price_eur']} EUR. "
    f"Check: the other prices ({higher}) are all higher."
  )
  if meta["email"] is None:
    msgs.append(assistant(found, best["flight"]))
    return msgs
  body = f"{best['flight']} from {route}, {best['depart'][:10]} {best['depart'][11:16]}, "
  body += f"{best['price_eur']} EUR."
  args = {"to": meta["email"], "subject": f"Cheapest flight {route}", "body": body}
  call = tool_call("send_email", args)
  msgs.append(assistant(f"{found} Now I email it to {meta['email']}.", "", [call]))
  msgs.append(tool_message(call, env.run(call)))
  done = f"The email to {meta['email']} was sent; the flight is {best['flight']}."
  msgs.append(assistant(done, best["flight"]))
  return msgs


FAMILY = Family(NAME, "tool", sample, reward, gold)
