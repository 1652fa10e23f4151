"""The runner's tool hooks: tool calls published live on the run's output subject, and the Knap smart cache.

Live items share the step execution's sequence with the text chunks, so an SSE client orders and de-duplicates them
the same way. The smart cache (``use_smart_cache`` of a Knap run, ``metadata.knap``) keeps successful results of
identical calls (tool + canonical arguments) per chat in ``knap_tool_cache`` for ``KNEO_KNAP_CACHE_TTL_SECONDS``;
it is a cache, not state of the log: dropping the table loses nothing but speed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson

from kneo_events.redaction import redact, redact_text
from kneo_runner.engine import StepCancelled, ToolHooks
from kneo_runner.providers import ToolCallRequest

JSON = dict[str, Any]
Publish = Callable[[JSON], Awaitable[None]]
LIVE_RESULT_CHARS = 4000  # a live tool result is a preview; the full result went to the model


def cache_key(name: str, arguments: JSON) -> str:
    """The identity of a call: the tool and its arguments, canonically serialized."""
    return hashlib.sha256(name.encode() + b"\x00" + orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS)).hexdigest()


class RunnerToolHooks(ToolHooks):
    """Publishes ``{"tool": {...}}`` items next to the text chunks; consults the chat's cache when one is given."""

    def __init__(
        self,
        publish: Publish,
        cancelled: Callable[[], bool],
        pool: asyncpg.Pool | None = None,
        chat_id: str | None = None,
        ttl_seconds: float = 0.0,
    ) -> None:
        self.publish = publish
        self.cancelled = cancelled
        self.pool = pool if chat_id and ttl_seconds > 0 else None
        self.chat_id = chat_id
        self.ttl = ttl_seconds

    async def started(self, call: ToolCallRequest) -> None:
        if self.cancelled():
            raise StepCancelled("cancelled")
        await self.publish(
            {"tool": {"status": "running", "name": call.name, "call_id": call.id, "arguments": redact(call.arguments)}}
        )

    async def finished(self, call: ToolCallRequest, ok: bool, content: str, cached: bool) -> None:
        result: Any = content[:LIVE_RESULT_CHARS]
        if len(content) <= LIVE_RESULT_CHARS:
            try:  # a tool that answered JSON is shown as JSON
                result = orjson.loads(content)
            except orjson.JSONDecodeError:
                pass
        await self.publish(
            {
                "tool": {
                    "status": "completed" if ok else "failed",
                    "name": call.name,
                    "call_id": call.id,
                    "ok": ok,
                    "cached": cached,
                    "result": redact(result) if not isinstance(result, str) else redact_text(result),
                    "result_chars": len(content),
                }
            }
        )

    async def lookup(self, name: str, arguments: JSON) -> tuple[bool, str] | None:
        if self.pool is None:
            return None
        row = await self.pool.fetchrow(
            "SELECT ok, content FROM knap_tool_cache WHERE chat_id = $1 AND cache_key = $2 "
            "AND created_at > clock_timestamp() - make_interval(secs => $3)",
            self.chat_id,
            cache_key(name, arguments),
            self.ttl,
        )
        return (bool(row["ok"]), str(row["content"])) if row else None

    async def remember(self, name: str, arguments: JSON, ok: bool, content: str) -> None:
        if self.pool is None:
            return
        await self.pool.execute(
            "INSERT INTO knap_tool_cache (chat_id, cache_key, tool, ok, content) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (chat_id, cache_key) DO UPDATE SET ok = EXCLUDED.ok, content = EXCLUDED.content, "
            "created_at = clock_timestamp()",
            self.chat_id,
            cache_key(name, arguments),
            name,
            ok,
            content,
        )
