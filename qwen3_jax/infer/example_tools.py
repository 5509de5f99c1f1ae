"""Deterministic example tools: a calculator, a unit converter, and a simulated flight search
plus email outbox (for multi-step chains). `example_registry()` registers them all.

Nothing here touches the network, the file system or the clock: the same call always gives the
same answer, so tool-use runs and tests are reproducible.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import math
import operator
import random
import re
import threading
from typing import Any

from qwen3_jax.infer.tools import AuditLog, Policy, Tool, ToolError, ToolRegistry

# ---------------------------------------------------------------------------------------------
# Calculator: an arithmetic parser over `ast` with a whitelist of nodes; nothing is eval'd.

_MAX_EXPRESSION_CHARS = 500
_MAX_DEPTH = 60  # nesting of the syntax tree
_MAX_INT_BITS = 1024  # integers up to ~1.8e308, the float range


def _power(base, exponent):
  # Refuse before computing: 9**9**9 would take minutes and gigabytes.
  if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
    if exponent * math.log2(abs(base)) > _MAX_INT_BITS:
      raise ToolError("result is too large")
  return base**exponent


def _round(x, ndigits=None):
  if ndigits is not None and not isinstance(ndigits, int):
    raise ToolError("round(x, n): n must be an integer")
  return round(x) if ndigits is None else round(x, ndigits)


_BINARY_OPS = {
  ast.Add: operator.add,
  ast.Sub: operator.sub,
  ast.Mult: operator.mul,
  ast.Div: operator.truediv,
  ast.FloorDiv: operator.floordiv,
  ast.Mod: operator.mod,
  ast.Pow: _power,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CONSTANTS = {"pi": math.pi, "e": math.e}
# name -> (function, fewest arguments, most arguments or None)
_FUNCTIONS = {
  "sqrt": (math.sqrt, 1, 1),
  "abs": (abs, 1, 1),
  "round": (_round, 1, 2),
  "min": (lambda *a: min(a), 1, None),
  "max": (lambda *a: max(a), 1, None),
  "log": (math.log, 1, 2),
  "log10": (math.log10, 1, 1),
  "exp": (math.exp, 1, 1),
  "sin": (math.sin, 1, 1),
  "cos": (math.cos, 1, 1),
  "tan": (math.tan, 1, 1),
  "floor": (math.floor, 1, 1),
  "ceil": (math.ceil, 1, 1),
}


def _checked(value):
  if isinstance(value, complex):
    raise ToolError("result is not a real number")
  if isinstance(value, float) and not math.isfinite(value):
    raise ToolError("result is too large" if math.isinf(value) else "result is not a number")
  if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
    raise ToolError("result is too large")
  return value


def _evaluate(node: ast.AST, depth: int = 0):
  if depth > _MAX_DEPTH:
    raise ToolError("expression is too deeply nested")
  if isinstance(node, ast.Expression):
    return _evaluate(node.body, depth + 1)
  if isinstance(node, ast.Constant):
    if type(node.value) in (int, float):  # not bool, complex or str
      return _checked(node.value)
    raise ToolError(f"unsupported constant {str(node.value)[:40]!r}: only numbers")
  if isinstance(node, ast.BinOp):
    op = _BINARY_OPS.get(type(node.op))
    if op is None:
      hint = " (use ** for powers)" if isinstance(node.op, ast.BitXor) else ""
      raise ToolError(f"unsupported operator {type(node.op).__name__}{hint}")
    left = _evaluate(node.left, depth + 1)
    return _checked(op(left, _evaluate(node.right, depth + 1)))
  if isinstance(node, ast.UnaryOp):
    op = _UNARY_OPS.get(type(node.op))
    if op is None:
      raise ToolError(f"unsupported operator {type(node.op).__name__}")
    return _checked(op(_evaluate(node.operand, depth + 1)))
  if isinstance(node, ast.Name):
    if node.id in _CONSTANTS:
      return _CONSTANTS[node.id]
    raise ToolError(f"unknown name {node.id[:40]!r}; constants: {', '.join(_CONSTANTS)}")
  if isinstance(node, ast.Call):
    if isinstance(node.func, ast.Attribute):
      raise ToolError("attribute access is not allowed")
    if not isinstance(node.func, ast.Name):
      raise ToolError("only the listed functions can be called, by name")
    if node.func.id not in _FUNCTIONS:
      raise ToolError(f"unknown function {node.func.id[:40]!r}; functions: {', '.join(_FUNCTIONS)}")
    fn, lo, hi = _FUNCTIONS[node.func.id]
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
      raise ToolError(f"{node.func.id}() takes plain positional arguments")
    if len(node.args) < lo or (hi is not None and len(node.args) > hi):
      count = str(lo) if lo == hi else f"{lo} or more" if hi is None else f"{lo} to {hi}"
      raise ToolError(f"{node.func.id}() takes {count} arguments, got {len(node.args)}")
    return _checked(fn(*[_evaluate(a, depth + 1) for a in node.args]))
  if isinstance(node, ast.Attribute):
    raise ToolError("attribute access is not allowed")
  raise ToolError(f"unsupported syntax: {type(node).__name__}")


def calculate(expression: str) -> int | float:
  """Evaluates an arithmetic expression: numbers, + - * / // % **, unary +/-, parentheses,
  the constants pi and e, and sqrt abs round min max log log10 exp sin cos tan floor ceil.

  Integers stay exact; floats are rounded to 15 significant digits (0.1 + 0.2 gives 0.3).
  Raises `ToolError` for anything else, and for results over ~1.8e308.
  """
  if len(expression) > _MAX_EXPRESSION_CHARS:
    raise ToolError(f"expression is longer than {_MAX_EXPRESSION_CHARS} characters")
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except SyntaxError as e:
    raise ToolError(f"invalid expression: {e.msg}") from None
  except (ValueError, RecursionError, MemoryError):
    raise ToolError("invalid expression") from None
  try:
    value = _evaluate(tree)
  except ZeroDivisionError:
    raise ToolError("division by zero") from None
  except OverflowError:
    raise ToolError("result is too large") from None
  except RecursionError:
    raise ToolError("expression is too deeply nested") from None
  except (ValueError, TypeError) as e:
    raise ToolError(f"math error: {e}") from None
  return float(f"{value:.15g}") if isinstance(value, float) else value


# ---------------------------------------------------------------------------------------------
# Unit converter.

# unit -> (dimension, size in the dimension's base unit: metre, kilogram, second)
_UNITS = {
  "mm": ("length", 1e-3),
  "cm": ("length", 1e-2),
  "m": ("length", 1.0),
  "km": ("length", 1e3),
  "in": ("length", 0.0254),
  "ft": ("length", 0.3048),
  "yd": ("length", 0.9144),
  "mi": ("length", 1609.344),
  "nmi": ("length", 1852.0),
  "mg": ("mass", 1e-6),
  "g": ("mass", 1e-3),
  "kg": ("mass", 1.0),
  "t": ("mass", 1e3),
  "oz": ("mass", 0.45359237 / 16),
  "lb": ("mass", 0.45359237),
  "ms": ("time", 1e-3),
  "s": ("time", 1.0),
  "min": ("time", 60.0),
  "h": ("time", 3600.0),
  "day": ("time", 86400.0),
  "week": ("time", 604800.0),
  "C": ("temperature", None),
  "F": ("temperature", None),
  "K": ("temperature", None),
}
# Temperature scales are affine: kelvin = scale * value + offset.
_TEMPERATURE = {"K": (1.0, 0.0), "C": (1.0, 273.15), "F": (5 / 9, 273.15 - 32 * 5 / 9)}


def _known_units() -> str:
  groups: dict[str, list[str]] = {}
  for unit, (dim, _) in _UNITS.items():
    groups.setdefault(dim, []).append(unit)
  return "; ".join(f"{dim}: {', '.join(units)}" for dim, units in groups.items())


def convert_units(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
  """Converts `value` from one unit to another of the same dimension (length, mass, time,
  temperature). Returns {"value": converted (12 significant digits), "unit": to_unit}."""
  for unit in (from_unit, to_unit):
    if unit not in _UNITS:
      raise ToolError(f"unknown unit {unit[:40]!r}; known units: {_known_units()}")
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
    raise ToolError("value must be a finite number")
  (dim_from, size_from), (dim_to, size_to) = _UNITS[from_unit], _UNITS[to_unit]
  if dim_from != dim_to:
    raise ToolError(f"cannot convert {from_unit} ({dim_from}) to {to_unit} ({dim_to})")
  if dim_from == "temperature":
    scale, offset = _TEMPERATURE[from_unit]
    kelvin = scale * value + offset
    if kelvin < -1e-9:
      raise ToolError(f"{value:g} {from_unit} is below absolute zero")
    scale, offset = _TEMPERATURE[to_unit]
    out = (kelvin - offset) / scale
  else:
    out = value * size_from / size_to
  return {"value": float(f"{out:.12g}"), "unit": to_unit}


# ---------------------------------------------------------------------------------------------
# Simulated flights and email.

# code -> (city, latitude, longitude, home airline code, airline name)
_AIRPORTS = {
  "AMS": ("Amsterdam", 52.31, 4.76, "KL", "KLM"),
  "CDG": ("Paris", 49.01, 2.55, "AF", "Air France"),
  "FRA": ("Frankfurt", 50.03, 8.57, "LH", "Lufthansa"),
  "LHR": ("London", 51.47, -0.45, "BA", "British Airways"),
  "JFK": ("New York", 40.64, -73.78, "DL", "Delta"),
  "SFO": ("San Francisco", 37.62, -122.38, "UA", "United"),
  "NRT": ("Tokyo", 35.77, 140.39, "NH", "ANA"),
  "SIN": ("Singapore", 1.36, 103.99, "SQ", "Singapore Airlines"),
}
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")


def _distance_km(a: str, b: str) -> float:
  (_, lat1, lon1, *_), (_, lat2, lon2, *_) = _AIRPORTS[a], _AIRPORTS[b]
  p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
  c = math.sin(p1) * math.sin(p2) + math.cos(p1) * math.cos(p2) * math.cos(dl)
  return 6371.0 * math.acos(max(-1.0, min(1.0, c)))


def search_flights(origin: str, destination: str, date: str) -> dict[str, Any]:
  """Simulated search: three direct flights, the same for the same (origin, destination, date),
  sorted by departure. Times are local to the origin; prices in euros."""
  for code in (origin, destination):
    if code not in _AIRPORTS:
      raise ToolError(f"unknown airport {code[:10]!r}; airports: {', '.join(_AIRPORTS)}")
  if origin == destination:
    raise ToolError("origin and destination are the same airport")
  try:
    day = datetime.date.fromisoformat(date) if _DATE_RE.fullmatch(date) else None
  except ValueError:
    day = None
  if day is None:
    raise ToolError(f"invalid date {date[:20]!r}; use YYYY-MM-DD")
  km = _distance_km(origin, destination)
  # str seeds hash with SHA-512: the same flights in every process, whatever PYTHONHASHSEED.
  rng = random.Random(f"{origin}|{destination}|{day.isoformat()}")
  carriers = [_AIRPORTS[origin][3:], _AIRPORTS[destination][3:]]
  departures = sorted(rng.sample(range(6 * 12, 22 * 12), 3))  # 5-minute slots, 06:00-21:55
  flights = []
  for slot in departures:
    code, airline = rng.choice(carriers)
    duration = 5 * round((km / 820 * 60 + 35 + rng.randrange(0, 30)) / 5)
    depart = datetime.datetime.combine(day, datetime.time()) + datetime.timedelta(minutes=5 * slot)
    flights.append(
      {
        "flight": f"{code}{rng.randrange(100, 1000)}",
        "airline": airline,
        "depart": depart.isoformat(timespec="minutes"),
        "duration_min": duration,
        "stops": 0,
        "price_eur": int(60 + km * 0.07 * rng.uniform(0.8, 1.6)),
      }
    )
  return {"origin": origin, "destination": destination, "date": date, "flights": flights}


@dataclasses.dataclass(frozen=True)
class Email:
  message_id: str
  to: str
  subject: str
  body: str


class Outbox:
  """In-memory outbox: `send_email` appends to `messages`; nothing leaves the process."""

  def __init__(self):
    self.messages: list[Email] = []
    self._lock = threading.Lock()

  def send_email(self, to: str, subject: str, body: str) -> dict[str, Any]:
    """Stores the email; returns {"status": "sent", "message_id", "to"}."""
    # fullmatch: a pattern's `$` also matches before a trailing newline (header injection).
    if not _EMAIL_RE.fullmatch(to):
      raise ToolError(f"invalid email address {to[:80]!r}")
    if "\n" in subject or "\r" in subject:
      raise ToolError("the subject must be one line")
    with self._lock:
      message_id = f"msg-{len(self.messages) + 1:04d}"
      self.messages.append(Email(message_id, to, subject, body))
    return {"status": "sent", "message_id": message_id, "to": to}


# ---------------------------------------------------------------------------------------------
# Schemas and the registry.

_AIRPORT_SCHEMA = {"type": "string", "enum": list(_AIRPORTS)}


def example_tools(outbox: Outbox | None = None) -> list[Tool]:
  """The example tools; `send_email` writes to `outbox` (a fresh one when None)."""
  outbox = Outbox() if outbox is None else outbox
  units = list(_UNITS)
  airports = ", ".join(f"{code} ({v[0]})" for code, v in _AIRPORTS.items())
  return [
    Tool(
      "calculator",
      "Evaluate an arithmetic expression exactly, e.g. '(2 + 3) * 4 ** 2' or 'sqrt(2) * pi'. "
      "Supports + - * / // % **, parentheses, pi, e, and sqrt, abs, round, min, max, log, "
      "log10, exp, sin, cos, tan, floor, ceil.",
      {
        "type": "object",
        "properties": {
          "expression": {
            "type": "string",
            "minLength": 1,
            "maxLength": _MAX_EXPRESSION_CHARS,
            "description": "The arithmetic expression.",
          }
        },
        "required": ["expression"],
        "additionalProperties": False,
      },
      calculate,
      timeout_s=5.0,
    ),
    Tool(
      "convert_units",
      "Convert a quantity between units of length, mass, time or temperature.",
      {
        "type": "object",
        "properties": {
          "value": {"type": "number", "description": "The quantity to convert."},
          "from_unit": {"type": "string", "enum": units, "description": "Its unit."},
          "to_unit": {"type": "string", "enum": units, "description": "The unit wanted."},
        },
        "required": ["value", "from_unit", "to_unit"],
        "additionalProperties": False,
      },
      convert_units,
      timeout_s=5.0,
    ),
    Tool(
      "search_flights",
      f"Search direct flights for one day. Airports: {airports}.",
      {
        "type": "object",
        "properties": {
          "origin": {**_AIRPORT_SCHEMA, "description": "Departure airport (IATA code)."},
          "destination": {**_AIRPORT_SCHEMA, "description": "Arrival airport (IATA code)."},
          "date": {
            "type": "string",
            "pattern": r"^\d{4}-\d{2}-\d{2}$",
            "description": "Departure date, YYYY-MM-DD.",
          },
        },
        "required": ["origin", "destination", "date"],
        "additionalProperties": False,
      },
      search_flights,
      timeout_s=5.0,
    ),
    Tool(
      "send_email",
      "Send an email.",
      {
        "type": "object",
        "properties": {
          "to": {
            "type": "string",
            "pattern": r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$",
            "maxLength": 254,
            "description": "Recipient address.",
          },
          "subject": {"type": "string", "minLength": 1, "maxLength": 200},
          "body": {"type": "string", "maxLength": 20_000},
        },
        "required": ["to", "subject", "body"],
        "additionalProperties": False,
      },
      outbox.send_email,
      timeout_s=5.0,
    ),
  ]


def example_registry(
  audit_log: AuditLog | None = None,
  *,
  outbox: Outbox | None = None,
  policy: Policy | None = None,
) -> ToolRegistry:
  """A registry holding the example tools.

  Args:
    audit_log: where every call is recorded, if anywhere.
    outbox: receives the emails `send_email` sends (a fresh one when None).
    policy: see `ToolRegistry`.

  Returns:
    The registry.
  """
  return ToolRegistry(example_tools(outbox), audit_log=audit_log, policy=policy)
