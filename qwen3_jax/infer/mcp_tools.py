"""Tools from MCP servers (stdio) mounted into a `ToolRegistry`, with the official `mcp` SDK.

  with MCPTools([sys.executable, "-m", "qwen3_jax.infer.mcp_server"]) as mcp:
    registry = ToolRegistry(audit_log=AuditLog("/tmp/audit.jsonl"))
    mcp.mount(registry)          # every tool the server lists: name, description, inputSchema
    run_tool_loop(policy, messages, registry)

`MCPTools` spawns the server as a subprocess and keeps one client session to it, on an event
loop in a background thread, so the registry's plain (synchronous) tool functions can call it.
Mounted tools are ordinary registry tools: the registry validates the arguments against the
server's `inputSchema`, applies its policy, timeout and result cap, and writes the audit record
before and whatever the server answers; a result the server flags `is_error` becomes a
`ToolError` (the model sees "Error: ...").
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from qwen3_jax.infer.tools import Tool, ToolError, ToolRegistry


class MCPTools:
  """A live connection to one MCP server over stdio (see the module docstring).

  Args:
    command: the server's command line (program and arguments).
    env: extra environment variables for it.
    timeout_s: most seconds to wait for the server to start or answer a call.
  """

  def __init__(self, command: Sequence[str], env: dict | None = None, timeout_s: float = 60.0):
    if not command:
      raise ValueError("MCPTools needs a server command")
    self.params = StdioServerParameters(command=command[0], args=list(command[1:]), env=env)
    self.timeout_s = timeout_s
    self.loop = asyncio.new_event_loop()
    self.thread = threading.Thread(target=self.loop.run_forever, name="mcp", daemon=True)
    self.session: ClientSession | None = None
    self.specs: list[dict] = []
    self._ready = threading.Event()

  def __enter__(self) -> MCPTools:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()

  def start(self) -> MCPTools:
    """Spawns the server, initialises the session and lists its tools."""
    self.thread.start()
    self._stop = asyncio.Event()
    self._task = asyncio.run_coroutine_threadsafe(self._main(), self.loop)
    self._ready.wait(self.timeout_s)
    if self.session is None:
      self._task.result(self.timeout_s)  # raises what went wrong
      raise TimeoutError(f"the MCP server {self.params.command!r} did not start")
    return self

  async def _main(self) -> None:
    """One task holds the session (the SDK's contexts must close in the task that opened
    them) until `close`."""
    async with stdio_client(self.params) as (read, write):
      async with ClientSession(read, write) as session:
        await session.initialize()
        listed = await session.list_tools()
        self.specs = [
          {"name": t.name, "description": t.description or "", "inputSchema": t.input_schema}
          for t in listed.tools
        ]
        self.session = session
        self._ready.set()
        await self._stop.wait()

  def _run(self, coro):
    return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout_s)

  def call(self, name: str, arguments: dict) -> str:
    """Calls a tool on the server; its text content, or a `ToolError` for an error result."""
    result = self._run(self.session.call_tool(name, arguments))
    text = "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")
    if result.is_error:
      raise ToolError(text.removeprefix("Error: "))
    return text

  def mount(self, registry: ToolRegistry, timeout_s: float | None = None) -> list[Tool]:
    """Registers every tool the server listed in `registry`; returns them."""
    tools = []
    for spec in self.specs:
      name = spec["name"]
      fn = lambda _name=name, **kw: self.call(_name, kw)  # noqa: E731
      tools.append(registry.register(Tool.from_spec(spec, fn, timeout_s=timeout_s)))
    return tools

  def close(self) -> None:
    """Ends the session and the server process."""
    if self.thread.is_alive():
      self.loop.call_soon_threadsafe(self._stop.set)
      self._task.result(self.timeout_s)
      self.loop.call_soon_threadsafe(self.loop.stop)
      self.thread.join(timeout=10)
