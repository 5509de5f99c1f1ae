"""Collectives of an optimised HLO module (the text of `Compiled.as_text()`), by kind.

`collectives` counts each collective instruction once where it appears: an op inside a loop
body (a scanned layer stack) counts once. `per_step` weighs each computation by how often it
runs: loop bodies by their trip counts (XLA's known trip count, else the bound constant of the
loop condition).
Bytes are the size of the op's result buffer on one chip; wire bytes are what one chip sends
with ring algorithms over a group of n chips: all-gather S (n - 1) / n of its output S,
reduce-scatter S (n - 1) of its output (its input is n S), all-reduce 2 S (n - 1) / n,
all-to-all and ragged-all-to-all S (n - 1) / n (ragged: S as `collectives` says),
collective-permute S.
"""

from __future__ import annotations

import re

KINDS = (
  "all-gather",
  "reduce-scatter",
  "all-reduce",
  "all-to-all",
  "ragged-all-to-all",
  "collective-permute",
)
DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "bf16": 2,
  "f16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}
# `%name = SHAPE opcode(` with opcode a collective or its async -start form.
_OP = re.compile(
  r"=\s+(?P<shape>\(.*?\)|\S+)\s+(?P<op>"
  + "|".join(re.escape(k) for k in KINDS)
  + r")(?:-start)?\("
)
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{(?P<first>[\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(?P<dims>[\d,]+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]\s*\{(?P<over>[^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTR = re.compile(
  r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s+=\s+(?P<shape>\(.*?\)|\S+)\s+(?P<op>[\w\-]+)\((?P<args>[^)]*)\)"
)
_CALLEE = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|called_computations)=")
_NAMES = re.compile(r"%([\w.\-]+)")


def array_bytes(shape: str) -> list[int]:
  """Bytes of every array in an HLO shape string ("bf16[8,128]{1,0}" or a tuple of them)."""
  out = []
  for m in _ARRAY.finditer(shape):
    if m["dtype"] not in DTYPE_BYTES:
      continue
    n = 1
    for d in filter(None, m["dims"].split(",")):
      n *= int(d)
    out.append(n * DTYPE_BYTES[m["dtype"]])
  return out


def group_size(line: str) -> int:
  """Chips per replica group of a collective instruction (1 when it names none). Forms:
  `{{0,1},{2,3}}`, iota `[2,2]<=[4]`, and `mesh['axis_0'=2,'axis_1'=2] {'axis_1'}`."""
  m = _GROUPS_LIST.search(line)
  if m:
    return max(1, len([x for x in m["first"].split(",") if x]))
  m = _GROUPS_IOTA.search(line)
  if m:
    return int(m["dims"].split(",")[-1])
  m = _GROUPS_MESH.search(line)
  if m:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: groups over the listed axes
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m["axes"]))
    n = 1
    for axis in re.findall(r"'([^']+)'", m["over"]):
      n *= int(sizes[axis])
    return n
  return 2 if _PAIRS.search(line) else 1


def wire_bytes(kind: str, size: int, n: int) -> float:
  """Bytes one chip sends for a collective of result size `size` over a group of n chips."""
  if n <= 1:
    return 0.0
  if kind == "all-reduce":
    return 2.0 * size * (n - 1) / n
  if kind == "reduce-scatter":
    return float(size * (n - 1))
  if kind == "collective-permute":
    return float(size)
  return size * (n - 1) / n


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {"count", "bytes", "wire_bytes"}} over the module's collective instructions.

  A tuple-shaped result counts as the sum of its arrays for all-reduce (a combined
  all-reduce) and as its largest array otherwise (an async start's tuple also holds its
  operand). A ragged-all-to-all counts the smaller of its input and output buffers: one of
  the two is sized for the worst case (every slot of the group on one chip, n times the
  balanced traffic), the other holds this chip's own slots, which is what a balanced routing
  sends and receives.
  """
  sizes = {
    m["name"]: sum(array_bytes(m["shape"])) for m in map(_INSTR.match, hlo_text.splitlines()) if m
  }
  out = {k: {"count": 0, "bytes": 0.0, "wire_bytes": 0.0} for k in KINDS}
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if m is None:
      continue
    kind = m["op"]
    arrays = array_bytes(m["shape"]) or [0]
    size = sum(arrays) if kind == "all-reduce" else max(arrays)
    if kind == "ragged-all-to-all":
      operand = _NAMES.search(line[m.end() :])
      if operand and operand[1] in sizes:
        size = min(size, sizes[operand[1]])
    row = out[kind]
    row["count"] += 1
    row["bytes"] += size
    row["wire_bytes"] += wire_bytes(kind, size, group_size(line))
  return out


# ----------------------------------------------------------------------------- per step

_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONST = re.compile(r"constant\((\d+)\)")


# Ops that move no data of their own (views, tuples, control flow, parameters).
def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  """{computation name: its instruction lines} in text order, and the entry's name."""
  comps, entry, current = {}, "", None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      current = m["name"]
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif line.startswith("}"):
      current = None
    elif current is not None:
      comps[current].append(line)
  return comps, entry


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
  """Iterations of a while loop: XLA's known trip count, else the loop bound constant of its
  condition (`i < N`), else 1."""
  m = _TRIP.search(line)
  if m:
    return int(m[1])
  cond = re.search(r"condition=%([\w.\-]+)", line)
  consts = [int(c) for c in _CONST.findall("\n".join(comps.get(cond[1], [])))] if cond else []
  return max(consts, default=1) or 1


def executions(text: str) -> tuple[dict[str, int], set[str]]:
  """How many times each computation runs per call of the module (loop bodies times their
  trip counts), and the set of fusion and reducer computations (no collective inside)."""
  comps, entry = _computations(text)
  runs = {name: 0 for name in comps}
  runs[entry] = 1
  fused: set[str] = set()
  for name in reversed(list(comps)):  # callers are printed after their callees
    for line in comps[name]:
      if not _CALLEE.search(line):
        continue
      m = _INSTR.match(line)
      op = m["op"] if m else ""
      trips = _trip_count(line, comps) if op == "while" else 1
      for attr in re.finditer(
        r"(calls|to_apply|body|condition|branch_computations|called_computations)="
        r"(\{[^}]*\}|%[\w.\-]+)",
        line,
      ):
        for callee in _NAMES.findall(attr[2]):
          if callee in runs:
            runs[callee] += runs[name] * (trips if attr[1] in ("body", "condition") else 1)
            if op == "fusion" or attr[1] == "to_apply":
              fused.add(callee)
  return runs, fused


def per_step(text: str) -> dict:
  """Collectives (as `collectives`) of one call of the module: each op counted as often as
  its computation runs (a scanned layer stack's ops once per layer group)."""
  comps, _ = _computations(text)
  runs, fused = executions(text)
  coll = {k: {"count": 0, "bytes": 0.0, "wire_bytes": 0.0} for k in KINDS}
  for name, lines in comps.items():
    if runs[name] == 0 or name in fused:
      continue
    for kind, row in collectives("\n".join(lines)).items():
      for field in row:
        coll[kind][field] += runs[name] * row[field]
  return dict(collectives=coll, wire_bytes=sum(c["wire_bytes"] for c in coll.values()))
