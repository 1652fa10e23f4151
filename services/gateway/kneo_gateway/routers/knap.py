"""The Knap face (seeds/003): ``POST /api/knap-tools/run`` streamed as the seed's SSE events, chats, Knaps.

Errors here are ``{"detail": ...}`` (400 for validation, 401 ``Not authenticated``, 404); see errors.py.
Scopes: running and registering need ``runs:write``; reading chats and Knaps ``runs:read``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from kneo_events.errors import InvalidRequest, NotFound, PayloadTooLarge
from kneo_events.ids import new_run_id
from kneo_events.projections import TERMINAL_STATUSES
from kneo_events.redaction import redact, redact_text
from kneo_events.schemas import KnapDeleted, KnapRegistered, dumps, new_event
from kneo_gateway import knap
from kneo_gateway.auth import Principal, require
from kneo_gateway.responses import JSONBody
from kneo_gateway.routers.runs import RunStart
from kneo_gateway.runs_io import RunRequest
from kneo_gateway.state import Gateway


class KnapError(BaseModel):
    """The Knap-face error envelope."""

    detail: str


_E = {"model": KnapError}
KNAP_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_E, "description": "invalid request parameters, unknown tool_type"},
    401: {**_E, "description": "Not authenticated"},
    403: {**_E, "description": "the key lacks the scope"},
    404: {**_E, "description": "unknown chat or Knap"},
    413: {**_E, "description": "messages too large"},
    429: {**_E, "description": "rate limited"},
    500: {**_E, "description": "internal error"},
}
router = APIRouter(tags=["knap"], responses=KNAP_ERRORS)
_FAILED = frozenset({"run.failed", "run.cancelled", "run.timed_out", "run.expired"})
_IDLE_CHECK_SECONDS = 2.0
_TAIL_WAIT_SECONDS = 0.5  # at most this long for output items still on their way at the run's end …
_TAIL_QUIET_SECONDS = 0.05  # … and no longer than this after the last one
_PING_SECONDS = 15.0


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant", "system"]
    content: str


class ToolType(BaseModel):
    """A connector the agent may use."""

    model_config = ConfigDict(extra="ignore")
    tool_type: str = Field(min_length=1, max_length=100)
    tool_description: str | None = Field(default=None, max_length=2000)


class KnapRunRequest(BaseModel):
    """``POST /api/knap-tools/run``."""

    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1)
    tool_types: list[ToolType]
    stream_updates: bool = True
    chat_id: str | None = Field(default=None, max_length=100)
    use_smart_cache: bool = True
    knap_tool_uuid: str | None = Field(default=None, max_length=100)


class KnapDefinition(BaseModel):
    """``POST /api/knaps``: a pre-configured Knap."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    instructions: str | None = Field(default=None, max_length=20_000)
    tool_types: list[ToolType] = Field(default_factory=list)


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def _connectors(gw: Gateway) -> dict[str, Any]:
    if gw.knap_connectors is None:
        gw.knap_connectors = knap.load_connectors(gw.settings)
    return gw.knap_connectors


async def _knap_row(gw: Gateway, knap_uuid: str) -> Any:
    row = await gw.kernel.store.pool.fetchrow(
        "SELECT knap_uuid, name, definition, created_by, created_at FROM knaps "
        "WHERE knap_uuid = $1 AND deleted_at IS NULL",
        knap_uuid,
    )
    if row is None:
        raise NotFound(f"Knap {knap_uuid} not found")
    return row


async def _chat_states(gw: Gateway, chat_id: str) -> list[dict[str, Any]]:
    rows = await gw.kernel.store.pool.fetch(
        "SELECT state FROM runs WHERE face = 'knap' AND state->'metadata'->'knap'->>'chat_id' = $1 ORDER BY created_at",
        chat_id,
    )
    return [dict(r["state"]) for r in rows]


def _sse(event: dict[str, Any]) -> bytes:
    """One event as the seed's clients parse it: a single ``data:`` line, then a blank line."""
    return b"data: " + dumps(event) + b"\n\n"


@router.post("/api/knap-tools/run", response_model=None)
async def run_knap(
    body: KnapRunRequest, request: Request, principal: Annotated[Principal, Depends(require("runs:write"))]
) -> StreamingResponse | JSONBody:
    """Run an agent with the named connectors; stream ``tool_execution`` / ``tool_result`` / ``message_chunk`` /
    ``done`` (``error`` then ``done`` on failure) as SSE ``data:`` lines, or one JSON body with
    ``stream_updates: false``. A client that disconnects doesn't stop the run: its answer is in the chat."""
    gw = _gw(request)
    s = gw.settings
    if len(body.messages) > s.knap_max_messages:
        raise InvalidRequest(f"at most {s.knap_max_messages} messages per request")
    if len(body.tool_types) > s.knap_max_tool_types:
        raise InvalidRequest(f"at most {s.knap_max_tool_types} tool_types per request")
    chars = sum(len(m.content) for m in body.messages)
    if chars > s.max_input_chars:
        raise PayloadTooLarge(f"messages exceed {s.max_input_chars} characters", field="messages")
    if body.messages[-1].role != "user":
        raise InvalidRequest("the last message must be the user's")
    connectors = _connectors(gw)
    instructions = None
    requested = [t.tool_type for t in body.tool_types]
    descriptions = {t.tool_type: t.tool_description or "" for t in body.tool_types}
    if body.knap_tool_uuid:
        row = await _knap_row(gw, body.knap_tool_uuid)
        definition = dict(row["definition"])
        instructions = definition.get("instructions")
        stored = [t["tool_type"] for t in definition.get("tool_types") or []]
        descriptions = {
            **{t["tool_type"]: t.get("tool_description") or "" for t in definition.get("tool_types") or []},
            **descriptions,
        }
        requested = [*stored, *requested]
    elif not body.tool_types:
        raise InvalidRequest("tool_types may be empty only with a knap_tool_uuid")
    tool_types = knap.resolve_tool_types(requested, connectors)
    history: list[dict[str, Any]] = []
    chat_id = body.chat_id
    if chat_id:
        states = await _chat_states(gw, chat_id)
        if not states:
            raise NotFound(f"chat {chat_id} not found")
        history = knap.history_messages(states)
    else:
        chat_id = knap.new_chat_id()
    messages = [m.model_dump() for m in body.messages]
    spec = knap.build_spec(tool_types, descriptions, connectors, knap.knap_model(s), instructions)
    run_request = RunRequest(
        input=knap.conversation_input(history, messages),
        spec=spec,
        async_mode=True,
        metadata={
            "knap": {
                "chat_id": chat_id,
                "messages": messages,
                "tool_types": tool_types,
                "smart_cache": body.use_smart_cache,
                "knap_tool_uuid": body.knap_tool_uuid,
            }
        },
    )
    start = RunStart(gw, request, run_request, spec, None, principal.name)
    start.route = "POST /api/knap-tools/run"
    start.face = "knap"
    run_id = new_run_id()
    if not body.stream_updates:
        return JSONBody(await _run_to_end(gw, start, run_id, chat_id))
    events = _stream(gw, start, run_id, chat_id)
    first = await anext(events)  # started (or refused) before the response begins
    return StreamingResponse(
        _prepend(first, events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Knap-Chat-Id": chat_id},
    )


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for item in rest:
        yield item


class _Translator:
    """Live run items → the seed's events (each tool call once per state; text as it comes)."""

    def __init__(self, run_id: str, chat_id: str) -> None:
        self.run_id, self.chat_id = run_id, chat_id
        self.message_id = knap.message_id(run_id)
        self.text: list[str] = []
        self.seen: set[tuple[str, str, int]] = set()
        self.tools: list[dict[str, Any]] = []
        self.started: set[str] = set()  # call ids whose tool_execution / tool_result went out
        self.resulted: set[str] = set()

    def chunk(self, item: dict[str, Any]) -> dict[str, Any] | None:
        key = (str(item.get("step_id")), str(item.get("execution")), int(item.get("seq", -1)))
        if key in self.seen:
            return None
        self.seen.add(key)
        tool = item.get("tool")
        if isinstance(tool, dict):
            call_id = str(tool.get("call_id"))
            if tool.get("status") == "running":
                if call_id in self.started:
                    return None
                self.started.add(call_id)
                return {
                    "type": "tool_execution",
                    "tool_name": tool.get("name"),
                    "status": "running",
                    "queryUuid": tool.get("call_id"),
                }
            if call_id in self.resulted:
                return None
            self.resulted.add(call_id)
            result = knap.tool_result_event(tool)
            self.tools.append(result)
            return result
        text = redact_text(str(item.get("text", "")))
        self.text.append(text)
        return {"type": "message_chunk", "content": text, "messageId": self.message_id}

    def backfill(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Tool calls the log has (``step.tool_called``) but the live items never brought (they are ephemeral and
        may arrive after the run's end): their events, from the stored record, in order."""
        out: list[dict[str, Any]] = []
        for c in calls:
            call_id = str(c.get("queryUuid"))
            if call_id not in self.started:
                self.started.add(call_id)
                out.append(
                    {"type": "tool_execution", "tool_name": c["tool_name"], "status": "running", "queryUuid": call_id}
                )
            if call_id not in self.resulted:
                self.resulted.add(call_id)
                result: Any = c.get("result")
                with contextlib.suppress(ValueError, TypeError):
                    result = orjson.loads(result)
                ev = knap.tool_result_event(
                    {
                        "name": c["tool_name"],
                        "call_id": call_id,
                        "result": result,
                        "ok": c.get("ok"),
                        "cached": c.get("cached"),
                    }
                )
                self.tools.append(ev)
                out.append(ev)
        return out

    def finish(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if state.get("status") == "succeeded":
            final = redact_text(state.get("output_text") or "")
            streamed = "".join(self.text)
            # chunks are ephemeral: if some were lost on the way (or none came), send what is missing
            if final != streamed and (not streamed or final.startswith(streamed)):
                rest = final[len(streamed) :]
                out.append({"type": "message_chunk", "content": rest, "messageId": self.message_id})
        else:
            out.append(
                {
                    "type": "error",
                    "error": state.get("error") or f"run {state.get('status')}",
                    "details": {"run_id": self.run_id, "status": state.get("status")},
                }
            )
        out.append({"type": "done", "messageId": self.message_id, "chatId": self.chat_id})
        return out


async def _stream(gw: Gateway, start: RunStart, run_id: str, chat_id: str) -> AsyncIterator[bytes]:
    t = _Translator(run_id, chat_id)
    store = gw.kernel.store
    async with gw.hub.listen(run_id) as listener:  # listening before the run exists: nothing is missed
        await start.append(run_id)
        yield b""  # the run is started: the response can begin
        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        while True:
            try:
                async with asyncio.timeout(_IDLE_CHECK_SECONDS):
                    kind, item = await listener.queue.get()
            except TimeoutError:
                state = await store.get_run(run_id)  # quiet: a missed terminal event must not hang the stream
                if state is not None and state["status"] in TERMINAL_STATUSES:
                    for ev in await _ending(gw, t, listener, run_id, state):
                        yield _sse(ev)
                    return
                if loop.time() - last_sent >= _PING_SECONDS:
                    last_sent = loop.time()
                    yield b": ping\n\n"
                continue
            if kind == "chunk":
                ev = t.chunk(item)
                if ev is not None:
                    last_sent = loop.time()
                    yield _sse(ev)
            elif item.get("type") == "run.succeeded" or item.get("type") in _FAILED:
                state = await store.get_run(run_id) or {"status": "failed", "error": "run state missing"}
                for ev in await _ending(gw, t, listener, run_id, state):
                    yield _sse(ev)
                return


async def _ending(
    gw: Gateway, t: _Translator, listener: Any, run_id: str, state: dict[str, Any]
) -> list[dict[str, Any]]:
    """The last events of a stream. Output items travel apart from events and may still be on their way when the
    run's end is known (in one process the commit is delivered at once): take what arrives within a moment, then
    fill in from the log any tool call that never came live, then the answer's missing tail, ``error``, ``done``."""
    out: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    until = loop.time() + _TAIL_WAIT_SECONDS
    while loop.time() < until:
        try:
            async with asyncio.timeout(_TAIL_QUIET_SECONDS):
                kind, item = await listener.queue.get()
        except TimeoutError:
            break
        if kind == "chunk" and (ev := t.chunk(item)) is not None:
            out.append(ev)
    out += t.backfill(await _tool_calls(gw, run_id))
    return out + t.finish(state)


async def _run_to_end(gw: Gateway, start: RunStart, run_id: str, chat_id: str) -> dict[str, Any]:
    """``stream_updates: false``: wait for the end (bounded by the sync wait) and answer one body."""
    t = _Translator(run_id, chat_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + gw.settings.sync_wait_seconds
    state: dict[str, Any] | None = None
    async with gw.hub.listen(run_id) as listener:
        await start.append(run_id)
        while loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(_IDLE_CHECK_SECONDS, max(0.01, deadline - loop.time()))):
                    kind, item = await listener.queue.get()
                    if kind == "chunk":
                        t.chunk(item)
                    continue
            state = await gw.kernel.store.get_run(run_id)
            if state is not None and state["status"] in TERMINAL_STATUSES:
                break
    state = state or await gw.kernel.store.get_run(run_id) or {"status": "queued"}
    tool_calls = await _tool_calls(gw, run_id)
    body: dict[str, Any] = {
        "type": "done" if state.get("status") in TERMINAL_STATUSES else "running",
        "messageId": t.message_id,
        "chatId": chat_id,
        "run_id": run_id,
        "status": state.get("status"),
        "message": state.get("output_text") if state.get("status") == "succeeded" else None,
        "tool_calls": tool_calls,
    }
    if state.get("status") in TERMINAL_STATUSES and state.get("status") != "succeeded":
        body["error"] = state.get("error")
    return body


async def _tool_calls(gw: Gateway, run_id: str) -> list[dict[str, Any]]:
    """The run's tool calls from the log (``step.tool_called``): name, arguments, result preview, cached."""
    from kneo_events.ids import run_stream

    events = await gw.kernel.store.read_stream(run_stream(run_id))
    return [
        {
            "tool_name": e.data.get("tool"),
            "queryUuid": e.data.get("call_id"),
            "arguments": e.data.get("arguments"),
            "result": e.data.get("result_preview"),
            "ok": e.data.get("ok"),
            "cached": bool(e.data.get("cached")),
        }
        for e in events
        if e.type == "step.tool_called"
    ]


@router.get("/api/knap-tools/chats/{chat_id}", dependencies=[Depends(require("runs:read"))])
async def get_chat(chat_id: str, request: Request) -> JSONBody:
    """A chat's transcript: the messages of each Knap run in it and the answers (beyond the seed)."""
    gw = _gw(request)
    states = await _chat_states(gw, chat_id)
    if not states:
        raise NotFound(f"chat {chat_id} not found")
    turns = knap.chat_turns(states)
    runs = [
        {
            "run_id": st["run_id"],
            "status": st.get("status"),
            "messageId": knap.message_id(st["run_id"]),
            "created_at": st.get("created_at"),
            "tool_calls": await _tool_calls(gw, st["run_id"]),
        }
        for st in states
    ]
    return JSONBody(redact({"chat_id": chat_id, "messages": turns, "runs": runs, "count": len(turns)}))


def _knap_body(row: Any) -> dict[str, Any]:
    return {
        "knap_uuid": row["knap_uuid"],
        "name": row["name"],
        **{k: v for k, v in dict(row["definition"]).items() if k != "name"},
        "created_by": row["created_by"],
        "created_at": row["created_at"].isoformat(),
    }


@router.post("/api/knaps", status_code=201)
async def register_knap(
    body: KnapDefinition, request: Request, principal: Annotated[Principal, Depends(require("runs:write"))]
) -> JSONBody:
    """Register a pre-configured Knap (its instructions and connectors); run it with ``knap_tool_uuid``."""
    gw = _gw(request)
    knap.resolve_tool_types([t.tool_type for t in body.tool_types], _connectors(gw))
    knap_uuid = knap.new_knap_uuid()
    definition = body.model_dump(exclude_none=True)
    meta = {"request_id": request.state.request_id, "actor": principal.name}
    event = KnapRegistered(knap_uuid=knap_uuid, name=body.name, definition=definition)
    await gw.kernel.commit(f"knap-{knap_uuid}", [new_event(event, meta)], 0)
    return JSONBody(_knap_body(await _knap_row(gw, knap_uuid)), status_code=201)


@router.get("/api/knaps", dependencies=[Depends(require("runs:read"))])
async def list_knaps(request: Request) -> JSONBody:
    """The registered Knaps, newest first."""
    gw = _gw(request)
    rows = await gw.kernel.store.pool.fetch(
        "SELECT knap_uuid, name, definition, created_by, created_at FROM knaps WHERE deleted_at IS NULL "
        "ORDER BY created_at DESC LIMIT $1",
        gw.settings.max_list_items,
    )
    knaps = [_knap_body(r) for r in rows]
    return JSONBody({"knaps": knaps, "count": len(knaps)})


@router.get("/api/knaps/{knap_uuid}", dependencies=[Depends(require("runs:read"))])
async def get_knap(knap_uuid: str, request: Request) -> JSONBody:
    """One registered Knap."""
    return JSONBody(_knap_body(await _knap_row(_gw(request), knap_uuid)))


@router.delete("/api/knaps/{knap_uuid}")
async def delete_knap(
    knap_uuid: str, request: Request, principal: Annotated[Principal, Depends(require("runs:write"))]
) -> JSONBody:
    """Delete a Knap (its runs stay; running it again is a 404)."""
    gw = _gw(request)
    await _knap_row(gw, knap_uuid)
    meta = {"request_id": request.state.request_id, "actor": principal.name}
    stream = f"knap-{knap_uuid}"
    version = await gw.kernel.store.stream_version(stream)
    await gw.kernel.commit(stream, [new_event(KnapDeleted(knap_uuid=knap_uuid), meta)], version)
    return JSONBody({"deleted": True, "knap_uuid": knap_uuid})
