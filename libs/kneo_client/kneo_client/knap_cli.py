"""``kneo knap …``: run a Knap (streamed), read a chat, register / list / show / delete pre-configured Knaps."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import orjson
import typer

from kneo_client.remote import Profile, ServiceUrl, call, connection, with_client

knap_app = typer.Typer(help="Run Knaps (agents with connectors) on the Knap face", no_args_is_help=True)

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (one event per line when streaming).")]
Tools = Annotated[
    list[str] | None, typer.Option("--tool", "-t", help="A connector (tool_type), e.g. gmail; repeat for more.")
]


@knap_app.command("run")
def knap_run(
    message: Annotated[str, typer.Argument(help="What to ask.")],
    tool: Tools = None,
    chat_id: Annotated[str | None, typer.Option("--chat-id", help="Continue this chat.")] = None,
    knap_uuid: Annotated[str | None, typer.Option("--knap", help="Run this pre-configured Knap.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="use_smart_cache: false.")] = False,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """Run a Knap and print its events as they stream (the answer as it is written, tool calls on their own line);
    exit 1 when the run ended with an error."""
    from kneo_client.cli import err, out

    failed = False

    async def go(client: Any) -> None:
        nonlocal failed
        async for ev in client.knap_run(
            message, tool or [], chat_id=chat_id, use_smart_cache=not no_cache, knap_tool_uuid=knap_uuid
        ):
            if as_json:  # JSON lines: one event per line, flushed as it comes
                sys.stdout.write(orjson.dumps(ev).decode() + "\n")
                sys.stdout.flush()
                failed = failed or ev.get("type") == "error"
                continue
            kind = ev.get("type")
            if kind == "message_chunk":
                out.print(ev["content"], end="")
            elif kind == "tool_execution":
                out.print(f"[dim]→ {ev['tool_name']} {ev['status']}[/dim]")
            elif kind == "tool_result":
                tag = " (cached)" if ev.get("cached") else ""
                tag += " failed" if ev.get("error") else ""
                out.print(f"[dim]← {ev['tool_name']}{tag}[/dim]")
            elif kind == "error":
                failed = True
                err.print(f"kneo: {ev.get('error')}")
            elif kind == "done":
                out.print()
                out.print(f"[dim]chat {ev['chatId']}  message {ev['messageId']}[/dim]")
        if failed:
            raise typer.Exit(1)

    asyncio.run(with_client(connection(service_url, profile), go))


@knap_app.command("chat")
def knap_chat(chat_id: str, as_json: AsJson = False, service_url: ServiceUrl = None, profile: Profile = None) -> None:
    """Show a chat's transcript."""
    from kneo_client.cli import _print_json, out

    chat = call(service_url, profile, "knap_chat", chat_id)
    if as_json:
        _print_json(chat)
        return
    for m in chat["messages"]:
        text = m["content"] if m.get("content") is not None else f"(error: {m.get('error')})"
        out.print(f"[bold]{m['role']}[/bold]: {text}")


@knap_app.command("register")
def knap_register(
    name: str,
    tool: Tools = None,
    instructions: Annotated[str | None, typer.Option(help="The agent's instructions.")] = None,
    description: Annotated[str | None, typer.Option(help="What the Knap is for.")] = None,
    as_json: AsJson = False,
    service_url: ServiceUrl = None,
    profile: Profile = None,
) -> None:
    """Register a pre-configured Knap; prints its uuid (run it with `kneo knap run --knap <uuid>`)."""
    from kneo_client.cli import _print_json, out

    made = call(service_url, profile, "register_knap", name, tool or [], instructions, description)
    if as_json:
        _print_json(made)
    else:
        out.print(made["knap_uuid"])


@knap_app.command("list")
def knap_list(as_json: AsJson = False, service_url: ServiceUrl = None, profile: Profile = None) -> None:
    """List the registered Knaps."""
    from kneo_client.cli import _print_json, out

    page = call(service_url, profile, "list_knaps")
    if as_json:
        _print_json(page)
        return
    from kneo_client.remote import table as make_table

    table = make_table("knap_uuid", "name", "tools", "created_at")
    for k in page["knaps"]:
        table.add_row(
            k["knap_uuid"], k["name"], ", ".join(t["tool_type"] for t in k.get("tool_types", [])), k["created_at"]
        )
    out.print(table)


@knap_app.command("show")
def knap_show(knap_uuid: str, as_json: AsJson = False, service_url: ServiceUrl = None, profile: Profile = None) -> None:
    """Show one registered Knap."""
    from kneo_client.cli import _print_json

    _print_json(call(service_url, profile, "get_knap", knap_uuid))


@knap_app.command("delete")
def knap_delete(
    knap_uuid: str, as_json: AsJson = False, service_url: ServiceUrl = None, profile: Profile = None
) -> None:
    """Delete a registered Knap."""
    from kneo_client.cli import _print_json, out

    body = call(service_url, profile, "delete_knap", knap_uuid)
    if as_json:
        _print_json(body)
    else:
        out.print(f"deleted {knap_uuid}")
