"""Runs: create, get, list, history, live stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from kneo_events.errors import ConcurrencyConflict, InvalidRequest, InvalidState, NotFound, PayloadTooLarge
from kneo_events.ids import new_run_id, run_stream
from kneo_events.projections import TERMINAL_STATUSES
from kneo_events.redaction import redact, redact_text
from kneo_events.schemas import (
    Command,
    HumanCancelled,
    NewEvent,
    RunCancelled,
    RunCreated,
    compile_run_command,
    dumps,
    new_event,
)
from kneo_gateway.auth import Principal, require
from kneo_gateway.idempotency import request_hash, validate_key
from kneo_gateway.paging import page_params
from kneo_gateway.responses import JSONBody
from kneo_gateway.runs_io import RunBody, RunRequest, run_body, run_view
from kneo_gateway.spec_source import load_spec
from kneo_gateway.state import Gateway

router = APIRouter(tags=["runs"])

SORT_FIELDS = ("created_at", "updated_at", "status", "run_id")
_STOP_TYPES = frozenset({"run.succeeded", "run.failed", "run.cancelled", "run.expired", "run.timed_out"})
_SETTLE_TYPES = _STOP_TYPES | {"human.requested"}  # what a sync request waits for (the run is done or paused)


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


@router.post("/runs", response_model=RunBody, responses={202: {"model": RunBody}})
async def create_run(
    body: RunRequest,
    request: Request,
    principal: Annotated[Principal, Depends(require("runs:write"))],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONBody:
    """Start a run. Sync mode waits (bounded) for a terminal or paused state: 200; async mode answers 202.

    With an ``Idempotency-Key``, a repeat of the same request replays the first response and starts nothing.
    """
    return await start_run(request, body, principal, idempotency_key, route="POST /runs")


async def start_run(
    request: Request, body: RunRequest, principal: Principal, idempotency_key: str | None, route: str
) -> JSONBody:
    """Validate, then start a run (once per Idempotency-Key and ``route``)."""
    gw = _gw(request)
    s = gw.settings
    if body.input is not None and len(body.input) > s.max_input_chars:
        raise PayloadTooLarge(f"input exceeds {s.max_input_chars} characters", field="input", limit=s.max_input_chars)
    if body.metadata is not None and len(dumps(body.metadata)) > s.max_metadata_bytes:
        raise PayloadTooLarge(
            f"metadata exceeds {s.max_metadata_bytes} bytes", field="metadata", limit=s.max_metadata_bytes
        )
    spec, spec_path = await load_spec(gw, body.spec, body.spec_path)
    start = RunStart(gw, request, body, spec, spec_path, principal.name)
    start.route = route  # recorded in run.created's metadata (the audit log tells spec-run from POST /runs)
    return await once(
        request,
        principal,
        idempotency_key,
        route,
        body.model_dump(mode="json"),
        new_run_id,
        start.run,
        start.settled_answer,
    )


Answer = tuple[int, dict[str, Any]]


async def once(
    request: Request,
    principal: Principal,
    idempotency_key: str | None,
    route: str,
    fingerprint: Any,
    new_id: Callable[[], str],
    start: Callable[[str], Awaitable[Answer]],
    settled: Callable[[], Awaitable[Answer | None]],
) -> JSONBody:
    """Start something once per ``Idempotency-Key`` (per key and ``route``): the first request's answer is replayed.

    ``fingerprint`` identifies the request (the same key with another request is a conflict); ``new_id`` makes the
    resource id claimed with the key; ``start(id)`` starts it and gives the answer; ``settled()`` is asked when the
    request failed or was cut off: the answer to keep for the key if the resource exists after all (else the claim
    is dropped). Shared by the runs, spec-run and Jobs routes.
    """
    gw = _gw(request)
    if idempotency_key is None:
        status, out = await start(new_id())
        return JSONBody(out, status_code=status)
    key = validate_key(idempotency_key)
    claim = await gw.idempotency.claim(
        principal.name, route, key, request_hash(fingerprint), new_id(), gw.settings.sync_wait_seconds + 5
    )
    if claim.replay is not None:
        request.state.run_id = claim.resource_id
        return JSONBody(claim.replay[1], status_code=claim.replay[0], headers={"Idempotent-Replayed": "true"})
    assert claim.resource_id is not None
    try:
        status, out = await start(claim.resource_id)
    except BaseException:

        async def settle() -> None:
            answer = await settled()
            if answer is None:
                await gw.idempotency.release(principal.name, route, key)
            else:
                await gw.idempotency.complete(principal.name, route, key, *answer)

        await asyncio.shield(settle())
        raise
    await gw.idempotency.complete(principal.name, route, key, status, out)
    return JSONBody(out, status_code=status)


class RunStart:
    """Append ``run.created`` (+ ``compile_run``) for a validated request and answer as the mode asks."""

    def __init__(
        self, gw: Gateway, request: Request, body: RunRequest, spec: dict[str, Any], spec_path: str | None, actor: str
    ) -> None:
        self.gw, self.request, self.body, self.spec, self.spec_path, self.actor = (
            gw,
            request,
            body,
            spec,
            spec_path,
            actor,
        )
        self.run_id: str | None = None
        self.created = False
        self.route = "POST /runs"  # recorded in run.created's metadata (the audit log tells the routes apart)
        self.face = "kneo"  # which face started it: kneo, jobs, knap

    def _first_append(self, run_id: str) -> tuple[str, list[NewEvent], Command]:
        """``run.created`` and the ``compile_run`` command of a new run."""
        body = self.body
        self.run_id = run_id
        self.request.state.run_id = run_id
        stream_id = run_stream(run_id)
        rid = self.request.state.request_id
        meta = {"request_id": rid, "correlation_id": run_id, "actor": self.actor, "route": self.route}
        created = RunCreated(
            run_id=run_id,
            input=body.input,
            spec=self.spec,
            spec_path=self.spec_path,
            target=body.target,
            environment=body.environment,
            async_mode=body.async_mode,
            metadata=body.metadata or {},
            timeout_seconds=body.timeout_seconds,
            face=self.face,
        )
        cmd = compile_run_command(run_id, stream_id, {"request_id": rid, "actor": self.actor})
        return stream_id, [new_event(created, meta)], cmd

    async def append(self, run_id: str, *, compile_now: bool = True) -> None:
        """Start the run and return at once (the caller follows it itself, e.g. with ``gw.hub.listen``).

        ``compile_now=False`` records the run without its ``compile_run`` command: the caller starts it later (a
        held job continuation, kneo_events.sandboxes).
        """
        stream_id, events, cmd = self._first_append(run_id)
        await self.gw.kernel.commit(stream_id, events, 0, None, [cmd] if compile_now else [], prior_state=None)
        self.created = True

    async def run(self, run_id: str) -> tuple[int, dict[str, Any]]:
        gw, body = self.gw, self.body
        stream_id, events, cmd = self._first_append(run_id)
        with gw.hub.wait_for(run_id, _SETTLE_TYPES) as listener:
            try:
                result = await gw.kernel.commit(stream_id, events, 0, None, [cmd], prior_state=None)
            except ConcurrencyConflict:
                # Only a taken-over idempotency claim reuses a run id: that run exists already.
                self.created = True
                state = await gw.kernel.store.get_run(run_id)
                assert state is not None
                return (200 if _settled(state) else 202), run_body(state)
            self.created = True
            if body.async_mode:
                state = await gw.kernel.store.get_run(run_id)
                return 202, run_body(state or {"run_id": run_id, "status": "queued"})
            settled = await _wait_settled(gw, run_id, listener, result.version, gw.settings.sync_wait_seconds)
        state = await gw.kernel.store.get_run(run_id)
        assert state is not None
        return (200 if (settled or _settled(state)) else 202), run_body(state)

    async def settle_claim(self, route: str, key: str) -> None:
        """The request failed or was cut off: keep the claim if a run exists (answer = its state), else drop it."""
        answer = await self.settled_answer()
        if answer is None:
            await self.gw.idempotency.release(self.actor, route, key)
        else:
            await self.gw.idempotency.complete(self.actor, route, key, *answer)

    async def settled_answer(self) -> Answer | None:
        """The request failed or was cut off: the answer to keep for its key if the run exists (else None)."""
        if self.run_id is None:
            return None
        state = await self.gw.kernel.store.get_run(self.run_id)  # even when the commit raised: it may have committed
        return None if state is None else ((200 if _settled(state) else 202), run_body(state))


def _settled(state: dict[str, Any]) -> bool:
    return state["status"] in TERMINAL_STATUSES or state["status"] == "paused"


async def _wait_settled(gw: Gateway, run_id: str, listener: Any, version: int, timeout: float) -> bool:
    """Wait for a terminal (or paused) event of the run; look at the projection each quiet second as a safety net."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            async with asyncio.timeout(min(1.0, deadline - loop.time())):
                await listener.queue.get()  # the listener only delivers settling events
            return True
        except TimeoutError:
            state = await gw.kernel.store.get_run(run_id)
            if state and (state["status"] in TERMINAL_STATUSES or state["status"] == "paused"):
                return True
    return False


@router.get("/runs", dependencies=[Depends(require("runs:read"))])
async def list_runs(
    request: Request,
    status: str | None = None,
    limit: Annotated[int, Query()] = 20,
    offset: Annotated[int, Query()] = 0,
    sort_by: str = "created_at",
    sort_order: str = "desc",
) -> JSONBody:
    """A page of runs, newest first by default; ``limit`` is clamped to ``KNEO_SERV_MAX_LIST_ITEMS``."""
    gw = _gw(request)
    limit = page_params(limit, offset, sort_by, sort_order, SORT_FIELDS, gw.settings.max_list_items)
    runs, total = await gw.kernel.store.list_runs(
        status=status, limit=limit, offset=offset, sort_by=sort_by, sort_order=sort_order
    )
    items = [
        {
            "run_id": r["run_id"],
            "status": r["status"],
            "workflow_name": r.get("workflow_name"),
            "workflow_kind": r.get("workflow_kind"),
            "face": r.get("face", "kneo"),
            "created_at": r.get("created_at"),
            "updated_at": r.get("updated_at"),
        }
        for r in runs
    ]
    return JSONBody(
        {
            "runs": items,
            "count": len(items),
            "total": total,
            "limit": limit,
            "offset": offset,
            "sort_by": sort_by,
            "sort_order": sort_order,
        }
    )


async def _state_or_404(gw: Gateway, run_id: str) -> dict[str, Any]:
    state = await gw.kernel.store.get_run(run_id)
    if state is None:
        raise NotFound(f"run {run_id} not found", run_id=run_id)
    return state


@router.get("/runs/{run_id}", dependencies=[Depends(require("runs:read"))])
async def get_run(run_id: str, request: Request) -> JSONBody:
    """The run's current state (from the inline projection: a GET right after a POST sees it)."""
    gw = _gw(request)
    request.state.run_id = run_id
    return JSONBody(run_view(await _state_or_404(gw, run_id)))


class CancelRequest(BaseModel):
    """``POST /v1/runs/{run_id}/cancel`` (the body is optional)."""

    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=1000)


@router.post("/runs/{run_id}/cancel")
async def cancel_run(
    run_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("runs:write"))],
    body: Annotated[CancelRequest | None, Body()] = None,
) -> JSONBody:
    """Cancel a queued or running run (a step in flight stops at its next chunk and records nothing).

    The cancellation is an event appended at the run's current version, so a late completion can never overwrite
    it. A finished run answers 409 ``invalid_state`` and nothing changes.
    """
    gw = _gw(request)
    request.state.run_id = run_id
    meta = {"request_id": request.state.request_id, "correlation_id": run_id, "actor": principal.name}
    for _ in range(10):
        state = await _state_or_404(gw, run_id)
        if state["status"] in TERMINAL_STATUSES:
            raise InvalidState(
                f"run {run_id} is already {state['status']}; only queued, running or paused runs can be cancelled",
                run_id=run_id,
                status=state["status"],
            )
        event = RunCancelled(reason=(body.reason if body else None) or f"cancelled by {principal.name}")
        events = [new_event(event, meta)]
        awaiting = state.get("awaiting_human")
        if state["status"] == "paused" and isinstance(awaiting, dict):  # close its human task too
            events.insert(
                0,
                new_event(
                    HumanCancelled(continuation_id=awaiting["continuation_id"], request_id=awaiting["request_id"]), meta
                ),
            )
        try:
            await gw.kernel.commit(run_stream(run_id), events, int(state["version"]), prior_state=state)
        except ConcurrencyConflict:
            continue  # the run moved on (a step finished): look again
        cancelled = await gw.kernel.store.get_run(run_id)
        assert cancelled is not None
        return JSONBody(run_body(cancelled))
    raise ConcurrencyConflict(f"run {run_id} kept changing; try the cancel again", run_id=run_id)


@router.get("/runs/{run_id}/events", dependencies=[Depends(require("runs:read"))])
async def run_events(
    run_id: str, request: Request, from_version: Annotated[int, Query(ge=1, le=2**31 - 1)] = 1
) -> JSONBody:
    """The run's stored event history, in order."""
    gw = _gw(request)
    await _state_or_404(gw, run_id)
    events = await gw.kernel.store.read_stream(run_stream(run_id), from_version)
    return JSONBody({"run_id": run_id, "events": [redact(e.wire()) for e in events], "count": len(events)})


def _parse_last_event_id(raw: str | None) -> tuple[int, int]:
    if not raw:
        return 0, -1
    version, _, chunk = raw.partition(".")
    try:
        parsed = int(version), int(chunk) if chunk else -1
    except ValueError:
        raise InvalidRequest("Last-Event-ID must look like <version> or <version>.<chunk>") from None
    if not (0 <= parsed[0] < 2**31 - 1 and -1 <= parsed[1] < 2**31):
        raise InvalidRequest("Last-Event-ID is out of range")
    return parsed


def _event_sse(ev: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=dumps(redact(ev)).decode(), event=ev["type"], id=str(ev["version"]))


@router.get(
    "/runs/{run_id}/stream",
    dependencies=[Depends(require("runs:read", allow_query_token=True))],
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "SSE"}},
)
async def stream_run(
    run_id: str,
    request: Request,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    """SSE: the run's stored history, then live events and output chunks; ends after the terminal event.

    ``id:`` is the event's stream version, or ``<version>.<chunk>`` for an output chunk; reconnect with
    ``Last-Event-ID`` to resume with no gap and no duplicate event.
    """
    gw = _gw(request)
    await _state_or_404(gw, run_id)
    start_version, start_chunk = _parse_last_event_id(last_event_id)
    return EventSourceResponse(
        _run_stream(gw, run_id, start_version, start_chunk),
        ping=gw.settings.sse_heartbeat_seconds,
        send_timeout=30,
    )


class _Cursor:
    """Where one SSE client is: the last event version sent and, per step in flight, its execution and last chunk."""

    def __init__(self, version: int, chunk: int) -> None:
        self.version = version
        self.chunk = chunk  # a resumed client's last chunk (applies to the first execution seen at that version)
        self.steps: dict[str, tuple[str | None, int]] = {}
        self.done = False

    def event(self, wire: dict[str, Any]) -> ServerSentEvent:
        self.version, self.chunk, self.steps = int(wire["version"]), -1, {}
        self.done = wire["type"] in _STOP_TYPES
        return _event_sse(wire)


async def _run_stream(gw: Gateway, run_id: str, last_version: int, last_chunk: int) -> AsyncIterator[ServerSentEvent]:
    stream_id = run_stream(run_id)
    store = gw.kernel.store
    cur = _Cursor(last_version, last_chunk)
    idle_check = max(1.0, min(5.0, gw.settings.sse_heartbeat_seconds))

    async def from_log(upto: int | None = None) -> list[ServerSentEvent]:
        """Events after the cursor from the log (the truth), up to ``upto``; stops after a terminal one."""
        out: list[ServerSentEvent] = []
        for ev in await store.read_stream(stream_id, cur.version + 1):
            if (upto is not None and ev.version > upto) or cur.done:
                break
            out.append(cur.event(ev.wire()))
        return out

    async with gw.hub.listen(run_id) as listener:  # listen first, then read history: nothing falls in between
        for sse in await from_log():
            yield sse
        if not cur.done:
            state = await store.get_run(run_id)
            if state is not None and state["status"] in TERMINAL_STATUSES and int(state["version"]) <= cur.version:
                return  # resumed after the end (e.g. Last-Event-ID = the terminal event): nothing more will come
        while not cur.done:
            if listener.lagged:
                listener.lagged = False
                while not listener.queue.empty():
                    listener.queue.get_nowait()
                for sse in await from_log():
                    yield sse
                yield ServerSentEvent(event="lagged", data='{"reason": "client too slow; output chunks skipped"}')
                continue
            try:
                async with asyncio.timeout(idle_check):
                    kind, item = await listener.queue.get()
            except TimeoutError:
                # Quiet for a while: make sure no event was missed live (e.g. during a NATS reconnect).
                for sse in await from_log():
                    yield sse
                continue
            if kind == "event":
                version = int(item["version"])
                if version <= cur.version:
                    continue
                if version > cur.version + 1:  # out of order, or a publish is late: fill the gap from the log
                    for sse in await from_log(version):
                        yield sse
                    continue
                yield cur.event(item)
                continue
            after, seq, execution = int(item["after_version"]), int(item["seq"]), item.get("execution")
            step_id = str(item.get("step_id"))
            if after > cur.version:
                # The chunk outran the event it follows (another process published it): that event is committed.
                for sse in await from_log(after):
                    yield sse
            if after != cur.version or cur.done:
                continue
            known = cur.steps.get(step_id)
            # A different execution of a step already streaming here means it restarted (a retry's delayed
            # redelivery does not count: only a change of execution does).
            restarted = known is not None and known[0] != execution
            if restarted:
                # A new execution of the step: it was redelivered (runner crash) and streams again from chunk 0.
                cur.steps[step_id] = (execution, -1)
                yield ServerSentEvent(
                    event="step.restarted",
                    data=dumps({"step_id": item["step_id"], "delivery": item.get("delivery")}).decode(),
                )
            elif known is None:
                cur.steps[step_id] = (execution, cur.chunk)
            if seq <= cur.steps[step_id][1]:
                continue
            cur.steps[step_id] = (execution, seq)
            if "tool" in item:  # a tool call running / finished inside the step (redacted by the runner)
                yield ServerSentEvent(data=dumps(item).decode(), event="tool", id=f"{after}.{seq}")
                continue
            yield ServerSentEvent(
                data=dumps({**item, "text": redact_text(str(item.get("text", "")))}).decode(),
                event="output",
                id=f"{after}.{seq}",
            )
