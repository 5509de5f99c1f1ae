"""Tool registry / executor: every bad call is refused without running anything, and logged;
the example tools (calculator, unit converter, flights + email)."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from qwen3_jax.infer.example_tools import (
  Outbox,
  calculate,
  convert_units,
  example_registry,
  search_flights,
)
from qwen3_jax.infer.tools import AuditLog, Tool, ToolError, ToolRegistry

WEATHER_SCHEMA = {
  "type": "object",
  "properties": {
    "city": {"type": "string"},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
  },
  "required": ["city"],
  "additionalProperties": False,
}


class Recorder:
  """A tool function that records its calls."""

  def __init__(self, result=None):
    self.calls = []
    self.result = result

  def __call__(self, **kwargs):
    self.calls.append(kwargs)
    return self.result if self.result is not None else {"city": kwargs["city"], "temp_c": 21}


@pytest.fixture
def setup(tmp_path):
  log = AuditLog(tmp_path / "audit" / "tools.jsonl")
  fn = Recorder()
  registry = ToolRegistry(audit_log=log)
  registry.register(Tool("get_weather", "Weather forecast.", WEATHER_SCHEMA, fn))
  return registry, fn, log


def test_valid_call_runs_and_is_logged(setup):
  registry, fn, log = setup
  res = registry.execute("get_weather", '{"city": "Zürich", "days": 2}', conversation_id="c1")
  assert res.ok and res.status == "ok" and res.error is None
  assert json.loads(res.content) == {"city": "Zürich", "temp_c": 21}
  assert "Zürich" in res.content  # ensure_ascii=False
  assert fn.calls == [{"city": "Zürich", "days": 2}]
  # A dict works as well as a JSON string.
  assert registry.execute("get_weather", {"city": "Oslo"}).ok
  records = log.read()
  assert len(records) == 2
  rec = records[0]
  assert set(rec) == {
    "time",
    "conversation_id",
    "tool",
    "arguments",
    "ok",
    "status",
    "error",
    "result_chars",
    "truncated",
    "duration_s",
  }
  assert rec["time"].endswith("Z") and rec["time"][:2] == "20"
  assert rec["conversation_id"] == "c1" and rec["tool"] == "get_weather"
  assert rec["arguments"] == {"city": "Zürich", "days": 2}
  assert rec["ok"] is True and rec["error"] is None and rec["truncated"] is False
  assert rec["result_chars"] == len(res.content)
  assert 0 <= rec["duration_s"] < 5
  # One JSON object per line, appended.
  lines = open(log.path, encoding="utf-8").read().splitlines()
  assert [json.loads(line)["arguments"] for line in lines][1] == {"city": "Oslo"}


BAD_CALLS = {
  "unknown_tool": ("os.system", '{"city": "x"}', None),
  "invalid_json": ("get_weather", '{"city": "x"', None),
  "not_an_object": ("get_weather", '["x"]', None),
  "nan": ("get_weather", '{"city": "x", "days": NaN}', None),
  "missing_required": ("get_weather", '{"days": 2}', None),
  "wrong_type": ("get_weather", '{"city": "x", "days": "2"}', None),
  "extra_property": ("get_weather", {"city": "x", "cmd": "rm -rf /"}, None),
  "out_of_range": ("get_weather", {"city": "x", "days": 70}, None),
  "parse_error": ("get_weather", {"city": "x"}, "unterminated <tool_call>"),
}
EXPECTED_STATUS = {
  "unknown_tool": "unknown_tool",
  "invalid_json": "invalid_json",
  "not_an_object": "invalid_json",
  "nan": "invalid_json",
  "parse_error": "parse_error",
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_calls_run_nothing_and_are_logged(setup, case):
  registry, fn, log = setup
  name, args, parse_error = BAD_CALLS[case]
  res = registry.execute(name, args, conversation_id="c2", parse_error=parse_error)
  assert not res.ok and res.error
  assert res.status == EXPECTED_STATUS.get(case, "invalid_arguments")
  assert res.content == f"Error: {res.error}" and len(res.content) < 400
  assert fn.calls == []
  (rec,) = log.read()
  assert rec["ok"] is False and rec["status"] == res.status and rec["error"] == res.error
  assert rec["tool"] == name and rec["conversation_id"] == "c2"
  assert rec["result_chars"] == len(res.content)
  # Arguments are logged as parsed, or raw when they were never parsed.
  parsed = json.loads(args) if case in ("missing_required", "wrong_type") else args
  assert rec["arguments"] == parsed


def test_error_messages_are_useful(setup):
  registry, _, _ = setup
  res = registry.execute("nope", "{}")
  assert res.content == "Error: unknown tool 'nope'; available: get_weather"
  res = registry.execute("get_weather", '{"days": 2}')
  assert "'city' is a required property" in res.content
  res = registry.execute("get_weather", {"city": "x", "cmd": 1})
  assert "'cmd' was unexpected" in res.content
  res = registry.execute("get_weather", {"city": "x", "days": "2"})
  assert "arguments.days" in res.content and "not of type 'integer'" in res.content
  assert "malformed tool call" in registry.execute("x", None, parse_error="bad").content


def test_tool_exception_and_tool_error(setup, tmp_path):
  registry, _, log = setup

  def boom(city):
    raise RuntimeError(f"backend down for {city}")

  def polite(city):
    raise ToolError(f"no forecast for {city}")

  registry.add({"name": "boom", "description": "", "parameters": WEATHER_SCHEMA}, boom)
  registry.add({"name": "polite", "description": "", "parameters": WEATHER_SCHEMA}, polite)
  res = registry.execute("boom", {"city": "Rome"})
  assert not res.ok and res.status == "exception"
  assert res.content == "Error: tool 'boom' raised RuntimeError: backend down for Rome"
  res = registry.execute("polite", {"city": "Rome"})
  assert res.content == "Error: no forecast for Rome"
  assert [r["status"] for r in log.read()] == ["exception", "exception"]


def test_policy_denial(setup, tmp_path):
  _, fn, _ = setup
  log = AuditLog(tmp_path / "policy.jsonl")
  seen = []

  def policy(name, args, ctx):
    seen.append((name, args, ctx.conversation_id, ctx.extra.get("user")))
    args["city"] = "mutated"  # must not reach the tool
    if ctx.extra.get("user") == "guest":
      return "guests may not ask for the weather"
    return args.get("days", 1) <= 3

  def broken_policy(name, args, ctx):
    raise KeyError("oops")

  registry = ToolRegistry(
    [Tool("get_weather", "", WEATHER_SCHEMA, fn)], policy=policy, audit_log=log
  )
  res = registry.execute(
    "get_weather", {"city": "Oslo"}, conversation_id="c3", context={"user": "guest"}
  )
  assert not res.ok and res.status == "denied"
  assert res.content == "Error: call to 'get_weather' denied: guests may not ask for the weather"
  res = registry.execute("get_weather", {"city": "Oslo", "days": 5})
  assert res.status == "denied" and "not allowed by policy" in res.content
  assert fn.calls == []
  assert registry.execute("get_weather", {"city": "Oslo"}).ok
  assert fn.calls == [{"city": "Oslo"}]
  assert seen[0] == ("get_weather", {"city": "mutated"}, "c3", "guest")
  # A policy that fails denies (fails closed); an invalid call never reaches the policy.
  registry.policy = broken_policy
  assert registry.execute("get_weather", {"city": "Oslo"}).status == "denied"
  n_seen = len(seen)
  registry.policy = policy
  assert registry.execute("get_weather", {"town": "Oslo"}).status == "invalid_arguments"
  assert len(seen) == n_seen and len(fn.calls) == 1
  assert [r["status"] for r in log.read()] == [
    "denied",
    "denied",
    "ok",
    "denied",
    "invalid_arguments",
  ]


def test_timeout_returns_promptly(tmp_path):
  log = AuditLog(tmp_path / "t.jsonl")
  release = threading.Event()
  finished = []

  def slow(city):
    release.wait(10)
    finished.append(city)
    return "late"

  registry = ToolRegistry(audit_log=log, max_running=1)
  registry.register(Tool("slow", "", WEATHER_SCHEMA, slow, timeout_s=0.2))
  t0 = time.perf_counter()
  res = registry.execute("slow", {"city": "x"})
  elapsed = time.perf_counter() - t0
  assert not res.ok and res.status == "timeout"
  assert res.content == "Error: tool 'slow' did not finish within 0.2 s"
  assert 0.2 <= elapsed < 0.2 + 0.5
  # The hung call still holds the only slot: a new call is refused, not queued.
  assert registry.execute("slow", {"city": "y"}).status == "busy"
  release.set()  # the abandoned call finishes in the background; its result is dropped
  for _ in range(100):
    if finished and registry._running == 0:
      break
    time.sleep(0.01)
  assert finished == ["x"]
  assert [r["status"] for r in log.read()] == ["timeout", "busy"]


def test_hung_tool_does_not_block_interpreter_exit():
  code = textwrap.dedent(
    """
    import time
    from qwen3_jax.infer.tools import Tool, ToolRegistry
    r = ToolRegistry([Tool("hang", "", {"type": "object"}, lambda: time.sleep(60), 0.1)])
    print(r.execute("hang", {}).status)
    """
  )
  t0 = time.perf_counter()
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "timeout"
  assert time.perf_counter() - t0 < 15


def test_concurrent_calls_log_one_record_each(tmp_path):
  log = AuditLog(tmp_path / "c.jsonl")
  registry = example_registry(log)

  def worker(i):
    for j in range(20):
      registry.execute("calculator", {"expression": f"{i} * 100 + {j}"}, conversation_id=str(i))

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  recs = log.read()
  assert len(recs) == 120 and all(r["ok"] for r in recs)
  assert sorted(r["arguments"]["expression"] for r in recs) == sorted(
    f"{i} * 100 + {j}" for i in range(6) for j in range(20)
  )
  assert registry._running == 0


def test_results_rendering_and_truncation(tmp_path):
  log = AuditLog(tmp_path / "r.jsonl")
  registry = ToolRegistry(audit_log=log, max_content_chars=200)
  registry.register(Tool("text", "", {"type": "object"}, lambda: "plain ünïcode"))
  registry.register(Tool("num", "", {"type": "object"}, lambda: 3.5))
  registry.register(Tool("big", "", {"type": "object"}, lambda: "x" * 1000))
  registry.register(Tool("set", "", {"type": "object"}, lambda: {1, 2}))
  assert registry.execute("text", None).content == "plain ünïcode"
  assert registry.execute("num", "").content == "3.5"
  res = registry.execute("big", "{}")
  assert res.ok and len(res.content) == 200
  assert res.content.endswith("[truncated: the full result has 1000 characters]")
  assert res.content.startswith("x" * 100)
  res = registry.execute("set", {})
  assert not res.ok and res.status == "bad_result"
  recs = log.read()
  assert recs[2]["truncated"] is True and recs[2]["result_chars"] == 200


def test_registration_checks():
  registry = ToolRegistry()
  registry.register(Tool("a", "", WEATHER_SCHEMA, Recorder()))
  with pytest.raises(ValueError, match="already registered"):
    registry.register(Tool("a", "", WEATHER_SCHEMA, Recorder()))
  with pytest.raises(ValueError, match=r"invalid JSON schema at properties/city/type"):
    registry.register(
      Tool("b", "", {"type": "object", "properties": {"city": {"type": "text"}}}, print)
    )
  with pytest.raises(ValueError, match="invalid JSON schema"):
    registry.register(Tool("b", "", {"type": "object", "required": "city"}, print))
  with pytest.raises(ValueError, match="must describe an object"):
    registry.register(Tool("b", "", {"type": "string"}, print))
  with pytest.raises(ValueError, match="invalid tool name"):
    registry.register(Tool("rm -rf", "", WEATHER_SCHEMA, print))
  with pytest.raises(TypeError, match="not callable"):
    registry.register(Tool("b", "", WEATHER_SCHEMA, "print"))
  assert registry.names() == ["a"]


def test_specs_openai_and_mcp_forms():
  fn = Recorder()
  openai = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER_SCHEMA},
  }
  mcp = {"name": "get_weather", "description": "Weather.", "inputSchema": WEATHER_SCHEMA}
  bare = {"name": "get_weather", "description": "Weather.", "parameters": WEATHER_SCHEMA}
  tools = [Tool.from_spec(s, fn) for s in (openai, mcp, bare)]
  assert tools[0] == tools[1] == tools[2]
  assert tools[0].spec() == openai
  assert Tool.from_spec(tools[0].spec(), fn) == tools[0]  # round trip
  # The spec is a copy: rendering it cannot change the registered schema.
  registry = ToolRegistry([Tool.from_spec(mcp, fn)])
  specs = registry.specs()
  assert specs == [openai]
  specs[0]["function"]["parameters"]["required"].append("days")
  assert registry.specs() == [openai]
  # The MCP schema is enforced like any other.
  assert registry.execute("get_weather", {"days": 1}).status == "invalid_arguments"
  assert registry.execute("get_weather", {"city": "x"}).ok and len(fn.calls) == 1
  no_args = Tool.from_spec({"name": "ping"}, lambda: "pong")
  assert no_args.parameters == {"type": "object", "properties": {}}
  with pytest.raises(ValueError, match="both"):
    Tool.from_spec({**mcp, "parameters": WEATHER_SCHEMA}, fn)
  with pytest.raises(ValueError, match="unsupported tool type"):
    Tool.from_spec({"type": "code_interpreter", "function": {"name": "x"}}, fn)


# ----- example tools -------------------------------------------------------------------------


@pytest.mark.parametrize(
  "expr, want",
  [
    ("2 + 3 * 4", 14),
    ("(2 + 3) * 4", 20),
    ("2 ** 3 ** 2", 512),  # right associative
    ("-2 ** 2", -4),  # ** binds tighter than unary minus
    ("7 // 2 + 7 % 3", 4),
    ("-7 // 2", -4),
    ("1 / 4", 0.25),
    ("0.1 + 0.2", 0.3),
    ("+(3)", 3),
    ("sqrt(16) + abs(-2)", 6.0),
    ("round(2.675, 2)", 2.67),
    ("min(3, 1, 2) + max(4, 5)", 6),
    ("log(e)", 1.0),
    ("log(8, 2)", 3.0),
    ("sin(0) + cos(0)", 1.0),
    ("round(pi, 4)", 3.1416),
    ("2 ** 1000 // 2 ** 999", 2),
    ("12345678901234567890 * 10", 123456789012345678900),
  ],
)
def test_calculator(expr, want):
  got = calculate(expr)
  assert got == want and type(got) is type(want)


@pytest.mark.parametrize(
  "expr, message",
  [
    ("__import__('os').system('echo hi')", "attribute access"),
    ("__import__('os')", "unknown function '__import__'"),
    ("(1).real", "attribute access"),
    ("x + 1", "unknown name 'x'"),
    ("lambda: 1", "unsupported syntax: Lambda"),
    ("(lambda: 1)()", "only the listed functions"),
    ("[i for i in range(10)]", "unsupported syntax: ListComp"),
    ("sum(i for i in [1])", "unknown function 'sum'"),
    ("'a' * 3", "unsupported constant"),
    ("True + 1", "unsupported constant"),
    ("1j", "unsupported constant"),
    ("9 ** 9 ** 9", "too large"),
    ("10 ** 400", "too large"),
    ("2.0 ** 5000", "too large"),
    ("1e308 * 10", "too large"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 / 0", "division by zero"),
    ("sqrt(-1)", "math error"),
    ("2 ^ 3", "use ** for powers"),
    ("1 << 2", "unsupported operator"),
    ("max()", "takes 1 or more arguments"),
    ("sqrt(1, 2)", "takes 1 arguments"),
    ("round(1.5, ndigits=1)", "plain positional"),
    ("-" * 200 + "1", "too deeply nested"),
    ("1 +", "invalid expression"),
    ("1" * 501, "longer than 500"),
    ("a = 1", "invalid expression"),
  ],
)
def test_calculator_rejects(expr, message):
  with pytest.raises(ToolError, match=re.escape(message)):
    calculate(expr)


def test_calculator_through_registry_never_evals(tmp_path):
  log = AuditLog(tmp_path / "calc.jsonl")
  registry = example_registry(log)
  marker = tmp_path / "pwned"
  expr = f"__import__('pathlib').Path({str(marker)!r}).touch()"
  res = registry.execute("calculator", {"expression": expr})
  assert not res.ok and not marker.exists()
  res = registry.execute("calculator", json.dumps({"expression": "(1 + 2) * 3 / 4"}))
  assert res.ok and res.content == "2.25"
  assert [r["ok"] for r in log.read()] == [False, True]


@pytest.mark.parametrize(
  "value, src, dst, want",
  [
    (1, "mi", "km", 1.609344),
    (12, "in", "ft", 1.0),
    (3, "nmi", "m", 5556.0),
    (1, "lb", "g", 453.59237),
    (16, "oz", "lb", 1.0),
    (2.5, "t", "kg", 2500.0),
    (90, "min", "h", 1.5),
    (1, "week", "s", 604800.0),
    (100, "C", "F", 212.0),
    (-40, "F", "C", -40.0),
    (0, "K", "C", -273.15),
    (300, "K", "F", 80.33),
  ],
)
def test_unit_conversions(value, src, dst, want):
  assert convert_units(value, src, dst) == {"value": want, "unit": dst}


def test_unit_errors():
  with pytest.raises(ToolError, match=r"cannot convert km \(length\) to kg \(mass\)"):
    convert_units(1, "km", "kg")
  with pytest.raises(ToolError, match="unknown unit 'furlong'; known units: length: mm"):
    convert_units(1, "furlong", "m")
  with pytest.raises(ToolError, match="below absolute zero"):
    convert_units(-300, "C", "K")
  registry = example_registry()
  res = registry.execute("convert_units", {"value": 1, "from_unit": "furlong", "to_unit": "m"})
  assert res.status == "invalid_arguments" and "'furlong' is not one of" in res.content
  res = registry.execute("convert_units", {"value": 1, "from_unit": "s", "to_unit": "K"})
  assert res.status == "exception" and "cannot convert s (time) to K" in res.content
  res = registry.execute("convert_units", {"value": "1", "from_unit": "s", "to_unit": "h"})
  assert res.status == "invalid_arguments"


def test_flight_search_and_email_chain(tmp_path):
  log = AuditLog(tmp_path / "chain.jsonl")
  outbox = Outbox()
  registry = example_registry(log, outbox=outbox)
  assert [s["function"]["name"] for s in registry.specs()] == [
    "calculator",
    "convert_units",
    "search_flights",
    "send_email",
  ]
  for spec in registry.specs():
    params = spec["function"]["parameters"]
    assert params["additionalProperties"] is False and params["required"]
  # Step 1: search (deterministic: same call, same flights; another date, other flights).
  args = {"origin": "AMS", "destination": "NRT", "date": "2025-06-01"}
  res = registry.execute("search_flights", json.dumps(args), conversation_id="trip")
  assert res.ok
  found = json.loads(res.content)
  assert found == search_flights(**args)
  assert found != search_flights("AMS", "NRT", "2025-06-02")
  flights = found["flights"]
  assert len(flights) == 3 and [f["depart"] for f in flights] == sorted(
    f["depart"] for f in flights
  )
  for f in flights:
    assert f["depart"].startswith("2025-06-01T") and 600 < f["duration_min"] < 900
    assert f["flight"][:2] in ("KL", "NH") and f["price_eur"] > 0
  # Step 2: pick the cheapest and mail it.
  cheapest = min(flights, key=lambda f: f["price_eur"])
  body = f"Flight {cheapest['flight']} departs {cheapest['depart']}, EUR {cheapest['price_eur']}."
  res = registry.execute(
    "send_email",
    {"to": "ana@example.com", "subject": "Your flight to Tokyo", "body": body},
    conversation_id="trip",
  )
  assert res.ok and json.loads(res.content) == {
    "status": "sent",
    "message_id": "msg-0001",
    "to": "ana@example.com",
  }
  assert [(m.to, m.body) for m in outbox.messages] == [("ana@example.com", body)]
  # Bad addresses (the schema; a trailing newline slips past `$` and is caught by the tool),
  # bad airports and dates send and find nothing.
  for to in ("not-an-address", "a@b", "a b@example.com", "ana@example.com\n"):
    res = registry.execute("send_email", {"to": to, "subject": "s", "body": "b"})
    assert not res.ok, to
  assert registry.execute("send_email", {"to": "a@b.co", "subject": "", "body": ""}).status == (
    "invalid_arguments"
  )
  for bad in ({"origin": "XXX"}, {"destination": "AMS"}, {"date": "2025-02-30"}, {"date": "soon"}):
    assert not registry.execute("search_flights", {**args, **bad}).ok, bad
  assert len(outbox.messages) == 1
  recs = log.read()
  assert [r["conversation_id"] for r in recs[:2]] == ["trip", "trip"]
  assert [r["tool"] for r in recs[:2]] == ["search_flights", "send_email"]
  assert sum(r["ok"] for r in recs) == 2
