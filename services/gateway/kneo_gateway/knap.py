"""The Knap face (seeds/003): connectors by ``tool_type``, the spec of a Knap run, chats, and the SSE events.

A Knap run is an ordinary run (face ``knap``): one agent step whose tools are the connectors the request names, on
the model of ``KNEO_KNAP_*``. Its live output is translated into the seed's events: a tool starting →
``tool_execution``, its result → ``tool_result`` (same ``queryUuid``), text → ``message_chunk``, the end → ``done``
(after an ``error`` when the run did not succeed). A chat is the Knap runs carrying its id; the model sees the
earlier turns (they are written into the run's input).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import orjson
import yaml

from kneo_events.errors import InvalidRequest
from kneo_events.settings import Settings

JSON = dict[str, Any]
MAX_HISTORY_CHARS = 20_000  # earlier turns of a chat kept in a run's input (the latest ones)


def new_chat_id() -> str:
    """``chat_<hex>``."""
    return f"chat_{secrets.token_hex(8)}"


def new_knap_uuid() -> str:
    """A Knap's id, a UUID as the seed shows."""
    import uuid

    return str(uuid.uuid4())


def builtin_connectors(settings: Settings) -> dict[str, JSON]:
    """The connectors shipped with Kneo: ``gmail`` (a local mbox / Maildir) and ``google_calendar`` (iCalendar)."""
    mailbox, calendar = settings.knap_gmail_mailbox, settings.knap_calendar_path
    return {
        "gmail": {
            "description": "Search the user's email (sender, subject, body; date range).",
            "tools": [
                {
                    "function": "kneo_runner.connectors.gmail:search_emails",
                    "params": {"mailbox_path": mailbox},
                    "permissions": {"filesystem": {"read": [mailbox]}},
                }
            ],
        },
        "google_calendar": {
            "description": "List the user's calendar events in a date range.",
            "tools": [
                {
                    "function": "kneo_runner.connectors.google_calendar:list_events",
                    "params": {"calendar_path": calendar},
                    "permissions": {"filesystem": {"read": [calendar]}},
                }
            ],
        },
    }


def load_connectors(settings: Settings) -> dict[str, JSON]:
    """Built-in connectors plus those of ``KNEO_KNAP_CONNECTORS_PATH`` (a YAML map ``tool_type: {description,
    tools: [tool entries], mcp: [servers]}``; a tool entry is a spec tool: ``function`` or ``mcp``, params,
    permissions). Read at start-up: a bad file is a start-up error."""
    out = builtin_connectors(settings)
    path = settings.knap_connectors_path
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"KNEO_KNAP_CONNECTORS_PATH {path}: expected a map of tool_type to connector")
        for name, conn in raw.items():
            if not isinstance(conn, dict) or not (conn.get("tools") or conn.get("mcp")):
                raise ValueError(f"KNEO_KNAP_CONNECTORS_PATH {path}: connector {name!r} needs tools or mcp")
            out[str(name)] = conn
    return out


def knap_model(settings: Settings) -> JSON:
    """The model block of Knap runs."""
    try:
        params = orjson.loads(settings.knap_model_params or "{}")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"KNEO_KNAP_MODEL_PARAMS is not JSON: {exc}") from None
    return {"provider": settings.knap_provider, "name": settings.knap_model, "params": params}


def resolve_tool_types(requested: list[str], connectors: dict[str, JSON]) -> list[str]:
    """The connectors of a run, in order, without repeats; an unknown one is a 400 naming the known ones."""
    unknown = [t for t in requested if t not in connectors]
    if unknown:
        raise InvalidRequest(
            f"unknown tool_type {', '.join(map(repr, unknown))}; known: {', '.join(sorted(connectors))}"
        )
    return list(dict.fromkeys(requested))


def build_spec(
    tool_types: list[str],
    descriptions: dict[str, str],
    connectors: dict[str, JSON],
    model: JSON,
    instructions: str | None = None,
) -> JSON:
    """The spec of a Knap run: one agent with the connectors' tools (each named by its ``tool_type`` when the
    connector has one tool, ``<tool_type>_<n>`` otherwise), one step answering the conversation."""
    tools: list[JSON] = []
    mcp: list[JSON] = []
    lines = []
    for t in tool_types:
        conn = connectors[t]
        entries = conn.get("tools") or []
        for i, entry in enumerate(entries):
            tool = {**entry, "id": t if len(entries) == 1 else f"{t}_{i + 1}"}
            tool["description"] = descriptions.get(t) or entry.get("description") or conn.get("description") or t
            tools.append(tool)
        mcp.extend(conn.get("mcp") or [])
        lines.append(f"- {t}: {descriptions.get(t) or conn.get('description') or t}")
    base = instructions or "You are a helpful assistant. Use the tools when they help, and answer concisely."
    if lines:
        base += "\nTools you can use:\n" + "\n".join(lines)
    agent: JSON = {"name": "knap", "model": model, "instructions": base, "tools": tools}
    if mcp:
        agent["mcp"] = mcp
    return {
        "version": "v1",
        "name": "knap-run",
        "agent": agent,
        "workflow": {
            "name": "knap",
            "kind": "sequential",
            "steps": [{"id": "answer", "kind": "agent", "prompt": "{input}"}],
        },
    }


def conversation_input(history: list[JSON], messages: list[JSON]) -> str:
    """The run's input: the chat's earlier turns (latest ones, bounded) and this request's messages, one per line
    block as ``role: content``; the last user message comes last."""
    lines = [f"{m['role']}: {m['content']}" for m in history]
    text = "\n".join(lines)
    if len(text) > MAX_HISTORY_CHARS:
        text = "…" + text[-MAX_HISTORY_CHARS:]
    new = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    if not text:
        # a single user message is the prompt itself (the dummy model and real ones see exactly what was asked)
        if len(messages) == 1 and messages[0]["role"] == "user":
            return str(messages[0]["content"])
        return new
    return f"Earlier in this conversation:\n{text}\n\nNow:\n{new}"


def chat_turns(states: list[JSON]) -> list[JSON]:
    """The transcript of a chat from its runs (oldest first): each run's messages, then its answer."""
    out: list[JSON] = []
    for st in states:
        knap = (st.get("metadata") or {}).get("knap") or {}
        for m in knap.get("messages") or []:
            out.append({"role": m["role"], "content": m["content"], "run_id": st["run_id"]})
        if st.get("status") == "succeeded":
            out.append({"role": "assistant", "content": st.get("output_text") or "", "run_id": st["run_id"]})
        elif st.get("status") in ("failed", "cancelled", "timed_out", "expired"):
            out.append({"role": "assistant", "content": None, "error": st.get("error"), "run_id": st["run_id"]})
    return out


def history_messages(states: list[JSON]) -> list[JSON]:
    """What the model sees of a chat's earlier runs: user messages and the answers it gave."""
    return [t for t in chat_turns(states) if t.get("content")]


def message_id(run_id: str) -> str:
    """The ``messageId`` of a run's answer."""
    return f"msg_{run_id.rsplit('_', 1)[-1]}"


def tool_result_event(tool: JSON) -> JSON:
    """A live ``{"tool": {...}}`` item that finished, as the seed's ``tool_result``."""
    out: JSON = {
        "type": "tool_result",
        "tool_name": tool.get("name"),
        "result": tool.get("result"),
        "queryUuid": tool.get("call_id"),
        "cached": bool(tool.get("cached")),
    }
    if not tool.get("ok", True):
        out["error"] = True
    return out
