"""A small, deterministic MCP server for the tools examples and tests (official ``mcp`` SDK, ``MCPServer``).

Run it over stdio (what ``examples/mcp_tools_workflow.yaml`` does):

    python examples/mcp_server.py

or over streamable HTTP (the MCP endpoint is ``http://127.0.0.1:<port>/mcp``):

    python examples/mcp_server.py --http --port 8765

Every tool is offline and deterministic. ``pause`` exists to demonstrate ``KNEO_SERV_MCP_TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import argparse
import re

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

FACTS = {
    "mcp": "The Model Context Protocol connects AI applications to tools and data over JSON-RPC.",
    "nats": "NATS JetStream is a persistent streaming layer built into the NATS server.",
    "postgres": "PostgreSQL is an open-source relational database first released in 1996.",
    "kneo": "Kneo runs AI agents and workflows declared in YAML on an event-sourced core.",
}

server: MCPServer = MCPServer(
    "kneo-example-tools", instructions="Offline, deterministic demo tools.", log_level="WARNING"
)


@server.tool()
def lookup_fact(topic: str) -> str:
    """Look up a short fact about a topic (mcp, nats, postgres, kneo)."""
    words = re.findall(r"[a-z0-9]+", topic.lower())
    # A known topic named anywhere in the text counts ("Look up: NATS" finds nats), so a model's loose phrasing works.
    for key in words:
        if key in FACTS:
            return FACTS[key]
    raise ToolError(f"no fact about {topic!r}; known topics: {', '.join(sorted(FACTS))}")


@server.tool()
def word_count(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


@server.tool()
async def pause(seconds: float) -> str:
    """Wait ``seconds`` (at most 60) and answer ``done``: shows how MCP call timeouts behave."""
    await anyio.sleep(min(max(seconds, 0.0), 60.0))
    return "done"


def main(argv: list[str] | None = None) -> None:
    """Serve over stdio (default) or streamable HTTP (``--http``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    if args.http:
        server.run("streamable-http", host=args.host, port=args.port)
    else:
        server.run("stdio")


if __name__ == "__main__":
    main()
