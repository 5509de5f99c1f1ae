r"""Chat with a model in the terminal, streaming, optionally with the example tools.

  python scripts/chat.py --hf_dir=/models/Qwen3-30B-A3B [--tools --audit_log=/tmp/audit.jsonl]
  python scripts/chat.py --workdir=/tmp/run --thinking_budget=256 --temperature=0.7
  python scripts/chat.py --workdir=/tmp/run --mcp_server='python -m qwen3_jax.infer.mcp_server'
  printf 'Hi\nWhat is 2+2? /no_think\n' | python scripts/chat.py --checkpoint=/ckpt/q30b

One user turn per line (piped input works too); end a turn with /think or /no_think to switch
the reasoning on or off (the latest switch wins), /reset forgets the conversation, /exit or EOF
quits. The reasoning is shown apart from the answer (dim on a terminal, labelled otherwise).
Sampling defaults to Qwen3's presets for each reply's mode; --temperature etc. override them.
"""

import json
import os
import shlex
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("workdir", None, "Training run directory (its newest checkpoint).")
flags.DEFINE_string("checkpoint", None, "Params checkpoint (save_params / convert_hf.py output).")
flags.DEFINE_string("hf_dir", None, "Hugging Face Qwen3 directory.")
flags.DEFINE_string("system", None, "System prompt.")
flags.DEFINE_bool("thinking", True, "Hard switch for reasoning (off: /think has no effect).")
flags.DEFINE_integer(
  "thinking_budget", None, "Most reasoning tokens per reply (default: no limit)."
)
flags.DEFINE_bool("tools", False, "Offer the example tools (calculator, units, flights, email).")
flags.DEFINE_multi_string(
  "mcp_server",
  [],
  "Command line of an MCP server (stdio) whose tools to offer, e.g. "
  "'python -m qwen3_jax.infer.mcp_server'; repeatable.",
)
flags.DEFINE_string("audit_log", None, "With tools: append every tool call to this JSONL file.")
flags.DEFINE_integer("max_steps", 4, "With --tools: most replies per user turn.")
flags.DEFINE_integer("max_new_tokens", 2048, "Most tokens per reply.")
flags.DEFINE_float("temperature", None, "Sampling temperature (0 = greedy; default: preset).")
flags.DEFINE_float("top_p", None, "Nucleus mass (default: Qwen3's preset for the mode).")
flags.DEFINE_integer("top_k", None, "Top-k (default: Qwen3's preset, 20).")
flags.DEFINE_float("min_p", None, "Min-p (default: Qwen3's preset, 0).")
flags.DEFINE_integer("seed", 0, "Sampling seed (moves on with every user turn).")
flags.DEFINE_enum("color", "auto", ["auto", "always", "never"], "ANSI styles on the output.")
flags.DEFINE_string(
  "scripted_replies", None, "Tests: a JSONL file of reply texts used instead of the model."
)


def main(argv):
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs its restores at INFO
  from qwen3_jax.infer import chat_session, load, tool_loop
  from qwen3_jax.infer.example_tools import example_registry
  from qwen3_jax.infer.mcp_tools import MCPTools
  from qwen3_jax.infer.tools import AuditLog, ToolRegistry

  source = dict(workdir=f.workdir, checkpoint=f.checkpoint, hf_dir=f.hf_dir)
  if sum(bool(v) for v in source.values()) != 1:
    raise app.UsageError("give one of --workdir, --checkpoint and --hf_dir")
  if f.audit_log and not (f.tools or f.mcp_server):
    raise app.UsageError("--audit_log needs --tools or --mcp_server")
  if f.scripted_replies:
    with open(f.scripted_replies) as fh:
      replies = [json.loads(line) for line in fh if line.strip()]
    policy = tool_loop.ScriptedPolicy(load.load_tokenizer_for(**source), replies)
  else:
    from qwen3_jax.infer.engine import Engine

    model, tokenizer = load.load_model(**source)
    policy = tool_loop.EnginePolicy(Engine(model, tokenizer))
  registry = None
  audit = AuditLog(f.audit_log) if f.audit_log else None
  if f.tools:
    registry = example_registry(audit)
  servers = [MCPTools(shlex.split(cmd)).start() for cmd in f.mcp_server]
  if servers and registry is None:
    registry = ToolRegistry(audit_log=audit)
  for server in servers:
    server.mount(registry)
  names = ("temperature", "top_p", "top_k", "min_p")
  overrides = {k: getattr(f, k) for k in names if getattr(f, k) is not None}
  session = chat_session.ChatSession(
    policy,
    registry=registry,
    system=f.system,
    enable_thinking=f.thinking,
    thinking_budget=f.thinking_budget,
    sampling={**overrides, "seed": f.seed},
    max_new_tokens=f.max_new_tokens,
    max_steps=f.max_steps,
  )
  color = None if f.color == "auto" else f.color == "always"
  printer = chat_session.TerminalPrinter(sys.stdout, color=color)
  for line in chat_session.user_lines(sys.stdin, sys.stdout):
    if line in chat_session.QUIT:
      break
    if line == chat_session.RESET:
      session.reset()
      continue
    printer.end(session.send(line, on_event=printer))
  for server in servers:
    server.close()


if __name__ == "__main__":
  app.run(main)
