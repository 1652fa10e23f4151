"""Agent tools: Python function tools with enforced permissions, and MCP servers through the official ``mcp`` SDK.

Interface used by the agent loop (engine.py). Implementation in progress.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kneo_events.settings import Settings


@dataclass(frozen=True)
class ToolSpec:
    """What the model is told about one tool: its name, description and the JSON Schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call as the model sees it (the error text when ``ok`` is False)."""

    ok: bool
    content: str


class ToolBox:
    """The tools of one agent for one step; an async context manager (MCP sessions live inside it)."""

    def __init__(self, agent: dict[str, Any], settings: Settings, allowed_packages: tuple[str, ...]) -> None:
        self._agent = agent
        self._settings = settings
        self._allowed_packages = allowed_packages

    @classmethod
    def for_agent(cls, agent: dict[str, Any], settings: Settings, allowed_packages: tuple[str, ...]) -> ToolBox:
        """The tools the compiled ``agent`` declares (``tools`` and ``mcp``)."""
        return cls(agent, settings, allowed_packages)

    async def __aenter__(self) -> ToolBox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def specs(self) -> list[ToolSpec]:
        """The tools offered to the model."""
        return []

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        """Call one tool; never raises for a tool failure."""
        return ToolResult(ok=False, content=f"unknown tool {name!r}")
