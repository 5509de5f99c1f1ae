"""A small MCP server (stdio) offering the example calculator and unit converter.

  python -m qwen3_jax.infer.mcp_server            # speaks MCP on stdin / stdout

Built on the official `mcp` SDK's low-level server: `tools/list` gives each tool's name,
description and `inputSchema` (the same JSON schemas as `example_tools`), and `tools/call`
runs the call through a `ToolRegistry` (schema validation, timeout, result cap), so a bad call
comes back as an `is_error` result with the registry's "Error: ..." message, never a crash.
"""

from __future__ import annotations

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from qwen3_jax.infer.example_tools import example_tools
from qwen3_jax.infer.tools import ToolRegistry

TOOL_NAMES = ("calculator", "convert_units")


def build_server(registry: ToolRegistry | None = None) -> Server:
  """The MCP server over `registry` (default: the calculator and the unit converter)."""
  if registry is None:
    registry = ToolRegistry([t for t in example_tools() if t.name in TOOL_NAMES])

  async def list_tools(ctx, params) -> types.ListToolsResult:
    del ctx, params
    return types.ListToolsResult(
      tools=[
        types.Tool(name=t.name, description=t.description, input_schema=dict(t.parameters))
        for t in (registry.get(n) for n in registry.names())
      ]
    )

  async def call_tool(ctx, params) -> types.CallToolResult:
    del ctx
    result = await anyio.to_thread.run_sync(
      lambda: registry.execute(params.name, params.arguments or {})
    )
    text = types.TextContent(type="text", text=result.content)
    return types.CallToolResult(content=[text], is_error=not result.ok)

  return Server("qwen3_jax-tools", on_list_tools=list_tools, on_call_tool=call_tool)


async def _serve() -> None:
  server = build_server()
  async with stdio_server() as (read, write):
    await server.run(read, write, server.create_initialization_options())


if __name__ == "__main__":
  anyio.run(_serve)
