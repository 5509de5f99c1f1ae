"""MCP tools end to end: the shipped MCP server as a real subprocess (stdio, official `mcp`
SDK), its tools mounted into a `ToolRegistry`, the tool loop and `scripts/chat.py` calling
them; results checked against the in-process example tools."""

import json
import os
import subprocess
import sys

import pytest
from test_tool_loop import TEXTS, VOCAB, _call, _reply

from qwen3_jax.data.tokenizer import train_tokenizer
from qwen3_jax.infer import example_tools
from qwen3_jax.infer.mcp_tools import MCPTools
from qwen3_jax.infer.tool_loop import ScriptedPolicy, run_tool_loop
from qwen3_jax.infer.tools import AuditLog, ToolRegistry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = [sys.executable, "-m", "qwen3_jax.infer.mcp_server"]
ENV = {**os.environ, "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(TEXTS * 4, VOCAB)


def test_mcp_tools_in_the_tool_loop(tok, tmp_path):
  audit = AuditLog(tmp_path / "audit.jsonl")
  registry = ToolRegistry(audit_log=audit)
  with MCPTools(SERVER, env=ENV) as mcp:
    mounted = mcp.mount(registry)
    local = {t.name: t for t in example_tools.example_tools()}
    assert [t.name for t in mounted] == ["calculator", "convert_units"]
    for t in mounted:  # the schemas came through MCP's inputSchema unchanged
      assert t.parameters == local[t.name].parameters
    replies = [
      _reply(
        "Two calls.",
        calls=[
          _call("calculator", expression="6 * 7"),
          _call("convert_units", value=3, from_unit="km", to_unit="m"),
        ],
      ),  # fmt: skip
      _reply("One bad call.", calls=[_call("calculator", expression="1 / 0")]),
      _reply("Done.", "42 and 3000 m."),
    ]
    t = run_tool_loop(ScriptedPolicy(tok, replies), [{"role": "user", "content": "Go"}], registry)
  assert t.finish_reason == "stop"
  ok, units, bad = t.results
  assert ok.ok and ok.content == str(example_tools.calculate("6 * 7"))
  want = example_tools.convert_units(3, "km", "m")
  assert units.ok and json.loads(units.content) == want
  assert not bad.ok and "division by zero" in bad.content
  records = audit.read()
  assert [r["tool"] for r in records] == ["calculator", "convert_units", "calculator"]
  assert [r["ok"] for r in records] == [True, True, False]


def test_chat_script_mounts_an_mcp_server(tok, tmp_path):
  """scripts/chat.py --mcp_server (scripted replies: no model needed, only its tokenizer)."""
  tok.save(str(tmp_path / "tokenizer.json"))
  replies = [_reply("Ask the tool.", calls=[_call("calculator", expression="2 ** 10")]), "1024."]
  path = tmp_path / "replies.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in replies))
  audit = tmp_path / "audit.jsonl"
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "chat.py"), "--color=never",
         f"--checkpoint={tmp_path}", f"--scripted_replies={path}", f"--audit_log={audit}",
         "--mcp_server=" + " ".join(SERVER)]  # fmt: skip
  proc = subprocess.run(
    cmd, input="What is 2**10?\n", capture_output=True, text=True, env=ENV, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[tool result] calculator: 1024" in proc.stdout.splitlines()
  [record] = [json.loads(x) for x in audit.read_text().splitlines()]
  assert record["tool"] == "calculator" and record["ok"]
